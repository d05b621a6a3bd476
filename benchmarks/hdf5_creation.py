"""Wall time and peak RSS of dwiml_create_hdf5_dataset for cohorts of 4 and 20 subjects.

Each subject has 96^3 volumes (T1, FA, an 8-feature fODF, a WM mask) and 20,000 streamlines.
The subject folders are symlinks to one generated set of files (as the dwi_ml docs recommend
for dwi_ml_ready folders), so generating a large cohort is cheap; every subject is still read,
standardized and written in full. Each cohort size runs in a fresh subprocess, whose own peak RSS
is read with os.wait4. Creation processes subjects one at a time, so the 20-subject peak should stay
within 1.2x of the 4-subject one.

Usage: python benchmarks/hdf5_creation.py [--sizes 4 20] [--workdir DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from dipy.io.stateful_tractogram import Origin, Space, StatefulTractogram
from dipy.io.streamline import save_tractogram

SHAPE = (96, 96, 96)
FODF_FEATURES = 8
N_STREAMLINES = 20_000
CONFIG = {
    "input": {"type": "volume", "files": ["anat/t1.nii", "dwi/fa.nii", "dwi/fodf.nii"],
              "standardization": "per_file", "std_mask": "masks/brain.nii"},
    "wm_mask": {"type": "volume", "files": "masks/wm.nii", "standardization": "none"},
    "streamlines": {"type": "streamlines", "files": "tractograms/*.trk"},
}


def write_template_subject(folder: Path, seed: int = 0) -> None:
    """One subject's files (uncompressed NIfTI: gzip would dominate the timing)."""
    rng = np.random.default_rng(seed)
    affine = np.diag([1.25, 1.25, 1.25, 1.0])
    brain = np.zeros(SHAPE, np.float32)
    brain[8:-8, 8:-8, 8:-8] = 1
    volumes = {"anat/t1.nii": rng.uniform(100, 900, SHAPE).astype(np.float32) * brain,
               "dwi/fa.nii": rng.uniform(0, 1, SHAPE).astype(np.float32),
               "dwi/fodf.nii": rng.normal(size=SHAPE + (FODF_FEATURES,)).astype(np.float32),
               "masks/brain.nii": brain,
               "masks/wm.nii": (rng.uniform(size=SHAPE) > 0.5).astype(np.float32)}
    for relative, data in volumes.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), folder / relative)
    # Random walks of 20-80 points inside the volume, in vox/corner.
    n_points = rng.integers(20, 81, N_STREAMLINES)
    starts = rng.uniform(20, 76, (N_STREAMLINES, 3))
    steps = rng.normal(scale=0.4, size=(n_points.sum(), 3))
    points = np.repeat(starts, n_points, axis=0) + np.cumsum(steps, axis=0)
    offsets = np.cumsum(n_points) - n_points
    points -= np.repeat(points[offsets] - starts, n_points, axis=0)  # restart each walk at its seed
    lines = np.split(np.clip(points, 0.5, 95.5).astype(np.float32), np.cumsum(n_points)[:-1])
    (folder / "tractograms").mkdir(exist_ok=True)
    sft = StatefulTractogram(lines, str(folder / "anat/t1.nii"), Space.VOX, origin=Origin.TRACKVIS)
    save_tractogram(sft, str(folder / "tractograms/bundle.trk"))


def make_cohort(workdir: Path, template: Path, n_subjects: int) -> dict:
    root = workdir / f"cohort_{n_subjects}"
    ready = root / "dwi_ml_ready"
    ready.mkdir(parents=True)
    subjects = [f"sub{i:03d}" for i in range(n_subjects)]
    for subject in subjects:
        (ready / subject).symlink_to(template, target_is_directory=True)
    (root / "config.json").write_text(json.dumps(CONFIG))
    (root / "train.txt").write_text("\n".join(subjects[:-1]))
    (root / "valid.txt").write_text(subjects[-1])
    (root / "test.txt").write_text("")
    return {"root": root, "args": [str(ready), str(root / "out.hdf5"), str(root / "config.json"),
                                   str(root / "train.txt"), str(root / "valid.txt"),
                                   str(root / "test.txt"), "--step_size", "1.0"]}


def run_creation(args: list[str]) -> tuple[float, float]:
    """Run the CLI in a fresh interpreter; return (wall seconds, peak RSS in MiB) of that child."""
    command = [sys.executable, "-c", "from trackflow.cli.create_hdf5_dataset import main; main()",
               *args]
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"creation failed with exit code {process.returncode}")
    return wall, usage.ru_maxrss / 1024  # Linux reports ru_maxrss in KiB


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 20])
    parser.add_argument("--workdir", type=Path, help="Kept after the run when given.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        template = workdir / "template_subject"
        write_template_subject(template)
        print(f"volumes {SHAPE}, {2 + FODF_FEATURES} input features + WM mask, "
              f"{N_STREAMLINES} streamlines per subject, --step_size 1.0")
        print(f"{'subjects':>8} {'wall (s)':>9} {'s/subject':>9} {'peak RSS (MiB)':>15} "
              f"{'hdf5 (MiB)':>11}")
        peaks = {}
        for n_subjects in args.sizes:
            cohort = make_cohort(workdir, template, n_subjects)
            wall, peak = run_creation(cohort["args"])
            size = (cohort["root"] / "out.hdf5").stat().st_size / 2**20
            peaks[n_subjects] = peak
            print(f"{n_subjects:>8} {wall:>9.1f} {wall / n_subjects:>9.2f} {peak:>15.0f} "
                  f"{size:>11.0f}", flush=True)
            (cohort["root"] / "out.hdf5").unlink()  # GBs of output are not worth keeping
        if len(peaks) > 1:
            small, large = min(peaks), max(peaks)
            print(f"peak RSS ratio {large} / {small} subjects: {peaks[large] / peaks[small]:.3f} "
                  "(target <= 1.2)")


if __name__ == "__main__":
    main()
