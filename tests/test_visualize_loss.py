"""Loss visualisation CLIs on the tiny demo cohort with random-weight models (l2t with and without EOS, TTO).

Per-point losses are recomputed independently of the loader: resampling by dipy, inputs by the model's
``compute_inputs``, targets as differences of consecutive points, loss by the head.
"""

import shutil

import h5py
import matplotlib
import numpy as np
import pytest
import torch
from dipy.io.streamline import load_tractogram, save_tractogram
from dipy.tracking.streamlinespeed import set_number_of_points
from PIL import Image

from trackflow.cli.visualize_loss import l2t_main, tt_main
from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.data.streamlines import euclidean_lengths
from trackflow.errors import TrackflowError
from trackflow.models.l2t import Learn2TrackModel
from trackflow.models.persistence import load_experiment_model
from trackflow.models.transformers import OriginalTransformerModel
from trackflow.visualization.loss import LossVisualizationOptions

SUBJECT = "sub-01"
STEP_MM = 1.5  # differs from the hdf5's 1 mm, so the model's resampling is exercised

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def no_display(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)


def _l2t(nb_features, dg_key, add_eos):
    torch.manual_seed(0)
    return Learn2TrackModel(nb_features=nb_features, step_size=STEP_MM, input_embedding_key="nn_embedding",
                            input_embedded_size=8, nb_previous_dirs=1, rnn_key="gru", rnn_layer_sizes=[8],
                            dg_key=dg_key, dg_args={"add_eos": add_eos}).eval()


def _tto(nb_features):
    torch.manual_seed(0)
    return OriginalTransformerModel(
        nb_features=nb_features, step_size=STEP_MM, max_len=400, n_layers_e=1, n_layers_d=1, nheads=2,
        input_embedded_size=8, ffnn_hidden_size=8, dropout_rate=0.0, input_embedding_key="nn_embedding",
        dg_key="sphere-classification", dg_args={"add_eos": True}).eval()


@pytest.fixture(scope="module")
def world(tiny_hdf5, make_experiment, tmp_path_factory):
    root = tmp_path_factory.mktemp("visu_loss")
    with HDF5Cohort(tiny_hdf5) as cohort:
        nb_features = cohort.volume_groups()["input"]
        volume = torch.as_tensor(cohort.read_volume(SUBJECT, "input").data)
        voxel_mm = float(cohort.read_volume(SUBJECT, "input").voxres[0])
        streamlines = cohort.read_streamlines(SUBJECT, "streamlines")
        sft = cohort.to_sft(SUBJECT, "streamlines")
    return {"root": root, "hdf5": tiny_hdf5, "volume": volume, "voxel_mm": voxel_mm,
            "streamlines": streamlines, "sft": sft,
            "l2t_eos": make_experiment(root / "l2t_eos", _l2t(nb_features, "sphere-classification", True)),
            "l2t_noeos": make_experiment(root / "l2t_noeos", _l2t(nb_features, "cosine-regression", False)),
            "tto": make_experiment(root / "tto", _tto(nb_features))}


def _model(experiment):
    return load_experiment_model(experiment)


def expected_losses(world, model):
    """(rows per streamline, per-point losses, EOS probabilities) computed without the batch loader."""
    lines = world["streamlines"]
    step_vox = model.step_size / world["voxel_mm"]
    # scilpy's step-size rule: ceil(length / step) points, at least 2.
    n_points = np.maximum(np.ceil(euclidean_lengths(lines) / step_vox), 2).astype(int)
    resampled = [set_number_of_points(np.asarray(s, np.float64), int(n)).astype(np.float32)
                 for s, n in zip(lines, n_points)]
    add_eos = model.direction_getter.add_eos
    rows = [torch.from_numpy(s if add_eos else s[:-1]) for s in resampled]
    targets = torch.cat([torch.from_numpy(np.vstack([np.diff(s, axis=0), np.zeros((1, 3), np.float32)])
                                          [:len(r)]) for s, r in zip(resampled, rows)])
    eos = torch.cat([torch.arange(len(r)) == len(s) - 1 for s, r in zip(resampled, rows)]) if add_eos else None
    with torch.no_grad():
        inputs = [model.compute_inputs(world["volume"], r) for r in rows]
        raw = model(inputs, rows)
        losses = model.direction_getter.loss(raw, targets, eos)
        eos_probs = model.direction_getter.eos_probability(raw)
    return rows, losses.numpy(), None if eos_probs is None else eos_probs.numpy()


def _load(path):
    sft = load_tractogram(str(path), "same", bbox_valid_check=False)
    sft.to_vox()
    sft.to_corner()
    return sft


def _per_point(sft, key):
    return np.concatenate([np.asarray(v).reshape(-1) for v in sft.data_per_point[key]])


def _streamline_means(sft):
    return np.array([np.mean(v) for v in sft.data_per_point["losses"]])


DOCUMENTED = ("{experiment} {hdf5} {subj} input --out_prefix colored_tractogram --use_gpu --batch_size 400 "
              "--streamlines_group streamlines --colormap turbo --show_now --compute_histogram "
              "--save_colored_tractogram --save_colored_best_and_worst 0.5")


def test_documented_command_line(world, capsys):
    """The documented command, on CPU without display: --use_gpu warns, --show_now saves; values are exact."""
    experiment = world["l2t_eos"]
    l2t_main(DOCUMENTED.format(experiment=experiment, hdf5=world["hdf5"], subj=SUBJECT).split() + ["-v"])
    captured = capsys.readouterr()
    log_lines = captured.err.splitlines()
    if not torch.cuda.is_available():
        assert sum(line.startswith("WARNING") and "CUDA" in line for line in log_lines) == 1
    assert sum("--show_now" in line for line in log_lines) == 1
    assert "per-point loss: mean" in captured.out and "EOS error" in captured.out

    out_dir = experiment / "visu_loss"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"colored_tractogram_{n}" for n in (
        "histogram.png", "histogram_eos_error.png", "histogram_eos_probs_per_third.png", "colored_loss.trk",
        "best0.5percent.trk", "worst0.5percent.trk", "colorbar_loss.png"))
    for png in out_dir.glob("*.png"):
        assert min(Image.open(png).size) >= 100

    rows, losses, _ = expected_losses(world, _model(experiment))
    colored = _load(out_dir / "colored_tractogram_colored_loss.trk")
    assert [len(s) for s in colored.streamlines] == [len(r) for r in rows]
    np.testing.assert_allclose(colored.streamlines.get_data(), torch.cat(rows).numpy(), atol=1e-3)
    np.testing.assert_allclose(_per_point(colored, "losses"), losses, rtol=1e-4, atol=1e-5)
    colors = colored.data_per_point["color"].get_data()
    assert colors.shape == (len(losses), 3) and colors.min() >= 0 and colors.max() <= 255
    # turbo maps the smallest loss and the largest one to its two end colours.
    turbo = matplotlib.colormaps["turbo"]
    np.testing.assert_allclose(colors[np.argmin(losses)], 255 * np.array(turbo(0.0)[:3]), atol=0.01)
    np.testing.assert_allclose(colors[np.argmax(losses)], 255 * np.array(turbo(1.0)[:3]), atol=0.01)
    # 0.5% of the 50 streamlines rounds to 0: at least one streamline each, the extremes.
    means = _streamline_means(colored)
    assert _streamline_means(_load(out_dir / "colored_tractogram_best0.5percent.trk")) == pytest.approx([means.min()])
    assert _streamline_means(_load(out_dir / "colored_tractogram_worst0.5percent.trk")) == pytest.approx([means.max()])


@pytest.mark.parametrize("percent", [20, 50])
def test_best_and_worst_partition(world, tmp_path, percent):
    """pct% of the streamlines each, disjoint, every best mean <= every worst mean; any batch size."""
    l2t_main([str(world["l2t_eos"]), str(world["hdf5"]), SUBJECT, "input", "--streamlines_group", "streamlines",
              "--batch_size", "7", "--save_colored_best_and_worst", str(percent), "--out_dir", str(tmp_path)])
    rows, losses, _ = expected_losses(world, _model(world["l2t_eos"]))
    means = np.array([chunk.mean() for chunk in np.split(losses, np.cumsum([len(r) for r in rows])[:-1])])
    # The prefix defaults to the subject id.
    best = _load(tmp_path / f"{SUBJECT}_best{percent}percent.trk")
    worst = _load(tmp_path / f"{SUBJECT}_worst{percent}percent.trk")
    n_expected = int(round(percent / 100 * len(means)))
    assert len(best) == len(worst) == n_expected
    best_means, worst_means = _streamline_means(best), _streamline_means(worst)
    assert best_means.max() <= worst_means.min()
    np.testing.assert_allclose(best_means, np.sort(means)[:n_expected], rtol=1e-4)
    np.testing.assert_allclose(worst_means, np.sort(means)[::-1][:n_expected], rtol=1e-4)
    starts = {tuple(np.round(s[0], 3)) for s in best.streamlines}
    assert starts.isdisjoint({tuple(np.round(s[0], 3)) for s in worst.streamlines})
    assert (tmp_path / f"{SUBJECT}_colorbar_loss.png").is_file()


def test_no_eos_drops_last_point_and_tt_script(world, tmp_path):
    """Without EOS the last point (no target) is not written; tt_visualize_loss gives TTO's own losses."""
    l2t_main([str(world["l2t_noeos"]), str(world["hdf5"]), SUBJECT, "input", "--streamlines_group",
              "streamlines", "--save_colored_tractogram", "--out_dir", str(tmp_path), "--out_prefix", "a"])
    rows, losses, _ = expected_losses(world, _model(world["l2t_noeos"]))
    resampled = expected_losses(world, _model(world["l2t_eos"]))[0]  # EOS: rows are all the points
    colored = _load(tmp_path / "a_colored_loss.trk")
    assert [len(s) for s in colored.streamlines] == [len(s) - 1 for s in resampled]
    np.testing.assert_allclose(colored.streamlines.get_data(), np.concatenate([s[:-1] for s in resampled]),
                               atol=1e-3)
    np.testing.assert_allclose(_per_point(colored, "losses"), losses, rtol=1e-4, atol=1e-5)

    tt_main([str(world["tto"]), str(world["hdf5"]), SUBJECT, "input", "--streamlines_group", "streamlines",
             "--save_colored_tractogram", "--out_dir", str(tmp_path), "--out_prefix", "tto", "--batch_size", "5"])
    _, tto_losses, _ = expected_losses(world, _model(world["tto"]))
    np.testing.assert_allclose(_per_point(_load(tmp_path / "tto_colored_loss.trk"), "losses"), tto_losses,
                               rtol=1e-4, atol=1e-5)


def test_eos_colorings_clipping_and_displacement(world, tmp_path):
    """EOS probabilities and errors per point, clipped ranges in names and colours, displacement lines."""
    l2t_main([str(world["l2t_eos"]), str(world["hdf5"]), SUBJECT, "input", "--streamlines_group",
              "streamlines", "--save_colored_eos_probs", "--save_colored_eos_errors", "--max_range_eos_errors",
              "0.5", "--save_displacement", "3", "--out_dir", str(tmp_path), "--out_prefix", "e"])
    rows, _, eos_probs = expected_losses(world, _model(world["l2t_eos"]))
    is_last = np.concatenate([np.arange(len(r)) == len(r) - 1 for r in rows])
    probs = _load(tmp_path / "e_colored_eos_probs.trk")
    np.testing.assert_allclose(_per_point(probs, "eos_probs"), eos_probs, rtol=1e-4, atol=1e-6)
    errors = _load(tmp_path / "e_colored_eos_errors_clippeddatamin-0.5.trk")
    expected_errors = np.where(is_last, 1 - eos_probs, eos_probs)
    np.testing.assert_allclose(_per_point(errors, "eos_errors"), expected_errors, rtol=1e-4, atol=1e-6)
    # Errors above 0.5 are clipped to the top colour of viridis (every last point of an untrained model).
    top = 255 * np.array(matplotlib.colormaps["viridis"](1.0)[:3])
    colors = errors.data_per_point["color"].get_data()
    clipped = expected_errors >= 0.5
    assert clipped.sum() >= len(rows)
    np.testing.assert_allclose(colors[clipped], np.broadcast_to(top, (clipped.sum(), 3)), atol=0.01)
    assert (tmp_path / "e_colorbar_eos_errors_clippeddatamin-0.5.png").is_file()
    assert (tmp_path / "e_colorbar_eos_probs.png").is_file()

    displacement = _load(tmp_path / "e_displacement.trk")
    assert len(displacement) == 6  # 3 true streamlines, then their 3 zig-zags
    true_lines, zigzags = displacement.streamlines[:3], displacement.streamlines[3:]
    for true, zigzag in zip(true_lines, zigzags):
        # The zig-zag passes through every true point, with one predicted step in between.
        assert len(zigzag) == 2 * len(true) - 1
        np.testing.assert_allclose(zigzag[::2], true, atol=1e-3)
        steps = np.linalg.norm(zigzag[1::2] - zigzag[:-1:2], axis=1)
        np.testing.assert_allclose(steps, np.linalg.norm(np.diff(true, axis=0), axis=1), rtol=1e-3, atol=1e-4)
    blue = displacement.data_per_point["color_z"][0]
    assert np.all(np.asarray(blue) == 255)


def test_streamlines_file_and_batch_size_invariance(world, tmp_path):
    """A .trx/.trk file on the input grid gives the hdf5 group's values, whatever the batch size."""
    trx = tmp_path / "ref.trx"
    save_tractogram(world["sft"], str(trx), bbox_valid_check=False)
    l2t_main([str(world["l2t_eos"]), str(world["hdf5"]), SUBJECT, "input", "--streamlines_file", str(trx),
              "--save_colored_tractogram", "--out_dir", str(tmp_path), "--out_prefix", "file", "--batch_size", "1"])
    l2t_main([str(world["l2t_eos"]), str(world["hdf5"]), SUBJECT, "input", "--streamlines_group", "streamlines",
              "--save_colored_tractogram", "--out_dir", str(tmp_path), "--out_prefix", "group"])
    np.testing.assert_allclose(_per_point(_load(tmp_path / "file_colored_loss.trk"), "losses"),
                               _per_point(_load(tmp_path / "group_colored_loss.trk"), "losses"), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("experiment,options,message", [
    ("l2t_eos", ["--streamlines_group", "streamlines"], "nothing to do"),
    ("l2t_noeos", ["--streamlines_group", "streamlines", "--save_colored_eos_probs"], "no EOS"),
    ("tto", ["--streamlines_group", "streamlines", "--compute_histogram"], "use tt_visualize_loss"),
    ("l2t_eos", ["--streamlines_group", "nope", "--compute_histogram"], "nope"),
    ("l2t_eos", ["--streamlines_group", "streamlines", "--compute_histogram", "--colormap", "nope"], "colormap"),
])
def test_bad_input_one_line_no_output(world, tmp_path, capsys, experiment, options, message):
    with pytest.raises(SystemExit) as exit_info:
        l2t_main([str(world[experiment]), str(world["hdf5"]), SUBJECT, "input", *options, "--subset", "training",
                  "--out_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _fails_with_one_line(argv, capsys, message):
    with pytest.raises(SystemExit) as exit_info:
        l2t_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_a_corrupted_object_header_in_the_hdf5_is_one_line(world, tmp_path, capsys):
    hdf5 = tmp_path / "damaged.hdf5"
    shutil.copyfile(world["hdf5"], hdf5)
    with h5py.File(hdf5, "r") as f:
        header = h5py.h5o.get_info(f[f"{SUBJECT}/input/data"].id).addr
    with open(hdf5, "r+b") as f:
        f.seek(header)
        f.write(b"\xff" * 64)
    _fails_with_one_line([str(world["l2t_eos"]), str(hdf5), SUBJECT, "input", "--streamlines_group", "streamlines",
                          "--subset", "training", "--compute_histogram", "--out_dir", str(tmp_path / "out")],
                         capsys, f"{hdf5} is damaged")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_output_that_is_the_input_tractogram_is_refused(world, tmp_path, capsys):
    reference = tmp_path / "x_colored_loss.trk"
    save_tractogram(world["sft"], str(reference), bbox_valid_check=False)
    before = reference.read_bytes()
    _fails_with_one_line([str(world["l2t_eos"]), str(world["hdf5"]), SUBJECT, "input", "--streamlines_file",
                          str(reference), "--save_colored_tractogram", "--out_dir", str(tmp_path), "--out_prefix",
                          "x", "-f"], capsys, "is the same file as input")
    assert reference.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [reference.name]


def test_outputs_appear_together_or_not_at_all(world, tmp_path, capsys):
    # The histogram can be drawn; the loss colours cannot (a range minimum above every loss): nothing is left.
    _fails_with_one_line([str(world["l2t_eos"]), str(world["hdf5"]), SUBJECT, "input", "--streamlines_group",
                          "streamlines", "--subset", "training", "--compute_histogram", "--save_colored_tractogram",
                          "--min_range", "1e6", "--out_dir", str(tmp_path)], capsys, "colour range minimum")
    assert not list(tmp_path.iterdir())


def test_existing_output_needs_overwrite(world, tmp_path, capsys):
    args = [str(world["l2t_eos"]), str(world["hdf5"]), SUBJECT, "input", "--streamlines_group", "streamlines",
            "--save_colored_tractogram", "--out_dir", str(tmp_path), "--out_prefix", "x"]
    l2t_main(args)
    before = (tmp_path / "x_colored_loss.trk").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        l2t_main(args)
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "x_colored_loss.trk").stat().st_mtime_ns == before
    l2t_main(args + ["-f"])


@pytest.mark.parametrize("options,message", [
    ({}, "exactly one of --streamlines_group and --streamlines_file"),
    ({"streamlines_group": "s", "streamlines_file": "f.trk"}, "exactly one of"),
    ({"streamlines_group": "s", "colormap": "nope"}, "unknown matplotlib colormap"),
    ({"streamlines_group": "s", "save_colored_best_and_worst": 0.0}, "--save_colored_best_and_worst must be"),
    ({"streamlines_group": "s", "batch_size": 0}, "--batch_size must be at least 1"),
    ({"streamlines_group": "s", "save_displacement": 0}, "--save_displacement must be at least 1"),
])
def test_options_are_checked_once_by_the_library(options, message):
    """Callers of ``visualize_loss`` without the parser get the same rules, named by their CLI option."""
    with pytest.raises(TrackflowError, match=message):
        LossVisualizationOptions(**options)
