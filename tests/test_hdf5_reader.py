"""HDF5Cohort (the reader contract), check_streamline_group, config reading, print_architecture."""

import shutil

import h5py
import numpy as np
import pytest

from fault_fixtures import hdf5_corrupt_object_header
from hdf5_fixtures import (AFFINE, DOC_CONFIG_TEXT, SHAPE, cli_args, write_cohort,
                           write_subject)
from trackflow.cli.create_hdf5_dataset import main as create_main
from trackflow.cli.hdf5_print_architecture import main as print_main
from trackflow.data.hdf5.config import (StreamlineGroupConfig, VolumeGroupConfig,
                                        loads_json_allowing_trailing_commas, parse_groups_config)
from trackflow.data.hdf5.reader import HDF5Cohort, check_streamline_group
from trackflow.errors import TrackflowError


@pytest.fixture(scope="module")
def cohort_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    # s1 gets many streamlines so that both read strategies (slices, whole block) are used
    paths = write_cohort(root, training=("s2", "s1"), validation=("s3",))
    write_subject(paths["folder"], "s1", seed=11, n_streamlines=(40, 30))
    out = root / "cohort.hdf5"
    create_main(cli_args(paths, out))
    return out


def test_root_attributes_and_subjects(cohort_file):
    with HDF5Cohort(cohort_file) as h5:
        assert (h5.step_size, h5.nb_points, h5.compress, h5.version) == (None, None, None, 1)
        assert h5.subjects("training") == ["s1", "s2"]  # sorted, whatever the list order
        assert h5.subjects("validation") == ["s3"] and h5.subjects("testing") == []
        assert h5.volume_groups() == {"input": 5, "wm_mask": 1}
        assert h5.streamline_groups() == ["streamlines"]
        with pytest.raises(TrackflowError, match="unknown subset 'train'"):
            h5.subjects("train")


def test_selected_streamlines_match_the_full_read(cohort_file):
    with HDF5Cohort(cohort_file) as h5:
        everything = h5.read_streamlines("s1", "streamlines")
        n = h5.streamlines_count("s1", "streamlines")
        assert n == len(everything) == 70
        assert everything.get_data().dtype == np.float32
        dps = h5.data_per_streamline("s1", "streamlines")["k1"]
        lengths = h5.euclidean_lengths("s1", "streamlines")
        rng = np.random.default_rng(0)
        # 3 streamlines: read by slices; 40 with repeats, any order: read as one block
        for indices in (np.array([7, 0, 69]), rng.integers(0, n, 40)):
            selected = h5.read_streamlines("s1", "streamlines", indices)
            assert len(selected) == len(indices)
            for got, i in zip(selected, indices):
                np.testing.assert_array_equal(got, everything[i])
            sft = h5.to_sft("s1", "streamlines", indices)
            np.testing.assert_array_equal(sft.data_per_streamline["k1"], dps[indices])
            np.testing.assert_array_equal(sft.streamlines.get_data(), selected.get_data())
        assert len(h5.read_streamlines("s1", "streamlines", [])) == 0
        # lengths in mm agree with the vox/corner points mapped through the affine
        mm = [np.linalg.norm(np.diff(s @ AFFINE[:3, :3].T, axis=0), axis=1).sum()
              for s in everything]
        np.testing.assert_allclose(lengths, mm, rtol=1e-4)
        with pytest.raises(TrackflowError, match="out of range"):
            h5.read_streamlines("s1", "streamlines", [70])


def test_volume_and_reference_nifti(cohort_file):
    with HDF5Cohort(cohort_file) as h5:
        volume = h5.read_volume("s3", "wm_mask")
        assert volume.data.shape == SHAPE + (1,) and volume.data.dtype == np.float32
        np.testing.assert_allclose(volume.affine, AFFINE)
        np.testing.assert_allclose(volume.voxres, [2.0, 1.5, 2.5])
        img = h5.reference_nifti("s3", "input")
        assert img.shape == SHAPE
        np.testing.assert_allclose(img.affine, AFFINE)
        np.testing.assert_allclose(img.header.get_zooms(), [2.0, 1.5, 2.5])


@pytest.mark.parametrize("call,message", [
    (lambda h5: h5.read_volume("s9", "input"), r"subject 's9' is not in .*\['s1', 's2', 's3'\]"),
    (lambda h5: h5.read_volume("s1", "t2"),
     r"group 't2' is not in subject 's1'.*\['input', 'streamlines', 'wm_mask'\]"),
    (lambda h5: h5.read_streamlines("s1", "input"), "of type 'volume', not 'streamlines'"),
    (lambda h5: h5.read_volume("s1", "streamlines"), "of type 'streamlines', not 'volume'"),
    (lambda h5: h5.reference_nifti("s1", "streamlines"), "not 'volume'"),
    (lambda h5: h5.to_sft("s1", "wm_mask"), "not 'streamlines'"),
])
def test_unknown_or_mistyped_names_are_errors(cohort_file, call, message):
    with HDF5Cohort(cohort_file) as h5, pytest.raises(TrackflowError, match=message):
        call(h5)


def test_files_that_are_not_cohorts_are_rejected(tmp_path):
    with pytest.raises(TrackflowError, match="does not exist"):
        HDF5Cohort(tmp_path / "none.hdf5")
    (tmp_path / "text.hdf5").write_text("hello")
    with pytest.raises(TrackflowError, match="not an hdf5 file"):
        HDF5Cohort(tmp_path / "text.hdf5")
    with h5py.File(tmp_path / "other.hdf5", "w") as f:
        f.attrs["training_subjs"] = ["a"]
    with pytest.raises(TrackflowError, match=r"missing root attribute\(s\) \['validation_subjs'"):
        HDF5Cohort(tmp_path / "other.hdf5")


def test_dwi_ml_style_attributes_are_read(cohort_file, tmp_path):
    """dwi_ml files have no version and may spell space/origin 'vox'/'corner'."""
    copy = tmp_path / "dwi_ml.hdf5"
    shutil.copy(cohort_file, copy)
    with h5py.File(copy, "r+") as f:
        del f.attrs["version"]
        f.attrs["step_size"] = 0.5
        f["s1/streamlines"].attrs["space"] = "vox"
        f["s1/streamlines"].attrs["origin"] = "corner"
    with HDF5Cohort(copy) as h5, HDF5Cohort(cohort_file) as ours:
        assert h5.version is None and h5.step_size == 0.5
        sft, reference = h5.to_sft("s1", "streamlines"), ours.to_sft("s1", "streamlines")
        assert (sft.space, sft.origin) == (reference.space, reference.origin)
        sft.to_rasmm()
        reference.to_rasmm()
        np.testing.assert_allclose(sft.streamlines.get_data(), reference.streamlines.get_data())


def _broken_copy(cohort_file, tmp_path, edit):
    copy = tmp_path / "broken.hdf5"
    shutil.copy(cohort_file, copy)
    with h5py.File(copy, "r+") as f:
        edit(f["s2/streamlines"])
    return copy


def _replace(group, name, values):
    del group[name]
    group.create_dataset(name, data=values)


@pytest.mark.parametrize("edit,message", [
    (lambda g: _replace(g, "data", g["data"][:-1]), "points but lengths sum"),
    (lambda g: _replace(g, "offsets", g["offsets"][()] + 1), "offsets are not the cumulative"),
    (lambda g: (_replace(g, "lengths", np.r_[g["lengths"][:-1], 0]),
                _replace(g, "data", g["data"][:int(g["lengths"][()].sum())])), "have no point"),
    (lambda g: _replace(g, "euclidean_lengths", g["euclidean_lengths"][:-1]),
     "euclidean_lengths has shape"),
    (lambda g: _replace(g["data_per_streamline"], "k1", np.zeros((2, 1))), "k1 has shape"),
    (lambda g: g.__delitem__("offsets"), r"lacks dataset\(s\) \['offsets'\]"),
])
def test_check_streamline_group_rejects_broken_groups(cohort_file, tmp_path, edit, message):
    with h5py.File(cohort_file, "r") as f:
        check_streamline_group(f["s2/streamlines"])  # the valid group passes
    broken = _broken_copy(cohort_file, tmp_path, edit)
    with h5py.File(broken, "r") as f, pytest.raises(TrackflowError, match=message):
        check_streamline_group(f["s2/streamlines"])
    with HDF5Cohort(broken) as h5, pytest.raises(TrackflowError, match=message):
        h5.read_streamlines("s2", "streamlines")  # the reader validates on read


def test_print_architecture(cohort_file, capsys):
    print_main([str(cohort_file)])
    text = capsys.readouterr().out
    assert "training subjects (2): s1, s2" in text
    assert "groups of the first subject 's1'" in text
    assert "attr nb_features: 5" in text
    assert "group data_per_streamline/ (1 members)" in text
    assert "dataset data_per_streamline/k1: shape (70, 1)" in text
    assert "step_size: Not defined by user" in text


def test_print_architecture_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        print_main([str(tmp_path / "missing.hdf5")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


# -- config -----------------------------------------------------------------------------------

def test_documented_config_with_trailing_comma_is_accepted():
    assert DOC_CONFIG_TEXT.rstrip().endswith("},\n}")
    groups = parse_groups_config(loads_json_allowing_trailing_commas(DOC_CONFIG_TEXT))
    assert groups == [
        VolumeGroupConfig("input", ("anat/*__T1w.nii.gz", "dwi/*__fa.nii.gz",
                                    "dwi/*__fodf.nii.gz"), "per_file",
                          ("masks/*__brain_mask.nii.gz",)),
        VolumeGroupConfig("wm_mask", ("masks/*__mask_wm.nii.gz",), "none"),
        StreamlineGroupConfig("streamlines", ("tractograms/*.trk",), ("k1",))]


def test_commas_inside_strings_are_kept():
    parsed = loads_json_allowing_trailing_commas('{"a": ["x,]", "y,}",], }')
    assert parsed == {"a": ["x,]", "y,}"]}


@pytest.mark.parametrize("text,position", [
    ('{"a": 1\n "b": 2}', "line 2, column 2"),
    ('{\n  "a": [1, 2,,]\n}', "line 2, column 15"),
    ('{\n\n    "a": tru\n}', "line 3, column 10"),
])
def test_other_json_errors_report_line_and_column(text, position):
    with pytest.raises(TrackflowError, match=position):
        loads_json_allowing_trailing_commas(text, source="c.json")


def test_connectivity_keys_are_normalised_and_checked():
    (group,) = parse_groups_config({"s": {"type": "streamlines", "files": "a.trk",
                                          "connectivity_matrix": "m.npy",
                                          "connectivity_nb_blocs": 4}})
    assert group.connectivity_nb_blocs == (4, 4, 4)
    for bad in ({"connectivity_nb_blocs": 4},
                {"connectivity_matrix": "m.npy"},
                {"connectivity_matrix": "m.npy", "connectivity_nb_blocs": [2, 3]}):
        with pytest.raises(TrackflowError, match="connectivity"):
            parse_groups_config({"s": {"type": "streamlines", "files": "a.trk", **bad}})


def test_unknown_keys_are_errors():
    with pytest.raises(TrackflowError, match=r"unknown key\(s\) \['std_maks'\]"):
        parse_groups_config({"v": {"type": "volume", "files": "a.nii.gz",
                                   "standardization": "all", "std_maks": "m.nii.gz"}})


@pytest.mark.parametrize("damaged", ["sub-01", "sub-01/input", "sub-01/input/data", "sub-01/streamlines"])
def test_damaged_object_header_is_one_line_error_for_every_reader(tiny_hdf5, tmp_path, capsys, damaged):
    from trackflow.cli.train import l2t_main
    path = hdf5_corrupt_object_header(tiny_hdf5, tmp_path / "damaged.hdf5", damaged)
    for main, args in ((print_main, [str(path)]),
                       (l2t_main, [str(tmp_path), "exp", str(path), "input", "streamlines", "--max_epochs", "1"])):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {path} is damaged ("), err
    assert not (tmp_path / "exp").exists()
