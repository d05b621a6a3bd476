"""Classical tracking: scilpy's ``scil_tracking_local`` and MRtrix3's ``tckgen`` (iFOD2, SD_STREAM) on an
fODF, the baselines of the quality benchmark.

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

MRtrix3 (``run_mrtrix_tracking``) reads SH in its own basis (``tournier07``): the fODF is converted with
``scil_sh_convert`` first. tckgen 3.0 has no seed-list option; each seed becomes a finite seeder of its own
(``-seed_grid_per_voxel`` with grid size 1 on a 3x3x3 image whose one set voxel is centred on the seed: a
1x1x1 image gives no seed in tckgen 3.0.3), and tckgen uses finite seeders in turn, each seed once (with up to
``-max_attempts_per_seed`` initial directions, tckgen's default 1000). Its cut-off on the fODF amplitude is
tckgen's default (0.1): seeds below it count as invalid seed points and give no streamline.
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
MRTRIX_ALGOS = ("iFOD2", "SD_STREAM")
MRTRIX_SH_BASIS = "tournier07"
# Seeds per tckgen command: each takes 3 arguments, and the command line must stay well under ARG_MAX.
MRTRIX_SEEDS_PER_RUN = 5000


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


def _executable(name: str, package: str) -> str:
    # The venv's bin folder first: tests run as `.venv/bin/python -m pytest` without the venv on PATH.
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    executable = shutil.which(name, path=search_path)
    if executable is None:
        raise TrackflowError(f"{name} not found beside {sys.executable} nor on PATH (is {package} installed?)")
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


def _run_tool(command: list[str], cwd=None) -> float:
    """Run one external command; its wall time in seconds, or its last error line as a TrackflowError."""
    LOGGER.info("running %s", " ".join(command) if len(command) < 40 else f"{' '.join(command[:20])} ...")
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if completed.returncode != 0:
        raise TrackflowError(f"{Path(command[0]).name} failed (exit {completed.returncode}): "
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
    executable = _executable(SCILPY_LOCAL_TRACKING, "scilpy")

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
        seconds = _run_tool(command)
    LOGGER.info("%s %s: %d seeds in %.1f s -> %s", SCILPY_LOCAL_TRACKING, algo, n_seeds, seconds, out)
    return BaselineRun(out, n_seeds, seconds)


def _write_seed_images(seeds: np.ndarray, affine: np.ndarray, folder: Path) -> list[str]:
    """One 3x3x3 image per seed (vox/corner on ``affine``'s grid) whose centre voxel is centred on it; the
    images' names, relative to ``folder``."""
    centre_voxel = np.zeros((3, 3, 3), dtype=np.uint8)
    centre_voxel[1, 1, 1] = 1
    world = nib.affines.apply_affine(affine, seeds - 0.5)  # voxel centres are at integer vox/center
    names = []
    for k, position in enumerate(world):
        seed_affine = affine.copy()
        seed_affine[:3, 3] = position - affine[:3, :3] @ np.ones(3)  # voxel (1, 1, 1) at the seed
        nib.save(nib.Nifti1Image(centre_voxel, seed_affine), folder / f"{k}.nii")
        names.append(f"{k}.nii")
    return names


def run_mrtrix_tracking(fodf, tracking_mask, out, *, algo: str, step_size: float, theta: float,
                        seeds: np.ndarray, min_length: float = 10.0, max_length: float = 300.0,
                        sh_basis: str, nthreads: int = 2, overwrite: bool = False) -> BaselineRun:
    """Track with MRtrix3's ``tckgen`` from the given seeds (each once, both directions); write ``out``.

    Parameters
    ----------
    fodf : path
        SH coefficients, [X, Y, Z, F], in ``sh_basis`` (converted to ``tournier07`` with
        ``scil_sh_convert``).
    tracking_mask : path
        tckgen's ``-mask``: streamlines stop where they leave it.
    out : path
        ``.tck`` (RASMM), written atomically.
    algo : {'iFOD2', 'SD_STREAM'}
    step_size, theta, min_length, max_length : float
        mm, degrees (tckgen's ``-angle``: largest angle between steps), mm, mm.
    seeds : ndarray, shape (S, 3)
        Seed positions, vox/corner on the fODF's grid (e.g. ``seeds_from_mask``).
    nthreads : int
        tckgen's ``-nthreads``.

    Returns
    -------
    BaselineRun
        ``seconds`` counts tckgen only (the basis conversion and the seed images are set-up).
    """
    out = Path(out)
    check_inputs([fodf, tracking_mask])
    check_outputs([out], overwrite, inputs=[fodf, tracking_mask])
    if algo not in MRTRIX_ALGOS:
        raise TrackflowError(f"algo must be one of {', '.join(MRTRIX_ALGOS)}, got {algo!r}")
    if out.suffix.lower() != ".tck":
        raise TrackflowError(f"the MRtrix tractogram must be a .tck file, got {out}")
    seeds = np.asarray(seeds, dtype=np.float64)
    if seeds.ndim != 2 or seeds.shape[1] != 3 or len(seeds) < 1:
        raise TrackflowError(f"seeds must be an (S, 3) array with S >= 1, got shape {seeds.shape}")
    tckgen = _executable("tckgen", "MRtrix3")
    tckedit = _executable("tckedit", "MRtrix3")
    convert = _executable("scil_sh_convert", "scilpy")

    with tempfile.TemporaryDirectory(prefix="trackflow_mrtrix_") as work, \
            atomic_output(out, overwrite=overwrite) as tmp:
        work = Path(work)
        sh = work / "fodf_tournier07.nii.gz"
        _run_tool([convert, str(fodf), str(sh), sh_basis, MRTRIX_SH_BASIS])
        names = _write_seed_images(seeds, nib.load(fodf).affine, work)
        common = ["-algorithm", algo, "-step", str(step_size), "-angle", str(theta), "-minlength",
                  str(min_length), "-maxlength", str(max_length), "-mask", str(Path(tracking_mask).resolve()),
                  "-nthreads", str(nthreads), "-quiet", "-force"]
        parts, seconds = [], 0.0
        for start in range(0, len(names), MRTRIX_SEEDS_PER_RUN):
            seed_options = [option for name in names[start:start + MRTRIX_SEEDS_PER_RUN]
                            for option in ("-seed_grid_per_voxel", name, "1")]
            parts.append(work / f"part_{len(parts)}.tck")
            seconds += _run_tool([tckgen, str(sh), str(parts[-1]), *seed_options, *common], cwd=work)
        _run_tool([tckedit, *map(str, parts), str(tmp), "-quiet", "-force"])
    LOGGER.info("tckgen %s: %d seeds in %.1f s -> %s", algo, len(seeds), seconds, out)
    return BaselineRun(out, len(seeds), seconds)
