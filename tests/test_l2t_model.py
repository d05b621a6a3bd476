"""Learn2TrackModel: whole-sequence forward vs the step-wise tracking interface, batch independence,
gradients (per-streamline decomposition and overfitting one batch with every head), bad options."""

import json

import pytest
import torch

from trackflow.errors import TrackflowError
from trackflow.models.l2t import Learn2TrackModel

NB_FEATURES = 3
VOLUME_SHAPE = (6, 6, 6, NB_FEATURES)


def random_streamlines(lengths, generator, step=0.6):
    """Random walks inside the test volume (vox/corner), one [T, 3] tensor per length."""
    streamlines = []
    for n in lengths:
        start = 1.5 + 3 * torch.rand(1, 3, generator=generator)
        steps = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator), dim=-1) * step
        steps[0] = 0
        streamlines.append(start + torch.cumsum(steps, 0))
    return streamlines


def padded(streamlines):
    """[B, T, 3] padded copies (padding = repeats of a far point, which must never be read)."""
    out = torch.full((len(streamlines), max(len(s) for s in streamlines), 3), 50.0)
    for b, s in enumerate(streamlines):
        out[b, :len(s)] = s
    return out


def make_model(**overrides):
    params = dict(nb_features=NB_FEATURES, neighborhood_type="axes", neighborhood_radius=1,
                  neighborhood_resolution=0.5, input_embedding_key="nn_embedding", input_embedded_size=8,
                  nb_previous_dirs=2, prev_dirs_embedding_key="nn_embedding", prev_dirs_embedded_size=4,
                  normalize_prev_dirs=True, rnn_key="lstm", rnn_layer_sizes=[7, 5], use_skip_connection=True,
                  use_layer_normalization=True, dropout=0.3, dg_key="cosine-regression",
                  dg_args={"add_eos": True})
    params.update(overrides)
    return Learn2TrackModel(**params)


STEPS_LIKELIHOOD = 400


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: extra threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def volume(generator):
    return torch.randn(*VOLUME_SHAPE, generator=generator)


def whole_sequence_outputs(model, volume, streamlines):
    """Per-streamline [T_i, K] outputs of the whole-sequence forward."""
    inputs = [model.compute_inputs(volume, s) for s in streamlines]
    with torch.no_grad():
        flat = model(inputs, streamlines)
    return list(flat.split([len(s) for s in streamlines]))


CONFIGS = [
    dict(rnn_key="lstm"),
    dict(rnn_key="gru", use_skip_connection=False, use_layer_normalization=False),
    dict(rnn_key="gru", rnn_layer_sizes=[4, 6, 5], prev_dirs_embedding_key="no_embedding",
         prev_dirs_embedded_size=None, input_embedding_key="no_embedding", input_embedded_size=None),
    dict(nb_previous_dirs=0, neighborhood_type=None, neighborhood_radius=None, neighborhood_resolution=None,
         rnn_layer_sizes=[6]),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_tracking_steps_equal_whole_sequence(config, volume, generator):
    torch.manual_seed(0)
    model = make_model(**config).eval()
    lengths = [1, 4, 7, 7, 3]
    streamlines = random_streamlines(lengths, generator)
    expected = whole_sequence_outputs(model, volume, streamlines)
    points = padded(streamlines)
    n_slots = 8
    slots = torch.randperm(n_slots, generator=generator)[:len(lengths)]  # the other slots stay idle
    state = model.new_tracking_state(volume, n_slots, max_points=points.shape[1])
    # Dirty every slot first so that the reset really has to clear it.
    all_slots = torch.arange(n_slots)
    noise = 3 * torch.rand(n_slots, 2, 3, generator=generator)
    model.tracking_step(state, all_slots, noise, torch.full((n_slots,), 2))
    model.reset_tracking_rows(state, slots, points, torch.ones(len(lengths), dtype=torch.long))

    lengths_t = torch.tensor(lengths)
    for t in range(max(lengths)):
        active = (lengths_t > t).nonzero().squeeze(1)
        active = active[torch.randperm(len(active), generator=generator)]  # rows in a shuffled order
        out = model.tracking_step(state, slots[active], points[active], torch.full((len(active),), t + 1))
        for row, b in enumerate(active.tolist()):
            torch.testing.assert_close(out[row], expected[b][t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", CONFIGS[:3])
def test_ragged_steps_equal_whole_sequence(config, volume, generator):
    # How the tracker replays a backward half's prefix: rows that started at different times step together,
    # each at its own length, in one call.
    torch.manual_seed(1)
    model = make_model(**config).eval()
    lengths = torch.tensor([6, 2, 8, 5, 8, 1])
    started_at = torch.tensor([2, 0, 0, 3, 6, 1])  # the call at which each row feeds its first point
    streamlines = random_streamlines(lengths.tolist(), generator)
    expected = whole_sequence_outputs(model, volume, streamlines)
    points = padded(streamlines)
    state = model.new_tracking_state(volume, n_slots=10, max_points=points.shape[1])
    slots = torch.tensor([9, 0, 4, 2, 7, 5])
    model.tracking_step(state, slots, points, lengths)  # garbage state that the reset must replace
    model.reset_tracking_rows(state, slots, points, torch.ones_like(lengths))

    for call in range(int((started_at + lengths).max())):
        current = call - started_at + 1  # the point each row feeds now, counted from 1
        active = ((current >= 1) & (current <= lengths)).nonzero().squeeze(1)
        out = model.tracking_step(state, slots[active], points[active], current[active])
        for row, b in enumerate(active.tolist()):
            torch.testing.assert_close(out[row], expected[b][current[b] - 1], atol=1e-5, rtol=0)


def test_a_prefix_reset_is_refused(volume, generator):
    # Learn2track takes prefixes through its steps (prefills_prefixes is False): a longer reset is an error,
    # never a silently wrong state.
    model = make_model().eval()
    assert not model.prefills_prefixes
    state = model.new_tracking_state(volume, 2, 4)
    points = padded(random_streamlines([4, 1], generator))
    with pytest.raises(ValueError, match="through tracking steps"):
        model.reset_tracking_rows(state, torch.tensor([0, 1]), points, torch.tensor([4, 1]))


def test_forward_does_not_depend_on_batch_composition(volume, generator):
    torch.manual_seed(2)
    model = make_model(rnn_key="gru").eval()
    streamlines = random_streamlines([5, 1, 9, 5, 3, 9], generator)
    together = whole_sequence_outputs(model, volume, streamlines)
    for b, s in enumerate(streamlines):
        alone = whole_sequence_outputs(model, volume, [s])[0]
        torch.testing.assert_close(alone, together[b], atol=1e-6, rtol=0)
    reordered = whole_sequence_outputs(model, volume, streamlines[::-1])
    for b, out in enumerate(reordered[::-1]):
        torch.testing.assert_close(out, together[b], atol=1e-6, rtol=0)


def training_rows(model, volume, streamlines, add_eos):
    """Inputs, streamlines and targets as the trainer builds them (without EOS the last point is dropped)."""
    targets = [s[1:] - s[:-1] for s in streamlines]
    if add_eos:
        rows = streamlines
        targets = [torch.cat([t, torch.zeros(1, 3)]) for t in targets]
        eos = torch.cat([torch.arange(len(s)) == len(s) - 1 for s in streamlines])
    else:
        rows = [s[:-1] for s in streamlines]
        eos = None
    inputs = [model.compute_inputs(volume, s) for s in rows]
    return inputs, rows, torch.cat(targets), eos


def test_batch_gradient_is_the_sum_of_per_streamline_gradients(volume, generator):
    """Catches gradients sent to the wrong rows (dwi_ml's in-place index bug): each streamline's loss
    must only reach the parameters through its own rows."""
    torch.manual_seed(3)
    model = make_model(dropout=0.0).train()
    streamlines = random_streamlines([6, 2, 8, 4], generator)

    def gradients(batch):
        model.zero_grad()
        inputs, rows, targets, eos = training_rows(model, volume, batch, add_eos=True)
        model.direction_getter.loss(model(inputs, rows), targets, eos).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    together = gradients(streamlines)
    separate = [gradients([s]) for s in streamlines]
    for name, grad in together.items():
        torch.testing.assert_close(grad, sum(g[name] for g in separate), atol=1e-5, rtol=1e-4)


HEADS = [
    ("cosine-regression", False), ("cosine-regression", True),
    ("l2-regression", False), ("l2-regression", True),
    ("cosine-plus-l2-regression", False), ("cosine-plus-l2-regression", True),
    ("sphere-classification", False), ("sphere-classification", True),
    ("smooth-sphere-classification", False), ("smooth-sphere-classification", True),
    ("gaussian", False), ("gaussian", True),
    ("gaussian-mixture", False),
    ("fisher-von-mises", False), ("fisher-von-mises", True),
]
# Negative log-likelihood heads: the loss has no floor at zero, and shrinking sigmas on the rows already
# fitted slows the others down, so they get a gentler rate, more steps and a median criterion.
LIKELIHOOD_HEADS = ("gaussian", "gaussian-mixture", "fisher-von-mises")


@pytest.mark.parametrize("dg_key, add_eos", HEADS)
def test_overfits_one_batch(dg_key, add_eos, volume, generator):
    """The full model learns one fixed batch: decoded directions match the targets, EOS decisions right."""
    torch.manual_seed(4)
    model = make_model(rnn_key="gru", rnn_layer_sizes=[16, 16], nb_previous_dirs=1,
                       prev_dirs_embedding_key="no_embedding", prev_dirs_embedded_size=None,
                       use_layer_normalization=False, dropout=0.0, dg_key=dg_key,
                       dg_args={"add_eos": add_eos}).train()
    streamlines = random_streamlines([6, 5, 5], generator, step=1.0)
    inputs, rows, targets, eos = training_rows(model, volume, streamlines, add_eos)
    head = model.direction_getter
    likelihood = dg_key in LIKELIHOOD_HEADS
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003 if likelihood else 0.02)
    losses = []
    for _ in range(STEPS_LIKELIHOOD if likelihood else 120):
        optimizer.zero_grad()
        loss = head.loss(model(inputs, rows), targets, eos).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    model.eval()
    with torch.no_grad():
        raw = model(inputs, rows)
    real = ~eos if add_eos else torch.ones(len(targets), dtype=torch.bool)
    cosines = torch.nn.functional.cosine_similarity(head.deterministic(raw)[real], targets[real], dim=-1)
    summary = f"cosines {cosines}, losses {losses[0]:.3f} -> {losses[-1]:.3f}"
    if likelihood:
        assert cosines.median() > 0.95, summary
        # the median of the last 50 steps: a mixture's NLL spikes when a sigma collapses (3.4 -> 6.8 at the
        # last step on one machine, -4 around it)
        assert torch.tensor(losses[-50:]).median().item() < losses[0] - 2.0, summary
    else:
        assert cosines.min() > 0.95, summary
        assert losses[-1] < 0.1 * losses[0], summary
    if add_eos:
        assert torch.equal(head.eos_probability(raw) > 0.5, eos), summary


@pytest.mark.parametrize("bad, message", [
    (dict(dropout=1.5), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(prev_dirs_embedding_key="no_embedding", prev_dirs_embedded_size=5), "prev_dirs_embedded_size"),
    (dict(prev_dirs_embedding_key="nn_embedding", prev_dirs_embedded_size=None), "prev_dirs_embedded_size"),
    (dict(prev_dirs_embedding_key="cnn_embedding"), "prev_dirs_embedding_key"),
    (dict(input_embedding_key="cnn_embedding", input_embedded_size=None, nb_cnn_filters=[2],
          kernel_size=[2]), "grid"),
    (dict(rnn_key="transformer"), "rnn_key"),
    (dict(rnn_layer_sizes=[]), "rnn_layer_sizes"),
    (dict(nb_previous_dirs=-1), "nb_previous_dirs"),
    (dict(step_size=0.5, compress_lines=0.2), "only one of"),
    (dict(nb_features=0), "nb_features"),
    (dict(neighborhood_type=None), "without a neighborhood_type"),
    (dict(neighborhood_type="sphere"), "neighborhood"),
    (dict(dg_key="no-such-head"), "no-such-head"),
])
def test_inconsistent_options_raise(bad, message):
    with pytest.raises(TrackflowError, match=message):
        make_model(**bad)


def test_cnn_embedding_runs_on_grid_neighbourhood(volume, generator):
    model = make_model(neighborhood_type="grid", input_embedding_key="cnn_embedding", input_embedded_size=None,
                       nb_cnn_filters=[4, 2], kernel_size=[2, 2]).eval()
    assert model.state_dict()["rnn_model.rnn_0.weight_ih_l0"].shape[1] == 2 + 4  # E = 1^3 * 2, P = 4
    streamlines = random_streamlines([4, 2], generator)
    outputs = whole_sequence_outputs(model, volume, streamlines)
    state = model.new_tracking_state(volume, 2, 4)
    points = padded(streamlines)
    model.reset_tracking_rows(state, torch.tensor([0, 1]), points, torch.tensor([1, 1]))
    for length in (1, 2, 3):
        model.tracking_step(state, torch.tensor([0]), points[:1], torch.tensor([length]))
    out = model.tracking_step(state, torch.tensor([0, 1]), points, torch.tensor([4, 1]))
    torch.testing.assert_close(out, torch.stack([outputs[0][3], outputs[1][0]]), atol=1e-5, rtol=0)


def test_params_for_checkpoint_rebuild_the_same_model():
    model = make_model(nb_previous_dirs=3, prev_dirs_embedding_key="no_embedding", prev_dirs_embedded_size=None,
                       step_size=0.5, experiment_name="x", log_level="DEBUG")
    params = json.loads(json.dumps(model.params_for_checkpoint()))
    assert params["prev_dirs_embedded_size"] == 9  # written back after derivation, as dwi_ml does
    assert "log_level" not in params
    rebuilt = Learn2TrackModel(**params)
    assert rebuilt.params_for_checkpoint() == params
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    # The neighbourhood is rebuilt from the parameters, never stored (dwi_ml's key set).
    assert not any("offsets" in k for k in model.state_dict())
    assert model.neighborhood_offsets.shape == (7, 3)


@pytest.mark.parametrize("rnn_key", ["gru", "lstm"])
def test_tracking_rows_are_bit_identical_alone_or_with_others(rnn_key, volume, generator):
    """A row's outputs are the same bits whether it steps alone or together with rows at other lengths (a
    replaying prefix beside proposing rows): the rule behind slot-count independent tracking."""
    torch.manual_seed(3)
    model = make_model(rnn_key=rnn_key, dropout=0.0).eval()
    lengths = torch.tensor([9, 2, 14, 5, 1, 7, 11])
    started_at = torch.tensor([0, 4, 1, 0, 9, 2, 3])
    streamlines = random_streamlines(lengths.tolist(), generator)
    points, n_rows = padded(streamlines), len(lengths)
    together = model.new_tracking_state(volume, n_rows, points.shape[1])
    model.reset_tracking_rows(together, torch.arange(n_rows), points, torch.ones_like(lengths))
    together_out = {}
    for call in range(int((started_at + lengths).max())):
        current = call - started_at + 1
        active = ((current >= 1) & (current <= lengths)).nonzero().squeeze(1)
        out = model.tracking_step(together, active, points[active], current[active])
        for row, b in enumerate(active.tolist()):
            together_out[b, int(current[b])] = out[row]
    for b in range(n_rows):
        # alone, without padding, in a different slot of a bigger state
        alone = model.new_tracking_state(volume, 3, int(lengths[b]))
        model.reset_tracking_rows(alone, torch.tensor([2]), streamlines[b][None], torch.tensor([1]))
        for length in range(1, int(lengths[b]) + 1):
            out = model.tracking_step(alone, torch.tensor([2]), streamlines[b][None], torch.tensor([length]))
            assert torch.equal(together_out[b, length], out[0])


def test_inputs_interpolated_in_chunks_equal_those_in_one_go(volume, generator, monkeypatch):
    from trackflow.models import base
    model = make_model()
    points = torch.rand(1000, 3, generator=generator) * torch.tensor(VOLUME_SHAPE[:3])
    whole = model.compute_inputs(volume, points)
    monkeypatch.setattr(base, "INPUT_CHUNK_POINTS", 50)  # 7 neighbours: chunks of 7 points
    assert torch.equal(model.compute_inputs(volume, points), whole)
