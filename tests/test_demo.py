"""Tests of the synthetic demo cohort (trackflow.data.demo, trackflow_make_demo) on a tiny cohort."""

import functools
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dipy.data import get_sphere
from dipy.direction import peak_directions
from dipy.io.streamline import load_tractogram
from dipy.io.utils import is_header_compatible
from dipy.reconst.shm import sh_to_sf
from dipy.sims.voxel import multi_tensor
from scipy import ndimage

import trackflow.cli.make_demo as make_demo_cli
from trackflow.data import demo
from trackflow.data.demo import (BUNDLES, SH_ORDER, TINY_SHAPE, VOXEL_SIZE_MM, legacy_to_descoteaux07,
                                 make_demo_cohort, multi_tensor_signal, split_subjects)
from trackflow.errors import TrackflowError

# Reading fODFs in dipy's legacy basis is done on purpose below, to show it gives wrong peaks.
pytestmark = pytest.mark.filterwarnings("ignore:The legacy descoteaux07 SH basis:PendingDeprecationWarning")

N_STREAMLINES = 20
BUNDLE_NAMES = [layout.name for layout in BUNDLES]
SUBJECT = "sub-01"


def make_tiny(out_dir, n_subjects=2, seed=0, **kwargs):
    return make_demo_cohort(out_dir, n_subjects=n_subjects, seed=seed,
                            streamlines_per_bundle=N_STREAMLINES, shape=TINY_SHAPE, **kwargs)


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """Two tiny subjects, seed 0."""
    out_dir = make_tiny(tmp_path_factory.mktemp("demo") / "cohort")
    return out_dir


def subject_file(cohort, relative, subject=SUBJECT):
    return cohort / "dwi_ml_ready" / subject / relative.replace("<s>", subject)


def load_array(cohort, relative, subject=SUBJECT):
    return np.asarray(nib.load(subject_file(cohort, relative, subject)).dataobj)


def load_voxel_streamlines(cohort, bundle, subject=SUBJECT):
    """Ground-truth streamlines of one bundle in vox/corner coordinates, loaded as any consumer would."""
    path = subject_file(cohort, f"tractograms/<s>__{bundle}.trk", subject)
    sft = load_tractogram(str(path), "same")
    sft.to_vox()
    sft.to_corner()
    return list(sft.streamlines)


def voxel_values(volume, points):
    index = np.floor(points).astype(int)
    return volume[index[:, 0], index[:, 1], index[:, 2]]


def bundle_axis(streamlines):
    """Main direction of a set of streamlines: principal eigenvector of the segment dyadics."""
    segments = np.concatenate([np.diff(s, axis=0) for s in streamlines])
    segments /= np.linalg.norm(segments, axis=1, keepdims=True)
    return np.linalg.eigh(segments.T @ segments)[1][:, -1]


def fodf_peaks(fodf_voxels, legacy):
    """dipy peaks of each fODF (rows of SH coefficients in the descoteaux07 basis)."""
    sphere = get_sphere(name="repulsion724")
    sf = sh_to_sf(fodf_voxels, sphere, sh_order_max=SH_ORDER, basis_type="descoteaux07", legacy=legacy)
    return [peak_directions(odf, sphere, relative_peak_threshold=0.3, min_separation_angle=25)[0]
            for odf in sf]


def angle_deg(direction, axes):
    """Unsigned angle between a direction [3] and each axis [K, 3]."""
    return np.degrees(np.arccos(np.clip(np.abs(np.asarray(axes) @ direction), 0, 1)))


def all_files(cohort):
    return sorted(p.relative_to(cohort) for p in cohort.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- layout


def test_layout_has_every_documented_file(tiny_cohort):
    cohort = tiny_cohort
    expected = {"anat/<s>__T1w.nii.gz", "dwi/<s>__fa.nii.gz", "dwi/<s>__fodf.nii.gz",
                "masks/<s>__brain_mask.nii.gz", "masks/<s>__mask_wm.nii.gz",
                "other_masks/<s>__interface.nii.gz"}
    for bundle in BUNDLE_NAMES:
        expected |= {f"tractograms/<s>__{bundle}.trk", f"bundles/<s>__{bundle}__head.nii.gz",
                     f"bundles/<s>__{bundle}__tail.nii.gz", f"bundles/<s>__{bundle}__mask.nii.gz"}
    assert len(BUNDLE_NAMES) >= 4
    assert sorted(p.name for p in (cohort / "dwi_ml_ready").iterdir()) == ["sub-01", "sub-02"]
    for subject in ("sub-01", "sub-02"):
        subject_dir = cohort / "dwi_ml_ready" / subject
        found = {str(p.relative_to(subject_dir)) for p in subject_dir.rglob("*") if p.is_file()}
        assert found == {name.replace("<s>", subject) for name in expected}
    assert (cohort / "README.txt").is_file()
    assert not list(cohort.parent.glob(".cohort.*")), "staging folder left behind"


def test_hdf5_config_is_the_documented_one_and_its_globs_match(tiny_cohort):
    cohort = tiny_cohort
    config = json.loads((cohort / "config" / "hdf5_config.json").read_text())
    assert config == {
        "input": {"type": "volume",
                  "files": ["anat/*__T1w.nii.gz", "dwi/*__fa.nii.gz", "dwi/*__fodf.nii.gz"],
                  "standardization": "per_file", "std_mask": ["masks/*__brain_mask.nii.gz"]},
        "wm_mask": {"type": "volume", "files": ["masks/*__mask_wm.nii.gz"], "standardization": "none"},
        "interface_mask": {"type": "volume", "files": ["other_masks/*__interface.nii.gz"],
                           "standardization": "none"},
        "streamlines": {"type": "streamlines", "files": ["tractograms/*.trk"]}}
    subject_dir = cohort / "dwi_ml_ready" / SUBJECT
    for group in config.values():
        for pattern in group["files"] + group.get("std_mask", []):
            matches = list(subject_dir.glob(pattern))
            assert len(matches) == (len(BUNDLE_NAMES) if pattern.endswith(".trk") else 1), pattern


def test_subject_lists_of_the_cohort(tiny_cohort):
    cohort = tiny_cohort
    lists = [(cohort / "config" / f"{split}_subjs.txt").read_text().split()
             for split in ("training", "validation", "testing")]
    assert lists == [["sub-01"], ["sub-02"], []]


@pytest.mark.parametrize("n_subjects", range(1, 12))
def test_split_subjects(n_subjects):
    ids = [f"s{i}" for i in range(n_subjects)]
    training, validation, testing = split_subjects(ids)
    assert training + validation + testing == ids
    assert len(training) >= 1
    if n_subjects >= 3:
        assert len(validation) >= 1 and len(testing) >= 1
        assert len(training) >= len(validation) + len(testing) - 1
    if n_subjects == 4:
        assert (len(training), len(validation), len(testing)) == (2, 1, 1)


def test_readme_states_acquisition_and_basis(tiny_cohort):
    cohort = tiny_cohort
    readme = (cohort / "README.txt").read_text()
    for fact in ("24x24x16 voxels", "1.5 mm", "b=1000", "SNR 20", f"SH order {SH_ORDER}",
                 "basis descoteaux07", "NON-legacy"):
        assert fact in readme


# ------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_arrays_and_other_seed_differs(tiny_cohort, tmp_path):
    cohort = tiny_cohort
    again = make_tiny(tmp_path / "again")
    other = make_tiny(tmp_path / "other", n_subjects=1, seed=1)
    assert all_files(again) == all_files(cohort)
    for relative in all_files(cohort):
        if relative.suffixes[-2:] == [".nii", ".gz"]:
            first, second = (np.asarray(nib.load(root / relative).dataobj) for root in (cohort, again))
            np.testing.assert_array_equal(first, second, err_msg=str(relative))
        elif relative.suffix == ".trk":
            first, second = (nib.streamlines.load(root / relative).streamlines for root in (cohort, again))
            assert len(first) == len(second) == N_STREAMLINES
            np.testing.assert_array_equal(first.get_data(), second.get_data(), err_msg=str(relative))
            np.testing.assert_array_equal(first._lengths, second._lengths)
        else:
            assert (cohort / relative).read_text() == (again / relative).read_text()

    for relative in ("anat/<s>__T1w.nii.gz", "dwi/<s>__fodf.nii.gz", "masks/<s>__mask_wm.nii.gz"):
        assert not np.array_equal(load_array(cohort, relative), load_array(other, relative)), relative
    first_arc, other_arc = (load_voxel_streamlines(root, "arc")[0] for root in (cohort, other))
    assert not np.array_equal(first_arc, other_arc)


def test_subjects_differ(tiny_cohort):
    cohort = tiny_cohort
    first, second = (load_array(cohort, "masks/<s>__mask_wm.nii.gz", s) for s in ("sub-01", "sub-02"))
    assert np.count_nonzero(first != second) > 0.05 * np.count_nonzero(first)


def test_classic_cohort_is_unchanged_by_the_varied_geometry_option(tiny_cohort):
    """Checksums of the tiny cohort written before varied geometry existed (commit c45a333): the classic
    demo's masks and ground truth are bit-identical, its fODF equal to float rounding."""
    cohort = tiny_cohort
    geometry = hashlib.sha256()
    fodf_sums = []
    for s in ("sub-01", "sub-02"):
        relatives = ["masks/<s>__mask_wm.nii.gz", "other_masks/<s>__interface.nii.gz"] + [
            f"bundles/<s>__{b}__{k}.nii.gz" for b in BUNDLE_NAMES for k in ("head", "tail", "mask")]
        for relative in relatives:
            geometry.update(load_array(cohort, relative, s).tobytes())
        for b in BUNDLE_NAMES:
            geometry.update(nib.streamlines.load(subject_file(cohort, f"tractograms/<s>__{b}.trk", s)
                                                 ).streamlines.get_data().tobytes())
        fodf_sums.append(load_array(cohort, "dwi/<s>__fodf.nii.gz", s).astype(np.float64).sum())
    assert geometry.hexdigest() == "ec091d98186f3954ca51c7f53ea986713f52b3932ce72a6e58da1e9a03b225c0"
    np.testing.assert_allclose(fodf_sums, [459.76150445830854, 460.46657271033314], rtol=1e-6)


# ----------------------------------------------------------------------------------- volumes, masks


def test_every_volume_of_a_subject_shares_grid_and_affine(tiny_cohort):
    cohort = tiny_cohort
    subject_dir = cohort / "dwi_ml_ready" / SUBJECT
    reference = nib.load(subject_dir / "anat" / f"{SUBJECT}__T1w.nii.gz")
    assert reference.shape == TINY_SHAPE
    np.testing.assert_allclose(nib.affines.voxel_sizes(reference.affine), [1.5] * 3)
    for path in subject_dir.rglob("*.nii.gz"):
        image = nib.load(path)
        assert image.shape[:3] == TINY_SHAPE, path.name
        np.testing.assert_array_equal(image.affine, reference.affine, err_msg=path.name)
    for path in subject_dir.rglob("*.trk"):
        assert is_header_compatible(str(path), reference), path.name


def test_masks_are_binary_and_nested(tiny_cohort):
    cohort = tiny_cohort
    subject_dir = cohort / "dwi_ml_ready" / SUBJECT
    mask_paths = [*subject_dir.glob("masks/*"), *subject_dir.glob("other_masks/*"),
                  *subject_dir.glob("bundles/*")]
    assert len(mask_paths) == 3 + 3 * len(BUNDLE_NAMES)
    for path in mask_paths:
        values = np.unique(np.asarray(nib.load(path).dataobj))
        assert set(values.tolist()) == {0, 1}, path.name
    brain = load_array(cohort, "masks/<s>__brain_mask.nii.gz").astype(bool)
    wm = load_array(cohort, "masks/<s>__mask_wm.nii.gz").astype(bool)
    interface = load_array(cohort, "other_masks/<s>__interface.nii.gz").astype(bool)
    assert not (wm & ~brain).any() and not (interface & ~wm).any()
    # CSF all around: the brain does not touch the volume's faces.
    assert not (brain[[0, -1]].any() or brain[:, [0, -1]].any() or brain[:, :, [0, -1]].any())
    bundle_union = np.zeros_like(wm)
    end_union = np.zeros_like(wm)
    for bundle in BUNDLE_NAMES:
        bundle_mask = load_array(cohort, f"bundles/<s>__{bundle}__mask.nii.gz").astype(bool)
        assert not (bundle_mask & ~wm).any()
        bundle_union |= bundle_mask
        for end in ("head", "tail"):
            end_union |= load_array(cohort, f"bundles/<s>__{bundle}__{end}.nii.gz").astype(bool)
    # WM mask = union of bundles dilated by at most one voxel; interface = bundle voxels at the ends only.
    assert not (bundle_union & ~wm).any() and wm.sum() > bundle_union.sum()
    assert not (wm & ~ndimage.binary_dilation(bundle_union)).any()
    assert interface.any() and not (interface & ~bundle_union).any() and not (interface & ~end_union).any()


def test_t1_contrast_and_fa(tiny_cohort):
    cohort = tiny_cohort
    t1 = load_array(cohort, "anat/<s>__T1w.nii.gz")
    fa = load_array(cohort, "dwi/<s>__fa.nii.gz")
    brain = load_array(cohort, "masks/<s>__brain_mask.nii.gz").astype(bool)
    bundles = np.any([load_array(cohort, f"bundles/<s>__{b}__mask.nii.gz") for b in BUNDLE_NAMES], axis=0)
    gm = brain & ~bundles
    assert t1[bundles].mean() > t1[gm].mean() + 0.15 > t1[~brain].mean() + 0.3
    # Single-fibre tensor FA is 0.8 noise-free; partial volume and crossings lower the mean.
    assert fa[bundles].mean() > 0.45 and fa[gm].mean() < 0.2


# --------------------------------------------------------------------------------------- streamlines


def test_ground_truth_streamlines_lie_in_their_masks(tiny_cohort):
    cohort = tiny_cohort
    wm = load_array(cohort, "masks/<s>__mask_wm.nii.gz")
    for bundle in BUNDLE_NAMES:
        streamlines = load_voxel_streamlines(cohort, bundle)
        assert len(streamlines) == N_STREAMLINES
        bundle_mask = load_array(cohort, f"bundles/<s>__{bundle}__mask.nii.gz")
        head = load_array(cohort, f"bundles/<s>__{bundle}__head.nii.gz")
        tail = load_array(cohort, f"bundles/<s>__{bundle}__tail.nii.gz")
        points = np.concatenate(streamlines)
        assert voxel_values(wm, points).all(), bundle
        # float32 storage may move a point lying on a voxel face into the next voxel; the WM mask is
        # dilated for that, the bundle mask is not.
        assert voxel_values(bundle_mask, points).mean() > 0.999, bundle
        assert voxel_values(head, np.array([s[0] for s in streamlines])).all(), bundle
        assert voxel_values(tail, np.array([s[-1] for s in streamlines])).all(), bundle
        step_mm = 1.5 * np.concatenate([np.linalg.norm(np.diff(s, axis=0), axis=1) for s in streamlines])
        assert 0.3 < np.median(step_mm) < 1.0, bundle  # a few points per voxel
        assert not (head.astype(bool) & tail.astype(bool)).any(), bundle  # ends are distinct


def test_crossing_angles_of_the_phantom(tiny_cohort):
    cohort = tiny_cohort
    axes = {b: bundle_axis(load_voxel_streamlines(cohort, b)) for b in ("horizontal", "vertical", "diagonal")}
    assert angle_deg(axes["horizontal"], [axes["vertical"]])[0] == pytest.approx(90, abs=8)
    assert angle_deg(axes["horizontal"], [axes["diagonal"]])[0] == pytest.approx(45, abs=8)


# --------------------------------------------------------------------------------- diffusion model


def test_multi_tensor_signal_matches_dipy():
    gtab = demo.demo_gradient_table()
    assert gtab.bvals.max() == 1000 and (~gtab.b0s_mask).sum() >= 30
    directions = np.array([[[1.0, 0, 0], [0, 0.6, 0.8]], [[0, 0, 1.0], [0.6, 0.8, 0]]])
    fractions = np.array([[0.5, 0.5], [0.3, 0.7]])
    ours = multi_tensor_signal(gtab, fractions, directions)
    mevals = np.array([demo.FIBRE_EVALS] * 2)
    for voxel in range(2):
        angles = [tuple(d) for d in directions[voxel]]  # dipy accepts unit vectors as "angles"
        reference, _ = multi_tensor(gtab, mevals, S0=1.0, angles=angles,
                                    fractions=100 * fractions[voxel], snr=None)
        np.testing.assert_allclose(ours[voxel], reference, rtol=1e-10)


def test_legacy_to_descoteaux07_preserves_the_function():
    rng = np.random.default_rng(3)
    n_coeffs = (SH_ORDER + 1) * (SH_ORDER + 2) // 2
    legacy = rng.normal(size=(4, n_coeffs))
    converted = legacy_to_descoteaux07(legacy, SH_ORDER)
    sphere = get_sphere(name="symmetric362")  # not the sphere used inside the conversion
    kwargs = dict(sh_order_max=SH_ORDER, basis_type="descoteaux07")
    np.testing.assert_allclose(sh_to_sf(converted, sphere, legacy=False, **kwargs),
                               sh_to_sf(legacy, sphere, legacy=True, **kwargs), atol=1e-10)
    # The two bases do differ, so a missing conversion would be caught.
    assert not np.allclose(sh_to_sf(legacy, sphere, legacy=False, **kwargs),
                           sh_to_sf(legacy, sphere, legacy=True, **kwargs))


def test_fodf_has_the_sh_count_of_its_order(tiny_cohort):
    cohort = tiny_cohort
    fodf = load_array(cohort, "dwi/<s>__fodf.nii.gz")
    assert SH_ORDER in (6, 8)
    assert fodf.shape == (*TINY_SHAPE, (SH_ORDER + 1) * (SH_ORDER + 2) // 2)


def test_fodf_peak_follows_a_single_oblique_bundle_only_in_the_right_basis(tiny_cohort):
    check_single_bundle_peaks(tiny_cohort)


def test_fodf_resolves_the_90_degree_crossing(tiny_cohort):
    check_crossing_resolved(tiny_cohort)


@pytest.mark.slow
def test_default_cohort_of_four_subjects(tmp_path):
    cohort = make_demo_cohort(tmp_path / "cohort")
    assert load_array(cohort, "dwi/<s>__fodf.nii.gz").shape[:3] == demo.DEFAULT_SHAPE
    check_single_bundle_peaks(cohort)
    check_crossing_resolved(cohort)


def check_single_bundle_peaks(cohort):
    """The fODF peak follows the oblique single bundle; read in the legacy basis, it does not."""
    fodf = load_array(cohort, "dwi/<s>__fodf.nii.gz")
    masks = {b: load_array(cohort, f"bundles/<s>__{b}__mask.nii.gz").astype(bool) for b in BUNDLE_NAMES}
    others = np.any([m for b, m in masks.items() if b != "diagonal"], axis=0)
    single = masks["diagonal"] & ~others
    assert single.sum() >= 30
    truth = bundle_axis(load_voxel_streamlines(cohort, "diagonal"))
    peaks = fodf_peaks(fodf[single], legacy=False)
    one_peak = np.array([len(p) == 1 for p in peaks])
    first_peak_error = np.array([angle_deg(p[0], [truth])[0] for p in peaks])
    assert one_peak.mean() > 0.9 and np.median(first_peak_error) < 10 and (first_peak_error < 25).mean() > 0.9
    # The bundle leaves the axial plane, so reading the file in dipy's legacy basis splits its lobe.
    legacy_one_peak = np.array([len(p) == 1 for p in fodf_peaks(fodf[single], legacy=True)])
    assert legacy_one_peak.mean() < 0.5


def check_crossing_resolved(cohort):
    """Most fODFs of the 90-degree crossing have two peaks, one along each bundle."""
    fodf = load_array(cohort, "dwi/<s>__fodf.nii.gz")
    horizontal, vertical = (load_array(cohort, f"bundles/<s>__{b}__mask.nii.gz").astype(bool)
                            for b in ("horizontal", "vertical"))
    crossing = horizontal & vertical
    assert crossing.sum() >= 10
    truths = [bundle_axis(load_voxel_streamlines(cohort, b)) for b in ("horizontal", "vertical")]
    resolved = [len(p) >= 2 and angle_deg(p[0], truths).min() < 25 and angle_deg(p[1], truths).min() < 25
                and angle_deg(p[0], [p[1]])[0] > 60 for p in fodf_peaks(fodf[crossing], legacy=False)]
    assert np.mean(resolved) > 0.5


# ---------------------------------------------------------------------------------- varied geometry

POSES = {"training": [1.0, 9.0], "validation": [5.0], "testing": [-11.0]}


def make_varied(out_dir, poses=POSES, seed=0):
    return make_demo_cohort(out_dir, seed=seed, streamlines_per_bundle=N_STREAMLINES, shape=TINY_SHAPE,
                            poses=poses)


@pytest.fixture(scope="module")
def varied_cohort(tmp_path_factory):
    return make_varied(tmp_path_factory.mktemp("varied") / "cohort")


def in_plane_turn_deg(cohort, bundle, subject, reference):
    """Signed in-plane angle (about z, close to the slab's normal) from a straight bundle's axis in
    ``reference`` to its axis in ``subject``."""
    first, second = (bundle_axis(load_voxel_streamlines(cohort, bundle, s)) for s in (reference, subject))
    turn = np.degrees(np.arctan2(second[1], second[0]) - np.arctan2(first[1], first[0]))
    return (turn + 90) % 180 - 90  # axes have no sign


def test_varied_cohort_lists_its_subjects_by_pose(varied_cohort):
    config = varied_cohort / "config"
    assert [read(config / f"{k}_subjs.txt") for k in ("training", "validation", "testing")] == [
        ["sub-01", "sub-02"], ["sub-03"], ["sub-04"]]
    assert (config / "poses.tsv").read_text().splitlines() == [
        "subject\tsubset\tpose_deg", "sub-01\ttraining\t1", "sub-02\ttraining\t9",
        "sub-03\tvalidation\t5", "sub-04\ttesting\t-11"]
    assert "Varied geometry" in (varied_cohort / "README.txt").read_text()


def read(path):
    return path.read_text().split()


def test_varied_geometry_is_reproducible_from_the_seed(varied_cohort, tmp_path):
    # Subject seeds do not depend on the number of subjects: same seed and pose, same subject.
    again = make_varied(tmp_path / "again", {"training": [1.0], "validation": [9.0], "testing": [0.0]})
    other_seed = make_varied(tmp_path / "other", {"training": [1.0], "validation": [9.0], "testing": [0.0]},
                             seed=1)
    for subject in ("sub-01", "sub-02"):
        for relative in ("dwi/<s>__fodf.nii.gz", "masks/<s>__mask_wm.nii.gz", "bundles/<s>__arc__head.nii.gz"):
            np.testing.assert_array_equal(load_array(varied_cohort, relative, subject),
                                          load_array(again, relative, subject))
            assert not np.array_equal(load_array(varied_cohort, relative, subject),
                                      load_array(other_seed, relative, subject))
        np.testing.assert_array_equal(np.concatenate(load_voxel_streamlines(varied_cohort, "fan", subject)),
                                      np.concatenate(load_voxel_streamlines(again, "fan", subject)))


def test_varied_subjects_differ_more_than_classic_ones(varied_cohort, tiny_cohort):
    def mask_difference(cohort, first, second):
        a, b = (load_array(cohort, "masks/<s>__mask_wm.nii.gz", s).astype(bool) for s in (first, second))
        return np.count_nonzero(a ^ b) / np.count_nonzero(a | b)

    classic = mask_difference(tiny_cohort, "sub-01", "sub-02")
    for first, second in (("sub-01", "sub-02"), ("sub-01", "sub-04"), ("sub-02", "sub-03")):
        assert mask_difference(varied_cohort, first, second) > max(0.2, 1.5 * classic), (first, second)
    # Each subject draws its own bundle changes: radii and lengths differ, not only the pose.
    lengths = [np.mean([np.sum(np.linalg.norm(np.diff(s, axis=0), axis=1)) for s in
                        load_voxel_streamlines(varied_cohort, "horizontal", subject)])
               for subject in ("sub-01", "sub-02", "sub-03", "sub-04")]
    assert np.ptp(lengths) > 0.3


def test_varied_pose_rotates_the_whole_configuration(varied_cohort):
    # Poses 1, 9, 5, -11 degrees; each bundle also turns by up to 5 degrees, the slab tilts by up to 3 more.
    for bundle in ("horizontal", "vertical", "diagonal"):
        assert in_plane_turn_deg(varied_cohort, bundle, "sub-02", "sub-04") == pytest.approx(20, abs=11)
        assert in_plane_turn_deg(varied_cohort, bundle, "sub-02", "sub-01") == pytest.approx(8, abs=11)
    axes = {b: bundle_axis(load_voxel_streamlines(varied_cohort, b, "sub-04"))
            for b in ("horizontal", "vertical", "diagonal")}
    assert angle_deg(axes["horizontal"], [axes["vertical"]])[0] == pytest.approx(90, abs=12)
    assert angle_deg(axes["horizontal"], [axes["diagonal"]])[0] == pytest.approx(45, abs=12)


@pytest.mark.parametrize("subject", ["sub-01", "sub-04"])
def test_varied_ground_truth_follows_the_signal(varied_cohort, subject):
    """Ground truth lies in the WM and bundle masks, ends in its end regions, and runs along the fODF peak
    wherever a single bundle fills the voxel."""
    wm = load_array(varied_cohort, "masks/<s>__mask_wm.nii.gz", subject)
    masks = {b: load_array(varied_cohort, f"bundles/<s>__{b}__mask.nii.gz", subject) for b in BUNDLE_NAMES}
    n_bundles_per_voxel = sum(m.astype(int) for m in masks.values())
    fodf = load_array(varied_cohort, "dwi/<s>__fodf.nii.gz", subject)
    for bundle in BUNDLE_NAMES:
        streamlines = load_voxel_streamlines(varied_cohort, bundle, subject)
        points = np.concatenate(streamlines)
        assert voxel_values(wm, points).all(), bundle
        # The bundle mask holds the voxels of the dense segments' midpoints: an end point may lie just past.
        assert voxel_values(masks[bundle], points).mean() > 0.995, bundle
        for end, index in (("head", 0), ("tail", -1)):
            end_mask = load_array(varied_cohort, f"bundles/<s>__{bundle}__{end}.nii.gz", subject)
            assert voxel_values(end_mask, np.array([s[index] for s in streamlines])).all(), (bundle, end)

        segments = np.concatenate([np.diff(s, axis=0) for s in streamlines])
        midpoints = np.concatenate([(s[1:] + s[:-1]) / 2 for s in streamlines])
        index = np.floor(midpoints).astype(int)
        alone = n_bundles_per_voxel[tuple(index.T)] == 1
        voxels, first = np.unique(index[alone], axis=0, return_index=True)
        tangents = segments[alone][first] / np.linalg.norm(segments[alone][first], axis=1, keepdims=True)
        peaks = fodf_peaks(fodf[tuple(voxels.T)], legacy=False)
        errors = [angle_deg(t, p).min() for t, p in zip(tangents, peaks) if len(p)]
        assert len(errors) > 5 and np.median(errors) < 15, (bundle, np.median(errors))


def test_cli_makes_a_varied_cohort(tmp_path, monkeypatch):
    tiny_library_call = functools.partial(make_demo_cohort, shape=TINY_SHAPE)  # the CLI has no --shape
    monkeypatch.setattr(make_demo_cli, "make_demo_cohort", tiny_library_call)
    out_dir = tmp_path / "cohort"
    make_demo_cli.main([str(out_dir), "--streamlines_per_bundle", "3", "--training_poses", "2", "4",
                        "--validation_poses", "3", "--testing_poses", "-11"])
    assert read(out_dir / "config" / "testing_subjs.txt") == ["sub-04"]
    assert (out_dir / "config" / "poses.tsv").read_text().splitlines()[-1] == "sub-04\ttesting\t-11"


@pytest.mark.parametrize("kwargs, message", [
    (dict(poses={"training": [1.0], "testing": [2.0]}), "at least one angle for each"),
    (dict(poses={"training": [1.0], "validation": [], "testing": [2.0]}), "at least one angle for each"),
    (dict(poses={"training": [float("nan")], "validation": [1.0], "testing": [2.0]}), "finite angles"),
    (dict(poses=POSES, n_subjects=4), "not both")])
def test_bad_poses_are_refused(tmp_path, kwargs, message):
    with pytest.raises(TrackflowError, match=message):
        make_demo_cohort(tmp_path / "cohort", **kwargs)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- errors, atomicity


def test_existing_output_without_force_is_refused_by_the_cli(tmp_path):
    out_dir = tmp_path / "cohort"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("x")
    result = subprocess.run([str(Path(sys.executable).parent / "trackflow_make_demo"), str(out_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]


def test_cli_passes_its_options_and_replaces_a_previous_cohort(tmp_path, monkeypatch):
    tiny_library_call = functools.partial(make_demo_cohort, shape=TINY_SHAPE)  # the CLI has no --shape
    monkeypatch.setattr(make_demo_cli, "make_demo_cohort", tiny_library_call)
    out_dir = tmp_path / "cohort"
    make_demo_cli.main([str(out_dir), "--subjects", "1", "--streamlines_per_bundle", "3"])
    (out_dir / "stale.txt").write_text("x")
    make_demo_cli.main([str(out_dir), "--subjects", "3", "--seed", "5", "--streamlines_per_bundle", "7",
                        "-f"])
    assert not (out_dir / "stale.txt").exists()
    assert sorted(p.name for p in (out_dir / "dwi_ml_ready").iterdir()) == ["sub-01", "sub-02", "sub-03"]
    assert len(load_voxel_streamlines(out_dir, "fan", "sub-03")) == 7
    assert "seed 5" in (out_dir / "README.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]


def test_force_refuses_to_delete_a_folder_that_is_not_a_cohort(tmp_path):
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    (out_dir / "model.pt").write_text("precious")
    with pytest.raises(TrackflowError, match="neither empty nor a demo cohort"):
        make_tiny(out_dir, force=True)
    assert [p.name for p in out_dir.iterdir()] == ["model.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_failure_leaves_no_partial_cohort(tmp_path, monkeypatch):
    calls = []

    def failing_subject(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return make_subject(*args, **kwargs)

    make_subject = demo.make_demo_subject
    monkeypatch.setattr(demo, "make_demo_subject", failing_subject)
    with pytest.raises(RuntimeError):
        make_tiny(tmp_path / "cohort")
    assert calls == ["sub-01", "sub-02"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [dict(n_subjects=0), dict(streamlines_per_bundle=0),
                                    dict(shape=(10, 24, 16)), dict(shape=(24, 24)),
                                    dict(shape=(48, 48, 8))])
def test_bad_options_are_refused(tmp_path, kwargs):
    with pytest.raises(TrackflowError):
        make_demo_cohort(tmp_path / "cohort", **kwargs)
    assert list(tmp_path.iterdir()) == []
