"""Tracking CLIs on the tiny demo cohort with tiny random-weight models (l2t and TTO)."""

import contextlib
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from dipy.io.streamline import load_tractogram
from dipy.tracking.streamlinespeed import length

import trackflow.data.tractograms
from trackflow.cli.track import l2t_main, tt_main
from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.errors import TrackflowError
from trackflow.experiment import ExperimentFolder
from trackflow.tracking.run import TrackingOptions, track_from_experiment
from trackflow.models.l2t import Learn2TrackModel
from trackflow.models.transformers import OriginalTransformerModel

SUBJECT = "sub-01"
HEAD = {"dg_key": "sphere-classification", "dg_args": {"add_eos": True}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def steer_towards_x(model):
    """Random weights made small and a head bias favouring +x, no EOS: streamlines long enough to keep.

    Untrained random heads turn by more than 90 degrees at almost every step.
    """
    head = model.direction_getter
    last = head.layers[1]
    with torch.no_grad():
        last.weight.mul_(0.1)
        last.bias[:head.nb_vertices] = 8.0 * head.vertices[:, 0]
        if head.add_eos:
            last.bias[head.nb_vertices:] = -10.0
    return model


def l2t_model(nb_features, **overrides):
    torch.manual_seed(0)
    params = dict(nb_features=nb_features, step_size=1.0, input_embedding_key="nn_embedding",
                  input_embedded_size=8, nb_previous_dirs=1, rnn_key="gru", rnn_layer_sizes=[8], **HEAD)
    params.update(overrides)
    model = Learn2TrackModel(**params).eval()
    return steer_towards_x(model) if params["dg_key"] == HEAD["dg_key"] else model


def tto_model(nb_features, max_len=400):
    torch.manual_seed(0)
    return steer_towards_x(OriginalTransformerModel(
        nb_features=nb_features, step_size=1.0, max_len=max_len, n_layers_e=1, n_layers_d=1, nheads=2,
        input_embedded_size=8, ffnn_hidden_size=8, dropout_rate=0.0, input_embedding_key="nn_embedding",
        **HEAD).eval())


@pytest.fixture(scope="module")
def world(tiny_hdf5, make_experiment, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking_cli")
    with HDF5Cohort(tiny_hdf5) as cohort:
        nb_features = cohort.volume_groups()["input"]
        wm = cohort.read_volume(SUBJECT, "wm_mask")
        affine = cohort.reference_nifti(SUBJECT, "interface_mask").affine
    return {"root": root, "hdf5": tiny_hdf5, "wm": wm, "affine": affine,
            "l2t": make_experiment(root / "l2t", l2t_model(nb_features)),
            "tto": make_experiment(root / "tto", tto_model(nb_features)),
            "tto_max_len_200": make_experiment(root / "tto_max_len_200", tto_model(nb_features, max_len=200)),
            "l2t_regression": make_experiment(
                root / "l2t_regression",
                l2t_model(nb_features, dg_key="cosine-regression", dg_args={"add_eos": False}))}


DOC_OPTIONS = ["-f", "-v", "--algo", "det", "--min_length", "10", "--max_length", "200", "--npv", "1",
               "--use_gpu", "--simultaneous_tracking", "500", "--discard_last", "--tracking_mask_group",
               "wm_mask", "--eos_stop", "0.5", "--hdf5"]


def check_tractogram(world, path, min_mm=10.0, max_mm=200.0, in_mask=True):
    sft = load_tractogram(str(path), "same", bbox_valid_check=False)
    np.testing.assert_allclose(sft.affine, world["affine"])
    sft.to_vox()
    sft.to_corner()
    voxel_mm = world["wm"].voxres[0]
    lengths = length(sft.streamlines) * voxel_mm
    assert len(lengths) > 0
    assert lengths.min() >= min_mm - 1e-3 and lengths.max() <= max_mm + 1e-3
    if in_mask:
        voxels = np.floor(sft.streamlines.get_data()).astype(int)
        assert (world["wm"].data[..., 0][tuple(voxels.T)] >= 0.5).all()
    return sft


@pytest.mark.parametrize("main,experiment", [(l2t_main, "l2t"), (tt_main, "tto")])
def test_documented_command_lines(world, main, experiment, tmp_path, capsys):
    out = tmp_path / "out_tractogram.trk"
    main([*DOC_OPTIONS, str(world["hdf5"]), str(world[experiment]), SUBJECT, "input", str(out),
          "interface_mask"])
    err = capsys.readouterr().err
    if not torch.cuda.is_available():
        assert err.count("CUDA is not available") == 1
    assert "kept" in err and "streamlines/s" in err
    # sub-01 is a training subject, not in the default testing subset: warned, used anyway
    assert "not in the testing subset" in err
    check_tractogram(world, out)


@pytest.mark.slow  # a fresh interpreter: about 10 s of imports on the shared machine
def test_installed_console_script_runs(world, tmp_path):
    out = tmp_path / "script.tck"
    command = [str(Path(sys.executable).parent / "tt_track_from_model"), str(world["tto"]), SUBJECT, "input",
               str(out), "interface_mask", "--nt", "10", "--min_length", "0"]
    log = tmp_path / "rule.log"  # stderr redirected to a file, as in a Snakemake rule or a SLURM job
    with open(log, "w") as stderr:
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=stderr, timeout=300)
    assert done.returncode == 0, log.read_text()
    assert len(nib.streamlines.load(str(out)).streamlines) == 10
    assert "\r" not in log.read_text() and "kept" in log.read_text()


def test_no_progress_bar_noise_in_a_log_file(world, tmp_path):
    log = tmp_path / "rule.log"
    with open(log, "w") as stderr, contextlib.redirect_stderr(stderr):
        run_l2t(world, tmp_path / "out.trk", "--nt", "10")
    text = log.read_text()
    assert "kept" in text and "\r" not in text and "seed/s" not in text


def test_dwi_ml_tracking_options_without_effect_change_nothing(world, tmp_path, capsys):
    run_l2t(world, tmp_path / "plain.trk", "--nt", "10")
    capsys.readouterr()
    run_l2t(world, tmp_path / "dwi_ml.trk", "--nt", "10", "--rng", "99", "--sphere", "repulsion724",
            "--data_interp", "nearest", "--skip", "3", "--lazy", "--cache_size", "2")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "without effect" in line]
    assert warnings == ["WARNING trackflow: accepted for dwi_ml compatibility but without effect here: "
                        "--data_interp, --skip, --sphere, --lazy, --cache_size, --rng"]
    assert (tmp_path / "plain.trk").read_bytes() == (tmp_path / "dwi_ml.trk").read_bytes()


def run_l2t(world, out, *extra, experiment="l2t", experiments=None):
    l2t_main([str((experiments or world)[experiment]), SUBJECT, "input", str(out), "interface_mask", "--hdf5_file",
              str(world["hdf5"]), "--tracking_mask_group", "wm_mask", "--min_length", "0", "--rng_seed", "4",
              "--max_length", "40", "-f", *extra])


@pytest.mark.parametrize("algo, sampling", [("det", "cone"), ("prob", "cone"), ("prob", "full")])
def test_same_tractogram_for_any_number_of_simultaneous_streamlines(world, tmp_path, algo, sampling):
    tractograms = []
    for n in (1, 4, 500):
        out = tmp_path / f"{algo}_{n}.trk"
        # 39.5 mm: 40 points at the 1 mm step, a length no rounding pushes past the bound
        run_l2t(world, out, "--algo", algo, "--prob_sampling", sampling, "--nt", "15",
                "--simultaneous_tracking", str(n), "--max_length", "39.5")
        tractograms.append(load_tractogram(str(out), "same", bbox_valid_check=False).streamlines)
    assert len(tractograms[0]) == 15  # --min_length 0: one streamline per seed, seed order
    for other in tractograms[1:]:
        assert len(other) == 15
        for a, b in zip(tractograms[0], other):
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_lengths_and_discard_last_hold_on_output(world, tmp_path):
    out = tmp_path / "len.trk"
    run_l2t(world, out, "--nt", "60", "--discard_last", "--min_length", "6", "--max_length", "12")
    check_tractogram(world, out, min_mm=6.0, max_mm=12.0)


def test_compress_trx_tck_and_seeds(world, tmp_path):
    plain, compressed = tmp_path / "plain.trk", tmp_path / "compressed.trx"
    run_l2t(world, plain, "--nt", "30", "--save_seeds")
    run_l2t(world, compressed, "--nt", "30", "--compress", "0.2")
    a = load_tractogram(str(plain), "same", bbox_valid_check=False)
    b = load_tractogram(str(compressed), "same", bbox_valid_check=False)
    assert len(a) == len(b) and b.streamlines.get_data().shape[0] < a.streamlines.get_data().shape[0]
    for sa, sb in zip(a.streamlines, b.streamlines):
        np.testing.assert_allclose(sb[[0, -1]], sa[[0, -1]], atol=1e-4)
    # seeds are stored in vox/center and lie in the seeding (interface) mask voxel
    a.to_vox()
    a.to_corner()
    seeds_corner = a.data_per_streamline["seeds"] + 0.5
    with HDF5Cohort(world["hdf5"]) as cohort:
        interface = cohort.read_volume(SUBJECT, "interface_mask").data[..., 0]
    assert (interface[tuple(np.floor(seeds_corner).astype(int).T)] > 0).all()
    tck = tmp_path / "plain.tck"
    run_l2t(world, tck, "--nt", "30")
    assert len(nib.streamlines.load(str(tck)).streamlines) == len(a)


@pytest.mark.parametrize("args,message", [
    (["--subject", "sub-99"], "sub-99"),
    (["--input", "nope"], "nope"),
    (["--input", "wm_mask"], "features"),
    (["--experiment", "missing_best"], "best_model"),
    (["--experiment", "l2t_regression", "--algo", "prob"], "sampl"),
    (["--experiment", "tto"], "tt_track_from_model"),
    (["--seeding", "streamlines"], "type"),
    (["--theta", "-10"], "--theta"),
    (["--step_size", "2", "--max_length", "1.5", "--min_length", "0"], "shorter than one step"),
    (["--max_length", "0.5", "--min_length", "0"], "shorter than one step"),  # the model's 1 mm step
    (["--eos_stop", "auto"], "eos_calibration.json"),  # an EOS model trained before calibration existed
])
def test_bad_input_gives_one_line_and_no_output(world, tmp_path, capsys, args, message):
    options = dict(zip(args[::2], args[1::2]))
    experiment = world["root"] / options.pop("--experiment", "l2t")
    experiment.mkdir(exist_ok=True)
    out = tmp_path / "bad.trk"
    argv = [str(experiment), options.pop("--subject", SUBJECT), options.pop("--input", "input"), str(out),
            options.pop("--seeding", "interface_mask"), "--hdf5_file", str(world["hdf5"]), "--nt", "5"]
    for key, value in options.items():
        argv += [key, value]
    with pytest.raises(SystemExit) as exit_info:
        l2t_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_tt_model_too_short_for_max_length_is_refused_with_the_length_that_fits(world, tmp_path, capsys):
    out = tmp_path / "tt.trk"
    argv = [str(world["tto_max_len_200"]), SUBJECT, "input", str(out), "interface_mask", "--nt", "5"]
    with pytest.raises(SystemExit) as exit_info:
        tt_main(argv)  # default --max_length 300 mm at the model's 1 mm step: 301 points
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_len is 200" in err[0] and "--max_length 199 or less" in err[0]
    assert not list(tmp_path.iterdir())
    tt_main(argv + ["--max_length", "199", "--min_length", "0"])  # what the message says fits, fits
    assert len(nib.streamlines.load(str(out)).streamlines) == 5


def hdf5_with_mask(world, tmp_path, group, volume):
    """A copy of the tiny hdf5 whose ``group`` of SUBJECT holds ``volume`` [X, Y, Z, F]."""
    path = tmp_path / "changed.hdf5"
    shutil.copyfile(world["hdf5"], path)
    with h5py.File(path, "r+") as f:
        del f[SUBJECT][group]["data"]
        f[SUBJECT][group]["data"] = volume.astype(np.float32)
    return path


@pytest.mark.parametrize("group,flag", [("wm_mask", "--tracking_mask_group"), ("interface_mask", None)])
@pytest.mark.parametrize("fault,message", [("nan", "non-finite values"), ("two_volumes", "holds 2 volumes")])
def test_mask_group_with_nan_or_several_volumes_is_refused(world, tmp_path, capsys, group, flag, fault,
                                                           message):
    with HDF5Cohort(world["hdf5"]) as cohort:
        mask = cohort.read_volume(SUBJECT, group).data
    bad = np.where(mask > 0, np.nan, mask) if fault == "nan" else np.concatenate([mask, 1 - mask], axis=3)
    hdf5 = hdf5_with_mask(world, tmp_path, group, bad)
    out = tmp_path / "out" / "masked.trk"
    argv = [str(world["l2t"]), SUBJECT, "input", str(out), "interface_mask", "--hdf5_file", str(hdf5),
            "--subset", "training", "--nt", "5"] + ([flag, group] if flag else [])
    with pytest.raises(SystemExit) as exit_info:
        l2t_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    role = "tracking" if flag else "seeding"
    assert len(err) == 1 and message in err[0] and f"{role} mask group '{group}'" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("extension", ["trk", "tck", "trx"])
def test_no_survivor_writes_an_empty_tractogram_and_says_so(world, tmp_path, capsys, extension):
    out = tmp_path / f"empty.{extension}"
    # Streamlines in the tiny volume's WM mask are far shorter than 290 mm: none is kept.
    run_l2t(world, out, "--nt", "10", "--min_length", "290", "--max_length", "300")
    err = capsys.readouterr().err
    assert err.count("wrote an empty tractogram") == 1
    reference = nib.Nifti1Image(np.zeros((2, 2, 2)), world["affine"])
    sft = load_tractogram(str(out), "same" if extension != "tck" else reference, bbox_valid_check=False)
    assert len(sft.streamlines) == 0


def test_an_output_that_is_a_directory_is_refused(world, tmp_path, capsys):
    out = tmp_path / "out.trk"
    out.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        run_l2t(world, out, "--nt", "5")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: output {out} is a directory"
    assert out.is_dir() and not list(out.iterdir())


def test_of_two_runs_racing_for_a_new_output_the_second_to_finish_fails(world, tmp_path, monkeypatch):
    """Run A writes its temporary and waits; run B, started on the same absent output, completes; then A
    must fail at its final rename instead of replacing B's tractogram."""
    real_save = trackflow.data.tractograms._save_trk
    a_wrote, b_done = threading.Event(), threading.Event()

    def save_then_wait_for_b(path, *data):
        real_save(path, *data)
        if threading.current_thread().name == "run A":
            a_wrote.set()
            b_done.wait(timeout=120)

    monkeypatch.setattr(trackflow.data.tractograms, "_save_trk", save_then_wait_for_b)
    out = tmp_path / "raced.trk"

    def run(nt):
        return track_from_experiment("l2t", world["l2t"], SUBJECT, "input", out, "interface_mask",
                                     TrackingOptions(hdf5_file=world["hdf5"], nt=nt, min_length=0, rng_seed=1))

    failures = []
    thread = threading.Thread(target=lambda: failures.append(_raises(run, 3)), name="run A")
    thread.start()
    assert a_wrote.wait(timeout=120)
    run(7)  # run B
    b_done.set()
    thread.join()
    assert failures == ["already exists"]
    assert len(nib.streamlines.load(str(out)).streamlines) == 7  # B's result stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raced.trk"]


def _raises(func, *args):
    try:
        func(*args)
    except TrackflowError as e:
        return "already exists" if "already exists" in str(e) else str(e)
    return None


def test_eos_stop_auto_uses_the_threshold_stored_beside_the_model(world, tmp_path):
    experiment = shutil.copytree(world["l2t"], tmp_path / "calibrated")
    ExperimentFolder(experiment).write_eos_calibration(experiment / "best_model", {"threshold": 1e-12})
    run_l2t(world, tmp_path / "auto.trk", "--nt", "15", "--eos_stop", "auto", experiment="calibrated_l2t",
            experiments={"calibrated_l2t": experiment})
    run_l2t(world, tmp_path / "fixed.trk", "--nt", "15", "--eos_stop", "1e-12")
    run_l2t(world, tmp_path / "half.trk", "--nt", "15")
    assert (tmp_path / "auto.trk").read_bytes() == (tmp_path / "fixed.trk").read_bytes()
    assert (tmp_path / "auto.trk").read_bytes() != (tmp_path / "half.trk").read_bytes()


def test_without_eos_stop_the_calibrated_threshold_is_used_and_0_5_when_there_is_none(world, tmp_path):
    experiment = shutil.copytree(world["l2t"], tmp_path / "calibrated")
    ExperimentFolder(experiment).write_eos_calibration(experiment / "best_model", {"threshold": 1e-12})
    calibrated = {"experiment": "calibrated_l2t", "experiments": {"calibrated_l2t": experiment}}
    run_l2t(world, tmp_path / "default_calibrated.trk", "--nt", "15", **calibrated)
    run_l2t(world, tmp_path / "auto.trk", "--nt", "15", "--eos_stop", "auto", **calibrated)
    run_l2t(world, tmp_path / "default_uncalibrated.trk", "--nt", "15")
    run_l2t(world, tmp_path / "half.trk", "--nt", "15", "--eos_stop", "0.5")
    assert (tmp_path / "default_calibrated.trk").read_bytes() == (tmp_path / "auto.trk").read_bytes()
    assert (tmp_path / "default_uncalibrated.trk").read_bytes() == (tmp_path / "half.trk").read_bytes()
    assert (tmp_path / "auto.trk").read_bytes() != (tmp_path / "half.trk").read_bytes()


def test_eos_stop_max_on_a_head_where_eos_is_never_the_argmax_changes_nothing(world, tmp_path):
    run_l2t(world, tmp_path / "max.trk", "--nt", "15", "--eos_stop", "max")
    run_l2t(world, tmp_path / "half.trk", "--nt", "15", "--eos_stop", "0.5")
    assert (tmp_path / "max.trk").read_bytes() == (tmp_path / "half.trk").read_bytes()
