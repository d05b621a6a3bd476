"""The classical baselines (scilpy's local tracking, MRtrix3's tckgen) on a tiny demo subject, with our
trackers' seeds."""

import nibabel as nib
import numpy as np
import pytest
from dipy.io.stateful_tractogram import Origin
from dipy.io.streamline import load_tractogram

from trackflow.data.demo import SH_BASIS
from trackflow.errors import TrackflowError
from trackflow.evaluation.tractometer import score_tractogram_file
from trackflow.tracking.classical import (MRTRIX_ALGOS, run_mrtrix_tracking, run_scilpy_local_tracking,
                                         seeds_from_mask)

SUBJECT = "sub-01"
STEP_MM = 0.75
THETA_DEG = 45.0


@pytest.fixture(scope="module")
def subject(tiny_cohort):
    """Paths of one tiny demo subject (read only: the cohort is shared by the session)."""
    root = tiny_cohort / "dwi_ml_ready" / SUBJECT
    return {"fodf": root / "dwi" / f"{SUBJECT}__fodf.nii.gz",
            "interface": root / "other_masks" / f"{SUBJECT}__interface.nii.gz",
            "wm": root / "masks" / f"{SUBJECT}__mask_wm.nii.gz",
            "bundles": root / "bundles"}


def load_vox_corner(path, reference):
    sft = load_tractogram(str(path), str(reference), bbox_valid_check=False)
    sft.to_vox()
    sft.to_origin(Origin.TRACKVIS)
    return sft


def test_seeds_from_mask_cycle_through_every_mask_voxel(subject):
    mask = np.asanyarray(nib.load(subject["interface"]).dataobj) > 0
    seeds = seeds_from_mask(subject["interface"], rng_seed=5, npv=3)
    assert seeds.shape == (3 * mask.sum(), 3)
    voxels = np.floor(seeds).astype(int)
    assert mask[tuple(voxels.T)].all()
    # npv seeds in every mask voxel, exactly: the mask voxels are visited in turn.
    per_voxel = np.zeros(mask.shape, int)
    np.add.at(per_voxel, tuple(voxels.T), 1)
    assert (per_voxel[mask] == 3).all()
    np.testing.assert_array_equal(seeds, seeds_from_mask(subject["interface"], rng_seed=5, npv=3))
    assert not np.allclose(seeds, seeds_from_mask(subject["interface"], rng_seed=6, npv=3))
    assert len(seeds_from_mask(subject["interface"], rng_seed=5, nt=17)) == 17
    with pytest.raises(TrackflowError, match="not both"):
        seeds_from_mask(subject["interface"], rng_seed=5, npv=1, nt=17)


def test_prob_baseline_tracks_from_the_given_seeds_and_is_scored(subject, tmp_path):
    seeds = seeds_from_mask(subject["interface"], rng_seed=1, npv=2)
    out = tmp_path / "prob.trk"
    run = run_scilpy_local_tracking(subject["fodf"], subject["interface"], subject["wm"], out, algo="prob",
                                    step_size=STEP_MM, theta=THETA_DEG, seeds=seeds, min_length=5.0,
                                    max_length=200.0, rng_seed=0, save_seeds=True, sh_basis=SH_BASIS)
    assert run.tractogram == out and run.n_seeds == len(seeds) and run.seconds > 0
    sft = load_vox_corner(out, subject["fodf"])
    assert 0 < len(sft) <= len(seeds)

    # Every streamline starts from one of our seeds (scilpy stores them vox/center) and passes through it:
    # the corner/center conversions on the way in and out cancel.
    stored = sft.data_per_streamline["seeds"] + 0.5
    nearest_seed = np.linalg.norm(stored[:, None] - seeds[None], axis=2).min(axis=1)
    np.testing.assert_allclose(nearest_seed, 0.0, atol=1e-4)
    through_seed = [np.linalg.norm(s - seed, axis=1).min() for s, seed in zip(sft.streamlines, stored)]
    np.testing.assert_allclose(through_seed, 0.0, atol=1e-3)

    # Steps are STEP_MM long, and only the point that left the mask may lie outside it.
    voxel_mm = nib.load(subject["fodf"]).header.get_zooms()[0]
    steps = np.concatenate([np.linalg.norm(np.diff(s, axis=0), axis=1) for s in sft.streamlines])
    np.testing.assert_allclose(steps * voxel_mm, STEP_MM, rtol=1e-3)
    wm = np.asanyarray(nib.load(subject["wm"]).dataobj) > 0
    interior = np.concatenate([s[1:-1] for s in sft.streamlines])
    assert wm[tuple(np.floor(interior).astype(int).T)].all()
    lengths_mm = voxel_mm * np.array([np.linalg.norm(np.diff(s, axis=0), axis=1).sum()
                                      for s in sft.streamlines])
    assert lengths_mm.min() >= 5.0 - 1e-3

    metrics = score_tractogram_file(out, subject["bundles"])
    assert metrics["n_streamlines"] == len(sft)
    assert metrics["VB"] > 0 and metrics["VS"] > 0


def test_det_baseline_seeded_by_scilpy_is_scored_and_never_overwritten(subject, tmp_path):
    kwargs = dict(algo="det", step_size=STEP_MM, theta=THETA_DEG, nt=150, rng_seed=4, sh_basis=SH_BASIS)
    run = run_scilpy_local_tracking(subject["fodf"], subject["interface"], subject["wm"],
                                    tmp_path / "det.trk", **kwargs)
    assert run.n_seeds == 150
    metrics = score_tractogram_file(run.tractogram, subject["bundles"])
    assert metrics["VB"] > 0
    with pytest.raises(TrackflowError, match="already exists"):
        run_scilpy_local_tracking(subject["fodf"], subject["interface"], subject["wm"], run.tractogram,
                                  **kwargs)


def test_scilpy_failure_is_one_error_and_no_output(subject, tmp_path):
    # A tracking mask on another grid: scilpy refuses it.
    other_grid = tmp_path / "other_grid.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), np.eye(4)), other_grid)
    out = tmp_path / "never.trk"
    with pytest.raises(TrackflowError, match="scil_tracking_local failed"):
        run_scilpy_local_tracking(subject["fodf"], subject["interface"], other_grid, out, algo="prob",
                                  step_size=STEP_MM, theta=THETA_DEG, npv=1, sh_basis=SH_BASIS)
    assert list(tmp_path.iterdir()) == [other_grid]


@pytest.mark.parametrize("kwargs, message", [
    (dict(algo="prob", npv=1, nt=10), "exactly one of"),
    (dict(algo="prob"), "exactly one of"),
    (dict(algo="ptt", npv=1), "algo must be"),
    (dict(algo="prob", seeds=np.zeros((4, 2))), r"\(S, 3\)"),
    (dict(algo="prob", seeds=np.full((1, 3), 10.5)), "S >= 2"),
])
def test_bad_arguments_are_refused_before_running_scilpy(subject, tmp_path, kwargs, message):
    with pytest.raises(TrackflowError, match=message):
        run_scilpy_local_tracking(subject["fodf"], subject["interface"], subject["wm"], tmp_path / "x.trk",
                                  step_size=STEP_MM, theta=THETA_DEG, sh_basis=SH_BASIS, **kwargs)
    with pytest.raises(TrackflowError, match=r"\.trk"):
        run_scilpy_local_tracking(subject["fodf"], subject["interface"], subject["wm"], tmp_path / "x.tck",
                                  algo="prob", step_size=STEP_MM, theta=THETA_DEG, npv=1, sh_basis=SH_BASIS)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- MRtrix3 tckgen


@pytest.mark.slow  # 6-7 s each: scil_sh_convert's imports, then tckgen
@pytest.mark.parametrize("algo", MRTRIX_ALGOS)
def test_mrtrix_tracks_each_given_seed_once_and_is_scored(subject, tmp_path, algo):
    seeds = seeds_from_mask(subject["interface"], rng_seed=3, nt=80)
    out = tmp_path / f"{algo}.tck"
    run = run_mrtrix_tracking(subject["fodf"], subject["wm"], out, algo=algo, step_size=STEP_MM,
                              theta=THETA_DEG, seeds=seeds, min_length=5.0, max_length=200.0,
                              sh_basis=SH_BASIS)
    assert run.tractogram == out and run.n_seeds == 80
    streamlines = load_vox_corner(out, subject["fodf"]).streamlines
    assert len(streamlines) > 20
    # tckgen tracks both ways from the seed, which stays a point of the streamline: each streamline
    # passes through one of our seeds, and no seed gives two streamlines.
    used = [np.argmin(np.min(np.linalg.norm(s[:, None] - seeds[None], axis=2), axis=0)) for s in streamlines]
    distances = [np.min(np.linalg.norm(s - seeds[k], axis=1)) for s, k in zip(streamlines, used)]
    assert max(distances) < 1e-3 and len(set(used)) == len(used)
    lengths_mm = [1.5 * np.sum(np.linalg.norm(np.diff(s, axis=0), axis=1)) for s in streamlines]
    assert min(lengths_mm) >= 5.0 - STEP_MM
    metrics = score_tractogram_file(out, subject["bundles"])
    assert metrics["n_streamlines"] == len(streamlines) and metrics["VB"] >= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left


@pytest.mark.slow  # about 6 s: scil_sh_convert's imports
def test_mrtrix_failure_is_one_error_and_no_output(subject, tmp_path):
    # Five volumes are no SH order: the basis conversion refuses them.
    not_sh = tmp_path / "not_sh.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 5), np.float32), nib.load(subject["fodf"]).affine), not_sh)
    out = tmp_path / "never.tck"
    with pytest.raises(TrackflowError, match="scil_sh_convert failed"):
        run_mrtrix_tracking(not_sh, subject["wm"], out, algo="iFOD2", step_size=STEP_MM, theta=THETA_DEG,
                            seeds=np.full((2, 3), 10.5), sh_basis=SH_BASIS)
    assert list(tmp_path.iterdir()) == [not_sh]


@pytest.mark.parametrize("kwargs, out_name, message", [
    (dict(algo="FACT"), "x.tck", "algo must be"),
    (dict(algo="iFOD2"), "x.trk", r"\.tck"),
    (dict(algo="iFOD2", seeds=np.zeros((4, 2))), "x.tck", r"\(S, 3\)"),
])
def test_bad_arguments_are_refused_before_running_mrtrix(subject, tmp_path, kwargs, out_name, message):
    kwargs = dict(seeds=np.full((2, 3), 10.5)) | kwargs
    with pytest.raises(TrackflowError, match=message):
        run_mrtrix_tracking(subject["fodf"], subject["wm"], tmp_path / out_name, step_size=STEP_MM,
                            theta=THETA_DEG, sh_basis=SH_BASIS, **kwargs)
    assert not any(tmp_path.iterdir())
