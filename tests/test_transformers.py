"""TractoTransformer models: dwi_ml checkpoint parity against stock torch layers, masks, causality and
incremental decoding (tracking) against the whole-sequence forward."""
import json
import math

import numpy as np
import pytest
import torch
from dipy.data import get_sphere
from torch import nn

from trackflow.errors import TrackflowError
from trackflow.models import transformers
from trackflow.models import attention
from trackflow.models.attention import plan_key_groups
from trackflow.models.persistence import load_model_dir
from trackflow.models.transformers import (OriginalTransformerModel, TransformerSrcAndTgtModel,
                                           TransformerSrcOnlyModel)

NB_FEATURES = 3
VOLUME_SHAPE = (6, 7, 5)
HEAD = {"dg_key": "cosine-regression",
        "dg_args": {"dropout": 0.0, "add_eos": True, "eos_weight": 1.0,
                    "normalize_targets": None, "normalize_outputs": None}}
COMMON = {"experiment_name": "test", "step_size": 0.5, "nb_features": NB_FEATURES, "max_len": 64,
          "n_layers_e": 2, "nheads": 2, "dropout_rate": 0.1, "activation": "relu", "norm_first": False,
          "input_embedding_key": "nn_embedding", **HEAD}
# Small versions of the checkpoints §1.7 examples.
CONFIGS = {
    "TTO": (OriginalTransformerModel, {"input_embedded_size": 8, "ffnn_hidden_size": 12, "n_layers_d": 2,
                                       "sos_token_type": "as_label", "target_embedding_key": "nn_embedding"}),
    "TTS": (TransformerSrcOnlyModel, {"input_embedded_size": 8}),
    "TTS-gelu-prenorm": (TransformerSrcOnlyModel, {"input_embedded_size": 8, "activation": "gelu",
                                                   "norm_first": True, "n_layers_e": 3}),
    "TTST-sphere": (TransformerSrcAndTgtModel, {"input_embedded_size": 6, "target_embedded_size": 4,
                                                "sos_token_type": "repulsion100",
                                                "target_embedding_key": "nn_embedding"}),
    "TTST-no-target-embedding": (TransformerSrcAndTgtModel, {"input_embedded_size": 6,
                                                             "sos_token_type": "as_label",
                                                             "target_embedding_key": "no_embedding"}),
    "TTO-sphere-gelu-prenorm": (OriginalTransformerModel, {"input_embedded_size": 8, "n_layers_d": 1,
                                                           "activation": "gelu", "norm_first": True,
                                                           "sos_token_type": "repulsion100",
                                                           "target_embedding_key": "nn_embedding"}),
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors on a shared 2-core machine: thread hand-offs cost far more than they save."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build(name, **overrides):
    model_class, extra = CONFIGS[name]
    torch.manual_seed(0)
    return model_class(**{**COMMON, **extra, **overrides}).eval()


def random_volume(generator):
    return torch.rand(*VOLUME_SHAPE, NB_FEATURES, generator=generator)


def random_walks(generator, lengths, step=0.5):
    """Random walks of 0.5-voxel steps inside the volume (vox/corner), one per length."""
    walks = []
    for length in lengths:
        start = torch.rand(3, generator=generator) * torch.tensor(VOLUME_SHAPE, dtype=torch.float32)
        steps = torch.nn.functional.normalize(torch.randn(length - 1, 3, generator=generator), dim=-1)
        walks.append(torch.cat([start[None], start + torch.cumsum(step * steps, dim=0)]))
    return walks


def whole_sequence_outputs(model, volume, streamlines):
    inputs = [model.compute_inputs(volume, s) for s in streamlines]
    with torch.no_grad():
        return torch.split(model(inputs, streamlines), [len(s) for s in streamlines])


# ------------------------------------------------------------------------------------------------------
# dwi_ml checkpoint layout -> our model -> compared with torch's stock transformer layers


def dwi_ml_layer_state(prefix, d_model, ffnn, decoder, generator):
    """One layer in dwi_ml's layout (checkpoints §2.3): separate q/k/v weights, packed bias."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.4

    attention_modules = ("self_attn", "multihead_attn") if decoder else ("self_attn",)
    state = {}
    for module in attention_modules:
        for name in ("q", "k", "v"):
            state[f"{prefix}{module}.{name}_proj_weight"] = rand(d_model, d_model)
        state[f"{prefix}{module}.in_proj_bias"] = rand(3 * d_model)
        state[f"{prefix}{module}.out_proj.weight"] = rand(d_model, d_model)
        state[f"{prefix}{module}.out_proj.bias"] = rand(d_model)
    state.update({f"{prefix}linear1.weight": rand(ffnn, d_model), f"{prefix}linear1.bias": rand(ffnn),
                  f"{prefix}linear2.weight": rand(d_model, ffnn), f"{prefix}linear2.bias": rand(d_model)})
    for i in range(1, 4 if decoder else 3):
        state[f"{prefix}norm{i}.weight"] = 1 + rand(d_model)
        state[f"{prefix}norm{i}.bias"] = rand(d_model)
    return state


def dwi_ml_state_dict(kind, params, d_model, target_in, generator):
    """A dwi_ml-format state dict built from the documented key names and shapes, random values."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.4

    embedded = params["input_embedded_size"]
    hidden = math.ceil(d_model / 2)
    state = {"input_embedding_layer.linear.weight": rand(embedded, NB_FEATURES),
             "input_embedding_layer.linear.bias": rand(embedded),
             "position_encoding_layer.pos_emb": rand(1, params["max_len"], d_model),
             "direction_getter.layers.0.weight": rand(hidden, d_model),
             "direction_getter.layers.0.bias": rand(hidden),
             "direction_getter.layers.1.weight": rand(4, hidden),  # 3 + EOS
             "direction_getter.layers.1.bias": rand(4)}
    if kind != "TTS" and params["target_embedding_key"] == "nn_embedding":
        target_out = d_model if kind == "TTO" else params["target_embedded_size"]
        state["embedding_layer_t.linear.weight"] = rand(target_out, target_in)
        state["embedding_layer_t.linear.bias"] = rand(target_out)
    ffnn = params.get("ffnn_hidden_size") or d_model // 2
    if kind == "TTO":
        for i in range(params["n_layers_e"]):
            state.update(dwi_ml_layer_state(f"modified_torch_transformer.encoder.layers.{i}.", d_model, ffnn,
                                            False, generator))
        for i in range(params.get("n_layers_d", params["n_layers_e"])):
            state.update(dwi_ml_layer_state(f"modified_torch_transformer.decoder.layers.{i}.", d_model, ffnn,
                                            True, generator))
    else:
        for i in range(params["n_layers_e"]):
            state.update(dwi_ml_layer_state(f"modified_torch_transformer.layers.{i}.", d_model, ffnn, False,
                                            generator))
    return state


def packed_transformer_state(state, prefix):
    """The stack's weights renamed for torch's modules, q/k/v packed into in_proj_weight."""
    stock = {}
    for key, value in state.items():
        if not key.startswith(prefix) or key.endswith(("k_proj_weight", "v_proj_weight")):
            continue
        name = key[len(prefix):]
        if name.endswith("q_proj_weight"):
            base = key[: -len("q_proj_weight")]
            value = torch.cat([state[base + "q_proj_weight"], state[base + "k_proj_weight"],
                               state[base + "v_proj_weight"]])
            name = name.replace("q_proj_weight", "in_proj_weight")
        stock[name] = value
    return stock


def reference_target_tokens(streamline, sos_token_type):
    """Target tokens written directly from the spec (checkpoints §3.4), one streamline, numpy."""
    points = streamline.numpy().astype(np.float32)
    directions = np.diff(points, axis=0)
    if sos_token_type == "as_label":
        tokens = np.zeros((len(points), 4), np.float32)
        tokens[0, 3] = 1
        tokens[1:, :3] = directions
        return torch.from_numpy(tokens)
    vertices = get_sphere(name=sos_token_type).vertices.astype(np.float32)
    tokens = np.zeros((len(points), len(vertices) + 1), np.float32)
    tokens[0, -1] = 1
    tokens[np.arange(1, len(points)), np.argmax(directions @ vertices.T, axis=1)] = 1
    return torch.from_numpy(tokens)


def stock_torch_outputs(kind, params, state, d_model, volume, streamlines, model):
    """Forward computed with torch's nn.TransformerEncoder / nn.Transformer and hand-written parts."""
    ffnn = params.get("ffnn_hidden_size") or d_model // 2
    layer_args = dict(d_model=d_model, nhead=params["nheads"], dim_feedforward=ffnn, dropout=0.0,
                      activation=params["activation"], batch_first=True, norm_first=params["norm_first"])
    lengths = torch.tensor([len(s) for s in streamlines])
    n_points = int(lengths.max())
    padding = torch.arange(n_points)[None] >= lengths[:, None]  # True = padded
    causal = torch.ones(n_points, n_points, dtype=torch.bool).triu(1)  # True = blocked

    def linear_relu(x, prefix):
        return torch.relu(x @ state[prefix + "weight"].T + state[prefix + "bias"])

    features = nn.utils.rnn.pad_sequence([model.compute_inputs(volume, s) for s in streamlines], batch_first=True)
    pos_emb = state["position_encoding_layer.pos_emb"][:, :n_points]
    sources = linear_relu(features, "input_embedding_layer.linear.")
    if kind != "TTS":
        targets = nn.utils.rnn.pad_sequence(
            [reference_target_tokens(s, params["sos_token_type"]) for s in streamlines], batch_first=True)
        if params["target_embedding_key"] == "nn_embedding":
            targets = linear_relu(targets, "embedding_layer_t.linear.")
    if kind == "TTO":
        stack = nn.Transformer(num_encoder_layers=params["n_layers_e"],
                               num_decoder_layers=params.get("n_layers_d", params["n_layers_e"]), **layer_args)
        stack.encoder.norm = None
        stack.decoder.norm = None
        stack.load_state_dict(packed_transformer_state(state, "modified_torch_transformer."), strict=True)
        stack.eval()
        hidden = stack(sources + pos_emb, targets + pos_emb, src_mask=causal, tgt_mask=causal, memory_mask=causal,
                       src_key_padding_mask=padding, tgt_key_padding_mask=padding,
                       memory_key_padding_mask=padding)
    else:
        tokens = (sources if kind == "TTS" else torch.cat([sources, targets], dim=-1)) + pos_emb
        stack = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer_args), params["n_layers_e"],
                                      enable_nested_tensor=False)
        stack.load_state_dict(packed_transformer_state(state, "modified_torch_transformer."), strict=True)
        stack.eval()
        hidden = stack(tokens, mask=causal, src_key_padding_mask=padding)
    head_hidden = linear_relu(hidden[~padding], "direction_getter.layers.0.")  # Linear, ReLU (dropout 0)
    return head_hidden @ state["direction_getter.layers.1.weight"].T + state["direction_getter.layers.1.bias"]


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")  # stock nn.Transformer with norm_first
@pytest.mark.parametrize("name, d_model, target_in", [
    ("TTO", 8, 4), ("TTS-gelu-prenorm", 8, None), ("TTST-sphere", 10, 101),
    ("TTST-no-target-embedding", 10, 4), ("TTO-sphere-gelu-prenorm", 8, 101)])
def test_dwi_ml_folder_loads_and_matches_stock_torch(name, d_model, target_in, tmp_path):
    generator = torch.Generator().manual_seed(1)
    model_class, extra = CONFIGS[name]
    params = {**COMMON, **extra}
    kind = name.split("-")[0]
    state = dwi_ml_state_dict(kind, params, d_model, target_in, generator)
    # The model folder as dwi_ml writes it; loading converts q/k/v and loads strictly.
    (tmp_path / "parameters.json").write_text(json.dumps(params, indent=4))
    (tmp_path / "model_type.txt").write_text(model_class.__name__)
    torch.save(state, tmp_path / "model_state.pkl")
    model = load_model_dir(tmp_path)
    assert type(model) is model_class and model.d_model == d_model

    volume = random_volume(generator)
    streamlines = random_walks(generator, [9, 4, 1, 9, 6])  # unequal lengths, a tie, a 1-point line
    ours = torch.cat(whole_sequence_outputs(model, volume, streamlines))
    with torch.no_grad():
        expected = stock_torch_outputs(kind, params, state, d_model, volume, streamlines, model)
    assert ours.shape == (sum(len(s) for s in streamlines), 4)
    assert (ours - expected).abs().max() <= 1e-5


def test_own_state_dict_keeps_packed_weights_and_reloads():
    model = build("TTO")
    state = model.state_dict()
    assert "modified_torch_transformer.decoder.layers.1.multihead_attn.in_proj_weight" in state
    assert not any(key.endswith("q_proj_weight") for key in state)
    assert state["position_encoding_layer.pos_emb"].shape == (1, COMMON["max_len"], 8)
    assert state["position_encoding_layer.pos_emb"].dtype == torch.float32
    params = model.params_for_checkpoint()
    assert params["ffnn_hidden_size"] == 12 and params["n_layers_d"] == 2
    assert "target_embedded_size" not in params
    rebuilt = OriginalTransformerModel(**params)
    rebuilt.load_state_dict(OriginalTransformerModel.convert_loaded_state_dict(state, params), strict=True)


def test_positional_table_is_the_sinusoidal_formula():
    table = build("TTS").position_encoding_layer.pos_emb[0].double()  # [max_len, D]
    positions = torch.arange(table.shape[0], dtype=torch.float64)[:, None]
    for j in range(table.shape[1] // 2):
        angle = positions[:, 0] / 10000 ** (2 * j / table.shape[1])
        assert torch.allclose(table[:, 2 * j], torch.sin(angle), atol=1e-5)
        assert torch.allclose(table[:, 2 * j + 1], torch.cos(angle), atol=1e-5)


def test_derived_parameters_are_written_back():
    assert build("TTS").params_for_checkpoint()["ffnn_hidden_size"] == 4  # D // 2
    params = build("TTST-no-target-embedding").params_for_checkpoint()
    assert params["target_embedded_size"] == 4
    assert params["norm_first"] is False


# ------------------------------------------------------------------------------------------------------
# masks and causality


@pytest.mark.parametrize("name", ["TTO", "TTS", "TTST-sphere"])
def test_outputs_do_not_depend_on_later_points(name):
    model = build(name)
    generator = torch.Generator().manual_seed(2)
    volume = random_volume(generator)
    streamline = random_walks(generator, [12])[0]
    changed = streamline.clone()
    changed[7:] += torch.randn(5, 3, generator=generator)
    before, = whole_sequence_outputs(model, volume, [streamline])
    after, = whole_sequence_outputs(model, volume, [changed])
    assert (before[:7] - after[:7]).abs().max() <= 1e-6
    assert (before[7:] - after[7:]).abs().max() > 1e-3  # the change does reach later outputs


@pytest.mark.parametrize("name", ["TTO", "TTS-gelu-prenorm", "TTST-no-target-embedding"])
def test_outputs_do_not_depend_on_the_rest_of_the_batch(name):
    model = build(name)
    generator = torch.Generator().manual_seed(3)
    volume = random_volume(generator)
    streamlines = random_walks(generator, [5, 11, 1, 8])
    batched = whole_sequence_outputs(model, volume, streamlines)
    for streamline, in_batch in zip(streamlines, batched):
        alone, = whole_sequence_outputs(model, volume, [streamline])
        assert (alone - in_batch).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["TTO", "TTST-sphere"])
def test_training_forward_reaches_every_parameter(name):
    model = build(name).train()
    generator = torch.Generator().manual_seed(7)
    volume = random_volume(generator)
    streamlines = random_walks(generator, [6, 3])
    model([model.compute_inputs(volume, s) for s in streamlines], streamlines).square().sum().backward()
    for key, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, key


def test_sequences_longer_than_max_len_are_refused():
    model = build("TTS", max_len=10)
    generator = torch.Generator().manual_seed(4)
    volume = random_volume(generator)
    with pytest.raises(TrackflowError, match="max_len"):
        whole_sequence_outputs(model, volume, random_walks(generator, [11]))
    with pytest.raises(TrackflowError, match="max_len"):
        model.new_tracking_state(volume, n_slots=2, max_points=11)


@pytest.mark.parametrize("overrides, message", [
    ({"norm_first": "False"}, "norm_first"),
    ({"activation": "tanh"}, "activation"),
    ({"nheads": 3}, "divisible"),
    ({"positional_encoding_key": "relational"}, "sinusoidal"),
    ({"input_embedding_key": "cnn_embedding", "input_embedded_size": None}, "cnn_embedding"),
])
def test_bad_parameters_are_refused(overrides, message):
    with pytest.raises(TrackflowError, match=message):
        build("TTS", **overrides)


@pytest.mark.parametrize("name, overrides, message", [
    ("TTO", {"target_embedded_size": 8}, "target_embedded_size"),
    ("TTO", {"target_embedding_key": "no_embedding"}, "model width"),  # as_label tokens are 4 wide, D = 8
    ("TTST-sphere", {"target_embedded_size": None}, "target_embedded_size"),
    ("TTST-no-target-embedding", {"target_embedded_size": 5}, "token width"),
    ("TTST-sphere", {"sos_token_type": "symmetric10"}, "sos_token_type"),
])
def test_bad_target_token_parameters_are_refused(name, overrides, message):
    with pytest.raises(TrackflowError, match=message):
        build(name, **overrides)


# ------------------------------------------------------------------------------------------------------
# incremental decoding (tracking) equals the whole-sequence forward


def padded(streamlines, lengths):
    """[B, max(lengths), 3] with NaN padding (the tracker's padding must never leak into outputs)."""
    out = torch.full((len(streamlines), int(max(lengths)), 3), float("nan"))
    for b, (streamline, length) in enumerate(zip(streamlines, lengths)):
        out[b, :length] = streamline[:length]
    return out


@pytest.mark.parametrize("name", ["TTO", "TTS", "TTST-sphere", "TTS-gelu-prenorm", "TTO-sphere-gelu-prenorm"])
def test_tracking_steps_equal_the_whole_sequence_forward(name):
    n_steps, max_points = 200, 240
    model = build(name, max_len=256)
    generator = torch.Generator().manual_seed(5)
    volume = random_volume(generator)
    # Slot 3 stays idle, slot 0 is a scratch slot; slot 2 starts from a prefill of 30 points; slot 4 gets
    # a new streamline (prefill of 49 points, as for a backward half) at step 100; slot 5 stops at step 150.
    lines = dict(zip([1, 2, 4, 5], random_walks(generator, [n_steps + 1, n_steps + 31, 101, 151])))
    replacement = random_walks(generator, [50 + n_steps])[0]
    expected = {slot: out for slot, out in zip(lines, whole_sequence_outputs(model, volume, list(lines.values())))}
    expected_replacement, = whole_sequence_outputs(model, volume, [replacement])

    state = model.new_tracking_state(volume, n_slots=6, max_points=max_points)
    next_length = {1: 1, 2: 31, 4: 1, 5: 1}
    start_rows = torch.tensor(list(next_length))
    start_lengths = torch.tensor(list(next_length.values()))
    with torch.no_grad():
        model.reset_tracking_rows(state, start_rows, padded([lines[s] for s in next_length], start_lengths),
                                  start_lengths)
        worst = 0.0
        for step in range(n_steps):
            if step == 100:
                lines[4], expected[4], next_length[4] = replacement, expected_replacement, 50
                model.reset_tracking_rows(state, torch.tensor([4]), padded([replacement], [50]),
                                          torch.tensor([50]))
            if step == 150:
                del next_length[5]
            slots = [list(next_length)[i] for i in torch.randperm(len(next_length), generator=generator)]
            lengths = torch.tensor([next_length[s] for s in slots] + [1, 1])
            # Two rows on scratch slot 0 (as the tracker does for stopped rows); their outputs are ignored.
            rows = torch.tensor(slots + [0, 0])
            raw = model.tracking_step(state, rows, padded([lines[s] for s in slots] + [lines[1]] * 2, lengths),
                                      lengths)[:len(slots)]
            reference = torch.stack([expected[s][next_length[s] - 1] for s in slots])
            worst = max(worst, float((raw - reference).abs().max()))
            for s in slots:
                next_length[s] += 1
    assert worst <= 1e-5
    assert next_length[2] == n_steps + 31  # slot 2 consumed its whole streamline


def test_tracking_refuses_more_points_than_allocated():
    model = build("TTS")
    generator = torch.Generator().manual_seed(6)
    volume = random_volume(generator)
    state = model.new_tracking_state(volume, n_slots=1, max_points=3)
    line = random_walks(generator, [4])[0][None]
    with pytest.raises(TrackflowError, match="max_points"):
        model.tracking_step(state, torch.tensor([0]), line, torch.tensor([4]))


def attended_widths(state):
    """Cache positions each slot attended over at the last tracking step (the in-place group first)."""
    widths = {}
    for slots, longest, in_place in state.plan:
        width = min(max(longest + state.steps_since_plan - 1, state.min_keys), state.capacity)
        widths.update(dict.fromkeys(range(state.n_slots) if in_place else slots.tolist(), width))
    return widths


@pytest.mark.parametrize("name", ["TTO", "TTST-sphere"])
def test_few_rows_among_many_slots_equal_the_whole_sequence_forward(name):
    # Few rows of many slots: their keys are gathered instead of attended in place (the tracker's tail).
    # The attended width follows the row's length and comes back down once its prefix is replaced.
    model = build(name, max_len=256)
    generator = torch.Generator().manual_seed(7)
    volume = random_volume(generator)
    long_line, short_line, replacement = random_walks(generator, [101, 21, 30])
    expected_long, expected_short, expected_replacement = whole_sequence_outputs(
        model, volume, [long_line, short_line, replacement])
    state = model.new_tracking_state(volume, n_slots=40, max_points=150)
    worst, widths = 0.0, []
    with torch.no_grad():
        model.reset_tracking_rows(state, torch.tensor([33, 7]), padded([long_line, short_line], [1, 1]),
                                  torch.tensor([1, 1]))
        for step in range(100):
            lines, slots, outputs = [long_line], [33], [expected_long]
            if step < 20:
                lines, slots, outputs = lines + [short_line], slots + [7], outputs + [expected_short]
            lengths = torch.tensor([step + 1] * len(slots) + [1, 1])
            raw = model.tracking_step(state, torch.tensor(slots + [0, 0]),  # scratch slot 0, twice
                                      padded(lines + [long_line] * 2, lengths), lengths)
            widths.append(attended_widths(state)[33])
            reference = torch.stack([out[step] for out in outputs])
            worst = max(worst, float((raw[:len(slots)] - reference).abs().max()))
        # slot 33 starts a new streamline: the bound must not stay at the old line's 100 points
        model.reset_tracking_rows(state, torch.tensor([33]), padded([replacement], [1]), torch.tensor([1]))
        for step in range(29):
            lengths = torch.tensor([step + 1])
            raw = model.tracking_step(state, torch.tensor([33]), padded([replacement], lengths), lengths)
            widths.append(attended_widths(state)[33])
            worst = max(worst, float((raw[0] - expected_replacement[step]).abs().max()))
    assert worst <= 1e-5
    least = state.min_keys
    assert all(max(step + 1, least) <= width <= max(step + transformers.REPLAN_EVERY, least)
               for step, width in enumerate(widths[:100]))
    assert widths[99] >= 100 and widths[-1] == least  # the 100-point prefix is forgotten


def test_key_groups_cover_every_row_once_and_follow_the_rows_lengths():
    lengths = np.array([300] + [40] * 500 + [100] * 30 + [3])
    plan = plan_key_groups(lengths, n_slots=600, min_keys=32)
    members = np.concatenate([index for index, _, _ in plan])
    assert sorted(members.tolist()) == list(range(len(lengths)))
    width = {int(b): longest for index, longest, _ in plan for b in index}
    assert all(width[b] >= lengths[b] for b in width)
    assert max(width[b] for b in range(1, 501)) <= 40  # the short rows do not attend over 300 positions
    assert width[0] == 300
    assert [in_place for *_, in_place in plan] == [True, False, False]  # many short rows: no copy
    # few rows among many slots (the tracker's tail): every group gathers its keys
    assert not any(in_place for *_, in_place in plan_key_groups(np.array([5, 200]), n_slots=600, min_keys=32))


@pytest.mark.parametrize("name", ["TTO", "TTS"])
def test_rows_of_very_different_lengths_in_one_step_equal_the_whole_sequence_forward(name, monkeypatch):
    # Prefixes of 1 to 150 points in 30 slots: in-place and gathered key groups in the same step (with
    # groups made free: at this size one in-place group is the cheapest plan).
    monkeypatch.setattr(attention, "GROUP_COST", 0)
    model = build(name, max_len=256)
    generator = torch.Generator().manual_seed(11)
    volume = random_volume(generator)
    prefix = [1, 2, 3, 5, 8, 9, 12, 14, 20, 25, 31, 40, 60, 90, 150] * 2
    n_steps = 12
    lines = random_walks(generator, [p + n_steps for p in prefix])
    expected = whole_sequence_outputs(model, volume, lines)
    slots = torch.arange(len(lines))
    state = model.new_tracking_state(volume, n_slots=len(lines), max_points=200)
    worst, widths = 0.0, []
    with torch.no_grad():
        lengths = torch.tensor(prefix)
        model.reset_tracking_rows(state, slots, padded(lines, lengths), lengths)
        for _ in range(n_steps):
            raw = model.tracking_step(state, slots, padded(lines, lengths), lengths)
            reference = torch.stack([out[length - 1] for out, length in zip(expected, lengths.tolist())])
            worst = max(worst, float((raw - reference).abs().max()))
            widths.append(attended_widths(state))
            lengths = lengths + 1
    assert worst <= 1e-5
    assert len({in_place for *_, in_place in state.plan}) == 2
    # a 1-point row does not attend over the longest width
    assert widths[0][0] == state.min_keys and widths[0][14] >= 150
