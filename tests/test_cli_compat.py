"""dwi_ml command lines as users have them in their scripts, help texts, and readable text outputs."""

import csv
import importlib
import logging
import re
from importlib.metadata import entry_points

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from dipy.io.stateful_tractogram import Space, StatefulTractogram
from dipy.io.streamline import save_tractogram

from trackflow.cli import track, train
from trackflow.cli.common import warn_ignored_dwi_ml_args
from trackflow.cli.filter_by_length import main as filter_main

SCRIPTS = sorted((ep for ep in entry_points(group="console_scripts") if ep.value.startswith("trackflow.")),
                 key=lambda ep: ep.name)
TRACK_POSITIONALS = ["exp", "sub-01", "input", "out.trk", "interface_mask"]
TRAIN_POSITIONALS = ["exps", "exp", "cohort.hdf5", "input", "streamlines"]


def test_every_console_script_is_checked():
    assert len(SCRIPTS) >= 16 and {"l2t_track_from_model", "tt_train_model", "dwiml_visualize_logs"} <= {
        ep.name for ep in SCRIPTS}


def help_text(script, capsys) -> str:
    module, function = script.value.split(":")
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), function)(["-h"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def entries_without_help(text: str) -> list:
    """Arguments of an argparse help whose entry has no help text.

    Entries are the lines indented by exactly two spaces after the usage; their help follows on the same
    line (after two spaces or more) or on the next lines, indented deeper.
    """
    lines = text.split("\n\n", 1)[1].splitlines()  # after the usage block
    missing = []
    for i, line in enumerate(lines):
        if not re.match(r"  [-\w]", line) or line.startswith("   "):
            continue
        same_line = re.search(r"\S {2,}\S", line.strip())
        next_line = lines[i + 1] if i + 1 < len(lines) else ""
        if not same_line and not re.match(r" {3,}\S", next_line):
            missing.append(line.strip())
    return missing


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda ep: ep.name)
def test_help_texts(script, capsys):
    text = help_text(script, capsys)
    assert "(default:" not in text  # defaults are written once, in the option's own help
    assert "§" not in text and not re.search(r"\bspec\b", text), "internal pointers in the help"
    assert entries_without_help(text) == []


def test_transformers_are_not_offered_the_cnn_embedding(capsys):
    text = help_text(next(ep for ep in SCRIPTS if ep.name == "tt_train_model"), capsys)
    assert "cnn_embedding" not in text and "--nb_cnn_filters" not in text and "--kernel_size" not in text
    with pytest.raises(SystemExit):
        train.build_train_parser("", "tt").parse_args([*TRAIN_POSITIONALS, "--input_embedding_key", "cnn_embedding"])
    assert "cnn_embedding" in help_text(next(ep for ep in SCRIPTS if ep.name == "l2t_train_model"), capsys)


@pytest.mark.parametrize("parser,argv,prefix", [
    (train.build_train_parser("", "l2t"), [*TRAIN_POSITIONALS, "--max_epoch", "3"], "--max_epoch"),
    (train.build_train_parser("", "tt"), [*TRAIN_POSITIONALS, "--n_layers", "2"], "--n_layers"),
    (track.build_parser("t", ""), [*TRACK_POSITIONALS, "--simultaneous", "2"], "--simultaneous"),
    (track.build_parser("t", ""), [*TRACK_POSITIONALS, "--rng_s", "2"], "--rng_s"),
    (train.build_resume_parser(""), ["exps", "exp", "--new_max", "2"], "--new_max"),
], ids=["l2t_train", "tt_train", "track", "track_rng_seed", "resume"])
def test_no_prefix_matching(parser, argv, prefix, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {prefix}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_documented_abbreviations_are_aliases():
    args = track.build_parser("t", "").parse_args(["--hdf5", "c.hdf5", "--discard_last", *TRACK_POSITIONALS])
    assert args.hdf5_file == "c.hdf5" and args.discard_last_point


def test_rng_is_dwi_ml_unused_option_on_tracking_not_rng_seed(caplog):
    args = vars(track.build_parser("t", "").parse_args([*TRACK_POSITIONALS, "--rng", "1234"]))
    with caplog.at_level(logging.WARNING, logger="trackflow"):
        warn_ignored_dwi_ml_args(args)
    assert args["rng_seed"] is None
    assert [r.message for r in caplog.records] == [
        "accepted for dwi_ml compatibility but without effect here: --rng"]
    assert not any(key.startswith("ignored") for key in args)  # what is left are TrackingOptions' fields


@pytest.mark.parametrize("parser,argv,named", [
    (track.build_parser("t", ""), [*TRACK_POSITIONALS, "--data_interp", "trilinear", "--skip", "0", "--sphere",
                                   "repulsion724", "--lazy", "--cache_size", "3"],
     "--data_interp, --skip, --sphere, --lazy, --cache_size"),
    (train.build_train_parser("", "l2t"), [*TRAIN_POSITIONALS, "--comet_workspace", "w", "--comet_project", "p",
                                           "--processes", "4", "--remove_invalid"],
     "--remove_invalid, --processes, --comet_workspace, --comet_project"),
    (train.build_resume_parser(""), ["exps", "exp", "-f"], "-f"),
], ids=["track", "train", "resume"])
def test_dwi_ml_options_without_effect_warn_once_naming_them(parser, argv, named, caplog):
    args = vars(parser.parse_args(argv))
    with caplog.at_level(logging.WARNING, logger="trackflow"):
        warn_ignored_dwi_ml_args(args)
    assert [r.message for r in caplog.records] == [
        f"accepted for dwi_ml compatibility but without effect here: {named}"]
    without = vars(parser.parse_args([a for a in argv if a in TRACK_POSITIONALS + TRAIN_POSITIONALS
                                      + ["exps", "exp"]]))
    warn_ignored_dwi_ml_args(without)
    assert args == without  # they change nothing


def test_counts_tsv_has_six_significant_digits(tmp_path):
    reference = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 10, 10), np.float32), np.eye(4)), reference)
    lines = [np.column_stack([np.linspace(0, total, 8), np.full(8, 2.0), np.full(8, 2.0)]).astype(np.float32)
             for total in (10 / 3, 20 / 3, 13 / 7)]
    in_path = tmp_path / "sub" / "m.trk"
    in_path.parent.mkdir()
    save_tractogram(StatefulTractogram(lines, str(reference), Space.RASMM), str(in_path), bbox_valid_check=False)
    counts = tmp_path / "counts.tsv"
    filter_main([str(in_path), str(tmp_path / "out.trk"), "--out_counts", str(counts)])
    with open(counts) as f:
        header, row = list(csv.reader(f, delimiter="\t"))
    values = dict(zip(header, row))
    assert values["mean_length_before_mm"] == "3.95238"  # (10/3 + 20/3 + 13/7) / 3
    for name in ("mean_length_before_mm", "median_length_before_mm", "mean_length_after_mm"):
        assert len(re.sub(r"[^0-9]", "", values[name]).lstrip("0")) <= 6, values
    assert pd.read_csv(counts, sep="\t")["n_before"].item() == 3
