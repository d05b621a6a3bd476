#!/usr/bin/env bash
# Install dwi_ml (scil-vital/dwi_ml, commit a1ee02d4) as a side-by-side BASELINE for benchmarks/vs_dwi_ml.py.
# dwi_ml is never a dependency of trackflow: it goes into its own virtualenv, outside the repository.
# dwi_ml's own pins (torch 2.7.1, numpy 1.25, scilpy 2.1) no longer resolve, so its dependencies are resolved
# in one pip call against trackflow's constraints.txt, then dwi_ml itself is installed without dependencies,
# then apply_fixes.py makes the five small edits torch 2.13 needs. Safe to rerun: every step checks first.
#
#   DWI_ML_SRC   clone of dwi_ml (default /work/dwi_ml_src)
#   DWI_ML_ENV   its virtualenv (default /work/dwi_ml_env)
#   DWI_ML_REPO  where to clone it from (default the public GitHub repository)
#   PYTHON       interpreter for the venv (default python3.11)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
DWI_ML_SRC="${DWI_ML_SRC:-/work/dwi_ml_src}"
DWI_ML_ENV="${DWI_ML_ENV:-/work/dwi_ml_env}"
DWI_ML_REPO="${DWI_ML_REPO:-https://github.com/scil-vital/dwi_ml.git}"
DWI_ML_COMMIT=a1ee02d4
PYTHON="${PYTHON:-python3.11}"

if [ ! -d "$DWI_ML_SRC/.git" ] && [ ! -f "$DWI_ML_SRC/.git" ]; then
    git clone -q "$DWI_ML_REPO" "$DWI_ML_SRC"
fi
head="$(git -C "$DWI_ML_SRC" rev-parse --short=8 HEAD)"
if [ "$head" != "$DWI_ML_COMMIT" ]; then
    # The fixes are applied to the checkout: a checkout at another commit must not carry them along.
    git -C "$DWI_ML_SRC" checkout -q "$DWI_ML_COMMIT"
fi

test -x "$DWI_ML_ENV/bin/python" || "$PYTHON" -m venv "$DWI_ML_ENV"
pip=("$DWI_ML_ENV/bin/python" -m pip install -q)
if ! "$DWI_ML_ENV/bin/python" -c "import torch, scilpy, comet_ml, nested_lookup, pynvml" 2>/dev/null; then
    # One call, so that scilpy's pins and torch's CPU wheel are resolved together (bertviz, jupyter: only
    # for dwi_ml's attention-visualisation scripts, left out).
    nice -n 10 "${pip[@]}" -c "$repo_root/constraints.txt" \
        torch==2.13.0 scilpy==2.3.0 dipy==1.12.1 nibabel==5.3.3 h5py==3.12.1 numpy==1.26.4 \
        scipy matplotlib scikit-image tqdm future comet_ml nested_lookup==0.2.25 pynvml
fi
if [ ! -x "$DWI_ML_ENV/bin/l2t_train_model" ]; then
    # A second call: --no-deps applies to a whole call.
    nice -n 10 "${pip[@]}" --no-deps --no-build-isolation -e "$DWI_ML_SRC"
fi
"$DWI_ML_ENV/bin/python" "$here/apply_fixes.py" "$DWI_ML_SRC"
echo "dwi_ml $(git -C "$DWI_ML_SRC" rev-parse --short=8 HEAD) ready in $DWI_ML_ENV"
