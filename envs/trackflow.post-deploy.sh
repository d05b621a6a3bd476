#!/usr/bin/env bash
# Snakemake runs this once after creating envs/trackflow.yaml, from the working directory, which must be
# the trackflow repository root (as in the README): installs trackflow's console scripts into the env.
set -euo pipefail
if [ ! -f pyproject.toml ] || ! grep -q '^name = "trackflow"' pyproject.toml; then
    echo "trackflow.post-deploy.sh: run snakemake from the trackflow repository root" >&2
    exit 1
fi
python -m pip install --no-deps .
