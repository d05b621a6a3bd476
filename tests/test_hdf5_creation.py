"""dwiml_create_hdf5_dataset: standardization, layout, streamline round trip and options."""

import ast
import json

import h5py
import nibabel as nib
import numpy as np
import pytest
from dipy.io.stateful_tractogram import Origin, Space
from dipy.io.streamline import load_tractogram

from hdf5_fixtures import (AFFINE, FODF_FEATURES, SHAPE, cli_args, random_streamlines,
                           save_nifti, save_streamlines, write_cohort, write_config)
from trackflow.cli.create_hdf5_dataset import main
from trackflow.data.hdf5.reader import HDF5Cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"))


def _create(paths, out, *options, config=None):
    main(cli_args(paths, out, config) + list(options))
    return out


def _load(paths, subject, relative_glob):
    (path,) = sorted((paths["folder"] / subject).glob(relative_glob))
    data = np.asarray(nib.load(path).dataobj, dtype=np.float64)
    return data[..., None] if data.ndim == 3 else data


def _reference_standardize(x, mask, per_feature):
    """Independent numpy reference: statistics inside the mask, applied everywhere."""
    inside = x[mask]
    mean = inside.mean(axis=0) if per_feature else inside.mean()
    std = np.maximum(inside.std(axis=0) if per_feature else inside.std(), 1e-6)
    return (x - mean) / std


def test_each_standardization_mode_matches_numpy(cohort, tmp_path):
    t1, fa, fodf = "anat/*__T1w.nii.gz", "dwi/*__fa.nii.gz", "dwi/*__fodf.nii.gz"
    brain, wm = "masks/*__brain_mask.nii.gz", "masks/*__mask_wm.nii.gz"
    config = write_config(tmp_path / "c.json", {
        "per_file_mask": {"type": "volume", "files": [t1, fodf], "standardization": "per_file",
                          "std_mask": brain},
        "per_file_nomask": {"type": "volume", "files": [t1, fa], "standardization": "per_file"},
        "all_nomask": {"type": "volume", "files": [t1, fa], "standardization": "all"},
        "independent_masks": {"type": "volume", "files": [fa, fodf],
                              "standardization": "independent", "std_mask": [wm, brain]},
        "none": {"type": "volume", "files": [fodf], "standardization": "none"},
    })
    out = _create(cohort, tmp_path / "out.hdf5", config=config)
    subject = "s2"
    T1, FA, FODF = (_load(cohort, subject, g) for g in (t1, fa, fodf))
    BRAIN, WM = (_load(cohort, subject, g)[..., 0] > 0 for g in (brain, wm))
    expected = {
        "per_file_mask": np.concatenate([_reference_standardize(T1, BRAIN, False),
                                         _reference_standardize(FODF, BRAIN, False)], axis=-1),
        "per_file_nomask": np.concatenate([_reference_standardize(T1, T1[..., 0] != 0, False),
                                           _reference_standardize(FA, FA[..., 0] != 0, False)],
                                          axis=-1),
        "all_nomask": _reference_standardize(np.concatenate([T1, FA], -1),
                                             (T1[..., 0] != 0) & (FA[..., 0] != 0), False),
        "independent_masks": _reference_standardize(np.concatenate([FA, FODF], -1),
                                                    BRAIN | WM, True),
        "none": FODF,
    }
    assert not (T1[..., 0] != 0).all()  # the "no std_mask" case really masks something
    with HDF5Cohort(out) as h5:
        assert h5.volume_groups() == {"per_file_mask": 1 + FODF_FEATURES, "per_file_nomask": 2,
                                      "all_nomask": 2, "independent_masks": 1 + FODF_FEATURES,
                                      "none": FODF_FEATURES}
        for group, reference in expected.items():
            volume = h5.read_volume(subject, group)
            assert volume.data.dtype == np.float32
            np.testing.assert_allclose(volume.data, reference, rtol=1e-4, atol=1e-4,
                                       err_msg=group)
        # The stored statistics undo every mode: raw = data * scale + offset ('none': 0 and 1).
        raw = {"per_file_mask": [T1, FODF], "per_file_nomask": [T1, FA], "all_nomask": [T1, FA],
               "independent_masks": [FA, FODF], "none": [FODF]}
        for group, files in raw.items():
            offset, scale = h5.standardization(subject, group)
            undone = h5.read_volume(subject, group).data * scale + offset
            np.testing.assert_allclose(undone, np.concatenate(files, -1), rtol=1e-5, atol=1e-4, err_msg=group)
        assert np.array_equal(h5.standardization(subject, "none")[0], np.zeros(FODF_FEATURES))
        assert np.array_equal(h5.standardization(subject, "none")[1], np.ones(FODF_FEATURES))
        # independent: each feature has mean 0 / std 1 inside its mask
        data = h5.read_volume(subject, "independent_masks").data[BRAIN | WM]
        np.testing.assert_allclose(data.mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(data.std(0), 1, atol=1e-4)


def test_layout_has_every_attribute_and_dataset_of_the_spec(cohort, tmp_path):
    out = _create(cohort, tmp_path / "out")  # no extension: .hdf5 is appended
    assert out.with_suffix(".hdf5").is_file()
    assert json.loads(out.with_suffix(".json").read_text().replace("},\n}", "}\n}")) \
        == json.loads(cohort["config"].read_text().replace("},\n}", "}\n}"))
    with h5py.File(out.with_suffix(".hdf5"), "r") as f:
        assert set(f.attrs) == {"data_and_time", "chosen_subjs", "groups_config", "training_subjs",
                                "validation_subjs", "testing_subjs", "step_size", "nb_points",
                                "compress", "version"}
        assert isinstance(f.attrs["data_and_time"], str)
        assert list(f.attrs["chosen_subjs"]) == ["s1", "s2", "s3"]
        assert list(f.attrs["training_subjs"]) == ["s1", "s2"]
        assert list(f.attrs["validation_subjs"]) == ["s3"]
        assert f.attrs["testing_subjs"].shape == (0,)
        assert ast.literal_eval(f.attrs["groups_config"])["input"]["standardization"] == "per_file"
        for name in ("step_size", "nb_points", "compress"):
            assert f.attrs[name] == "Not defined by user"
        assert f.attrs["version"] == 1
        assert set(f) == {"s1", "s2", "s3"}
        for subject in f:
            assert set(f[subject]) == {"input", "wm_mask", "streamlines"}
            for group, n_features in (("input", 2 + FODF_FEATURES), ("wm_mask", 1)):
                g = f[subject][group]
                assert set(g) == {"data"}
                # dwi_ml's four, plus the standardization statistics (raw = data * scale + offset).
                assert set(g.attrs) == {"type", "affine", "voxres", "nb_features", "standardization_offset",
                                        "standardization_scale"}
                assert g.attrs["standardization_offset"].shape == g.attrs["standardization_scale"].shape \
                    == (n_features,)
                assert g.attrs["type"] == "volume"
                assert g["data"].dtype == np.float32 and g["data"].shape == SHAPE + (n_features,)
                np.testing.assert_allclose(g.attrs["affine"], AFFINE)
                np.testing.assert_allclose(g.attrs["voxres"], [2.0, 1.5, 2.5])
                assert g.attrs["nb_features"] == n_features
            g = f[subject]["streamlines"]
            assert set(g) == {"data", "offsets", "lengths", "euclidean_lengths",
                              "data_per_streamline"}
            assert set(g.attrs) == {"type", "space", "origin", "affine", "dimensions",
                                    "voxel_sizes", "voxel_order"}
            n = 9  # 5 AF + 4 CC
            assert g["data"].dtype == np.float32 and g["data"].shape == (g["lengths"][()].sum(), 3)
            for name, dtype in (("offsets", np.int64), ("lengths", np.int64),
                                ("euclidean_lengths", np.float64)):
                assert g[name].dtype == dtype and g[name].shape == (n,)
            assert set(g["data_per_streamline"]) == {"k1"}  # k2 is not in dps_keys
            assert g["data_per_streamline/k1"].shape == (n, 1)
            assert (g.attrs["type"], g.attrs["space"], g.attrs["origin"]) == \
                ("streamlines", "Space.VOX", "Origin.TRACKVIS")
            np.testing.assert_allclose(g.attrs["affine"], AFFINE)
            np.testing.assert_array_equal(g.attrs["dimensions"], SHAPE)
            np.testing.assert_allclose(g.attrs["voxel_sizes"], [2.0, 1.5, 2.5])
            assert g.attrs["voxel_order"] == "".join(nib.aff2axcodes(AFFINE))


def _trk_rasmm(cohort, subject):
    """The subject's .trk files, loaded independently by dipy in RASMM, in glob order."""
    sfts = [load_tractogram(str(p), "same") for p in
            sorted((cohort["folder"] / subject / "tractograms").glob("*.trk"))]
    for sft in sfts:
        sft.to_rasmm()
        sft.to_center()
    points = [s for sft in sfts for s in sft.streamlines]
    k1 = np.concatenate([sft.data_per_streamline["k1"] for sft in sfts])
    return points, k1


def test_round_trip_returns_the_same_rasmm_points(cohort, tmp_path):
    out = _create(cohort, tmp_path / "out.hdf5")
    with HDF5Cohort(out) as h5:
        for subject in ("s1", "s3"):
            expected, k1 = _trk_rasmm(cohort, subject)
            sft = h5.to_sft(subject, "streamlines")
            assert (sft.space, sft.origin) == (Space.VOX, Origin.TRACKVIS)
            sft.to_rasmm()
            sft.to_center()
            assert len(sft) == len(expected)
            for got, want in zip(sft.streamlines, expected):
                np.testing.assert_allclose(got, want, atol=1e-4)
            np.testing.assert_allclose(sft.data_per_streamline["k1"], k1, rtol=1e-6)
            mm = [np.linalg.norm(np.diff(s, axis=0), axis=1).sum() for s in expected]
            np.testing.assert_allclose(h5.euclidean_lengths(subject, "streamlines"), mm, rtol=1e-5)


def test_step_size_resamples_in_mm(cohort, tmp_path):
    step = 1.0
    out = _create(cohort, tmp_path / "out.hdf5", "--step_size", str(step))
    expected, _ = _trk_rasmm(cohort, "s1")
    with HDF5Cohort(out) as h5:
        assert h5.step_size == step and h5.nb_points is None and h5.compress is None
        sft = h5.to_sft("s1", "streamlines")
        sft.to_rasmm()
        sft.to_center()
        lengths_mm = [np.linalg.norm(np.diff(s, axis=0), axis=1).sum() for s in sft.streamlines]
        np.testing.assert_allclose(h5.euclidean_lengths("s1", "streamlines"), lengths_mm,
                                   rtol=1e-4)
        for got, want in zip(sft.streamlines, expected):
            want_mm = np.linalg.norm(np.diff(want, axis=0), axis=1).sum()
            assert len(got) == max(int(np.ceil(want_mm / step)), 2)
            np.testing.assert_allclose(got[[0, -1]], want[[0, -1]], atol=1e-4)


def test_nb_points_and_compress(cohort, tmp_path):
    with HDF5Cohort(_create(cohort, tmp_path / "a.hdf5", "--nb_points", "6")) as h5:
        assert h5.nb_points == 6
        assert set(np.diff(h5.read_streamlines("s1", "streamlines")._offsets)) == {6}
    original, _ = _trk_rasmm(cohort, "s1")
    with HDF5Cohort(_create(cohort, tmp_path / "b.hdf5", "--compress")) as h5:
        assert h5.compress == 0.01
        compressed = h5.read_streamlines("s1", "streamlines")
        assert len(compressed) == len(original)
        assert all(2 <= len(c) <= len(o) for c, o in zip(compressed, original))
        # random walks have no collinear points: 0.01 mm compression keeps almost all of them
        assert compressed.get_data().shape[0] > 0.9 * sum(len(o) for o in original)


def test_remove_invalid_drops_streamlines_outside_the_box(tmp_path):
    paths = write_cohort(tmp_path, training=("s1",), validation=())
    rng = np.random.default_rng(5)
    lines = random_streamlines(rng, 3)
    lines.append(np.array([[1, 1, 1], [4, 4, 4], [4, 4, SHAPE[2] + 3]], np.float32))  # leaves
    ref = paths["folder"] / "s1" / "anat" / "s1__T1w.nii.gz"
    save_streamlines(paths["folder"] / "s1" / "extra" / "s1__out.trk", lines, ref,
                     bbox_valid_check=False)
    config = write_config(tmp_path / "c.json", {
        "t1": {"type": "volume", "files": "anat/*__T1w.nii.gz", "standardization": "none"},
        "bundle": {"type": "streamlines", "files": "extra/*.trk"}})
    with HDF5Cohort(_create(paths, tmp_path / "keep.hdf5", config=config)) as h5:
        assert h5.streamlines_count("s1", "bundle") == 4
    with HDF5Cohort(_create(paths, tmp_path / "drop.hdf5", "--remove_invalid",
                            config=config)) as h5:
        assert h5.streamlines_count("s1", "bundle") == 3
        for got, want in zip(h5.read_streamlines("s1", "bundle"), lines[:3]):
            np.testing.assert_allclose(got, want, atol=1e-4)


def test_tck_uses_the_first_volume_group_as_reference(tmp_path):
    paths = write_cohort(tmp_path, training=("s1",), validation=())
    subject_dir = paths["folder"] / "s1"
    rng = np.random.default_rng(9)
    lines = random_streamlines(rng, 4)
    ref = subject_dir / "anat" / "s1__T1w.nii.gz"
    save_streamlines(subject_dir / "tck" / "s1__b.tck", lines, ref)
    config = write_config(tmp_path / "c.json", {
        "t1": {"type": "volume", "files": "anat/*__T1w.nii.gz", "standardization": "none"},
        "bundle": {"type": "streamlines", "files": "tck/*.tck"}})
    with HDF5Cohort(_create(paths, tmp_path / "o.hdf5", config=config)) as h5:
        for got, want in zip(h5.read_streamlines("s1", "bundle"), lines):
            np.testing.assert_allclose(got, want, atol=1e-4)


def test_save_intermediate_writes_final_volumes_and_streamlines(cohort, tmp_path):
    out = _create(cohort, tmp_path / "out.hdf5", "--save_intermediate")
    (folder,) = tmp_path.glob("intermediate_*")
    with HDF5Cohort(out) as h5:
        for subject in ("s1", "s2", "s3"):
            img = nib.load(folder / f"{subject}_input.nii.gz")
            np.testing.assert_allclose(img.get_fdata(), h5.read_volume(subject, "input").data,
                                       rtol=1e-6)
            np.testing.assert_allclose(img.affine, AFFINE)
            sft = load_tractogram(str(folder / f"{subject}_streamlines.trk"), "same")
            sft.to_vox()
            sft.to_corner()
            np.testing.assert_allclose(sft.streamlines.get_data(),
                                       h5.read_streamlines(subject, "streamlines").get_data(),
                                       atol=1e-4)


def test_subject_lists_empty_and_shared(cohort, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "both.txt").write_text("s1 s3")
    paths = dict(cohort, validation=tmp_path / "both.txt", testing=tmp_path / "empty.txt")
    out = _create(paths, tmp_path / "out.hdf5")  # the CLI logs warnings to stderr
    log = capsys.readouterr().err
    assert "'s1' is in more than one subject list" in log
    assert "unlisted" not in log  # s2 is listed in training
    with HDF5Cohort(out) as h5:
        assert h5.subjects("validation") == ["s1", "s3"]
        assert h5.subjects("testing") == []
    with h5py.File(out, "r") as f:
        assert list(f.attrs["chosen_subjs"]) == ["s1", "s2", "s3"]


def test_skip_enforce_files_presence_only_warns(cohort, tmp_path, capsys):
    config = write_config(tmp_path / "c.json", {
        "input": {"type": "volume", "files": ["anat/*__T1w.nii.gz", "dwi/nothing*.nii.gz"],
                  "standardization": "none"}})
    with pytest.raises(SystemExit):
        _create(cohort, tmp_path / "strict.hdf5", config=config)
    assert not (tmp_path / "strict.hdf5").exists()
    capsys.readouterr()
    out = _create(cohort, tmp_path / "lax.hdf5", "--skip_enforce_files_presence", config=config)
    assert "'dwi/nothing*.nii.gz' matches no file" in capsys.readouterr().err
    with HDF5Cohort(out) as h5:
        assert h5.volume_groups() == {"input": 1}


def test_existing_output_needs_f(cohort, tmp_path, capsys):
    out = _create(cohort, tmp_path / "out.hdf5", "--nb_points", "4")
    with pytest.raises(SystemExit):
        _create(cohort, out)
    assert "already exists" in capsys.readouterr().err
    _create(cohort, out, "-f")
    with HDF5Cohort(out) as h5:
        assert h5.nb_points is None


def test_connectivity_from_blocs_and_from_labels(tmp_path):
    paths = write_cohort(tmp_path, training=("s1",), validation=())
    subject_dir = paths["folder"] / "s1"
    matrix = np.array([[0, 3, 0], [3, 0, 1], [0, 1, 2]], dtype=float)
    np.save(subject_dir / "conn.npy", matrix)
    labels = np.random.default_rng(0).integers(0, 4, SHAPE)
    save_nifti(subject_dir / "labels.nii.gz", labels)
    config = write_config(tmp_path / "c.json", {
        "t1": {"type": "volume", "files": "anat/*__T1w.nii.gz", "standardization": "none"},
        "blocs": {"type": "streamlines", "files": "tractograms/*__AF.trk",
                  "connectivity_matrix": "conn.npy", "connectivity_nb_blocs": [2]},
        "labels": {"type": "streamlines", "files": "tractograms/*__AF.trk",
                   "connectivity_matrix": "conn.npy", "connectivity_labels": "labels.nii.gz"}})
    out = _create(paths, tmp_path / "o.hdf5", config=config)
    with h5py.File(out, "r") as f:
        blocs, by_labels = f["s1/blocs"], f["s1/labels"]
        np.testing.assert_array_equal(blocs["connectivity_matrix"][()], matrix > 0)
        assert blocs["connectivity_matrix"].dtype == bool
        assert blocs.attrs["connectivity_matrix_type"] == "from_blocs"
        np.testing.assert_array_equal(blocs.attrs["connectivity_nb_blocs"], [2, 2, 2])
        assert by_labels.attrs["connectivity_matrix_type"] == "from_labels"
        np.testing.assert_array_equal(by_labels["connectivity_label_volume"][()], labels)


def test_empty_tractogram_gives_an_empty_valid_group(tmp_path):
    paths = write_cohort(tmp_path, training=("s1",), validation=())
    subject_dir = paths["folder"] / "s1"
    save_streamlines(subject_dir / "empty" / "s1__none.trk", [],
                     subject_dir / "anat" / "s1__T1w.nii.gz")
    config = write_config(tmp_path / "c.json", {
        "t1": {"type": "volume", "files": "anat/*__T1w.nii.gz", "standardization": "none"},
        "bundle": {"type": "streamlines", "files": "empty/*.trk"}})
    with HDF5Cohort(_create(paths, tmp_path / "o.hdf5", "--step_size", "0.5",
                            config=config)) as h5:
        assert h5.streamlines_count("s1", "bundle") == 0
        assert h5.read_streamlines("s1", "bundle").get_data().shape == (0, 3)
        assert h5.euclidean_lengths("s1", "bundle").shape == (0,)
        assert len(h5.to_sft("s1", "bundle")) == 0
