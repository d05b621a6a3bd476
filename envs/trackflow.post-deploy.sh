#!/usr/bin/env bash
# Snakemake runs this once after creating envs/trackflow.yaml (--sdm conda), inside the new env, from the
# working directory, which need not be the trackflow repository (a snakedeploy deployment, a module): it
# installs trackflow's console scripts from TRACKFLOW_SOURCE, which the workflow sets to its own source
# (workflow/rules/common.smk: the repository folder, or git+https://<host>/<owner>/<repo>@<ref> for a module
# taken from a git host). Set it beforehand to install from elsewhere (a wheel, a release).
set -euo pipefail
# The trackflow release this env is for: a new version changes this file, hence the env's hash, so Snakemake
# builds a new env instead of keeping the old trackflow (tests/test_deploy.py checks it against pyproject.toml).
version=0.1.0
if [ -z "${TRACKFLOW_SOURCE:-}" ]; then
    echo "trackflow.post-deploy.sh: TRACKFLOW_SOURCE is not set (run it through the trackflow workflow)" >&2
    exit 1
fi
python -m pip install --no-deps "$TRACKFLOW_SOURCE"
installed=$(python -c 'from importlib.metadata import version; print(version("trackflow"))')
if [ "$installed" != "$version" ]; then
    echo "trackflow.post-deploy.sh: $TRACKFLOW_SOURCE is trackflow $installed, this env is for $version" >&2
    exit 1
fi
