"""Training on a tiny demo hdf5: batch rows and augmentation, the trainer, the experiment folder,
reproducibility and resume, bad-input errors, log plots."""

import csv
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from trackflow.cli import visualize_logs
from trackflow.cli.train import l2t_main, l2t_resume_main, tt_main, tt_resume_main
from trackflow.data.hdf5.creation import create_hdf5_dataset
from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.device import select_device
from trackflow.errors import TrackflowError
from trackflow.experiment import LOG_FILES, TRACKING_MONITOR, ExperimentFolder
from trackflow.models.persistence import load_experiment_model
from trackflow.models.registry import model_class
from trackflow.training.batch_loader import BatchLoader, LoaderParams, SubsetData
from trackflow.training.eos_calibration import _interior_and_end_maxima, best_first_stop_threshold
from trackflow.training.trainer import calibrate_experiment_eos, parse_learning_rates

# tiny_hdf5 (conftest): 1 training + 1 validation subject, 50 streamlines each, resampled to 1 mm.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_L2T = ["--rnn_key", "gru", "--rnn_layer_sizes", "16", "--batch_size_training", "10",
            "--batch_size_validation", "50", "--learning_rate", "0.01", "--weight_decay", "0"]
# Every source of randomness switched on: dropout, both noises, split, reverse.
RANDOM_L2T = TINY_L2T + ["--dropout", "0.3", "--nb_previous_dirs", "1", "--input_embedding_key",
                         "nn_embedding", "--input_embedded_size", "8", "--add_eos",
                         "--noise_gaussian_size_forward", "0.1", "--noise_gaussian_size_loss", "0.05",
                         "--split_ratio", "0.3", "--reverse_ratio", "0.5"]


@pytest.fixture(scope="module")
def training_only_hdf5(tiny_cohort, tmp_path_factory):
    """The first demo subject alone, as the only (training) subject: no validation subset."""
    root = tmp_path_factory.mktemp("training_only")
    (root / "train.txt").write_text("sub-01\n")
    (root / "empty.txt").write_text("")
    return create_hdf5_dataset(tiny_cohort / "dwi_ml_ready", root / "train_only.hdf5",
                               tiny_cohort / "config" / "hdf5_config.json", root / "train.txt", root / "empty.txt",
                               root / "empty.txt", step_size=1.0)


def _train(main, exps, name, hdf5, *options):
    main([str(exps), name, str(hdf5), "input", "streamlines", *options])
    return exps / name


def _state(experiment, which="best_model"):
    return torch.load(experiment / which / "model_state.pkl", map_location="cpu", weights_only=True)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tiny_model(add_eos: bool):
    torch.manual_seed(0)
    return model_class("Learn2TrackModel")(
        nb_features=30, rnn_key="gru", rnn_layer_sizes=[8], step_size=1.0,
        dg_key="cosine-regression", dg_args={"add_eos": add_eos})


# ---------------------------------------------------------------------------------------------- batch rows
@pytest.mark.parametrize("add_eos", [False, True])
def test_rows_inputs_and_targets(tiny_hdf5, add_eos):
    with HDF5Cohort(tiny_hdf5) as cohort:
        data = SubsetData(cohort, ["sub-01"], "input", "streamlines", "cpu")
        lines = cohort.read_streamlines("sub-01", "streamlines", np.array([0, 3, 7]))
        volume = cohort.read_volume("sub-01", "input").data
        loader = BatchLoader(LoaderParams(), {"step_size": 1.0}, {"step_size": cohort.step_size}, 0, "cpu")
        batch = loader.load(data, [("sub-01", np.array([0, 3, 7]))], training=False)
        rows = loader.rows(_tiny_model(add_eos), data, batch, training=False)

    n_rows = [len(s) if add_eos else len(s) - 1 for s in lines]
    assert [len(x) for x in rows.inputs] == n_rows == [len(c) for c in rows.coordinates]
    expected_dirs = np.concatenate([np.vstack([np.diff(s, axis=0), np.zeros((1, 3))])[:n] for s, n
                                    in zip(lines, n_rows)])
    np.testing.assert_allclose(rows.target_dirs.numpy(), expected_dirs, atol=1e-6)
    if add_eos:
        expected_eos = np.concatenate([np.arange(len(s)) == len(s) - 1 for s in lines])
        np.testing.assert_array_equal(rows.eos_target.numpy(), expected_eos)
    else:
        assert rows.eos_target is None
    # Inputs: trilinear interpolation with integer coordinate i = voxel i, clamped at the borders
    # (scipy's map_coordinates with mode='nearest' follows the same convention).
    points = np.concatenate([s[:n] for s, n in zip(lines, n_rows)])
    expected_inputs = np.stack([map_coordinates(volume[..., f], points.T, order=1, mode="nearest")
                                for f in range(volume.shape[-1])], axis=1)
    np.testing.assert_allclose(torch.cat(rows.inputs).numpy(), expected_inputs, atol=1e-4)


def test_noise_is_truncated_training_only_and_leaves_inputs_clean(tiny_hdf5):
    sigma_forward, sigma_loss = 0.3, 0.2
    ids = [("sub-01", np.arange(20))]
    with HDF5Cohort(tiny_hdf5) as cohort:
        data = SubsetData(cohort, ["sub-01"], "input", "streamlines", "cpu")
        clean_loader = BatchLoader(LoaderParams(), {}, {}, 0, "cpu")
        noisy_loader = BatchLoader(LoaderParams(noise_gaussian_size_forward=sigma_forward,
                                                noise_gaussian_size_loss=sigma_loss), {}, {}, 0, "cpu")
        model = _tiny_model(add_eos=False)
        batch = clean_loader.load(data, ids, training=True)
        clean = clean_loader.rows(model, data, batch, training=True)
        noisy = noisy_loader.rows(model, data, batch, training=True)
        validation = noisy_loader.rows(model, data, batch, training=False)

    forward_noise = torch.cat(noisy.coordinates) - torch.cat(clean.coordinates)
    assert forward_noise.abs().max() <= 2 * sigma_forward + 1e-6
    assert forward_noise.std() > 0.5 * sigma_forward
    assert torch.equal(torch.cat(noisy.inputs), torch.cat(clean.inputs))
    # Target = (p_{t+1} + e_{t+1}) - (p_t + e_t): bounded by 4 sigma, variance 2 sigma^2 (shrunk by truncation).
    target_noise = noisy.target_dirs - clean.target_dirs
    assert target_noise.abs().max() <= 4 * sigma_loss + 1e-5
    assert 0.6 * np.sqrt(2) * sigma_loss < target_noise.std() < np.sqrt(2) * sigma_loss
    assert torch.equal(validation.target_dirs, clean.target_dirs)
    assert torch.equal(torch.cat(validation.coordinates), torch.cat(clean.coordinates))


def test_split_and_reverse_keep_every_streamline(tiny_hdf5):
    with HDF5Cohort(tiny_hdf5) as cohort:
        data = SubsetData(cohort, ["sub-01"], "input", "streamlines", "cpu", lazy=True, cache_size=0)
        n = cohort.streamlines_count("sub-01", "streamlines")
        lines = list(cohort.read_streamlines("sub-01", "streamlines"))
        # Make some streamlines too short to split: they must stay, unsplit.
        loader = BatchLoader(LoaderParams(split_ratio=1.0), {"nb_points": 8}, {}, 0, "cpu")
        short_batch = loader.load(data, [("sub-01", np.arange(n))], training=True)
        assert short_batch.lengths.tolist() == [8] * n
        split = BatchLoader(LoaderParams(split_ratio=1.0), {}, {}, 0, "cpu").load(
            data, [("sub-01", np.arange(n))], training=True)
        reverse = BatchLoader(LoaderParams(reverse_ratio=1.0), {}, {}, 0, "cpu").load(
            data, [("sub-01", np.arange(n))], training=True)

    eligible = [s for s in lines if len(s) >= 13]
    assert len(split.lengths) == n + len(eligible)
    assert split.lengths.min() >= 2 and int(split.lengths.sum()) == sum(map(len, lines)) + len(eligible)
    halves = torch.split(split.points, split.lengths.tolist())
    # Each cut streamline becomes two consecutive halves of >= 6 points sharing the cut point.
    first = next(i for i, s in enumerate(lines) if len(s) >= 13)
    a, b = halves[first], halves[first + 1]
    assert len(a) >= 6 and len(b) >= 6 and torch.equal(a[-1], b[0])
    np.testing.assert_array_equal(torch.cat([a, b[1:]]).numpy(), lines[first])
    np.testing.assert_array_equal(torch.split(reverse.points, reverse.lengths.tolist())[0].numpy(),
                                  lines[0][::-1])


# ---------------------------------------------------------------------------------------------- trainer
def test_l2t_validation_loss_falls_and_folder_layout(tiny_hdf5, tmp_path):
    exp = _train(l2t_main, tmp_path, "l2t", tiny_hdf5, "--rnn_key", "gru", "--rnn_layer_sizes", "32",
                 "--nb_previous_dirs", "1", "--input_embedding_key", "nn_embedding",
                 "--input_embedded_size", "16", "--add_eos", "--batch_size_training", "10",
                 "--learning_rate", "0.01", "--weight_decay", "0", "--max_epochs", "6")
    valid = np.load(exp / "logs" / LOG_FILES["valid_loss"])
    assert len(valid) == 6 and valid[-1] < 0.7 * valid[0]

    for model_dir in ("best_model", "checkpoint/model"):
        assert sorted(p.name for p in (exp / model_dir).iterdir()) == ["eos_calibration.json", "model_state.pkl",
                                                                        "model_type.txt", "parameters.json"]
        assert (exp / model_dir / "model_type.txt").read_text() == "Learn2TrackModel"
    # The EOS threshold chosen on the validation subject, beside each model; recomputing it gives the same.
    calibration = json.loads((exp / "best_model" / "eos_calibration.json").read_text())
    assert 0 < calibration["threshold"] < 1 and calibration["subjects"] == ["sub-02"]
    assert calibration["n_streamlines"] == 2 * 50 and 0 <= calibration["net_gain"] <= 1
    assert ExperimentFolder(exp).read_eos_threshold(use_latest_epoch=False) == calibration["threshold"]
    assert calibrate_experiment_eos(exp)["best_model"] == calibration
    logs = [f for name, f in LOG_FILES.items() if name != TRACKING_MONITOR]  # no generation-validation phase
    assert sorted(p.name for p in (exp / "logs").iterdir()) == sorted(logs)
    assert all(len(np.load(exp / "logs" / f)) == 6 for f in logs)
    latest = ExperimentFolder(exp).read_latest_parameters()
    assert latest["hdf5 file"] == str(tiny_hdf5.resolve())
    assert len(list(exp.glob("parameters_??-??-????_??h??.json"))) == 1
    best = json.loads((exp / "best_epoch_losses.json").read_text())
    assert best["valid_loss"] == pytest.approx(valid.min())
    state = torch.load(exp / "checkpoint" / "checkpoint_state.pkl", weights_only=True)
    assert state["current_states"]["completed_epochs"] == 6
    # The folder alone rebuilds the model; the head is the one asked for.
    model = load_experiment_model(exp)
    assert _same_weights(model.state_dict(), _state(exp))
    assert model.params_for_checkpoint()["dg_args"]["add_eos"] is True
    assert model.params_for_checkpoint()["step_size"] == 1.0


def test_same_rng_same_weights_and_resume_equals_uninterrupted(tiny_hdf5, tmp_path):
    full = _train(l2t_main, tmp_path, "full", tiny_hdf5, *RANDOM_L2T, "--max_epochs", "2")
    again = _train(l2t_main, tmp_path, "again", tiny_hdf5, *RANDOM_L2T, "--max_epochs", "2",
                   "--lazy", "--cache_size", "1")
    other_seed = _train(l2t_main, tmp_path, "other", tiny_hdf5, *RANDOM_L2T, "--max_epochs", "2",
                        "--rng", "7")
    half = _train(l2t_main, tmp_path, "half", tiny_hdf5, *RANDOM_L2T, "--max_epochs", "1")
    l2t_resume_main([str(tmp_path), "half", "--new_max_epochs", "2"])

    assert _same_weights(_state(full), _state(again))          # same seed (lazy or not): same weights
    assert not _same_weights(_state(full), _state(other_seed))
    for which in ("best_model", "checkpoint/model"):
        assert _same_weights(_state(full, which), _state(half, which))
    for name in ("train_loss", "valid_loss"):
        np.testing.assert_array_equal(np.load(full / "logs" / LOG_FILES[name]),
                                      np.load(half / "logs" / LOG_FILES[name]))
    assert len(list(half.glob("parameters_*.json"))) >= 2    # dated file(s) + latest


@pytest.mark.parametrize("model", ["TTO", "TTS", "TTST"])
def test_transformers_train_and_reload(tiny_hdf5, tmp_path, capsys, model):
    extra = ["--target_embedded_size", "4"] if model == "TTST" else []
    exp = _train(tt_main, tmp_path, model, tiny_hdf5, "--model", model, "--input_embedded_size", "8",
                 *extra, "--nheads", "2", "--n_layers_e", "1", "--max_len", "64", "--add_eos",
                 "--batch_size_training", "10", "--batch_size_validation", "50", "--learning_rate", "0.01",
                 "--max_epochs", "2", "--norm_first")
    valid = np.load(exp / "logs" / LOG_FILES["valid_loss"])
    assert valid[1] < valid[0]
    loaded = load_experiment_model(exp, use_latest_epoch=True)
    assert type(loaded).__name__ == (exp / "best_model" / "model_type.txt").read_text()
    assert loaded.params_for_checkpoint()["norm_first"] is True
    assert _same_weights(loaded.state_dict(), _state(exp, "checkpoint/model"))
    # The l2t resume script refuses a transformer experiment; the tt one needs a larger max_epochs.
    with pytest.raises(SystemExit):
        l2t_resume_main([str(tmp_path), model, "--new_max_epochs", "3"])
    assert "use tt_resume_training_from_checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tt_resume_main([str(tmp_path), model])


def test_patience_stops_training(tiny_hdf5, tmp_path):
    # A delta larger than any possible improvement: only epoch 1 counts as best.
    exp = _train(l2t_main, tmp_path, "patient", tiny_hdf5, *TINY_L2T, "--max_epochs", "5",
                 "--patience", "1", "--patience_delta", "100")
    assert len(np.load(exp / "logs" / LOG_FILES["train_loss"])) == 2
    with pytest.raises(SystemExit):
        l2t_resume_main([str(tmp_path), "patient"])
    l2t_resume_main([str(tmp_path), "patient", "--new_patience", "2"])
    assert len(np.load(exp / "logs" / LOG_FILES["train_loss"])) == 3


def test_without_validation_the_training_loss_selects_the_best_model(training_only_hdf5, tmp_path, capsys):
    exp = _train(l2t_main, tmp_path, "no_valid", training_only_hdf5, *TINY_L2T, "--max_epochs", "2")
    assert "no validation subject" in capsys.readouterr().err
    train = np.load(exp / "logs" / LOG_FILES["train_loss"])
    assert np.isnan(np.load(exp / "logs" / LOG_FILES["valid_loss"])).all()
    best = json.loads((exp / "best_epoch_losses.json").read_text())
    assert best == {"train_loss": pytest.approx(train.min()), "valid_loss": None}


def test_failed_checkpoint_write_keeps_the_previous_one(tiny_hdf5, tmp_path):
    exp = _train(l2t_main, tmp_path, "exp", tiny_hdf5, *TINY_L2T, "--max_epochs", "1")
    before = (exp / "checkpoint" / "checkpoint_state.pkl").read_bytes()

    class BrokenModel:
        def params_for_checkpoint(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ExperimentFolder(exp).save_checkpoint(BrokenModel(), {"anything": 1})
    assert (exp / "checkpoint" / "checkpoint_state.pkl").read_bytes() == before
    assert [p.name for p in exp.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("positionals, options, message", [
    (("input_typo", "streamlines"), [], "input_typo"),
    (("streamlines", "streamlines"), [], "streamline group, not a volume group"),
    (("input", "wm_mask"), [], "volume group, not a streamline group"),
    (("input", "streamlines"), ["--dg_key", "gaussian", "--normalize_outputs"], "normalize_outputs"),
    (("input", "streamlines"), ["--add_entropy_to_gauss", "0.5"], "add_entropy_to_gauss"),
    (("input", "streamlines"), ["--input_embedding_key", "cnn_embedding", "--nb_cnn_filters", "4",
                                "--kernel_size", "2"], "grid"),
    (("input", "streamlines"), ["--dg_key", "sphere-classification", "--add_eos", "--eos_weight", "-2"],
     "eos_weight"),
    (("input", "streamlines"), ["--eos_weight", "2"], "--eos_weight needs --add_eos"),
    (("input", "streamlines"), ["--prev_dirs_embedding_key", "nn_embedding", "--prev_dirs_embedded_size", "8"],
     "needs --nb_previous_dirs >= 1"),
])
def test_bad_options_fail_before_training(tiny_hdf5, tmp_path, capsys, positionals, options, message):
    with pytest.raises(SystemExit) as exit_info:
        l2t_main([str(tmp_path), "exp", str(tiny_hdf5), *positionals, *TINY_L2T, *options])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "exp").exists()


def test_existing_experiment_and_missing_paths(tiny_hdf5, tmp_path, capsys):
    with pytest.raises(SystemExit):
        l2t_main([str(tmp_path / "missing"), "exp", str(tiny_hdf5), "input", "streamlines"])
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "old_file").write_text("x")
    with pytest.raises(SystemExit):
        _train(l2t_main, tmp_path, "exp", tiny_hdf5, *TINY_L2T, "--max_epochs", "1")
    assert "already exists" in capsys.readouterr().err
    _train(l2t_main, tmp_path, "exp", tiny_hdf5, *TINY_L2T, "--max_epochs", "1", "-f")
    assert not (tmp_path / "exp" / "old_file").exists() and (tmp_path / "exp" / "best_model").is_dir()


def test_learning_rate_schedule_and_device_fallback(caplog):
    assert parse_learning_rates(["0.001*3", "0.0001"]) == [0.001, 0.001, 0.001, 0.0001]
    assert parse_learning_rates(None) == [0.001]
    if not torch.cuda.is_available():
        with caplog.at_level("WARNING"):
            assert select_device(True).type == "cpu"
        assert sum("CUDA" in r.message for r in caplog.records) == 1


# ---------------------------------------------------------------------------------------------- log plots
def test_visualize_logs_writes_pngs(tiny_hdf5, tmp_path, capsys):
    exp = _train(l2t_main, tmp_path, "exp", tiny_hdf5, *TINY_L2T, "--max_epochs", "2")
    prefix = tmp_path / "plots" / "run_"
    visualize_logs.main([str(exp), str(exp), "--save_figures", str(prefix)])
    for name in ("loss", "grad_norm", "time"):
        png = tmp_path / "plots" / f"run_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(SystemExit):
        visualize_logs.main([str(exp), "--save_figures", str(prefix)])
    assert "already exists" in capsys.readouterr().err

    # dwi_ml's --save_to_csv and --remove_outliers; its layout options are accepted with one warning
    table = tmp_path / "logs.csv"
    visualize_logs.main([str(exp), "--save_figures", str(tmp_path / "dwi_ml_"), "--save_to_csv", str(table),
                         "--remove_outliers", "--graph", "Loss", "train_loss_monitor_per_epoch", "--nb_plots_per_fig",
                         "2"])
    assert capsys.readouterr().err.count("without effect here: --graph, --nb_plots_per_fig") == 1
    rows = {row[1]: row for row in csv.reader(table.open())}
    assert rows.keys() == {f.removesuffix(".npy") for name, f in LOG_FILES.items() if name != TRACKING_MONITOR}
    train_loss = np.load(exp / "logs" / LOG_FILES["train_loss"])
    assert rows["train_loss_monitor_per_epoch"][0] == "exp"
    np.testing.assert_allclose([float(v) for v in rows["train_loss_monitor_per_epoch"][2:]], train_loss, rtol=1e-5)
    assert (tmp_path / "dwi_ml_loss.png").is_file()


@pytest.mark.parametrize("damage", [lambda p: p.write_bytes(p.read_bytes()[:-10]), lambda p: p.write_bytes(b"junk"),
                                    lambda p: np.save(p, np.array([{"a": 1}], dtype=object))],
                         ids=["truncated", "garbage", "pickled"])
def test_visualize_logs_refuses_a_corrupt_log(tiny_hdf5, tmp_path, capsys, damage):
    exp = _train(l2t_main, tmp_path, "exp", tiny_hdf5, *TINY_L2T, "--max_epochs", "1")
    damage(exp / "logs" / LOG_FILES["train_loss"])
    with pytest.raises(SystemExit) as exit_info:
        visualize_logs.main([str(exp), "--save_figures", str(tmp_path / "plots" / "run_")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_loss_monitor_per_epoch.npy" in err[0], err
    assert not (tmp_path / "plots").exists() or not any((tmp_path / "plots").iterdir())


@pytest.mark.parametrize("main", [l2t_main, tt_main, l2t_resume_main, tt_resume_main, visualize_logs.main])
def test_help(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_use_gpu_is_a_runtime_choice_on_resume(tiny_hdf5, tmp_path, capsys):
    """--use_gpu is not stored as a training parameter: a run started with it resumes on the CPU without it,
    and resuming with it on a machine without CUDA warns and runs; an old checkpoint storing use_gpu resumes."""
    exp = _train(l2t_main, tmp_path, "gpu", tiny_hdf5, *TINY_L2T, "--max_epochs", "1", "--use_gpu")
    state = ExperimentFolder(exp).load_checkpoint_state()
    assert "use_gpu" not in state["params_for_init"]
    l2t_resume_main([str(tmp_path), "gpu", "--new_max_epochs", "2"])
    assert len(np.load(exp / "logs" / LOG_FILES["train_loss"])) == 2
    if not torch.cuda.is_available():
        capsys.readouterr()
        l2t_resume_main([str(tmp_path), "gpu", "--new_max_epochs", "3", "--use_gpu"])
        assert "CUDA is not available" in capsys.readouterr().err  # the CLI's log handler writes to stderr
        assert len(np.load(exp / "logs" / LOG_FILES["train_loss"])) == 3
    # A checkpoint written when use_gpu was a stored trainer parameter: the stored value is ignored.
    folder = ExperimentFolder(exp)
    state = folder.load_checkpoint_state()
    state["params_for_init"]["use_gpu"] = True
    torch.save(state, folder.checkpoint_state_file)
    epochs = len(np.load(exp / "logs" / LOG_FILES["train_loss"]))
    l2t_resume_main([str(tmp_path), "gpu", "--new_max_epochs", str(epochs + 1)])
    assert len(np.load(exp / "logs" / LOG_FILES["train_loss"])) == epochs + 1


def test_model_config_asdict_is_parameters_json(tiny_hdf5, tmp_path):
    exp = _train(l2t_main, tmp_path, "exp", tiny_hdf5, *TINY_L2T, "--max_epochs", "1")
    model = load_experiment_model(exp)
    saved = json.loads((exp / "best_model" / "parameters.json").read_text())
    from dataclasses import asdict
    assert list(asdict(model.config).items()) == list(saved.items())


# ---------------------------------------------------------------------------------------------- faults (issue 11)
def _start_training(exps, name, hdf5, *options):
    """``l2t_train_model`` in a subprocess (a real process to send SIGTERM to)."""
    code = "import sys; from trackflow.cli.train import l2t_main; l2t_main(sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, str(exps), name, str(hdf5), "input", "streamlines",
                             *TINY_L2T, *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _sigterm_once_training_started(process, exps, name):
    """SIGTERM the run once its (temporary) experiment holds its parameters, i.e. during epoch 1."""
    deadline = time.monotonic() + 60
    while not list(exps.glob(f".{name}.*.tmp/parameters_latest.json")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode != 0


def test_interrupted_overwrite_keeps_the_old_experiment(tiny_hdf5, tmp_path):
    exp = _train(l2t_main, tmp_path, "exp", tiny_hdf5, *TINY_L2T, "--max_epochs", "1")
    before = {p.relative_to(exp): p.read_bytes() for p in exp.rglob("*") if p.is_file()}
    _sigterm_once_training_started(_start_training(tmp_path, "exp", tiny_hdf5, "--max_epochs", "500", "-f"),
                                   tmp_path, "exp")
    assert {p.relative_to(exp): p.read_bytes() for p in exp.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_interrupted_training_leaves_no_husk(tiny_hdf5, tmp_path):
    _sigterm_once_training_started(_start_training(tmp_path, "exp", tiny_hdf5, "--max_epochs", "500"),
                                   tmp_path, "exp")
    assert list(tmp_path.iterdir()) == []
    # Nothing blocks the rerun without -f.
    assert (_train(l2t_main, tmp_path, "exp", tiny_hdf5, *TINY_L2T, "--max_epochs", "1") / "best_model").is_dir()


def _hdf5_copy(tiny_hdf5, tmp_path, change):
    path = tmp_path / "changed.hdf5"
    shutil.copyfile(tiny_hdf5, path)
    with h5py.File(path, "r+") as f:
        change(f)
    return path


@pytest.mark.parametrize("subject, group, what", [("sub-01", "input", "voxel values"),
                                                  ("sub-02", "streamlines", "point coordinates")])
def test_nan_data_is_named_before_training(tiny_hdf5, tmp_path, capsys, subject, group, what):
    def add_nan(f):
        f[subject][group]["data"][3, 1] = np.nan
    hdf5 = _hdf5_copy(tiny_hdf5, tmp_path, add_nan)
    with pytest.raises(SystemExit) as exit_info:
        _train(l2t_main, tmp_path, "exp", hdf5, *TINY_L2T, "--max_epochs", "1")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"subject '{subject}', group '{group}'" in err[0] and what in err[0]
    assert not (tmp_path / "exp").exists()


def test_resume_with_an_hdf5_of_other_features_writes_nothing(tiny_hdf5, tmp_path, capsys):
    exp = _train(l2t_main, tmp_path, "exp", tiny_hdf5, *TINY_L2T, "--max_epochs", "1")
    before = {p.relative_to(exp): p.read_bytes() for p in exp.rglob("*") if p.is_file()}

    def drop_a_feature(f):
        for subject in ("sub-01", "sub-02"):
            group = f[subject]["input"]
            data = group["data"][()][..., 1:]
            del group["data"]
            group.create_dataset("data", data=data)
            group.attrs["nb_features"] = data.shape[-1]
    hdf5 = _hdf5_copy(tiny_hdf5, tmp_path, drop_a_feature)
    with pytest.raises(SystemExit):
        l2t_resume_main([str(tmp_path), "exp", "--new_max_epochs", "2", "--hdf5_file", str(hdf5)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "features" in err[0]
    assert {p.relative_to(exp): p.read_bytes() for p in exp.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("damage", ["truncate", "malicious"])
def test_unreadable_checkpoint_on_resume(tiny_hdf5, tmp_path, capsys, damage):
    exp = _train(l2t_main, tmp_path, "exp", tiny_hdf5, *TINY_L2T, "--max_epochs", "1")
    state_file = exp / "checkpoint" / "checkpoint_state.pkl"
    if damage == "truncate":
        state_file.write_bytes(state_file.read_bytes()[:-5000])
    else:
        state_file.write_bytes(pickle.dumps(_Malicious()))
    with pytest.raises(SystemExit) as exit_info:
        l2t_resume_main([str(tmp_path), "exp", "--new_max_epochs", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint_state.pkl is not a readable checkpoint" in err[0]
    assert not (tmp_path / "pwned").exists()


class _Malicious:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


# ---------------------------------------------------------------------------------------------- generation-validation
GV_RECIPE = ("--rnn_key", "gru", "--rnn_layer_sizes", "16", "--nb_previous_dirs", "1", "--dg_key",
             "sphere-classification", "--add_eos", "--batch_size_training", "10", "--learning_rate", "0.01",
             "--add_a_tracking_validation_phase", "--tracking_mask", "wm_mask")


def test_tracking_validation_phase_chooses_the_best_epoch_by_tracked_end_distance(tiny_hdf5, tmp_path):
    exp = _train(l2t_main, tmp_path, "gv", tiny_hdf5, *GV_RECIPE, "--max_epochs", "5",
                 "--tracking_phase_frequency", "2")
    distances = np.load(exp / "logs" / LOG_FILES[TRACKING_MONITOR])
    valid = np.load(exp / "logs" / LOG_FILES["valid_loss"])
    assert len(distances) == 5 and np.isfinite(distances).all() and (distances > 0).all()
    assert distances[1] == distances[0] and distances[3] == distances[2]  # phases at epochs 1, 3 and 5
    best_epoch = int(np.argmin(distances))  # the first of equal values: repeated epochs never win
    best = json.loads((exp / "best_epoch_losses.json").read_text())
    assert best["valid_loss"] == pytest.approx(valid[best_epoch])
    # the best model is that epoch's: its own tracking score is the logged one
    from trackflow.data.hdf5.reader import HDF5Cohort
    from trackflow.models.persistence import load_model_dir
    from trackflow.training.trainer import TrainerParams
    from trackflow.tracking.validation import make_tracking_validator
    model = load_model_dir(exp / "best_model", "cpu").eval()
    with HDF5Cohort(tiny_hdf5) as cohort:
        validator = make_tracking_validator(cohort, model, "input", "streamlines",
                                            TrainerParams(add_a_tracking_validation_phase=True,
                                                          tracking_mask="wm_mask"), "cpu")
        assert validator() == pytest.approx(distances[best_epoch], rel=1e-5)


def test_tracking_validation_phase_needs_a_mask_group(tiny_hdf5, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _train(l2t_main, tmp_path, "gv", tiny_hdf5, *GV_RECIPE[:-2], "--max_epochs", "1")
    assert exit_info.value.code == 2 and "--tracking_mask" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train(l2t_main, tmp_path, "gv", tiny_hdf5, *GV_RECIPE[:-1], "no_such_group", "--max_epochs", "1")
    assert "no_such_group" in capsys.readouterr().err and not (tmp_path / "gv").exists()


def test_eos_threshold_stops_streamlines_at_their_ends_and_cuts_few():
    rng = np.random.default_rng(0)
    # 40 streamlines: largest p(EOS) in their last points in [0.04, 0.2], inside below 0.03 but for 5 at 0.15
    end_max = rng.uniform(0.04, 0.2, 40)
    interior_max = rng.uniform(0, 0.03, 40)
    interior_max[:5] = 0.15
    record = best_first_stop_threshold(interior_max, end_max)
    assert interior_max[5:].max() < record["threshold"] < end_max.min()  # cuts only the 5
    assert record["recall"] == pytest.approx(35 / 40) and record["precision"] == pytest.approx(35 / 40)
    # a per-point view would count each inner point; here one false stop anywhere cuts the streamline
    values = np.array([0.0, 0.9, 0.1, 0.2, 0.3, 0.0, 0.0, 0.4])  # streamlines of 5 and 3 points
    interior, end = _interior_and_end_maxima(values, np.array([5, 3]))
    np.testing.assert_array_equal(interior, [0.9, 0.0])
    np.testing.assert_array_equal(end, [0.3, 0.4])


def test_no_validation_subject_no_calibration(training_only_hdf5, tmp_path, capsys):
    exp = _train(l2t_main, tmp_path, "l2t", training_only_hdf5, *TINY_L2T, "--add_eos", "--max_epochs", "1",
                 "--dg_key", "sphere-classification")
    assert not (exp / "best_model" / "eos_calibration.json").exists()
    assert "no EOS calibration" in capsys.readouterr().err
    with pytest.raises(TrackflowError, match="eos_calibration.json"):
        ExperimentFolder(exp).read_eos_threshold(use_latest_epoch=False)
