"""Classical tracking: scilpy's ``scil_tracking_local`` on an fODF, the baseline of the quality benchmark.

The learned trackers are scored next to this baseline on the same subject and the same seeds. Seeds are
shared by position: ``seeds_from_mask`` draws exactly the positions that ``l2t_track_from_model`` /
``tt_track_from_model`` use for the same seeding mask, ``--rng_seed`` and ``--npv``/``--nt`` (it calls the
trackers' own ``SeedGenerator``), and ``run_scilpy_local_tracking`` hands them to scilpy through
``--in_custom_seeds``.

Conventions at the boundary: our seeds are vox/corner (voxel i spans [i, i+1)); scilpy reads custom seeds
in voxel space with CENTER origin (it tracks with an identity affine, voxel centres at integers), so 0.5 is
subtracted when the seed file is written. scilpy writes ``.trk`` streamlines in RASMM like every other
tractogram, and its ``--save_seeds`` data are vox/center, as ours.

Differences from our tracker that remain (scilpy's behaviour, not ours to change): ``--max_length`` bounds
each half of a streamline during tracking and streamlines longer than it in total are then dropped, not
truncated; the point that leaves the tracking mask is kept (as our default); a direction turning more than
``theta`` stops the streamline.
"""

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from trackflow.errors import TrackflowError
from trackflow.files import atomic_output, check_inputs, check_outputs
from trackflow.tracking.seeds import SeedGenerator, check_seed_counts, count_seeds

LOGGER = logging.getLogger(__name__)

SCILPY_LOCAL_TRACKING = "scil_tracking_local"
SCILPY_ALGOS = ("det", "prob")


@dataclass
class BaselineRun:
    """One scilpy tracking run.

    Attributes
    ----------
    tractogram : Path
        The written tractogram (RASMM, the fODF's header).
    n_seeds : int
        Seeds tracked (before scilpy's length filter).
    seconds : float
        Wall-clock time of the whole scilpy command, its 1-2 s of imports included.
    """

    tractogram: Path
    n_seeds: int
    seconds: float


def seeds_from_mask(seeding_mask, *, rng_seed: int, npv: int | None = None,
                    nt: int | None = None) -> np.ndarray:
    """The seed positions the learned trackers use for this mask, rng seed and seed count.

    Parameters
    ----------
    seeding_mask : path
        NIfTI mask; voxels > 0 are seeded (the same array as the hdf5 group the trackers read).
    rng_seed : int
        The trackers' ``--rng_seed``.
    npv, nt : int or None
        Seeds per mask voxel, or total seeds (at most one; neither means ``npv`` 1).

    Returns
    -------
    ndarray, float32, shape (S, 3)
        Seed positions, vox/corner, in seed-index order.
    """
    check_inputs([seeding_mask])
    check_seed_counts(npv, nt)
    mask = np.asanyarray(nib.load(seeding_mask).dataobj)
    n_seeds = count_seeds(mask, npv, nt)
    generator = SeedGenerator(mask, rng_seed)
    return generator.positions(torch.arange(n_seeds)).numpy()


def _scilpy_executable() -> str:
    # The venv's bin folder first: tests run as `.venv/bin/python -m pytest` without the venv on PATH.
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    executable = shutil.which(SCILPY_LOCAL_TRACKING, path=search_path)
    if executable is None:
        raise TrackflowError(f"{SCILPY_LOCAL_TRACKING} not found beside {sys.executable} nor on PATH "
                             "(is scilpy installed?)")
    return executable


def _failure_reason(stderr: str) -> str:
    """The last non-empty stderr line: scilpy's argparse error or the exception's message."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else "no error message"


def _checked_seeds(seeding_mask, npv, nt, seeds) -> tuple[np.ndarray | None, int]:
    """(explicit seeds as float64 [S, 3] or None, number of seeds), refusing anything but one seed option."""
    if sum(option is not None for option in (npv, nt, seeds)) != 1:
        raise TrackflowError("give exactly one of npv, nt or seeds")
    if seeds is None:
        return None, count_seeds(np.asanyarray(nib.load(seeding_mask).dataobj), npv, nt)
    seeds = np.asarray(seeds, dtype=np.float64)
    # scilpy squeezes the loaded array, so a single seed would become three scalars.
    if seeds.ndim != 2 or seeds.shape[1] != 3 or len(seeds) < 2:
        raise TrackflowError(f"seeds must be an (S, 3) array with S >= 2, got shape {seeds.shape}")
    return seeds, len(seeds)


def _run_scilpy(command: list[str]) -> float:
    """Run one scilpy command; its wall time in seconds, or its last error line as a TrackflowError."""
    LOGGER.info("running %s", " ".join(command))
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise TrackflowError(f"{SCILPY_LOCAL_TRACKING} failed (exit {completed.returncode}): "
                             f"{_failure_reason(completed.stderr)}")
    return time.perf_counter() - started


def run_scilpy_local_tracking(fodf, seeding_mask, tracking_mask, out, *, algo: str, step_size: float,
                              theta: float, npv: int | None = None, nt: int | None = None,
                              seeds: np.ndarray | None = None, min_length: float = 10.0,
                              max_length: float = 300.0, rng_seed: int = 0, sh_basis: str,
                              save_seeds: bool = False, overwrite: bool = False) -> BaselineRun:
    """Track with ``scil_tracking_local`` (CPU) and write ``out`` atomically.

    Parameters
    ----------
    fodf : path
        SH coefficients, [X, Y, Z, F], isotropic voxels.
    seeding_mask : path
        Seeding mask on the fODF's grid (used by scilpy for ``npv``/``nt`` seeding; checked either way).
    tracking_mask : path
        Tracking stops at the first point outside it (that point is kept).
    out : path
        ``.trk`` (scilpy 2.3 maps ``.tck`` points with the transposed affine, wrong for oblique grids,
        and refuses ``.trx``).
    algo : {'det', 'prob'}
        Peak of the fODF, or a direction drawn from it, within the ``theta`` cone.
    step_size : float
        mm.
    theta : float
        Largest angle (degrees) between consecutive steps.
    npv, nt : int or None
        Seeds per seeding-mask voxel, or in total, drawn by scilpy with ``rng_seed``.
    seeds : ndarray, shape (S, 3), S >= 2, or None
        Explicit seed positions, vox/corner (e.g. ``seeds_from_mask``). Exactly one of ``npv``, ``nt``,
        ``seeds`` must be given.
    min_length, max_length : float
        mm; see the module docstring for how scilpy applies ``max_length``.
    rng_seed : int
        scilpy's ``--seed`` (seed positions when drawn by scilpy, and ``prob`` sampling).
    sh_basis : str
        SH basis of ``fodf``, scilpy 2.x name (the demo's ``descoteaux07``; a wrong one rotates lobes
        silently).
    save_seeds : bool
        Store each streamline's seed (vox/center) as per-streamline data ``seeds``.
    overwrite : bool
        Replace an existing ``out``.

    Returns
    -------
    BaselineRun
    """
    out = Path(out)
    check_inputs([fodf, seeding_mask, tracking_mask])
    check_outputs([out], overwrite, inputs=[fodf, seeding_mask, tracking_mask])
    if algo not in SCILPY_ALGOS:
        raise TrackflowError(f"algo must be one of {', '.join(SCILPY_ALGOS)}, got {algo!r}")
    if out.suffix.lower() != ".trk":
        raise TrackflowError(f"the baseline tractogram must be a .trk file, got {out}")
    seeds, n_seeds = _checked_seeds(seeding_mask, npv, nt, seeds)
    executable = _scilpy_executable()

    with tempfile.TemporaryDirectory(prefix="trackflow_seeds_") as seed_dir, \
            atomic_output(out, overwrite=overwrite) as tmp:
        command = [executable, str(fodf), str(seeding_mask), str(tracking_mask), str(tmp), "--algo", algo,
                   "--step", str(step_size), "--theta", str(theta), "--min_length", str(min_length),
                   "--max_length", str(max_length), "--sh_basis", sh_basis, "--seed", str(rng_seed)]
        if save_seeds:
            command.append("--save_seeds")
        if seeds is not None:
            seed_file = Path(seed_dir) / "seeds_vox_center.npy"
            np.save(seed_file, seeds - 0.5)  # vox/corner -> scilpy's vox/center
            command += ["--in_custom_seeds", str(seed_file)]
        else:
            command += ["--npv", str(npv)] if npv is not None else ["--nt", str(nt)]
        seconds = _run_scilpy(command)
    LOGGER.info("%s %s: %d seeds in %.1f s -> %s", SCILPY_LOCAL_TRACKING, algo, n_seeds, seconds, out)
    return BaselineRun(out, n_seeds, seconds)
