"""Fault injection: every console script of pyproject.toml on a table of bad inputs (issue 11).

Each case runs one command IN-PROCESS (its entry point imported from ``[project.scripts]``, called with
argv, ``SystemExit`` caught, stderr captured) on a damaged copy of small session fixtures, and asserts:

- a non-zero exit (``SystemExit`` code != 0; an exception escaping ``main`` is a failure: a traceback);
- the error rule: stderr holds exactly one error line and it is its last line. A library error is
  ``error: <message>`` (``run_cli``); an argparse usage error ends with ``<prog>: error: <message>`` after
  argparse's usage lines. Log lines (warnings) may come before it; no ``Traceback``. Where the case names
  what the message must mention (the damaged file, the option), the error line contains it;
- no partial output: every declared output that did not exist is still absent (and no hidden
  ``.<name>.*tmp*`` temporary is left beside it); every one that existed (an old result, or an input that
  an output collides with) is byte-for-byte unchanged; a malicious pickle never ran (its marker folder
  does not exist).

Cases that must succeed (an empty tractogram when no streamline survives, say) are asserted as successes
with their result. Signal cases (SIGTERM, SIGKILL mid-run, two racing runs) use subprocesses.

Case ids are ``<command>-<fault>``. Counts by command (in-process table + subprocess cases):

=====================================  =====
trackflow_make_demo                       14
dwiml_create_hdf5_dataset                 50
dwiml_hdf5_print_architecture              8
l2t_train_model                           38
tt_train_model                            39
l2t_resume_training_from_checkpoint       25
tt_resume_training_from_checkpoint        25
dwiml_visualize_logs                      12
l2t_track_from_model                      58
tt_track_from_model                       59
l2t_visualize_loss                        27
tt_visualize_loss                         27
trackflow_score                           25
trackflow_filter_by_length                23
trackflow_merge_tractograms               35
trackflow_prepare_tractoflow              35
signals and races (subprocess)             6
total                                    506
=====================================  =====

(``test_counts_by_command`` keeps this table honest.)
"""

import dataclasses
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
import trx.trx_file_memmap as tmm

from fault_fixtures import (FILE_FAULTS, copy_tree, damaged_copy, hdf5_corrupt_object_header, hdf5_edited, link_tree,
                            malicious_pickle, nifti_like, snapshot, trk_on_other_grid, trk_with_nan)
from test_tractoflow import TRACTOFLOW_FROM_DEMO  # tests/ is on sys.path
from trackflow.data.hdf5.creation import create_hdf5_dataset
from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.models.l2t import Learn2TrackModel
from trackflow.models.persistence import save_model_dir
from trackflow.models.transformers import OriginalTransformerModel
from trackflow.data.tractograms import load_tractogram_file, save_tractogram_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
SUBJECT = "sub-01"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def entry_point(command: str) -> Callable:
    module, function = SCRIPTS[command].split(":")
    return getattr(importlib.import_module(module), function)


# ---------------------------------------------------------------------------------------------- the world
L2T_TINY = ["--rnn_key", "gru", "--rnn_layer_sizes", "8"]
TT_TINY = ["--model", "TTO", "--max_len", "200", "--nheads", "2", "--n_layers_e", "1", "--input_embedded_size",
           "8", "--ffnn_hidden_size", "8", "--dropout_rate", "0"]
SHORT = ["--max_epochs", "1", "--max_batches_per_epoch_training", "1", "--max_batches_per_epoch_validation", "1",
         "--batch_size_training", "5", "--batch_size_validation", "5", "--learning_rate", "0.01"]
FAMILY_TINY = {"l2t": L2T_TINY, "tt": TT_TINY}


@dataclasses.dataclass
class World:
    root: Path
    cohort: Path
    hdf5: Path
    experiments: dict   # family -> trained experiment (1 epoch x 1 batch): best_model, checkpoint, logs
    hdf5_variants: dict  # name -> damaged or edited copy of the hdf5
    tractogram: Path    # sub-01 ground truth, on the sub-01 grid
    bundles: Path       # sub-01 ground-truth masks

    @property
    def subject_dir(self) -> Path:
        return self.cohort / "dwi_ml_ready" / SUBJECT


def _set(f, name, transform):
    data = f[name][()]
    f[name][...] = transform(data)


def _nan_at(index):
    def transform(data):
        data = data.astype(float)
        data[index] = np.nan
        return data
    return transform


def _nan_in_mask(f):
    """NaN in every feature of one voxel of the tracking mask (a voxel the models do read)."""
    inside = np.argwhere(f[f"{SUBJECT}/wm_mask/data"][()][..., 0] > 0)
    return _nan_at(tuple(inside[len(inside) // 2]))


def _two_volumes(f, group):
    data = f[f"{group}/data"][()]
    del f[f"{group}/data"]
    f[group].create_dataset("data", data=np.concatenate([data, 1 - data], axis=-1))
    f[group].attrs["nb_features"] = 2


def _build_world(root: Path, cohort: Path, hdf5: Path) -> World:
    experiments = {}
    for family in ("l2t", "tt"):
        entry_point(f"{family}_train_model")([str(root), f"trained_{family}", str(hdf5), "input", "streamlines",
                                               *FAMILY_TINY[family], *SHORT])
        experiments[family] = root / f"trained_{family}"
    variants = root / "hdf5_variants"
    variants.mkdir()
    hv = {
        "nan_input": hdf5_edited(hdf5, variants / "nan_input.hdf5",
                                 lambda f: _set(f, f"{SUBJECT}/input/data", _nan_in_mask(f))),
        "nan_mask": hdf5_edited(hdf5, variants / "nan_mask.hdf5",
                                lambda f: _set(f, f"{SUBJECT}/wm_mask/data", lambda d: np.full(d.shape, np.nan))),
        "two_volume_mask": hdf5_edited(hdf5, variants / "two_volume_mask.hdf5",
                                       lambda f: _two_volumes(f, f"{SUBJECT}/wm_mask")),
        "two_volume_seeding": hdf5_edited(hdf5, variants / "two_volume_seeding.hdf5",
                                          lambda f: _two_volumes(f, f"{SUBJECT}/interface_mask")),
        "nan_streamlines": hdf5_edited(hdf5, variants / "nan_streamlines.hdf5",
                                       lambda f: _set(f, f"{SUBJECT}/streamlines/data", _nan_at((3, 1)))),
        "corrupt_header": hdf5_corrupt_object_header(hdf5, variants / "corrupt_header.hdf5", SUBJECT),
    }
    # The same cohort with a 2-feature input group (T1 and FA only): another feature count.
    config = json.loads((cohort / "config" / "hdf5_config.json").read_text())
    config["input"]["files"] = config["input"]["files"][:2]
    (variants / "two_features.json").write_text(json.dumps(config))
    lists = cohort / "config"
    hv["other_features"] = create_hdf5_dataset(
        cohort / "dwi_ml_ready", variants / "other_features.hdf5", variants / "two_features.json",
        lists / "training_subjs.txt", lists / "validation_subjs.txt", lists / "testing_subjs.txt", step_size=1.0)
    tractogram = cohort / "dwi_ml_ready" / SUBJECT / "tractograms" / f"{SUBJECT}__arc.trk"
    return World(root, cohort, hdf5, experiments, hv, tractogram, cohort / "dwi_ml_ready" / SUBJECT / "bundles")


@pytest.fixture(scope="session")
def world(tiny_cohort, tiny_hdf5, tmp_path_factory) -> World:
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_world(tmp_path_factory.mktemp("faults_world"), tiny_cohort, tiny_hdf5)
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass
class Plan:
    """What one case runs: argv, the declared outputs, and (malicious pickles) the marker that must not
    appear."""
    argv: list
    outputs: list
    marker: Path | None = None
    check: Callable | None = None  # success cases: check(plan) asserts the result


@dataclasses.dataclass
class Case:
    command: str
    fault: str
    build: Callable  # build(world, tmp_path) -> Plan
    message: str | None = None  # the error line must contain this (case-insensitive)
    succeeds: bool = False

    @property
    def id(self) -> str:
        return f"{self.command}-{self.fault}"


CASES: list[Case] = []


def case(command, fault, message=None, succeeds=False):
    def register(build):
        CASES.append(Case(command, fault, build, message, succeeds))
        return build
    return register


def add(command, fault, build, message=None, succeeds=False):
    CASES.append(Case(command, fault, build, message, succeeds))


def _s(*paths) -> list[str]:
    return [str(p) for p in paths]


# ---------------------------------------------------------------------------------------------- make_demo
def _demo(tmp, *extra, out=None):
    out = out or tmp / "demo"
    return Plan(_s(out) + ["--subjects", "2", "--streamlines_per_bundle", "2", *extra], [out])


def _demo_existing_file(w, tmp):
    (tmp / "demo").write_text("my notes")
    return _demo(tmp)


def _demo_existing_dir(w, tmp, force=()):
    (tmp / "demo").mkdir()
    (tmp / "demo" / "thesis.tex").write_text("years of work")
    return _demo(tmp, *force)


def _demo_parent_file(w, tmp):
    (tmp / "file").write_text("x")
    return _demo(tmp, out=tmp / "file" / "demo")


add("trackflow_make_demo", "output-exists-as-file", _demo_existing_file, "demo")
add("trackflow_make_demo", "output-dir-exists-no-f", _demo_existing_dir, "demo")
add("trackflow_make_demo", "output-dir-not-a-cohort-with-f", lambda w, t: _demo_existing_dir(w, t, ["-f"]), "demo")
add("trackflow_make_demo", "output-parent-is-file", _demo_parent_file)
for _fault, _opts in [("subjects-0", ["--subjects", "0"]), ("subjects-negative", ["--subjects", "-1"]),
                      ("subjects-nonsense", ["--subjects", "abc"]), ("seed-nonsense", ["--seed", "x1"]),
                      ("streamlines-per-bundle-0", ["--streamlines_per_bundle", "0"]),
                      ("streamlines-per-bundle-negative", ["--streamlines_per_bundle", "-3"])]:
    add("trackflow_make_demo", _fault, lambda w, t, o=_opts: _demo(t, *o))
_POSES = ["--validation_poses", "2", "--testing_poses", "-11"]
for _fault, _opts in [("poses-nonsense", ["--training_poses", "x"]),
                      ("poses-missing-subset", ["--training_poses", "1", "--testing_poses", "-11"]),
                      ("poses-nan", ["--training_poses", "nan", *_POSES])]:
    add("trackflow_make_demo", _fault,
        lambda w, t, o=_opts: Plan(_s(t / "demo") + ["--streamlines_per_bundle", "2", *o], [t / "demo"]))
add("trackflow_make_demo", "poses-and-subjects", lambda w, t: _demo(t, "--training_poses", "1", *_POSES))


# ---------------------------------------------------------------------------------------------- create_hdf5
def _hdf5_plan(w, tmp, mutate=None, out=None, extra=(), subjects=(SUBJECT,)):
    """A private one-subject cohort (files symlinked), changed by ``mutate(folder, lists)``."""
    folder = link_tree(w.cohort / "dwi_ml_ready" / SUBJECT, tmp / "ready" / SUBJECT).parent
    for subject in subjects[1:]:
        link_tree(w.cohort / "dwi_ml_ready" / subject, folder / subject)
    config = tmp / "config.json"
    config.write_text((w.cohort / "config" / "hdf5_config.json").read_text())
    lists = {name: tmp / f"{name}.txt" for name in ("training", "validation", "testing")}
    lists["training"].write_text("\n".join(subjects) + "\n")
    lists["validation"].write_text("")
    lists["testing"].write_text("")
    paths = {"folder": folder, "config": config, **lists}
    if mutate:
        mutate(paths)
    out = out or tmp / "out.hdf5"
    argv = _s(paths["folder"], out, paths["config"], lists["training"], lists["validation"], lists["testing"])
    return Plan(argv + ["--step_size", "1.0", *extra], [out, Path(out).with_suffix(".json")])


def _hdf5_case(fault, mutate, message=None, **kw):
    add("dwiml_create_hdf5_dataset", fault, lambda w, t: _hdf5_plan(w, t, mutate, **kw), message)


def _subject_file(paths, relative):
    return paths["folder"] / SUBJECT / relative.format(s=SUBJECT)


def _replace_folder_by_file(paths):
    paths["folder"] = paths["folder"].parent / "ready_file"
    paths["folder"].write_text("not a folder")


_hdf5_case("folder-missing", lambda p: p.update(folder=p["folder"].parent / "nowhere"), "nowhere")
_hdf5_case("folder-is-file", _replace_folder_by_file, "ready_file")
_hdf5_case("folder-without-subject", lambda p: p.update(folder=p["folder"].parent / "empty_ready")
           or (p["folder"].mkdir()), SUBJECT)
for _kind in FILE_FAULTS:
    _hdf5_case(f"config-{_kind}", lambda p, k=_kind: damaged_copy(k, p["config"], p["config"]), "config")
_hdf5_case("config-not-an-object", lambda p: p["config"].write_text("[1, 2]"), "config")
_hdf5_case("config-no-groups", lambda p: p["config"].write_text("{}"), "config")
_hdf5_case("config-unknown-group-type", lambda p: p["config"].write_text(json.dumps(
    {"input": {"type": "surface", "files": ["anat/*__T1w.nii.gz"]}})), "surface")
for _kind in ("missing", "directory"):
    _hdf5_case(f"training-list-{_kind}", lambda p, k=_kind: damaged_copy(k, p["training"], p["training"]),
               "training")
_hdf5_case("training-list-garbage", lambda p: damaged_copy("garbage", p["training"], p["training"]))
_hdf5_case("training-list-unknown-subject", lambda p: p["training"].write_text("sub-99\n"), "sub-99")
_hdf5_case("validation-list-missing", lambda p: p["validation"].unlink(), "validation")
_hdf5_case("testing-list-missing", lambda p: p["testing"].unlink(), "testing")
for _kind in ("empty", "garbage", "truncated", "directory"):
    _hdf5_case(f"volume-nii-gz-{_kind}", lambda p, k=_kind: damaged_copy(
        k, _subject_file(p, "anat/{s}__T1w.nii.gz").resolve(), _subject_file(p, "anat/{s}__T1w.nii.gz")),
        "T1w")
def _in_brain(p):
    """A voxel inside the subject's brain (standardization) mask."""
    brain = np.asarray(nib.load(str(_subject_file(p, "masks/{s}__brain_mask.nii.gz"))).dataobj)
    return tuple(np.argwhere(brain > 0)[len(np.argwhere(brain > 0)) // 2])


_hdf5_case("volume-nan-inside-brain", lambda p: nifti_like(
    _subject_file(p, "anat/{s}__T1w.nii.gz").resolve(), _subject_file(p, "anat/{s}__T1w.nii.gz"),
    _nan_at(_in_brain(p))), "T1w")


def _inf_at(index):
    def transform(data):
        data[index] = np.inf
        return data
    return transform


_hdf5_case("volume-inf-inside-brain", lambda p: nifti_like(
    _subject_file(p, "dwi/{s}__fa.nii.gz").resolve(), _subject_file(p, "dwi/{s}__fa.nii.gz"),
    _inf_at(_in_brain(p))), "fa")
_hdf5_case("volume-wrong-grid-shape", lambda p: nifti_like(
    _subject_file(p, "dwi/{s}__fodf.nii.gz").resolve(), _subject_file(p, "dwi/{s}__fodf.nii.gz"),
    lambda d: d[:-2]), "fodf")
_hdf5_case("volume-wrong-grid-affine", lambda p: nifti_like(
    _subject_file(p, "dwi/{s}__fodf.nii.gz").resolve(), _subject_file(p, "dwi/{s}__fodf.nii.gz"),
    lambda d: (d, np.diag([2.0, 2.0, 2.0, 1.0]))), "fodf")
_WM = "masks/{s}__mask_wm.nii.gz"
for _kind in ("empty", "garbage", "truncated"):
    _hdf5_case(f"mask-nii-gz-{_kind}", lambda p, k=_kind: damaged_copy(
        k, _subject_file(p, _WM).resolve(), _subject_file(p, _WM)), "mask_wm")
_hdf5_case("mask-all-nan", lambda p: nifti_like(_subject_file(p, _WM).resolve(), _subject_file(p, _WM),
                                                lambda d: np.full(d.shape, np.nan)), "wm_mask")
_hdf5_case("mask-some-inf", lambda p: nifti_like(_subject_file(p, _WM).resolve(), _subject_file(p, _WM),
                                                 lambda d: np.where(d > 0, np.inf, d)), "wm_mask")
_hdf5_case("mask-wrong-grid", lambda p: nifti_like(_subject_file(p, _WM).resolve(), _subject_file(p, _WM),
                                                   lambda d: d[:, :-3]), "wm_mask")


def _mask_group_of_two_volumes(p):
    config = json.loads(p["config"].read_text())
    config["wm_mask"]["files"] = ["masks/*__brain_mask.nii.gz", "masks/*__mask_wm.nii.gz"]
    p["config"].write_text(json.dumps(config))


_hdf5_case("mask-group-of-two-volumes", _mask_group_of_two_volumes, "wm_mask")
_TRK = "tractograms/{s}__arc.trk"
for _kind in ("empty", "garbage", "truncated", "directory"):
    _hdf5_case(f"trk-{_kind}", lambda p, k=_kind: damaged_copy(k, _subject_file(p, _TRK).resolve(),
                                                              _subject_file(p, _TRK)), "arc")
_hdf5_case("trk-nan-coordinates", lambda p: trk_with_nan(_subject_file(p, _TRK).resolve(), _subject_file(p, _TRK)),
           "arc")
_hdf5_case("trk-other-grid", lambda p: trk_on_other_grid(_subject_file(p, _TRK).resolve(),
                                                         _subject_file(p, _TRK)), "arc")
add("dwiml_create_hdf5_dataset", "subjects-with-different-feature-counts",
    lambda w, t: _hdf5_plan(w, t, lambda p: (p["folder"] / "sub-02" / "dwi" / "sub-02__fodf.nii.gz").unlink(),
                            subjects=(SUBJECT, "sub-02"), extra=["--skip_enforce_files_presence"]), "sub-02")


def _hdf5_existing(w, t):
    plan = _hdf5_plan(w, t)
    Path(plan.argv[1]).write_bytes(b"old result")
    return plan


def _hdf5_output_is_config(w, t):
    plan = _hdf5_plan(w, t)
    plan.argv[1] = plan.argv[2]
    plan.outputs = [Path(plan.argv[2])]
    return plan


def _hdf5_output_dir(w, t):
    plan = _hdf5_plan(w, t)
    Path(plan.argv[1]).mkdir()
    return plan


def _hdf5_parent_file(w, t):
    (t / "afile").write_text("x")
    return _hdf5_plan(w, t, out=t / "afile" / "out.hdf5")


add("dwiml_create_hdf5_dataset", "output-is-directory", _hdf5_output_dir, "out.hdf5")
add("dwiml_create_hdf5_dataset", "output-unknown-extension", lambda w, t: _hdf5_plan(w, t, out=t / "out.xyz"),
    "xyz")
add("dwiml_create_hdf5_dataset", "output-exists-no-f", _hdf5_existing, "exists")
add("dwiml_create_hdf5_dataset", "output-collides-with-config", _hdf5_output_is_config, "config")
add("dwiml_create_hdf5_dataset", "output-parent-is-file", _hdf5_parent_file)
for _fault, _opts in [("step-size-negative", ["--step_size", "-1"]), ("step-size-0", ["--step_size", "0"]),
                      ("nb-points-0", ["--nb_points", "0"]), ("nb-points-negative", ["--nb_points", "-2"]),
                      ("compress-negative", ["--compress", "-1"])]:
    def _numeric(w, t, o=_opts):
        plan = _hdf5_plan(w, t)
        plan.argv = plan.argv[:6] + o
        return plan
    add("dwiml_create_hdf5_dataset", _fault, _numeric)


def _hdf5_success_check(plan):
    import h5py
    with h5py.File(plan.argv[1]) as f:
        assert list(f.attrs["training_subjs"]) == [SUBJECT]
        assert f[f"{SUBJECT}/input/data"].shape[-1] == 30


add("dwiml_create_hdf5_dataset", "valid-one-subject",
    lambda w, t: dataclasses.replace(_hdf5_plan(w, t), check=_hdf5_success_check), succeeds=True)


# ---------------------------------------------------------------------------------------------- print_architecture
def _print_plan(path):
    return Plan(_s(path), [])


for _kind in FILE_FAULTS:
    add("dwiml_hdf5_print_architecture", f"hdf5-{_kind}",
        lambda w, t, k=_kind: _print_plan(damaged_copy(k, w.hdf5, t / "in.hdf5")), "in.hdf5")
add("dwiml_hdf5_print_architecture", "hdf5-corrupt-object-header",
    lambda w, t: _print_plan(w.hdf5_variants["corrupt_header"]), "corrupt_header")
add("dwiml_hdf5_print_architecture", "hdf5-is-json",
    lambda w, t: _print_plan(w.cohort / "config" / "hdf5_config.json"), "hdf5_config.json")
add("dwiml_hdf5_print_architecture", "valid", lambda w, t: _print_plan(w.hdf5), succeeds=True)


# ---------------------------------------------------------------------------------------------- train
def _train_plan(w, tmp, family, hdf5=None, exps=None, name="exp", extra=(), input_group="input",
                streamlines_group="streamlines"):
    exps = exps or tmp / "exps"
    exps.mkdir(exist_ok=True) if exps == tmp / "exps" else None
    argv = _s(exps) + [name] + _s(hdf5 or w.hdf5) + [input_group, streamlines_group, *FAMILY_TINY[family], *SHORT,
                                                     *extra]
    return Plan(argv, [exps / name])


def _train_existing(w, tmp, family):
    plan = _train_plan(w, tmp, family)
    link_tree(w.experiments[family], plan.outputs[0])
    return plan


def _train_cases(family):
    command = f"{family}_train_model"
    add(command, "experiments-path-missing", lambda w, t: _train_plan(w, t, family, exps=t / "nowhere"), "nowhere")

    def exps_file(w, t):
        (t / "exps_file").write_text("x")
        return _train_plan(w, t, family, exps=t / "exps_file")
    add(command, "experiments-path-is-file", exps_file, "exps_file")
    for kind in FILE_FAULTS:
        add(command, f"hdf5-{kind}", lambda w, t, k=kind: _train_plan(
            w, t, family, hdf5=damaged_copy(k, w.hdf5, t / "in.hdf5")), "in.hdf5")
    add(command, "hdf5-corrupt-object-header",
        lambda w, t: _train_plan(w, t, family, hdf5=w.hdf5_variants["corrupt_header"]), "corrupt_header")
    add(command, "input-group-unknown", lambda w, t: _train_plan(w, t, family, input_group="nope"), "nope")
    add(command, "streamline-group-unknown", lambda w, t: _train_plan(w, t, family, streamlines_group="nope"),
        "nope")
    add(command, "input-group-is-streamlines",
        lambda w, t: _train_plan(w, t, family, input_group="streamlines"), "streamlines")
    add(command, "streamline-group-is-volume",
        lambda w, t: _train_plan(w, t, family, streamlines_group="wm_mask"), "wm_mask")
    add(command, "nan-input-volume", lambda w, t: _train_plan(w, t, family, hdf5=w.hdf5_variants["nan_input"]),
        "nan")
    add(command, "nan-streamline-coordinates",
        lambda w, t: _train_plan(w, t, family, hdf5=w.hdf5_variants["nan_streamlines"]), "nan")
    add(command, "experiment-exists-no-f", lambda w, t: _train_existing(w, t, family), "exists")
    numeric = [("max-epochs-0", ["--max_epochs", "0"]), ("max-epochs-negative", ["--max_epochs", "-1"]),
               ("learning-rate-negative", ["--learning_rate", "-1"]),
               ("learning-rate-nonsense", ["--learning_rate", "fast"]),
               ("batch-size-0", ["--batch_size_training", "0"]),
               ("batch-size-negative", ["--batch_size_validation", "-5"]),
               ("weight-decay-negative", ["--weight_decay", "-1"]),
               ("noise-negative", ["--noise_gaussian_size_forward", "-1"]),
               ("split-ratio-above-1", ["--split_ratio", "2"]),
               ("reverse-ratio-negative", ["--reverse_ratio", "-0.5"]),
               ("eos-weight-without-add-eos", ["--eos_weight", "2"]),
               ("step-size-negative", ["--step_size", "-1"]),
               ("clip-grad-negative", ["--clip_grad", "-1"]),
               ("patience-negative", ["--patience", "-1"]),
               ("max-batches-0", ["--max_batches_per_epoch_training", "0"]),
               ("lazy-cache-size-negative", ["--lazy", "--cache_size", "-1"]),
               ("tracking-phase-without-mask", ["--add_a_tracking_validation_phase"]),
               ("tracking-phase-frequency-0", ["--add_a_tracking_validation_phase", "--tracking_mask", "wm_mask",
                                               "--tracking_phase_frequency", "0"]),
               ("tracking-mask-unknown-group", ["--add_a_tracking_validation_phase", "--tracking_mask", "nope"])]
    if family == "l2t":
        numeric += [("dropout-above-1", ["--dropout", "1.5"]), ("rnn-layer-size-0", ["--rnn_layer_sizes", "0"]),
                    ("prev-dirs-embedding-without-prev-dirs", ["--prev_dirs_embedding_key", "nn_embedding",
                                                               "--prev_dirs_embedded_size", "4"]),
                    ("nb-previous-dirs-negative", ["--nb_previous_dirs", "-1"])]
    else:
        numeric += [("dropout-above-1", ["--dropout_rate", "1.5"]), ("nheads-not-dividing", ["--nheads", "3"]),
                    ("max-len-0", ["--max_len", "0"]), ("n-layers-e-0", ["--n_layers_e", "0"]),
                    ("n-layers-d-with-tts", ["--model", "TTS", "--n_layers_d", "2"])]
    for fault, opts in numeric:
        add(command, fault, lambda w, t, o=opts: _train_plan(w, t, family, extra=o))


_train_cases("l2t")
_train_cases("tt")


# ---------------------------------------------------------------------------------------------- resume
def _resume(w, tmp, family, mutate=None, extra=("--new_max_epochs", "2"), experiment=None, marker=None):
    """Resume a private copy (files copied: resuming writes into the folder) of a trained experiment."""
    folder = copy_tree(experiment or w.experiments[family], tmp / "exps" / "exp")
    if mutate:
        mutate(folder)
    return Plan(_s(tmp / "exps", "exp") + list(extra), [folder], marker)


def _rm(path):
    def mutate(folder):
        target = folder / path
        if target.is_dir() and not target.is_symlink():
            import shutil
            shutil.rmtree(target)
        else:
            target.unlink()
    return mutate


def _resume_cases(family):
    command = f"{family}_resume_training_from_checkpoint"
    other = "tt" if family == "l2t" else "l2t"
    add(command, "experiment-missing", lambda w, t: _resume(w, t, family, _rm("")), "exp")

    def experiments_path_missing(w, t):
        return Plan(_s(t / "nowhere", "exp", ) + ["--new_max_epochs", "2"], [t / "nowhere"])
    add(command, "experiments-path-missing", experiments_path_missing, "nowhere")

    def experiment_is_file(w, t):
        (t / "exps").mkdir()
        (t / "exps" / "exp").write_text("x")
        return Plan(_s(t / "exps", "exp") + ["--new_max_epochs", "2"], [t / "exps" / "exp"])
    add(command, "experiment-is-file", experiment_is_file, "exp")
    add(command, "no-checkpoint", lambda w, t: _resume(w, t, family, _rm("checkpoint")), "checkpoint")
    state = "checkpoint/checkpoint_state.pkl"
    model_state = "checkpoint/model/model_state.pkl"
    for kind in ("empty", "garbage", "truncated", "directory"):
        add(command, f"checkpoint-pkl-{kind}", lambda w, t, k=kind: _resume(
            w, t, family, lambda f: damaged_copy(k, (f / state).resolve(), f / state)), "checkpoint_state")
    add(command, "checkpoint-pkl-malicious", lambda w, t: _resume(
        w, t, family, lambda f: malicious_pickle(f / state, t / "pwned"), marker=t / "pwned"), "checkpoint_state")
    for kind in ("empty", "truncated"):
        add(command, f"model-pkl-{kind}", lambda w, t, k=kind: _resume(
            w, t, family, lambda f: damaged_copy(k, (f / model_state).resolve(), f / model_state)), "model_state")
    add(command, "model-pkl-malicious", lambda w, t: _resume(
        w, t, family, lambda f: malicious_pickle(f / model_state, t / "pwned"), marker=t / "pwned"), "model_state")
    params = "checkpoint/model/parameters.json"
    for kind in ("garbage", "truncated"):
        add(command, f"model-parameters-json-{kind}", lambda w, t, k=kind: _resume(
            w, t, family, lambda f: damaged_copy(k, (f / params).resolve(), f / params)), "parameters.json")
    for kind in ("missing", "garbage", "truncated"):
        add(command, f"hdf5-{kind}", lambda w, t, k=kind: _resume(
            w, t, family, extra=["--new_max_epochs", "2", "--hdf5_file", str(damaged_copy(k, w.hdf5, t / "in.hdf5"))]),
            "in.hdf5")
    add(command, "hdf5-other-feature-count", lambda w, t: _resume(
        w, t, family, extra=["--new_max_epochs", "2", "--hdf5_file", str(w.hdf5_variants["other_features"])]),
        "feature")
    add(command, "hdf5-corrupt-object-header", lambda w, t: _resume(
        w, t, family, extra=["--new_max_epochs", "2", "--hdf5_file", str(w.hdf5_variants["corrupt_header"])]),
        "corrupt_header")
    add(command, "new-max-epochs-negative", lambda w, t: _resume(w, t, family, extra=["--new_max_epochs", "-1"]),
        "max_epochs")
    add(command, "new-max-epochs-not-larger", lambda w, t: _resume(w, t, family, extra=["--new_max_epochs", "1"]),
        "max_epochs")
    add(command, "finished-run-without-new-max-epochs", lambda w, t: _resume(w, t, family, extra=[]),
        "max_epochs")
    add(command, "new-patience-negative", lambda w, t: _resume(
        w, t, family, extra=["--new_max_epochs", "2", "--new_patience", "-1"]), "patience")
    add(command, "wrong-model-family", lambda w, t: _resume(w, t, family, experiment=w.experiments[other]),
        f"{other}_resume")

    def check(plan):
        losses = np.load(Path(plan.argv[0]) / plan.argv[1] / "logs" / "train_loss_monitor_per_epoch.npy")
        assert len(losses) == 2
    add(command, "valid-one-more-epoch",
        lambda w, t: dataclasses.replace(_resume(w, t, family), outputs=[], check=check), succeeds=True)


_resume_cases("l2t")
_resume_cases("tt")


# ---------------------------------------------------------------------------------------------- visualize_logs
def _logs(w, tmp, mutate=None, prefix=None, extra=()):
    folder = link_tree(w.experiments["l2t"], tmp / "exp")
    if mutate:
        mutate(folder)
    prefix = prefix or tmp / "plots" / "cmp_"
    outputs = [Path(f"{prefix}{name}.png") for name in ("loss", "grad_norm", "time")]
    return Plan(_s(folder, *extra) + ["--save_figures", str(prefix)], outputs)


_LOSS_NPY = "logs/train_loss_monitor_per_epoch.npy"
add("dwiml_visualize_logs", "experiment-missing", lambda w, t: _logs(w, t, _rm("")), "exp")
add("dwiml_visualize_logs", "experiment-is-file",
    lambda w, t: _logs(w, t, lambda f: _rm("")(f) or f.write_text("x")), "exp")
add("dwiml_visualize_logs", "no-logs-folder", lambda w, t: _logs(w, t, _rm("logs")), "logs")
for _kind in ("empty", "garbage", "truncated", "directory"):  # a missing log is skipped, by design
    add("dwiml_visualize_logs", f"npy-{_kind}", lambda w, t, k=_kind: _logs(
        w, t, lambda f: damaged_copy(k, (f / _LOSS_NPY).resolve(), f / _LOSS_NPY)), "train_loss")
add("dwiml_visualize_logs", "npy-wrong-shape", lambda w, t: _logs(
    w, t, lambda f: (f / _LOSS_NPY).unlink() or np.save(f / _LOSS_NPY, np.zeros((2, 3, 4)))), "train_loss")
add("dwiml_visualize_logs", "second-experiment-missing", lambda w, t: _logs(w, t, extra=[t / "other_exp"]),
    "other_exp")


def _logs_parent_file(w, t):
    (t / "afile").write_text("x")
    return _logs(w, t, prefix=t / "afile" / "cmp_")


def _logs_existing(w, t):
    plan = _logs(w, t)
    plan.outputs[0].parent.mkdir(parents=True)
    plan.outputs[0].write_bytes(b"old figure")
    return plan


add("dwiml_visualize_logs", "output-parent-is-file", _logs_parent_file)
add("dwiml_visualize_logs", "output-exists-no-f", _logs_existing, "exists")


def _logs_check(plan):
    for png in plan.outputs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


add("dwiml_visualize_logs", "valid",
    lambda w, t: dataclasses.replace(_logs(w, t), check=_logs_check), succeeds=True)


# ---------------------------------------------------------------------------------------------- track
def _track(w, tmp, family, experiment=None, hdf5=None, subject=SUBJECT, input_group="input", out=None,
           seeding="interface_mask", mask="wm_mask", extra=(), mutate=None, marker=None):
    if experiment is None:
        experiment = link_tree(w.experiments[family], tmp / "exp")
        if mutate:
            mutate(experiment)
    out = out or tmp / "out.trk"
    count = [] if "--npv" in extra else ["--nt", "5"]
    argv = _s(experiment) + [subject, input_group, str(out), seeding, "--hdf5_file", str(hdf5 or w.hdf5), *count,
                             "--min_length", "0", "--max_length", "20", "--rng_seed", "1"]
    argv += ["--tracking_mask_group", mask] if mask else []
    return Plan(argv + list(extra), [out], marker)


def _untrained_eos_model(family, hdf5):
    with HDF5Cohort(hdf5) as cohort:
        nb_features = cohort.volume_groups()["input"]
    head = {"dg_key": "sphere-classification", "dg_args": {"add_eos": True}}
    torch.manual_seed(0)
    if family == "l2t":
        return Learn2TrackModel(nb_features=nb_features, step_size=1.0, rnn_key="gru", rnn_layer_sizes=[4], **head)
    return OriginalTransformerModel(nb_features=nb_features, step_size=1.0, max_len=200, n_layers_e=1, n_layers_d=1,
                                    nheads=2, input_embedded_size=8, ffnn_hidden_size=8, dropout_rate=0.0,
                                    input_embedding_key="nn_embedding", **head)


def _track_cases(family):
    command = f"{family}_track_from_model"
    other = "tt" if family == "l2t" else "l2t"
    T = _track
    add(command, "experiment-missing", lambda w, t: T(w, t, family, experiment=t / "nowhere"), "nowhere")
    add(command, "no-best-model", lambda w, t: T(w, t, family, mutate=_rm("best_model")), "best_model")
    model_state = "best_model/model_state.pkl"
    for kind in ("empty", "garbage", "truncated", "directory"):
        add(command, f"model-pkl-{kind}", lambda w, t, k=kind: T(
            w, t, family, mutate=lambda f: damaged_copy(k, (f / model_state).resolve(), f / model_state)),
            "model_state")
    add(command, "model-pkl-malicious", lambda w, t: T(
        w, t, family, mutate=lambda f: malicious_pickle(f / model_state, t / "pwned"), marker=t / "pwned"),
        "model_state")
    params = "best_model/parameters.json"
    for kind in ("missing", "garbage", "truncated"):
        add(command, f"model-parameters-json-{kind}", lambda w, t, k=kind: T(
            w, t, family, mutate=lambda f: damaged_copy(k, (f / params).resolve(), f / params)), "parameters.json")
    add(command, "model-type-garbage", lambda w, t: T(
        w, t, family, mutate=lambda f: damaged_copy("garbage", None, f / "best_model" / "model_type.txt")),
        "model_type")
    for kind in FILE_FAULTS:
        add(command, f"hdf5-{kind}", lambda w, t, k=kind: T(
            w, t, family, hdf5=damaged_copy(k, w.hdf5, t / "in.hdf5")), "in.hdf5")
    add(command, "hdf5-corrupt-object-header",
        lambda w, t: T(w, t, family, hdf5=w.hdf5_variants["corrupt_header"]), "corrupt_header")

    def recorded_hdf5_missing(w, t):
        plan = T(w, t, family, mutate=lambda f: (f / "parameters_latest.json").unlink() or (
            f / "parameters_latest.json").write_text(json.dumps({"hdf5 file": str(t / "gone.hdf5")})))
        i = plan.argv.index("--hdf5_file")
        del plan.argv[i:i + 2]
        return plan
    add(command, "recorded-hdf5-missing", recorded_hdf5_missing, "gone.hdf5")
    add(command, "subject-unknown", lambda w, t: T(w, t, family, subject="sub-99"), "sub-99")
    add(command, "input-group-unknown", lambda w, t: T(w, t, family, input_group="nope"), "nope")
    add(command, "input-group-wrong-features", lambda w, t: T(w, t, family, input_group="wm_mask"), "feature")
    add(command, "seeding-group-unknown", lambda w, t: T(w, t, family, seeding="nope"), "nope")
    add(command, "seeding-group-is-streamlines", lambda w, t: T(w, t, family, seeding="streamlines"), "streamlines")
    add(command, "tracking-mask-group-unknown", lambda w, t: T(w, t, family, mask="nope"), "nope")
    add(command, "tracking-mask-all-nan", lambda w, t: T(w, t, family, hdf5=w.hdf5_variants["nan_mask"]), "wm_mask")
    add(command, "tracking-mask-two-volumes",
        lambda w, t: T(w, t, family, hdf5=w.hdf5_variants["two_volume_mask"]), "wm_mask")
    add(command, "seeding-mask-two-volumes",
        lambda w, t: T(w, t, family, hdf5=w.hdf5_variants["two_volume_seeding"]), "interface_mask")
    add(command, "input-volume-nan", lambda w, t: T(w, t, family, hdf5=w.hdf5_variants["nan_input"]), "nan")

    def out_dir(w, t):
        (t / "out.trk").mkdir()
        return T(w, t, family)

    def out_existing(w, t):
        (t / "out.trk").write_bytes(b"old tractogram")
        return T(w, t, family)

    def out_is_hdf5(w, t):
        hdf5 = t / "in.hdf5"
        hdf5.write_bytes(w.hdf5.read_bytes())
        plan = T(w, t, family, hdf5=hdf5, out=hdf5)
        return plan

    def out_parent_file(w, t):
        (t / "afile").write_text("x")
        return T(w, t, family, out=t / "afile" / "out.trk")
    add(command, "output-is-directory", out_dir, "out.trk")
    add(command, "output-collides-with-hdf5", out_is_hdf5, "in.hdf5")
    add(command, "output-unknown-extension", lambda w, t: T(w, t, family, out=t / "out.xyz"), "xyz")
    add(command, "output-exists-no-f", out_existing, "exists")
    add(command, "output-parent-is-file", out_parent_file)
    add(command, "seeds-in-tck", lambda w, t: T(w, t, family, out=t / "out.tck", extra=["--save_seeds"]), "tck")
    numeric = [("theta-negative", ["--theta", "-10"]), ("theta-nonsense", ["--theta", "wide"]),
               ("step-size-negative", ["--step_size", "-1"]), ("step-size-0", ["--step_size", "0"]),
               ("max-length-below-one-step", ["--max_length", "0.5"]),
               ("step-size-above-max-length", ["--step_size", "5", "--max_length", "2"]),
               ("min-length-negative", ["--min_length", "-5"]),
               ("min-length-above-max-length", ["--min_length", "50"]),
               ("eos-stop-above-1", ["--eos_stop", "1.5"]), ("npv-0", ["--npv", "0"]), ("nt-negative", ["--nt", "-3"]),
               ("nt-nonsense", ["--nt", "many"]), ("rng-seed-nonsense", ["--rng_seed", "abc"]),
               ("simultaneous-tracking-0", ["--simultaneous_tracking", "0"]),
               ("compress-negative", ["--compress", "-1"]), ("algo-unknown", ["--algo", "magic"]),
               ("mask-interp-unknown", ["--mask_interp", "cubic"]), ("subset-unknown", ["--subset", "all"]),
               ("eos-stop-unknown-word", ["--eos_stop", "maximum"]),
               ("prob-sampling-unknown", ["--algo", "prob", "--prob_sampling", "sphere"])]
    for fault, opts in numeric:
        add(command, fault, lambda w, t, o=opts: T(w, t, family, extra=o))
    add(command, "wrong-model-family", lambda w, t: T(w, t, family, experiment=w.experiments[other]),
        f"{other}_track_from_model")

    def eos_auto_uncalibrated(w, t):
        # an EOS model without eos_calibration.json (trained before calibration existed)
        experiment = t / "eos_exp"
        save_model_dir(_untrained_eos_model(family, w.hdf5), experiment / "best_model")
        return T(w, t, family, experiment=experiment, extra=["--eos_stop", "auto"])
    add(command, "eos-stop-auto-without-calibration", eos_auto_uncalibrated, "eos_calibration.json")
    if family == "tt":
        def default_max_length(w, t):
            plan = T(w, t, family)
            i = plan.argv.index("--max_length")
            del plan.argv[i:i + 2]
            return plan
        add(command, "default-max-length-above-model-max-len", default_max_length, "max_length")

    def check_empty(plan):
        assert len(nib.streamlines.load(plan.argv[3]).streamlines) == 0

    def check_five(plan):
        assert len(nib.streamlines.load(plan.argv[3]).streamlines) == 5
    add(command, "no-survivor-writes-empty-tractogram", lambda w, t: dataclasses.replace(T(
        w, t, family, mask="interface_mask", extra=["--min_length", "15"]), outputs=[], check=check_empty),
        succeeds=True)
    add(command, "valid", lambda w, t: dataclasses.replace(T(w, t, family), outputs=[], check=check_five),
        succeeds=True)


_track_cases("l2t")
_track_cases("tt")


# ---------------------------------------------------------------------------------------------- visualize_loss
def _loss(w, tmp, family, experiment=None, hdf5=None, subject=SUBJECT, input_group="input", source=None,
          extra=("--compute_histogram",), mutate=None, marker=None, out_dir=None):
    if experiment is None:
        experiment = link_tree(w.experiments[family], tmp / "exp")
        if mutate:
            mutate(experiment)
    out_dir = out_dir or tmp / "visu"
    source = source or ["--streamlines_group", "streamlines"]
    argv = _s(experiment, hdf5 or w.hdf5) + [subject, input_group, *map(str, source), "--subset", "training",
                                             "--out_dir", str(out_dir), *extra]
    return Plan(argv, [out_dir], marker)


def _loss_cases(family):
    command = f"{family}_visualize_loss"
    other = "tt" if family == "l2t" else "l2t"
    L = _loss
    model_state = "best_model/model_state.pkl"
    add(command, "experiment-missing", lambda w, t: L(w, t, family, experiment=t / "nowhere"), "nowhere")
    add(command, "model-pkl-truncated", lambda w, t: L(
        w, t, family, mutate=lambda f: damaged_copy("truncated", (f / model_state).resolve(), f / model_state)),
        "model_state")
    add(command, "model-pkl-malicious", lambda w, t: L(
        w, t, family, mutate=lambda f: malicious_pickle(f / model_state, t / "pwned"), marker=t / "pwned"),
        "model_state")
    for kind in FILE_FAULTS:
        add(command, f"hdf5-{kind}", lambda w, t, k=kind: L(
            w, t, family, hdf5=damaged_copy(k, w.hdf5, t / "in.hdf5")), "in.hdf5")
    add(command, "hdf5-corrupt-object-header",
        lambda w, t: L(w, t, family, hdf5=w.hdf5_variants["corrupt_header"]), "corrupt_header")
    add(command, "subject-unknown", lambda w, t: L(w, t, family, subject="sub-99"), "sub-99")
    add(command, "input-group-unknown", lambda w, t: L(w, t, family, input_group="nope"), "nope")
    add(command, "streamlines-group-unknown",
        lambda w, t: L(w, t, family, source=["--streamlines_group", "nope"]), "nope")
    for kind in FILE_FAULTS:
        add(command, f"streamlines-file-{kind}", lambda w, t, k=kind: L(
            w, t, family, source=["--streamlines_file", damaged_copy(k, w.tractogram, t / "lines.trk")]),
            "lines.trk")
    add(command, "streamlines-file-nan-coordinates", lambda w, t: L(
        w, t, family, source=["--streamlines_file", trk_with_nan(w.tractogram, t / "lines.trk")]), "lines.trk")
    add(command, "streamlines-file-other-grid", lambda w, t: L(
        w, t, family, source=["--streamlines_file", trk_on_other_grid(w.tractogram, t / "lines.trk")]), "lines.trk")

    def unknown_extension(w, t):
        (t / "lines.xyz").write_bytes(w.tractogram.read_bytes())
        return L(w, t, family, source=["--streamlines_file", t / "lines.xyz"])
    add(command, "streamlines-file-unknown-extension", unknown_extension, "xyz")
    add(command, "batch-size-0", lambda w, t: L(w, t, family, extra=["--compute_histogram", "--batch_size", "0"]),
        "batch_size")
    add(command, "best-and-worst-above-100", lambda w, t: L(
        w, t, family, extra=["--save_colored_best_and_worst", "150"]), "best_and_worst")
    add(command, "no-output-requested", lambda w, t: L(w, t, family, extra=[]))

    def out_dir_file(w, t):
        (t / "visu").write_text("x")
        return L(w, t, family)

    def existing(w, t):
        (t / "visu").mkdir()
        (t / "visu" / f"{SUBJECT}_histogram.png").write_bytes(b"old figure")
        return L(w, t, family)
    add(command, "out-dir-is-file", out_dir_file, "visu")
    add(command, "output-exists-no-f", existing, "exists")
    add(command, "wrong-model-family", lambda w, t: L(w, t, family, experiment=w.experiments[other]),
        f"{other}_visualize_loss")

    def check(plan):
        assert (plan.outputs[0] / f"{SUBJECT}_histogram.png").read_bytes()[:4] == b"\x89PNG"
    add(command, "valid-histogram", lambda w, t: dataclasses.replace(L(w, t, family), check=check), succeeds=True)


_loss_cases("l2t")
_loss_cases("tt")


# ---------------------------------------------------------------------------------------------- score
def _score(w, tmp, tractogram=None, bundles=None, out=None, extra=(), mutate=None):
    if bundles is None:
        bundles = link_tree(w.bundles, tmp / "bundles")
        if mutate:
            mutate(bundles)
    out = out or tmp / "scores.json"
    return Plan(_s(tractogram or w.tractogram, bundles, out) + list(extra), [out])


_MASK = f"{SUBJECT}__arc__mask.nii.gz"
for _kind in FILE_FAULTS:
    add("trackflow_score", f"tractogram-{_kind}", lambda w, t, k=_kind: _score(
        w, t, tractogram=damaged_copy(k, w.tractogram, t / "in.trk")), "in.trk")
add("trackflow_score", "tractogram-nan-coordinates",
    lambda w, t: _score(w, t, tractogram=trk_with_nan(w.tractogram, t / "in.trk")), "in.trk")
add("trackflow_score", "tractogram-other-grid",
    lambda w, t: _score(w, t, tractogram=trk_on_other_grid(w.tractogram, t / "in.trk")), "in.trk")


def _score_xyz(w, t):
    (t / "in.xyz").write_bytes(w.tractogram.read_bytes())
    return _score(w, t, tractogram=t / "in.xyz")


add("trackflow_score", "tractogram-unknown-extension", _score_xyz, "xyz")
add("trackflow_score", "bundles-dir-missing", lambda w, t: _score(w, t, bundles=t / "nowhere"), "nowhere")
add("trackflow_score", "bundles-dir-is-file", lambda w, t: _score(w, t, bundles=w.tractogram), "arc.trk")
add("trackflow_score", "bundles-dir-empty",
    lambda w, t: _score(w, t, bundles=(t / "empty").mkdir() or t / "empty"), "empty")
for _kind in ("empty", "garbage", "truncated"):
    add("trackflow_score", f"mask-nii-gz-{_kind}", lambda w, t, k=_kind: _score(
        w, t, mutate=lambda b: damaged_copy(k, (b / _MASK).resolve(), b / _MASK)), "arc__mask")
add("trackflow_score", "mask-other-grid", lambda w, t: _score(w, t, mutate=lambda b: nifti_like(
    (b / _MASK).resolve(), b / _MASK, lambda d: d[:-2])), "arc")
add("trackflow_score", "mask-all-zero", lambda w, t: _score(w, t, mutate=lambda b: nifti_like(
    (b / _MASK).resolve(), b / _MASK, np.zeros_like)), "arc")
add("trackflow_score", "mask-all-nan", lambda w, t: _score(w, t, mutate=lambda b: nifti_like(
    (b / _MASK).resolve(), b / _MASK, lambda d: np.full(d.shape, np.nan))), "arc")
add("trackflow_score", "head-missing",
    lambda w, t: _score(w, t, mutate=lambda b: (b / f"{SUBJECT}__arc__head.nii.gz").unlink()), "arc")


def _score_out_dir(w, t):
    (t / "scores.json").mkdir()
    return _score(w, t)


def _score_existing(w, t):
    (t / "scores.json").write_text('{"old": true}')
    return _score(w, t)


def _score_out_is_input(w, t):
    (t / "in.trk").write_bytes(w.tractogram.read_bytes())
    return _score(w, t, tractogram=t / "in.trk", out=t / "in.trk")


def _score_parent_file(w, t):
    (t / "afile").write_text("x")
    return _score(w, t, out=t / "afile" / "scores.json")


add("trackflow_score", "output-is-directory", _score_out_dir, "scores.json")
add("trackflow_score", "output-exists-no-f", _score_existing, "exists")
add("trackflow_score", "output-collides-with-input", _score_out_is_input, "in.trk")
add("trackflow_score", "output-parent-is-file", _score_parent_file)
add("trackflow_score", "dilate-endpoints-negative",
    lambda w, t: _score(w, t, extra=["--dilate_endpoints", "-3"]), "dilate_endpoints")
add("trackflow_score", "dilate-endpoints-nonsense",
    lambda w, t: _score(w, t, extra=["--dilate_endpoints", "wide"]), "dilate_endpoints")


def _score_check(plan):
    metrics = json.loads(Path(plan.argv[2]).read_text())
    assert metrics["VB"] >= 1 and 0 < metrics["F1"] <= 1


add("trackflow_score", "valid-ground-truth",
    lambda w, t: dataclasses.replace(_score(w, t), outputs=[], check=_score_check), succeeds=True)


# ---------------------------------------------------------------------------------------------- filter_by_length
def _filter(w, tmp, tractogram=None, out=None, counts=None, extra=()):
    out = out or tmp / "out.trk"
    counts = counts or tmp / "counts.tsv"
    return Plan(_s(tractogram or w.tractogram, out) + ["--out_counts", str(counts), *extra], [out, counts])


def _own_input(w, t, name="in.trk"):
    (t / name).write_bytes(w.tractogram.read_bytes())
    return t / name


for _kind in FILE_FAULTS:
    add("trackflow_filter_by_length", f"tractogram-{_kind}", lambda w, t, k=_kind: _filter(
        w, t, tractogram=damaged_copy(k, w.tractogram, t / "in.trk")), "in.trk")
add("trackflow_filter_by_length", "tractogram-nan-coordinates",
    lambda w, t: _filter(w, t, tractogram=trk_with_nan(w.tractogram, t / "in.trk")), "in.trk")
add("trackflow_filter_by_length", "tractogram-unknown-extension",
    lambda w, t: _filter(w, t, tractogram=_own_input(w, t, "in.xyz")), "xyz")


def _tck(w, t, reference):
    tck = t / "in.tck"
    trk = nib.streamlines.load(str(w.tractogram))
    nib.streamlines.save(trk.tractogram, str(tck))
    return _filter(w, t, tractogram=tck, extra=["--reference", str(reference)] if reference else [])


add("trackflow_filter_by_length", "tck-without-reference", lambda w, t: _tck(w, t, None), "reference")
add("trackflow_filter_by_length", "tck-reference-missing", lambda w, t: _tck(w, t, t / "ref.nii.gz"), "ref.nii.gz")
add("trackflow_filter_by_length", "tck-reference-garbage",
    lambda w, t: _tck(w, t, damaged_copy("garbage", None, t / "ref.nii.gz")), "ref.nii.gz")
add("trackflow_filter_by_length", "output-unknown-extension", lambda w, t: _filter(w, t, out=t / "out.xyz"), "xyz")


def _filter_collide(w, t, out=None, counts=None):
    plan = _filter(w, t, tractogram=_own_input(w, t), out=out and t / out, counts=counts and t / counts)
    plan.outputs = sorted(set(plan.outputs) | {t / "in.trk"})
    return plan


add("trackflow_filter_by_length", "output-collides-with-input",
    lambda w, t: _filter_collide(w, t, out="in.trk"), "in.trk")
add("trackflow_filter_by_length", "counts-collides-with-output",
    lambda w, t: _filter_collide(w, t, counts="out.trk"), "out.trk")
add("trackflow_filter_by_length", "counts-collides-with-input",
    lambda w, t: _filter_collide(w, t, counts="in.trk"), "in.trk")
add("trackflow_filter_by_length", "output-is-directory",
    lambda w, t: (t / "out.trk").mkdir() or _filter(w, t), "out.trk")
add("trackflow_filter_by_length", "counts-is-directory",
    lambda w, t: (t / "counts.tsv").mkdir() or _filter(w, t), "counts.tsv")
add("trackflow_filter_by_length", "output-exists-no-f",
    lambda w, t: _filter(w, t) if (t / "out.trk").write_bytes(b"old") else None, "exists")
add("trackflow_filter_by_length", "counts-exists-no-f",
    lambda w, t: _filter(w, t) if (t / "counts.tsv").write_text("old\n") else None, "exists")
add("trackflow_filter_by_length", "output-parent-is-file",
    lambda w, t: (t / "afile").write_text("x") and _filter(w, t, out=t / "afile" / "out.trk"))
add("trackflow_filter_by_length", "minL-negative", lambda w, t: _filter(w, t, extra=["--minL", "-1"]), "minL")
add("trackflow_filter_by_length", "maxL-nonsense", lambda w, t: _filter(w, t, extra=["--maxL", "long"]), "maxL")
add("trackflow_filter_by_length", "minL-above-maxL",
    lambda w, t: _filter(w, t, extra=["--minL", "50", "--maxL", "10"]), "minL")


def _filter_check_empty(plan):
    assert len(nib.streamlines.load(plan.argv[1]).streamlines) == 0
    row = Path(plan.argv[3]).read_text().splitlines()
    assert len(row) == 2 and "\t0\t" in row[1]


add("trackflow_filter_by_length", "no-survivor-writes-empty-tractogram",
    lambda w, t: dataclasses.replace(_filter(w, t, extra=["--minL", "10000"]), outputs=[], check=_filter_check_empty),
    succeeds=True)


# ---------------------------------------------------------------------------------------------- merge_tractograms
MERGE = "trackflow_merge_tractograms"


def _reference(w) -> nib.Nifti1Image:
    return nib.load(str(w.subject_dir / "masks" / f"{SUBJECT}__mask_wm.nii.gz"))


def _ground_truth_vox(w) -> list:
    """The ground-truth streamlines in vox/corner, as the tracking scripts hand them to the writer."""
    sft = load_tractogram_file(w.tractogram)
    sft.to_vox()
    sft.to_corner()
    return list(sft.streamlines)


def _merge(w, tmp, ext=".trk", out=None, extra=(), mutate=None):
    """Two chunks of one run written by the tracking scripts' writer (3 and 7 streamlines), ``whole``
    (what the unchunked run writes) beside them; ``mutate(chunks)`` damages them."""
    streamlines, reference = _ground_truth_vox(w), _reference(w)
    chunks = [tmp / f"chunk{k}{ext}" for k in range(2)]
    for chunk, part in zip(chunks, (streamlines[:3], streamlines[3:])):
        save_tractogram_file(chunk, part, reference)
    save_tractogram_file(tmp / f"whole{ext}", streamlines, reference)
    if mutate:
        mutate(chunks)
    out = out or tmp / f"out{ext}"
    return Plan(_s(out, *chunks) + list(extra), [out])


def _merge_case(fault, message=None, **kw):
    add(MERGE, fault, lambda w, t: _merge(w, t, **kw), message)


for _ext in (".trk", ".tck", ".trx"):
    for _kind in FILE_FAULTS:
        _merge_case(f"chunk{_ext.replace('.', '-')}-{_kind}", f"chunk1{_ext}", ext=_ext,
                    mutate=lambda c, k=_kind: damaged_copy(k, c[1], c[1]))


def _on_other_grid(w, chunk):
    save_tractogram_file(chunk, _ground_truth_vox(w)[3:],
                         nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), np.diag([2.0, 2, 2, 1])))


for _ext in (".trk", ".trx"):
    add(MERGE, f"chunk{_ext.replace('.', '-')}-other-reference", lambda w, t, e=_ext: _merge(
        w, t, ext=e, mutate=lambda c: _on_other_grid(w, c[1])), f"chunk1{_ext}")


def _with_per_point_data(w, chunk):
    streamlines = _ground_truth_vox(w)[3:]
    save_tractogram_file(chunk, streamlines, _reference(w),
                         data_per_point={"weight": np.ones(sum(len(s) for s in streamlines))})


add(MERGE, "chunk-trk-other-per-point-data",
    lambda w, t: _merge(w, t, mutate=lambda c: _with_per_point_data(w, c[1])), "chunk1.trk")


def _mixed_extensions(w, t):
    plan = _merge(w, t)
    save_tractogram_file(t / "chunk1.tck", _ground_truth_vox(w)[3:], _reference(w))
    plan.argv[2] = str(t / "chunk1.tck")
    return plan


add(MERGE, "chunks-of-mixed-extensions", _mixed_extensions, "chunk1.tck")
add(MERGE, "output-other-extension-than-chunks", lambda w, t: _merge(w, t, out=t / "out.tck"), "chunk0.trk")
add(MERGE, "output-unknown-extension", lambda w, t: _merge(w, t, out=t / "out.xyz"), "xyz")


def _merge_into_chunk(w, t, index, extra=()):
    plan = _merge(w, t, out=t / f"chunk{index}.trk", extra=extra)
    plan.outputs = [t / "chunk0.trk", t / "chunk1.trk"]
    return plan


add(MERGE, "output-is-first-chunk", lambda w, t: _merge_into_chunk(w, t, 0), "chunk0.trk")
add(MERGE, "output-is-a-chunk-with-f", lambda w, t: _merge_into_chunk(w, t, 1, ["-f"]), "chunk1.trk")
add(MERGE, "output-is-directory", lambda w, t: (t / "out.trk").mkdir() or _merge(w, t), "out.trk")
add(MERGE, "output-parent-is-file",
    lambda w, t: (t / "afile").write_text("x") and _merge(w, t, out=t / "afile" / "out.trk"))
add(MERGE, "output-exists-no-f",
    lambda w, t: _merge(w, t) if (t / "out.trk").write_bytes(b"old tractogram") else None, "exists")


def _merge_argv(argv):
    def build(w, t):
        plan = _merge(w, t)
        plan.argv = argv(plan.argv)
        return plan
    return build


add(MERGE, "no-chunk", _merge_argv(lambda argv: argv[:1]), "in_tractograms")
add(MERGE, "no-argument", _merge_argv(lambda argv: []))
add(MERGE, "unknown-option", _merge_argv(lambda argv: argv + ["--nope"]), "--nope")
add(MERGE, "abbreviated-option", _merge_argv(lambda argv: argv + ["--overwr"]), "--overwr")


def _merge_check(plan):
    """The merged file is the one the unchunked run writes, bit for bit (.trx: the same arrays)."""
    out = Path(plan.argv[0])
    whole = out.with_name(f"whole{out.suffix}")
    if out.suffix != ".trx":
        assert out.read_bytes() == whole.read_bytes()
        return
    a, b = tmm.load(str(whole)), tmm.load(str(out))
    try:
        assert np.array_equal(a.streamlines._data, b.streamlines._data)
        assert np.array_equal(a.streamlines._lengths, b.streamlines._lengths) and len(b) == 10
    finally:
        a.close(), b.close()


for _ext in (".trk", ".tck", ".trx"):
    add(MERGE, f"valid{_ext.replace('.', '-')}", lambda w, t, e=_ext: dataclasses.replace(
        _merge(w, t, ext=e), check=_merge_check), succeeds=True)


def _merge_with_empty_chunk(w, t):
    plan = _merge(w, t)
    save_tractogram_file(t / "empty.trk", [], _reference(w))  # a seed range where nothing survived
    plan.argv[2:2] = [str(t / "empty.trk")]
    plan.argv.append(str(t / "empty.trk"))
    return dataclasses.replace(plan, check=_merge_check)


add(MERGE, "valid-with-empty-chunks", _merge_with_empty_chunk, succeeds=True)
add(MERGE, "valid-existing-output-with-f", lambda w, t: dataclasses.replace(
    _merge(w, t, extra=["-f"]), check=_merge_check) if (t / "out.trk").write_bytes(b"old") else None,
    succeeds=True)


# ---------------------------------------------------------------------------------------------- prepare_tractoflow
PREPARE = "trackflow_prepare_tractoflow"


def _tractoflow(w, tmp, mutate=None, out=None, extra=("--training", SUBJECT, "--testing", "sub-02")):
    """A TractoFlow results/ tree (files symlinked to the demo cohort's, as tests/test_tractoflow.py lays
    them out) with TractoFlow's cohort-wide folders, changed by ``mutate(results)``."""
    results = tmp / "tractoflow" / "results"
    for subject_dir in sorted((w.cohort / "dwi_ml_ready").iterdir()):
        s = subject_dir.name
        for target, source in TRACTOFLOW_FROM_DEMO.items():
            path = results / s / target.format(s=s)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(subject_dir / source.format(s=s))
    for folder in ("Mean_FRF", "Readme"):
        (results / folder).mkdir()
    if mutate:
        mutate(results)
    out = out or tmp / "cohort"
    return Plan(_s(results, out) + list(extra), [out])


def _prepare_case(fault, message=None, **kw):
    add(PREPARE, fault, lambda w, t: _tractoflow(w, t, **kw), message)


def _results_replaced(by):
    def build(w, t):
        plan = _tractoflow(w, t)
        results = t / "elsewhere"
        by(results)
        plan.argv[0] = str(results)
        return plan
    return build


add(PREPARE, "results-missing", _results_replaced(lambda r: None), "elsewhere")
add(PREPARE, "results-is-file", _results_replaced(lambda r: r.write_text("x")), "elsewhere")
add(PREPARE, "results-empty", _results_replaced(lambda r: r.mkdir()), "elsewhere")
add(PREPARE, "results-only-cohort-folders",
    _results_replaced(lambda r: (r / "Mean_FRF").mkdir(parents=True) or (r / "Readme").mkdir()), "elsewhere")
for _target in TRACTOFLOW_FROM_DEMO:
    if _target.startswith("PFT_Tracking/"):
        continue  # tractograms are optional (all subjects or none)
    _prepare_case(f"missing-{Path(_target).name.split('__')[1].split('.')[0]}", _target.format(s="sub-02"),
                  mutate=lambda r, p=_target: (r / "sub-02" / p.format(s="sub-02")).unlink())
_FA = "sub-01/DTI_Metrics/sub-01__fa.nii.gz"
_prepare_case("fa-is-directory", _FA, mutate=lambda r: damaged_copy("directory", None, r / _FA))
_prepare_case("fa-dangling-link", _FA,
              mutate=lambda r: (r / _FA).unlink() or (r / _FA).symlink_to(r / "gone.nii.gz"))
_prepare_case("subject-folder-empty", "sub-02/DTI_Metrics",
              mutate=lambda r: shutil.rmtree(r / "sub-02") or (r / "sub-02").mkdir())
_prepare_case("tractograms-of-one-subject-only", "sub-02",
              mutate=lambda r: shutil.rmtree(r / "sub-02" / "PFT_Tracking"))
for _fault, _opts, _message in [
        ("list-unknown-subject", ["--training", "sub-01", "sub-99"], "sub-99"),
        ("subject-in-two-lists", ["--training", "sub-01", "--testing", "sub-01"], "sub-01"),
        ("subject-twice-in-one-list", ["--training", "sub-01", "sub-01"], "sub-01"),
        ("training-list-empty", ["--testing", "sub-01"], "training"),
        ("split-negative", ["--split", "0.7", "-0.15", "0.45"], "split"),
        ("split-all-zero", ["--split", "0", "0", "0"], "split"),
        ("split-without-training", ["--split", "0", "0.5", "0.5"], "training"),
        ("split-nan", ["--split", "0.7", "nan", "0.3"], "split"),
        ("split-two-values", ["--split", "0.7", "0.3"], "--split"),
        ("split-nonsense", ["--split", "0.7", "x", "0.3"], "--split"),
        ("seed-nonsense", ["--seed", "x1"], "--seed"),
        ("unknown-option", ["--nope"], "--nope")]:
    _prepare_case(_fault, _message, extra=_opts)


def _prepare_existing(w, t):
    plan = _tractoflow(w, t)  # the tree, then the earlier run, then this run's plan on the same tree
    entry_point(PREPARE)(plan.argv[:2] + ["--training", "sub-02"])
    return plan


add(PREPARE, "output-exists-no-f", _prepare_existing, "cohort")
add(PREPARE, "output-is-file-no-f", lambda w, t: (t / "cohort").write_text("my notes") and _tractoflow(w, t),
    "exists")
add(PREPARE, "output-parent-is-file",
    lambda w, t: (t / "afile").write_text("x") and _tractoflow(w, t, out=t / "afile" / "cohort"))


def _prepare_over_input(w, t, out):
    plan = _tractoflow(w, t, extra=["--training", SUBJECT, "-f"])
    plan.argv[1] = str(t / out)
    plan.outputs = [t / out]
    return plan


add(PREPARE, "output-is-results-with-f", lambda w, t: _prepare_over_input(w, t, "tractoflow/results"), "results")
add(PREPARE, "output-contains-results-with-f", lambda w, t: _prepare_over_input(w, t, "tractoflow"), "tractoflow")


def _prepare_check(lists, streamlines=True):
    def check(plan):
        results, out = Path(plan.argv[0]), Path(plan.argv[1])
        link = out / "dwi_ml_ready" / SUBJECT / "dwi" / f"{SUBJECT}__fodf.nii.gz"
        assert link.is_symlink() and link.resolve() == (results / SUBJECT / "FODF_Metrics" / link.name).resolve()
        groups = json.loads((out / "hdf5_config.json").read_text())
        assert ("streamlines" in groups) == streamlines
        assert {s: (out / f"{s}_subjs.txt").read_text().split() for s in ("training", "validation", "testing")} \
            == lists
    return check


def _prepare_valid(lists, streamlines=True, mutate=None, before=None, extra=None):
    def build(w, t):
        plan = _tractoflow(w, t, mutate=mutate, **({"extra": extra} if extra is not None else {}))
        if before:
            before(plan)
        return dataclasses.replace(plan, check=_prepare_check(lists, streamlines))
    return build


add(PREPARE, "valid-subject-lists",
    _prepare_valid({"training": [SUBJECT], "validation": [], "testing": ["sub-02"]}), succeeds=True)
add(PREPARE, "valid-seeded-split", _prepare_valid({"training": [SUBJECT, "sub-02"], "validation": [], "testing": []},
                                                  extra=[]), succeeds=True)
add(PREPARE, "valid-without-tractograms", _prepare_valid(
    {"training": [SUBJECT], "validation": [], "testing": ["sub-02"]}, streamlines=False,
    mutate=lambda r: [shutil.rmtree(r / s / "PFT_Tracking") for s in (SUBJECT, "sub-02")]), succeeds=True)
add(PREPARE, "valid-empty-output-folder", _prepare_valid(
    {"training": [SUBJECT], "validation": [], "testing": ["sub-02"]},
    before=lambda plan: Path(plan.argv[1]).mkdir()), succeeds=True)  # as Snakemake leaves it
add(PREPARE, "valid-output-exists-with-f-replaces-previous-cohort", _prepare_valid(
    {"training": [SUBJECT], "validation": [], "testing": ["sub-02"]},
    extra=["--training", SUBJECT, "--testing", "sub-02", "-f"],
    before=lambda plan: entry_point(PREPARE)(plan.argv[:2] + ["--training", "sub-02"])), succeeds=True)


# ---------------------------------------------------------------------------------------------- the runner
ERROR_LINE = ("error:",)


def _temporaries_beside(path: Path) -> list:
    if not path.parent.is_dir():
        return []
    return sorted(p.name for p in path.parent.glob(f".{path.name}.*tmp*"))


def _writer_is_writing(path: Path) -> bool:
    """A temporary beside ``path`` holds bytes: the writer itself made it (atomic_output's reserved name
    exists empty for an instant before the writer creates the file, so an empty one proves nothing)."""
    for name in _temporaries_beside(path):
        try:
            if (path.parent / name).stat().st_size > 0:
                return True
        except FileNotFoundError:
            pass
    return False


def check_error_output(err: str, message: str | None) -> None:
    """The error rule of the module docstring."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    error_lines = [i for i, line in enumerate(lines) if line.startswith("error:") or
                   (": error: " in line and " " not in line.split(": error: ")[0])]
    assert len(error_lines) == 1, f"expected one error line, got:\n{err}"
    assert error_lines[0] == len(lines) - 1, f"the error line is not the last one:\n{err}"
    if not lines[-1].startswith("error:"):
        assert "usage:" in err, err
    if message:
        assert message.lower() in lines[-1].lower(), f"the error line does not name {message!r}: {lines[-1]}"


def run_case(c: Case, world, tmp_path, capsys):
    plan = c.build(world, tmp_path)
    before = {p: snapshot(p) for p in plan.outputs}
    main = entry_point(c.command)
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    code, escaped = 0, None
    try:
        main(plan.argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 - an escaping exception is the failure being reported
        escaped = e
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    err = capsys.readouterr().err
    if plan.marker is not None:
        assert not plan.marker.exists(), "the malicious pickle ran its code"
    assert escaped is None, f"traceback instead of one line: {type(escaped).__name__}: {escaped}"
    if c.succeeds:
        assert code == 0, f"exit {code}:\n{err}"
        if plan.check:
            plan.check(plan)
        return
    assert code != 0, f"exit 0 on bad input; stderr:\n{err}"
    check_error_output(err, c.message)
    for p, old in before.items():
        now = snapshot(p)
        if old is None:
            assert now is None or now == [], f"partial output under {p}: {now}"
        else:
            assert now == old, f"the old {p} was changed"
        assert not _temporaries_beside(p), f"temporaries left beside {p}: {_temporaries_beside(p)}"


@pytest.fixture(autouse=True)
def no_display(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_fault(c, world, tmp_path, capsys):
    run_case(c, world, tmp_path, capsys)


# ---------------------------------------------------------------------------------------------- signals
SIGNAL_CASES = ["trackflow_filter_by_length-sigterm-mid-write-keeps-old-output",
                "trackflow_filter_by_length-sigkill-mid-write-then-rerun-cleans-temporary",
                "trackflow_filter_by_length-two-racing-runs-without-f",
                "l2t_train_model-sigterm-mid-training-with-f-keeps-old-experiment",
                "l2t_train_model-sigkill-mid-training-then-rerun-without-f",
                "l2t_track_from_model-sigterm-mid-tracking-keeps-old-output"]


def _script(command: str) -> str:
    return str(Path(sys.executable).parent / command)


@pytest.fixture(scope="session")
def big_tractogram(world, tmp_path_factory) -> Path:
    """A tractogram big enough (60,000 streamlines) that writing its filtered copy takes a while."""
    rng = np.random.default_rng(0)
    trk = nib.streamlines.load(str(world.tractogram))
    n, points = 60_000, 8
    starts = rng.uniform(5, 25, size=(n, 1, 3))
    data = (starts + np.cumsum(rng.normal(scale=0.5, size=(n, points, 3)), axis=1)).astype(np.float32)
    path = tmp_path_factory.mktemp("big") / "big.trk"
    nib.streamlines.save(nib.streamlines.Tractogram(list(data), affine_to_rasmm=np.eye(4)), str(path),
                         header=trk.header)
    return path


def _wait_for(predicate, process, timeout=120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")


def _filter_process(tractogram, out, counts, *extra):
    return subprocess.Popen([_script("trackflow_filter_by_length"), str(tractogram), str(out), "--out_counts",
                             str(counts), *extra], stderr=subprocess.PIPE, text=True, env=_env())


def _one_error_line(process) -> str:
    err = process.stderr.read()
    check_error_output(err, None)
    return err


def test_signal_filter_sigterm_keeps_old_output(big_tractogram, tmp_path):
    out, counts = tmp_path / "out.trk", tmp_path / "counts.tsv"
    out.write_bytes(b"old tractogram")
    old = snapshot(out)
    p = _filter_process(big_tractogram, out, counts, "-f")
    assert _wait_for(lambda: _writer_is_writing(out), p), "the writer never started its temporary"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) != 0
    _one_error_line(p)
    assert snapshot(out) == old and not counts.exists()
    assert not _temporaries_beside(out) and not _temporaries_beside(counts)


def test_signal_filter_sigkill_then_rerun_cleans_temporary(big_tractogram, tmp_path):
    out, counts = tmp_path / "out.trk", tmp_path / "counts.tsv"
    p = _filter_process(big_tractogram, out, counts)
    assert _wait_for(lambda: _writer_is_writing(out), p), "the writer never started its temporary"
    p.kill()
    p.wait(timeout=60)
    assert not out.exists() and _temporaries_beside(out)  # the killed writer could not clean up
    rerun = subprocess.run([_script("trackflow_filter_by_length"), str(big_tractogram), str(out), "--out_counts",
                            str(counts), "--minL", "10000"], capture_output=True, text=True, env=_env(), timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert len(nib.streamlines.load(str(out)).streamlines) == 0
    assert not _temporaries_beside(out), "the stale temporary of the killed run is still there"


def test_signal_filter_two_racing_runs_without_f(world, tmp_path):
    out, counts = tmp_path / "out.trk", tmp_path / "counts.tsv"
    runs = [_filter_process(world.tractogram, out, counts, "--subject", f"run{i}") for i in range(2)]
    codes = [p.wait(timeout=120) for p in runs]
    assert sorted(c == 0 for c in codes) == [False, True], f"exit codes {codes}: both runs wrote {out}"
    loser = runs[codes.index(next(c for c in codes if c != 0))]
    check_error_output(loser.stderr.read(), "exists")
    assert not _temporaries_beside(out) and not _temporaries_beside(counts)


def _train_process(world, exps, *extra):
    return subprocess.Popen([_script("l2t_train_model"), str(exps), "exp", str(world.hdf5), "input", "streamlines",
                             *L2T_TINY, "--batch_size_training", "5", "--batch_size_validation", "5",
                             "--max_batches_per_epoch_training", "1", "--max_batches_per_epoch_validation", "1",
                             *extra], stderr=subprocess.PIPE, text=True, env=_env())


@pytest.mark.slow  # ~45 s; tests/test_training.py has fast tests of the same defects
def test_signal_train_sigterm_with_f_keeps_old_experiment(world, tmp_path):
    exps = tmp_path / "exps"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(world.experiments["l2t"], exps / "exp")
    old = snapshot(exps / "exp")
    p = _train_process(world, exps, "--max_epochs", "100000", "-f", "-v")
    first_line = p.stderr.readline()  # the first log line: imports done, run_cli's SIGTERM handler is set
    time.sleep(2.0)  # into the training epochs (100,000 of them: it cannot finish first)
    assert p.poll() is None, "training finished before the signal"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) != 0
    err = first_line + p.stderr.read()
    assert err.strip().splitlines()[-1].startswith("error:") and "Traceback" not in err, err
    assert snapshot(exps / "exp") == old, "the old experiment was destroyed or changed by the interrupted -f run"
    assert not [q for q in exps.iterdir() if q.name != "exp"], f"leftovers: {list(exps.iterdir())}"


@pytest.mark.slow  # ~45 s; tests/test_training.py has fast tests of the same defects
def test_signal_train_sigkill_then_rerun_without_f(world, tmp_path):
    exps = tmp_path / "exps"
    exps.mkdir()
    p = _train_process(world, exps, "--max_epochs", "100000")
    assert _wait_for(lambda: any(exps.rglob("*.tmp*")), p, timeout=120), "no checkpoint write seen"
    p.kill()
    p.wait(timeout=60)
    rerun = _train_process(world, exps, "--max_epochs", "1")
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert (exps / "exp" / "best_model" / "model_state.pkl").is_file()
    assert not list(exps.rglob("*.tmp*")), "stale temporaries of the killed run are still there"


def test_signal_track_sigterm_keeps_old_output(world, tmp_path):
    out = tmp_path / "out.trk"
    out.write_bytes(b"old tractogram")
    old = snapshot(out)
    p = subprocess.Popen([_script("l2t_track_from_model"), str(world.experiments["l2t"]), SUBJECT, "input", str(out),
                          "interface_mask", "--hdf5_file", str(world.hdf5), "--nt", "200000", "--min_length", "0",
                          "--max_length", "200", "-f", "-v"], stderr=subprocess.PIPE, text=True, env=_env())
    first_line = p.stderr.readline()  # the first log line: imports done, run_cli's SIGTERM handler is set
    time.sleep(1.0)  # tracking 200,000 seeds takes far longer
    assert p.poll() is None, "tracking finished before the signal"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) != 0
    err = first_line + p.stderr.read()
    assert err.strip().splitlines()[-1].startswith("error:"), err
    assert "Traceback" not in err
    assert snapshot(out) == old and not _temporaries_beside(out)


# ---------------------------------------------------------------------------------------------- the table itself
def test_counts_by_command():
    """Every console script has cases, and the module docstring's table is the real count."""
    counts = Counter(c.command for c in CASES)
    assert set(counts) == set(SCRIPTS), set(SCRIPTS) ^ set(counts)
    table = {line.split()[0]: int(line.split()[-1]) for line in __doc__.splitlines()
             if line.split() and line.split()[0] in SCRIPTS}
    assert table == dict(counts), dict(counts)
    signal_tests = [name for name in globals() if name.startswith("test_signal_")]
    assert len(signal_tests) == len(SIGNAL_CASES)
    assert sum(counts.values()) + len(SIGNAL_CASES) >= 234
