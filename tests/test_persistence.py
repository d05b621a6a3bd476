"""Model folders: dwi_ml-format folders written by hand from the documented layout load and compute the
documented composition; save/load round trip; legacy names; clean errors."""

import json
import math
import sys
from collections import OrderedDict

import pytest
import torch

from trackflow.errors import TrackflowError
from trackflow.models.l2t import Learn2TrackModel
from trackflow.models.persistence import load_experiment_model, load_model_dir, save_model_dir

# dwi_ml-checkpoints.md §1.7, Learn2TrackModel example (F=45), verbatim.
L2T_EXAMPLE_JSON = """
{"experiment_name": "l2t_demo", "step_size": 0.5, "compress_lines": null, "nb_points": null,
 "input_embedding_key": "nn_embedding", "input_embedded_size": 64, "kernel_size": null, "nb_cnn_filters": null,
 "neighborhood_type": "axes", "neighborhood_radius": 1, "neighborhood_resolution": 1.0,
 "dg_key": "sphere-classification", "dg_args": {"dropout": 0.0, "add_eos": true, "eos_weight": 1.0},
 "nb_previous_dirs": 2, "prev_dirs_embedding_key": "no_embedding", "prev_dirs_embedded_size": 6,
 "normalize_prev_dirs": true, "nb_features": 45, "rnn_key": "lstm", "rnn_layer_sizes": [100, 100],
 "use_skip_connection": true, "use_layer_normalization": true, "dropout": 0.1}
"""
# CLI defaults (no embedding, no previous directions, LSTM 100-100, cosine regression), F=5.
CLI_DEFAULT_JSON = """
{"experiment_name": "l2t_cli", "step_size": 1.0, "compress_lines": null, "nb_points": null,
 "input_embedding_key": "no_embedding", "input_embedded_size": null, "kernel_size": null, "nb_cnn_filters": null,
 "neighborhood_type": null, "neighborhood_radius": null, "neighborhood_resolution": null,
 "dg_key": "cosine-regression", "dg_args": {"dropout": 0.0, "add_eos": false, "eos_weight": 1.0,
 "normalize_targets": null, "normalize_outputs": null},
 "nb_previous_dirs": 0, "prev_dirs_embedding_key": "no_embedding", "prev_dirs_embedded_size": null,
 "normalize_prev_dirs": false, "nb_features": 5, "rnn_key": "lstm", "rnn_layer_sizes": [100, 100],
 "use_skip_connection": false, "use_layer_normalization": false, "dropout": 0.0}
"""
# GRU x3 with nn previous-direction embedding, l2 regression with EOS; an unknown key holding Infinity.
GRU_JSON = """
{"experiment_name": "gru", "step_size": null, "compress_lines": 0.2, "nb_points": null,
 "input_embedding_key": "nn_embedding", "input_embedded_size": 6, "kernel_size": null, "nb_cnn_filters": null,
 "neighborhood_type": "grid", "neighborhood_radius": 1, "neighborhood_resolution": 0.5,
 "dg_key": "l2-regression", "dg_args": {"dropout": 0.0, "add_eos": true, "eos_weight": 1.0,
 "normalize_targets": null, "normalize_outputs": null},
 "nb_previous_dirs": 3, "prev_dirs_embedding_key": "nn_embedding", "prev_dirs_embedded_size": 5,
 "normalize_prev_dirs": false, "nb_features": 2, "rnn_key": "gru", "rnn_layer_sizes": [8, 6, 7],
 "use_skip_connection": true, "use_layer_normalization": true, "dropout": 0.2, "max_length_mm": Infinity}
"""


def documented_state_dict(params, nb_neighbours, head_outputs, generator):
    """A Learn2TrackModel state dict built from the documented key names and shapes (checkpoints §2.2)."""
    def rand(*shape):
        # The scale of torch's default init (about 1 / sqrt(fan_in)), so activations stay O(1).
        return torch.randn(*shape, generator=generator) / math.sqrt(shape[-1] if len(shape) > 1 else 16)

    state = OrderedDict()
    input_size = params["nb_features"] * nb_neighbours
    if params["input_embedding_key"] == "nn_embedding":
        state["input_embedding_layer.linear.weight"] = rand(params["input_embedded_size"], input_size)
        state["input_embedding_layer.linear.bias"] = rand(params["input_embedded_size"])
        input_size = params["input_embedded_size"]
    n = params["nb_previous_dirs"]
    if n > 0:
        if params["prev_dirs_embedding_key"] == "nn_embedding":
            state["prev_dirs_embedding.linear.weight"] = rand(params["prev_dirs_embedded_size"], 3 * n)
            state["prev_dirs_embedding.linear.bias"] = rand(params["prev_dirs_embedded_size"])
        input_size += params["prev_dirs_embedded_size"]
    gates = 4 if params["rnn_key"] == "lstm" else 3
    sizes = params["rnn_layer_sizes"]
    skip = params["use_skip_connection"]
    for i, size in enumerate(sizes):
        layer_input = input_size if i == 0 else sizes[i - 1] + (input_size if skip else 0)
        state[f"rnn_model.rnn_{i}.weight_ih_l0"] = rand(gates * size, layer_input)
        state[f"rnn_model.rnn_{i}.weight_hh_l0"] = rand(gates * size, size)
        state[f"rnn_model.rnn_{i}.bias_ih_l0"] = rand(gates * size)
        state[f"rnn_model.rnn_{i}.bias_hh_l0"] = rand(gates * size)
        if params["use_layer_normalization"]:
            state[f"rnn_model.layer_norm_{i}.weight"] = 1 + rand(size)
            state[f"rnn_model.layer_norm_{i}.bias"] = rand(size)
    rnn_output = sum(sizes) + input_size if skip else sizes[-1]
    hidden = math.ceil(rnn_output / 2)
    state["direction_getter.layers.0.weight"] = rand(hidden, rnn_output)
    state["direction_getter.layers.0.bias"] = rand(hidden)
    state["direction_getter.layers.1.weight"] = rand(head_outputs, hidden)
    state["direction_getter.layers.1.bias"] = rand(head_outputs)
    return state


def write_folder(path, params_text, state_dict, model_type="Learn2TrackModel"):
    path.mkdir(parents=True)
    (path / "parameters.json").write_text(params_text)
    (path / "model_type.txt").write_text(model_type)
    torch.save(state_dict, path / "model_state.pkl")
    return path


def reference_prev_dirs(points, n, normalize):
    """[T, 3n]: at point t, [d_{t-1}, ..., d_{t-n}], d_j = p_{j+1} - p_j, zeros when missing."""
    rows = points.new_zeros(len(points), 3 * n)
    for t in range(len(points)):
        for k in range(1, n + 1):
            j = t - k
            if j >= 0:
                d = points[j + 1] - points[j]
                rows[t, 3 * (k - 1):3 * k] = d / d.norm() if normalize else d
    return rows


def reference_rnn(x, w_ih, w_hh, b_ih, b_hh, lstm):
    """Textbook LSTM (gates i, f, g, o) or GRU (r, z, n) over x [T, I] from zero states -> [T, L]."""
    size = w_hh.shape[1]
    h = w_hh.new_zeros(size)
    c = w_hh.new_zeros(size)
    outputs = []
    for x_t in x:
        gi = w_ih @ x_t + b_ih
        gh = w_hh @ h + b_hh
        if lstm:
            i, f, g, o = (gi + gh).chunk(4)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            r = torch.sigmoid(gi[:size] + gh[:size])
            z = torch.sigmoid(gi[size:2 * size] + gh[size:2 * size])
            n = torch.tanh(gi[2 * size:] + r * gh[2 * size:])
            h = (1 - z) * n + z * h
        outputs.append(h)
    return torch.stack(outputs)


def reference_forward(state, params, inputs, points):
    """The documented composition (checkpoints §2.2 "Composition"), eval mode, one streamline."""
    x = inputs
    if params["input_embedding_key"] == "nn_embedding":
        x = torch.relu(x @ state["input_embedding_layer.linear.weight"].T
                       + state["input_embedding_layer.linear.bias"])
    n = params["nb_previous_dirs"]
    if n > 0:
        prev = reference_prev_dirs(points, n, params["normalize_prev_dirs"])
        if params["prev_dirs_embedding_key"] == "nn_embedding":
            prev = torch.relu(prev @ state["prev_dirs_embedding.linear.weight"].T
                              + state["prev_dirs_embedding.linear.bias"])
        x = torch.cat([x, prev], dim=-1)
    rnn_input, layer_input, outputs = x, x, []
    sizes = params["rnn_layer_sizes"]
    for i in range(len(sizes)):
        prefix = f"rnn_model.rnn_{i}."
        o = reference_rnn(layer_input, state[prefix + "weight_ih_l0"], state[prefix + "weight_hh_l0"],
                          state[prefix + "bias_ih_l0"], state[prefix + "bias_hh_l0"], params["rnn_key"] == "lstm")
        if params["use_layer_normalization"]:
            mean = o.mean(-1, keepdim=True)
            var = o.var(-1, unbiased=False, keepdim=True)
            o = (o - mean) / torch.sqrt(var + 1e-5) * state[f"rnn_model.layer_norm_{i}.weight"] \
                + state[f"rnn_model.layer_norm_{i}.bias"]
        if i < len(sizes) - 1:
            o = torch.relu(o)
            layer_input = torch.cat([o, rnn_input], dim=-1) if params["use_skip_connection"] else o
        outputs.append(o)
    final = torch.cat(outputs + [rnn_input], dim=-1) if params["use_skip_connection"] else outputs[-1]
    hidden = torch.relu(final @ state["direction_getter.layers.0.weight"].T + state["direction_getter.layers.0.bias"])
    return hidden @ state["direction_getter.layers.1.weight"].T + state["direction_getter.layers.1.bias"]


@pytest.mark.parametrize("params_text, nb_neighbours, head_outputs", [
    (L2T_EXAMPLE_JSON, 7, 725),
    (CLI_DEFAULT_JSON, 1, 3),
    (GRU_JSON, 27, 4),
], ids=["checkpoints_1.7_example", "cli_defaults", "gru_nn_prev_dirs_grid"])
def test_dwi_ml_folder_loads_and_matches_documented_computation(tmp_path, params_text, nb_neighbours,
                                                                head_outputs):
    generator = torch.Generator().manual_seed(7)
    params = json.loads(params_text)
    state = documented_state_dict(params, nb_neighbours, head_outputs, generator)
    model = load_model_dir(write_folder(tmp_path / "best_model", params_text, state))
    assert isinstance(model, Learn2TrackModel) and not model.training

    lengths = [5, 1, 3, 5]
    fin = params["nb_features"] * nb_neighbours
    inputs = [torch.randn(n, fin, generator=generator) for n in lengths]
    streamlines = [torch.cumsum(torch.randn(n, 3, generator=generator), 0) for n in lengths]
    with torch.no_grad():
        outputs = model(inputs, streamlines).split(lengths)
    for x, points, out in zip(inputs, streamlines, outputs):
        # float64 reference, so the tolerance only has to absorb the model's float32 rounding.
        state64 = {k: v.double() for k, v in state.items()}
        expected = reference_forward(state64, params, x.double(), points.double()).float()
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_documented_example_sizes():
    generator = torch.Generator().manual_seed(0)
    example = documented_state_dict(json.loads(L2T_EXAMPLE_JSON), 7, 725, generator)
    assert example["rnn_model.rnn_0.weight_ih_l0"].shape == (400, 70)
    assert example["rnn_model.rnn_1.weight_ih_l0"].shape == (400, 170)
    assert example["direction_getter.layers.0.weight"].shape == (135, 270)
    model = Learn2TrackModel(**json.loads(L2T_EXAMPLE_JSON))
    assert sum(p.numel() for p in model.parameters()) == 333_409
    cli = Learn2TrackModel(**json.loads(CLI_DEFAULT_JSON)).state_dict()
    assert cli["rnn_model.rnn_0.weight_ih_l0"].shape == (400, 5)
    assert cli["rnn_model.rnn_1.weight_ih_l0"].shape == (400, 100)
    assert cli["direction_getter.layers.0.weight"].shape == (50, 100)
    assert cli["direction_getter.layers.1.weight"].shape == (3, 50)


def small_model():
    torch.manual_seed(0)
    return Learn2TrackModel(nb_features=2, neighborhood_type="axes", neighborhood_radius=1,
                            neighborhood_resolution=1.0, input_embedding_key="nn_embedding",
                            input_embedded_size=4, nb_previous_dirs=1, rnn_key="gru", rnn_layer_sizes=[5, 3],
                            use_skip_connection=True, dg_key="sphere-classification",
                            dg_args={"add_eos": True}, step_size=0.5).eval()


def outputs_of(model):
    generator = torch.Generator().manual_seed(3)
    streamlines = [torch.rand(n, 3, generator=generator) * 4 for n in (4, 2)]
    volume = torch.randn(5, 5, 5, 2, generator=generator)
    with torch.no_grad():
        return model([model.compute_inputs(volume, s) for s in streamlines], streamlines)


def test_save_then_load_round_trip(tmp_path):
    model = small_model()
    folder = tmp_path / "exp" / "best_model"
    save_model_dir(model, folder)
    assert (folder / "model_type.txt").read_text() == "Learn2TrackModel"
    assert json.loads((folder / "parameters.json").read_text()) == model.params_for_checkpoint()
    raw_state = torch.load(folder / "model_state.pkl", weights_only=True)
    assert list(raw_state) == list(model.state_dict())
    torch.testing.assert_close(outputs_of(load_experiment_model(tmp_path / "exp")), outputs_of(model),
                               atol=0, rtol=0)

    # Saving again replaces the folder and leaves no temporary folder behind.
    other = small_model()
    with torch.no_grad():
        other.direction_getter.layers[1].bias.add_(1.0)
    save_model_dir(other, folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["best_model"]
    torch.testing.assert_close(outputs_of(load_model_dir(folder)), outputs_of(other), atol=0, rtol=0)


def test_latest_epoch_folder(tmp_path):
    model = small_model()
    save_model_dir(model, tmp_path / "checkpoint" / "model")
    with pytest.raises(TrackflowError, match="has no best_model/ folder"):
        load_experiment_model(tmp_path)
    loaded = load_experiment_model(tmp_path, use_latest_epoch=True)
    torch.testing.assert_close(outputs_of(loaded), outputs_of(model), atol=0, rtol=0)


def test_legacy_names_are_mapped(tmp_path):
    model = small_model()
    params = model.params_for_checkpoint()
    params["input_embedding_size"] = params.pop("input_embedded_size")
    params["prev_dirs_embedding_size"] = params.pop("prev_dirs_embedded_size")
    params["neighborhood_radius"] = [1.0]  # old format: list of ring distances
    params["neighborhood_resolution"] = None
    del params["nb_cnn_filters"], params["kernel_size"]
    params["start_from_copy_prev"] = None
    params["dg_args"]["compress_loss"] = False
    state = OrderedDict((k.replace("input_embedding_layer.", "input_embedding."), v)
                        for k, v in model.state_dict().items())
    folder = write_folder(tmp_path / "old", json.dumps(params), state)
    (folder / "model_type.txt").write_text("Learn2TrackModel\n")  # stripped on reading
    loaded = load_model_dir(folder)
    assert loaded.params_for_checkpoint() == model.params_for_checkpoint()
    torch.testing.assert_close(outputs_of(loaded), outputs_of(model), atol=0, rtol=0)


def test_l2t_loads_even_if_transformer_module_is_broken(tmp_path, monkeypatch):
    save_model_dir(small_model(), tmp_path / "m")
    monkeypatch.setitem(sys.modules, "trackflow.models.transformers", None)  # any import of it fails
    assert isinstance(load_model_dir(tmp_path / "m"), Learn2TrackModel)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "parameters.json").unlink(), "parameters.json"),
    (lambda d: (d / "model_type.txt").unlink(), "model_type.txt"),
    (lambda d: (d / "model_state.pkl").unlink(), "model_state.pkl"),
    (lambda d: (d / "parameters.json").write_text('{"nb_features": 2,'), "parameters.json"),
    (lambda d: (d / "parameters.json").write_text("[1, 2]"), "parameters.json"),
    (lambda d: (d / "model_state.pkl").write_bytes(b"not a torch file"), "model_state.pkl"),
    # Truncated inside the zip's data records: torch raises OSError.
    (lambda d: (d / "model_state.pkl").write_bytes((d / "model_state.pkl").read_bytes()[:-4000]),
     "model_state.pkl is not a readable"),
    (lambda d: (d / "model_type.txt").write_text("FancyModel"), "FancyModel"),
    (lambda d: torch.save({"rnn_model.rnn_0.weight_ih_l0": torch.zeros(2, 2)}, d / "model_state.pkl"),
     "model_state.pkl does not match"),
])
def test_damaged_folders_raise_one_clear_error(tmp_path, damage, message):
    folder = tmp_path / "best_model"
    save_model_dir(small_model(), folder)
    damage(folder)
    with pytest.raises(TrackflowError, match=message):
        load_model_dir(folder)


def test_missing_folders(tmp_path):
    with pytest.raises(TrackflowError, match="does not exist"):
        load_model_dir(tmp_path / "nothing")
    with pytest.raises(TrackflowError, match="does not exist"):
        load_experiment_model(tmp_path / "nothing")


@pytest.mark.parametrize("class_name", ["OriginalTransformerModel", "TransformerSrcOnlyModel",
                                        "TransformerSrcAndTgtModel"])
def test_transformer_folders_dispatch_on_model_type(tmp_path, class_name):
    transformers = pytest.importorskip("trackflow.models.transformers")
    extra = {"TransformerSrcAndTgtModel": dict(target_embedding_key="nn_embedding", target_embedded_size=4)}
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(
        nb_features=2, input_embedding_key="nn_embedding", input_embedded_size=8, nheads=2, n_layers_e=1,
        max_len=16, **extra.get(class_name, {})).eval()
    save_model_dir(model, tmp_path / "m")
    assert (tmp_path / "m" / "model_type.txt").read_text() == class_name
    loaded = load_model_dir(tmp_path / "m")
    assert type(loaded) is type(model)
    torch.testing.assert_close(outputs_of(loaded), outputs_of(model), atol=0, rtol=0)
