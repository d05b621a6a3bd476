"""Bad inputs of dwiml_create_hdf5_dataset: one-line error, non-zero exit, nothing left behind."""

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hdf5_fixtures import (AFFINE, SHAPE, cli_args, random_streamlines, save_nifti,
                           save_streamlines, write_cohort, write_config)
from trackflow.cli.create_hdf5_dataset import main
from trackflow.data.hdf5 import creation

T1 = "anat/*__T1w.nii.gz"


def _volume(files, standardization="none", **extra):
    return {"type": "volume", "files": files, "standardization": standardization, **extra}


def _config(paths, groups):
    return write_config(paths["config"].parent / "bad_config.json", groups)


# Each case edits a fresh one-subject cohort and returns (cli arguments, expected error fragment).

def missing_folder(paths, out):
    args = cli_args(paths, out)
    args[0] = str(paths["folder"] / "nowhere")
    return args, "does not exist"


def missing_file(paths, out):
    return cli_args(paths, out, _config(paths, {"t1": _volume("anat/t1.nii.gz")})), \
        "'anat/t1.nii.gz' matches no file"


def absolute_pattern(paths, out):
    return cli_args(paths, out, _config(paths, {"t1": _volume("/etc/*.nii.gz")})), \
        "must be a path relative to the subject folder"


def glob_matching_nothing(paths, out):
    return cli_args(paths, out, _config(paths, {"t1": _volume("anat/*__T2w.nii.gz")})), \
        "matches no file"


def affine_mismatch_between_files(paths, out):
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    save_nifti(paths["folder"] / "s1" / "dwi" / "s1__fa.nii.gz", np.ones(SHAPE), shifted)
    config = _config(paths, {"input": _volume([T1, "dwi/*__fa.nii.gz"])})
    return cli_args(paths, out, config), "not on the grid"


def grid_mismatch_between_groups(paths, out):
    save_nifti(paths["folder"] / "s1" / "other" / "s1__small.nii.gz", np.ones((4, 4, 4)))
    config = _config(paths, {"t1": _volume(T1), "small": _volume("other/*__small.nii.gz")})
    return cli_args(paths, out, config), "not on the grid"


def non_nifti_volume(paths, out):
    np.save(paths["folder"] / "s1" / "anat" / "s1__T1w.npy", np.ones(SHAPE))
    return cli_args(paths, out, _config(paths, {"t1": _volume("anat/*.npy")})), \
        "not a NIfTI file"


def unknown_group_type(paths, out):
    config = _config(paths, {"t1": _volume(T1), "surf": {"type": "surface", "files": T1}})
    return cli_args(paths, out, config), "unknown type 'surface'"


def missing_standardization(paths, out):
    return cli_args(paths, out, _config(paths, {"t1": {"type": "volume", "files": T1}})), \
        "needs 'standardization'"


def invalid_standardization(paths, out):
    return cli_args(paths, out, _config(paths, {"t1": _volume(T1, "zscore")})), \
        "invalid standardization 'zscore'"


def subject_listed_twice(paths, out):
    paths["training"].write_text("s1\ns1\n")
    return cli_args(paths, out), "'s1' is listed twice"


def subject_without_folder(paths, out):
    paths["training"].write_text("s1 s9")
    return cli_args(paths, out), "'s9' (training_subjs list) has no folder"


def tck_without_volume_group(paths, out):
    subject_dir = paths["folder"] / "s1"
    save_streamlines(subject_dir / "tck" / "s1__b.tck",
                     random_streamlines(np.random.default_rng(0), 3), subject_dir / T1.replace(
                         "*", "s1"))
    config = _config(paths, {"bundle": {"type": "streamlines", "files": "tck/*.tck"}})
    return cli_args(paths, out, config), "needs a volume group"


def nan_inside_std_mask(paths, out):
    path = paths["folder"] / "s1" / "anat" / "s1__T1w.nii.gz"
    t1 = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    t1[4, 4, 3] = np.nan  # inside the brain mask
    save_nifti(path, t1)
    config = _config(paths, {"t1": _volume(T1, "per_file",
                                           std_mask="masks/*__brain_mask.nii.gz")})
    return cli_args(paths, out, config), "NaN or infinite values inside the standardization mask"


def inf_inside_std_mask(paths, out):
    path = paths["folder"] / "s1" / "dwi" / "s1__fa.nii.gz"
    fa = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    fa[3, 3, 3] = np.inf
    save_nifti(path, fa)
    config = _config(paths, {"fa": _volume("dwi/*__fa.nii.gz", "all")})
    return cli_args(paths, out, config), "NaN or infinite"


def missing_dps_key(paths, out):
    config = _config(paths, {"t1": _volume(T1), "bundles": {
        "type": "streamlines", "files": "tractograms/*.trk", "dps_keys": ["k1", "k2"]}})
    return cli_args(paths, out, config), "lacks data_per_streamline key(s) ['k2']"


def trk_on_another_grid(paths, out):
    subject_dir = paths["folder"] / "s1"
    save_nifti(subject_dir / "other" / "s1__big.nii.gz", np.ones((12, 12, 12)))
    save_streamlines(subject_dir / "other" / "s1__b.trk",
                     random_streamlines(np.random.default_rng(0), 3),
                     subject_dir / "other" / "s1__big.nii.gz")
    config = _config(paths, {"t1": _volume(T1), "b": {"type": "streamlines",
                                                      "files": "other/*.trk"}})
    return cli_args(paths, out, config), "not header-compatible"


def bad_output_extension(paths, out):
    return cli_args(paths, out.with_suffix(".h5")), "must have the .hdf5 extension"


def json_syntax_error(paths, out):
    paths["config"].write_text('{\n  "t1": {"type": "volume"\n           "files": "x"}\n}\n')
    return cli_args(paths, out), "line 3, column 12"


def missing_subject_list(paths, out):
    args = cli_args(paths, out)
    args[4] = str(paths["validation"].with_name("nope.txt"))
    return args, "subject list"


def connectivity_with_both_blocs_and_labels(paths, out):
    config = _config(paths, {"t1": _volume(T1), "b": {
        "type": "streamlines", "files": "tractograms/*.trk", "connectivity_matrix": "c.npy",
        "connectivity_nb_blocs": 3, "connectivity_labels": "l.nii.gz"}})
    return cli_args(paths, out, config), "exactly one of connectivity_nb_blocs"


# ---- issue 11
def nan_in_mask_group(paths, out):
    path = paths["folder"] / "s1" / "masks" / "s1__mask_wm.nii.gz"
    save_nifti(path, np.full(SHAPE, np.nan))
    return cli_args(paths, out), "subject 's1', mask group 'wm_mask': 504 NaN or infinite"


def truncated_nifti(paths, out):
    path = paths["folder"] / "s1" / "dwi" / "s1__fodf.nii.gz"
    path.write_bytes(path.read_bytes()[:-200])
    return cli_args(paths, out), "cannot read the voxels of"


def empty_trk(paths, out):
    (paths["folder"] / "s1" / "tractograms" / "s1__CC.trk").write_bytes(b"")
    return cli_args(paths, out), "cannot read tractogram"


def garbage_trk(paths, out):
    (paths["folder"] / "s1" / "tractograms" / "s1__CC.trk").write_bytes(os.urandom(3000))
    return cli_args(paths, out), "cannot read tractogram"


def output_is_a_directory(paths, out):
    out.mkdir()
    (out / "keep").write_text("x")
    return cli_args(paths, out), "is a directory"


def json_output_is_a_directory(paths, out):
    out.with_suffix(".json").mkdir()
    return cli_args(paths, out), "is a directory"


CASES = [missing_folder, missing_file, glob_matching_nothing, absolute_pattern,
         affine_mismatch_between_files,
         grid_mismatch_between_groups, non_nifti_volume, unknown_group_type,
         missing_standardization, invalid_standardization, subject_listed_twice,
         subject_without_folder, tck_without_volume_group, nan_inside_std_mask,
         inf_inside_std_mask, missing_dps_key, trk_on_another_grid, bad_output_extension,
         json_syntax_error, missing_subject_list, connectivity_with_both_blocs_and_labels,
         nan_in_mask_group, truncated_nifti, empty_trk, garbage_trk, output_is_a_directory,
         json_output_is_a_directory]

# What a case leaves in the output folder on purpose (the directory in the output's way).
PLANTED = {"output_is_a_directory": {"cohort.hdf5"}, "json_output_is_a_directory": {"cohort.json"}}


def _files_beside(out: Path) -> set[str]:
    return {p.name for p in out.parent.iterdir()}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_gives_one_line_error_and_no_output(case, tmp_path, capsys):
    paths = write_cohort(tmp_path / "in", training=("s1",), validation=())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args, fragment = case(paths, out_dir / "cohort.hdf5")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert fragment in err
    # no hdf5, no json, no temporary file
    assert _files_beside(out_dir / "x") == PLANTED.get(case.__name__, set())


def test_subjects_with_different_feature_counts_are_refused(tmp_path, capsys):
    # s2 lacks its fODF: 2 input features instead of 5, only a warning with --skip_enforce_files_presence.
    paths = write_cohort(tmp_path / "in", training=("s1", "s2"), validation=())
    (paths["folder"] / "s2" / "dwi" / "s2__fodf.nii.gz").unlink()
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(paths, out_dir / "cohort.hdf5") + ["--skip_enforce_files_presence"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "'dwi/*__fodf.nii.gz' matches no file" in lines[0] and "skipped" in lines[0]
    assert lines[1:] == ["error: group 'input' has 2 features in subject 's2' but 5 in subject 's1'; every "
                         "subject needs the same files"]
    assert _files_beside(out_dir / "x") == set()


def test_interrupted_run_leaves_nothing(tmp_path, capsys, monkeypatch):
    paths = write_cohort(tmp_path / "in", training=("s1", "s2"), validation=())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real_process_subject = creation._process_subject

    def interrupt_on_second_subject(h5_file, root, subject, *args):
        if subject == "s2":
            raise KeyboardInterrupt
        return real_process_subject(h5_file, root, subject, *args)

    monkeypatch.setattr(creation, "_process_subject", interrupt_on_second_subject)
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(paths, out_dir / "cohort.hdf5"))
    assert exit_info.value.code != 0
    assert capsys.readouterr().err.strip() == "error: interrupted"
    assert _files_beside(out_dir / "x") == set()


def test_console_script_exit_code_in_a_subprocess(tmp_path):
    """The installed entry point itself: one line on stderr, exit 2, no output."""
    script = Path(sys.executable).with_name("dwiml_create_hdf5_dataset")
    paths = write_cohort(tmp_path / "in", training=("s1",), validation=())
    config = _config(paths, {"t1": _volume(T1, "bogus")})
    out = tmp_path / "cohort.hdf5"
    result = subprocess.run([str(script)] + cli_args(paths, out, config), capture_output=True,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: volume group 't1' has invalid standardization 'bogus', expected one of "
        "['all', 'independent', 'per_file', 'none']"]
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_an_output_created_meanwhile_is_not_replaced_without_f(tmp_path, capsys, monkeypatch):
    """Two runs without -f on the same absent output: the one finishing second fails, the first's file stays."""
    paths = write_cohort(tmp_path / "in", training=("s1",), validation=())
    out = tmp_path / "out" / "cohort.hdf5"
    real_process_subject = creation._process_subject

    def other_run_finishes_first(*args):
        for path in (out, out.with_suffix(".json")):
            path.write_text("the other run's result")
        return real_process_subject(*args)

    monkeypatch.setattr(creation, "_process_subject", other_run_finishes_first)
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(paths, out))
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == ["cohort.hdf5", "cohort.json"]
    assert out.read_text() == out.with_suffix(".json").read_text() == "the other run's result"
