"""Rotation augmentation: exact SH rotation matrices, the loader's rotated rows against an explicitly rotated
volume, reproducibility, the off switch, the hdf5 standardization attributes and the trainer options."""

import json
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from trackflow.cli.train import l2t_main, l2t_resume_main, tt_main
from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.errors import TrackflowError
from trackflow.geometry.sh_rotation import (SH_BASES, axis_angle_matrices, fibonacci_sphere, random_rotations,
                                            sh_basis_matrix, sh_order_of_count, sh_rotation_matrices)
from trackflow.models.registry import model_class
from trackflow.training.batch_loader import BatchLoader, LoaderParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_L2T = ["--rnn_key", "gru", "--rnn_layer_sizes", "16", "--batch_size_training", "10",
            "--batch_size_validation", "50", "--learning_rate", "0.01", "--weight_decay", "0",
            "--neighborhood_type", "axes", "--neighborhood_radius", "1", "--neighborhood_resolution", "1",
            "--nb_previous_dirs", "1"]
# The tiny demo's input group: T1, FA, fODF of order 6 (28 coefficients).
TINY_SH = ["--sh_features", "2", "28"]


# ---------------------------------------------------------------------------------------------- SH rotation
def _sh_fit(values, points, order, basis):
    return np.linalg.lstsq(sh_basis_matrix(points, order, basis).T, values, rcond=None)[0]


@pytest.mark.parametrize("basis", SH_BASES)
def test_a_fibre_along_x_rotated_90_degrees_about_z_lies_along_y(basis):
    points = fibonacci_sphere(3000)
    # (u . x)^8: a fibre along x, exactly an order-8 SH function (a polynomial of degree 8 on the sphere).
    fibre_x = _sh_fit(points[:, 0] ** 8, points, 8, basis)
    rotated = sh_rotation_matrices(axis_angle_matrices([[0, 0, 1]], [np.pi / 2]), 8, basis)[0] @ fibre_x
    values = rotated @ sh_basis_matrix(points, 8, basis)
    peak = points[np.argmax(values)]
    assert abs(peak[1]) > 0.995                       # along +-y
    # Exactly the fit of the rotated function (a fibre along y), not only its peak.
    fibre_y = _sh_fit(points[:, 1] ** 8, points, 8, basis)
    np.testing.assert_allclose(rotated, fibre_y, atol=1e-9)
    assert not np.allclose(fibre_x, fibre_y, atol=1e-3)


@pytest.mark.parametrize("basis", SH_BASES)
def test_sh_rotation_is_an_orthogonal_representation(basis):
    rng = np.random.default_rng(3)
    first, second = random_rotations(rng, 5, 180), random_rotations(rng, 5, 180)
    m1, m2 = sh_rotation_matrices(first, 8, basis), sh_rotation_matrices(second, 8, basis)
    np.testing.assert_allclose(m1 @ m1.transpose(0, 2, 1), np.broadcast_to(np.eye(45), m1.shape), atol=1e-10)
    np.testing.assert_allclose(sh_rotation_matrices(first @ second, 8, basis), m1 @ m2, atol=1e-10)
    np.testing.assert_allclose(sh_rotation_matrices(np.eye(3)[None], 8, basis)[0], np.eye(45), atol=1e-10)
    # f'(u) = f(R^T u) on points other than the fit points.
    coefficients = rng.normal(size=45)
    points = fibonacci_sphere(77)
    rotated_values = (m1[0] @ coefficients) @ sh_basis_matrix(points, 8, basis)
    np.testing.assert_allclose(rotated_values, coefficients @ sh_basis_matrix(points @ first[0], 8, basis),
                               atol=1e-10)


def test_random_rotations_respect_the_largest_angle():
    rotations = random_rotations(np.random.default_rng(0), 200, 15.0)
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (200, 3, 3)),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0)
    angles = np.degrees(np.arccos(np.clip((np.trace(rotations, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert angles.max() <= 15.0 + 1e-9 and angles.max() > 12.0


def test_rotations_about_a_given_axis_keep_it_and_turn_both_ways():
    axis = np.array([0.0, -0.26, 0.97])
    rotations = random_rotations(np.random.default_rng(0), 200, 15.0, axis)
    unit = axis / np.linalg.norm(axis)
    np.testing.assert_allclose(rotations @ unit, np.broadcast_to(unit, (200, 3)), atol=1e-12)
    # the signed angle about the axis: both signs, bounded by the largest angle
    normal = np.cross(unit, [1.0, 0, 0])
    turned = rotations @ normal
    signed = np.degrees(np.arctan2(np.cross(normal, turned) @ unit, turned @ normal))
    assert signed.min() < -12 and signed.max() > 12 and np.abs(signed).max() <= 15 + 1e-9
    # without an axis the draws are those of before the option existed (same rng calls, same order)
    rng = np.random.default_rng(3)
    axes = rng.normal(size=(4, 3))
    expected = axis_angle_matrices(axes / np.linalg.norm(axes, axis=1, keepdims=True),
                                   np.deg2rad(15.0) * rng.uniform(size=4))
    np.testing.assert_array_equal(random_rotations(np.random.default_rng(3), 4, 15.0), expected)


def test_sh_counts_and_options_are_validated():
    assert [sh_order_of_count(c) for c in (1, 6, 15, 28, 45)] == [0, 2, 4, 6, 8]
    with pytest.raises(TrackflowError, match="no symmetric SH order"):
        sh_order_of_count(44)
    with pytest.raises(TrackflowError, match="no symmetric SH order"):
        LoaderParams(rotation_augmentation_deg=10, sh_features=[2, 44])
    with pytest.raises(TrackflowError, match=r"\[0, 180\]"):
        LoaderParams(rotation_augmentation_deg=200)
    with pytest.raises(TrackflowError, match="is off"):
        LoaderParams(sh_features=[2, 45])
    with pytest.raises(TrackflowError, match="--rotation_axis is only used"):
        LoaderParams(rotation_axis=[0, 0, 1])
    with pytest.raises(TrackflowError, match="not all zero"):
        LoaderParams(rotation_augmentation_deg=10, rotation_axis=[0, 0, 0])
    with pytest.raises(TrackflowError, match="goes past"):
        LoaderParams(rotation_augmentation_deg=10, sh_features=[3, 45]).check_features(47)
    LoaderParams(rotation_augmentation_deg=10, sh_features=[2, 45]).check_features(47)


# ---------------------------------------------------------------------------------------------- the loader
SHAPE = (22, 22, 22)
SH_FIRST, SH_COUNT, ORDER = 1, 15, 4     # features: scalar, 15 SH coefficients (order 4), scalar
N_FEATURES = SH_FIRST + SH_COUNT + 1


class FakeData:
    """What the loader reads of a ``SubsetData``: one subject's standardized volume, its stats, streamlines."""

    def __init__(self, volume, offset, scale, lines):
        self._volume = torch.as_tensor(volume, dtype=torch.float32)
        self.stats = (offset, scale)
        self.lines = lines

    def volume(self, subject):
        return self._volume, np.ones(3)

    def standardization(self, subject):
        return self.stats

    def streamlines(self, subject, ids):
        return [self.lines[i] for i in ids]


def _linear_field():
    """raw(x) = a + A x for every feature (trilinear interpolation is exact on it), and per-feature stats."""
    rng = np.random.default_rng(5)
    a, slopes = rng.normal(size=N_FEATURES), rng.normal(size=(N_FEATURES, 3)) * 0.2
    offset, scale = rng.normal(size=N_FEATURES), rng.uniform(0.5, 2.0, size=N_FEATURES)
    return a, slopes, offset, scale


def _grid():
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), -1)


def _lines():
    rng = np.random.default_rng(6)
    lines = []
    for _ in range(4):   # short random walks near the centre: rotated, they stay away from the edges
        steps = rng.normal(size=(8, 3))
        steps /= np.linalg.norm(steps, axis=1, keepdims=True)
        lines.append((11.0 + np.cumsum(0.5 * steps, axis=0) - 1.0).astype(np.float32))
    return lines


def _model():
    torch.manual_seed(0)
    return model_class("Learn2TrackModel")(
        nb_features=N_FEATURES, rnn_key="gru", rnn_layer_sizes=[8], neighborhood_type="axes",
        neighborhood_radius=1, neighborhood_resolution=1.0, dg_key="cosine-regression")


def _loader(deg, seed=0, **extra):
    params = LoaderParams(rotation_augmentation_deg=deg, sh_features=[SH_FIRST, SH_COUNT] if deg else None,
                          **extra)
    return BatchLoader(params, {}, {}, seed, "cpu")


def test_rotated_rows_equal_the_inputs_of_an_explicitly_rotated_volume():
    a, slopes, offset, scale = _linear_field()
    grid = _grid()
    standardized = (a + grid @ slopes.T - offset) / scale
    lines = _lines()
    data = FakeData(standardized, offset, scale, lines)
    model = _model()
    loader = _loader(180)
    batch = loader.load(data, [("s", np.arange(len(lines)))], training=True)
    rows = loader.rows(model, data, batch, training=True)

    sh = slice(SH_FIRST, SH_FIRST + SH_COUNT)
    for b, line in enumerate(lines):
        rotation = batch.rotations[b]
        centre = line.astype(np.float64).mean(axis=0)
        # The rotated subject: V'(y) = rot(V(R^T (y - c) + c)), standardized with the same statistics.
        source = (grid - centre) @ rotation + centre               # R^T (y - c) + c, row form
        raw = a + source @ slopes.T
        raw[..., sh] = raw[..., sh] @ sh_rotation_matrices(rotation[None], ORDER)[0].T
        rotated_volume = torch.as_tensor((raw - offset) / scale, dtype=torch.float32)
        rotated_line = (line - centre) @ rotation.T + centre        # y_i = R (x_i - c) + c
        rotated_rows = torch.as_tensor(rotated_line[:-1], dtype=torch.float32)
        expected = model.compute_inputs(rotated_volume, rotated_rows)
        torch.testing.assert_close(rows.inputs[b], expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(rows.coordinates[b], rotated_rows, atol=1e-5, rtol=0)
    expected_dirs = np.concatenate([np.diff((line - line.mean(0)) @ batch.rotations[b].T, axis=0)
                                    for b, line in enumerate(lines)])
    np.testing.assert_allclose(rows.target_dirs.numpy(), expected_dirs, atol=1e-5)
    # A wrong SH rotation (the inverse) would not match: the check can fail.
    assert not np.allclose(batch.rotations[0], batch.rotations[0].T, atol=1e-3)


def test_off_draws_nothing_and_leaves_rows_unchanged():
    a, slopes, offset, scale = _linear_field()
    lines = _lines()
    data = FakeData((a + _grid() @ slopes.T - offset) / scale, offset, scale, lines)
    model = _model()
    off = _loader(0)
    before = off.get_state()["numpy"]
    batch = off.load(data, [("s", np.arange(len(lines)))], training=True)
    assert batch.rotations is None and off.get_state()["numpy"] == before   # no number drawn
    rows = off.rows(model, data, batch, training=True)
    points = torch.as_tensor(np.concatenate([line[:-1] for line in lines]))
    assert torch.equal(torch.cat(rows.inputs), model.compute_inputs(data.volume("s")[0], points))
    assert torch.equal(torch.cat(rows.coordinates), points)
    on = _loader(15)
    on.load(data, [("s", np.arange(len(lines)))], training=True)
    assert on.get_state()["numpy"] != before
    # Validation batches are never rotated.
    assert on.load(data, [("s", np.arange(len(lines)))], training=False).rotations is None


def test_rotations_are_reproducible_and_resumable():
    a, slopes, offset, scale = _linear_field()
    lines = _lines()
    data = FakeData((a + _grid() @ slopes.T - offset) / scale, offset, scale, lines)
    sampled = [("s", np.arange(len(lines)))]
    first, second = _loader(30, seed=4), _loader(30, seed=4)
    np.testing.assert_array_equal(first.load(data, sampled, True).rotations, second.load(data, sampled, True).rotations)
    state = first.get_state()
    expected = first.load(data, sampled, True).rotations
    resumed = _loader(30, seed=99)
    resumed.set_state(state)
    np.testing.assert_array_equal(resumed.load(data, sampled, True).rotations, expected)
    assert not np.allclose(_loader(30, seed=5).load(data, sampled, True).rotations, expected)


# ---------------------------------------------------------------------------------------------- hdf5 and CLI
def test_hdf5_records_the_standardization(tiny_hdf5, tiny_cohort):
    subject_dir = tiny_cohort / "dwi_ml_ready" / "sub-01"
    raw = np.concatenate([np.asarray(nib.load(subject_dir / path).dataobj, dtype=np.float32).reshape(
        *nib.load(subject_dir / path).shape[:3], -1) for path in
        ("anat/sub-01__T1w.nii.gz", "dwi/sub-01__fa.nii.gz", "dwi/sub-01__fodf.nii.gz")], axis=-1)
    with HDF5Cohort(tiny_hdf5) as cohort:
        offset, scale = cohort.standardization("sub-01", "input")
        standardized = cohort.read_volume("sub-01", "input").data
        mask_stats = cohort.standardization("sub-01", "wm_mask")
    assert offset.shape == scale.shape == (30,)
    # per_file: one mean and std per file (T1, FA, the 28 fODF coefficients share theirs).
    assert len(set(offset[2:])) == 1 and len(set(scale[2:])) == 1 and offset[0] != offset[1]
    np.testing.assert_allclose(standardized * scale + offset, raw, rtol=1e-5, atol=1e-5 * np.abs(raw).max())
    np.testing.assert_array_equal(mask_stats[0], [0.0]) and np.testing.assert_array_equal(mask_stats[1], [1.0])


def test_training_with_rotation_records_it_and_resumes(tiny_hdf5, tmp_path):
    l2t_main([str(tmp_path), "rot", str(tiny_hdf5), "input", "streamlines", *TINY_L2T,
              "--rotation_augmentation", "20", *TINY_SH, "--sh_basis", "descoteaux07", "--max_epochs", "1"])
    parameters = json.loads((tmp_path / "rot" / "parameters_latest.json").read_text())
    assert parameters["Loader params"]["rotation_augmentation_deg"] == 20
    assert parameters["Loader params"]["sh_features"] == [2, 28]
    l2t_resume_main([str(tmp_path), "rot", "--new_max_epochs", "2"])
    checkpoint = torch.load(tmp_path / "rot" / "checkpoint" / "checkpoint_state.pkl", weights_only=True)
    assert checkpoint["batch_loader_params"]["rotation_augmentation_deg"] == 20
    parameters = json.loads((tmp_path / "rot" / "parameters_latest.json").read_text())
    assert parameters["Loader params"]["sh_features"] == [2, 28]
    assert len(np.load(tmp_path / "rot" / "logs" / "train_loss_monitor_per_epoch.npy")) == 2


def test_tt_trains_with_rotation(tiny_hdf5, tmp_path):
    tt_main([str(tmp_path), "tt", str(tiny_hdf5), "input", "streamlines", "--model", "TTS", "--nheads", "2",
             "--n_layers_e", "1", "--input_embedded_size", "8", "--ffnn_hidden_size", "8", "--max_len", "200",
             "--batch_size_training", "10", "--max_epochs", "1", "--rotation_augmentation", "180", *TINY_SH,
             "--sh_basis", "tournier07"])
    parameters = json.loads((tmp_path / "tt" / "parameters_latest.json").read_text())
    assert parameters["Loader params"]["sh_basis"] == "tournier07"


@pytest.mark.parametrize("options, message", [
    (["--rotation_augmentation", "20", "--sh_features", "2", "27"], "no symmetric SH order"),
    (["--rotation_augmentation", "20", "--sh_features", "3", "28"], "goes past the input group's 30 features"),
    (["--sh_features", "2", "28"], "is off"),
])
def test_bad_rotation_options_are_one_line_errors(tiny_hdf5, tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        l2t_main([str(tmp_path), "exp", str(tiny_hdf5), "input", "streamlines", *TINY_L2T, *options])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "exp").exists()


def test_an_hdf5_without_the_statistics_asks_to_recreate_it(tiny_hdf5, tmp_path, capsys):
    old = tmp_path / "old.hdf5"
    shutil.copyfile(tiny_hdf5, old)
    with h5py.File(old, "r+") as f:
        for subject in ("sub-01", "sub-02"):
            for name in ("standardization_offset", "standardization_scale"):
                del f[subject]["input"].attrs[name]
    with pytest.raises(SystemExit):
        l2t_main([str(tmp_path), "exp", str(old), "input", "streamlines", *TINY_L2T,
                  "--rotation_augmentation", "20", *TINY_SH])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recreate the hdf5" in err[0]
    assert not (tmp_path / "exp").exists()
