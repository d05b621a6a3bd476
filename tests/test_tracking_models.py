"""The engine with real (tiny, random-weight) models: KV-cached transformer tracking equals tracking that
recomputes the whole sequence at every step, and l2t tracking does not depend on the slot count (bit for bit)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from trackflow.models import transformers
from trackflow.models.l2t import Learn2TrackModel
from trackflow.models.transformers import (OriginalTransformerModel, TransformerSrcAndTgtModel,
                                           TransformerSrcOnlyModel)
from trackflow.tracking.decoders import make_direction_decoder
from trackflow.tracking.seeds import SeedGenerator
from trackflow.tracking.stopping import MaskStoppingCriterion
from trackflow.tracking.tracker import Tracker, TrackingParameters

_spec = importlib.util.spec_from_file_location(
    "tracking_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "tracking.py")
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)

NB_FEATURES = 3
SHAPE = (9, 8, 7)
HEAD = {"dg_key": "cosine-regression", "dg_args": {"add_eos": True}}
COMMON = dict(nb_features=NB_FEATURES, step_size=0.5, max_len=160, n_layers_e=2, nheads=2, dropout_rate=0.0,
              input_embedding_key="nn_embedding", ffnn_hidden_size=12, **HEAD)
TRANSFORMERS = {
    "TTO": lambda: OriginalTransformerModel(input_embedded_size=8, n_layers_d=2, **COMMON),
    "TTS": lambda: TransformerSrcOnlyModel(input_embedded_size=8, **COMMON),
    "TTST": lambda: TransformerSrcAndTgtModel(input_embedded_size=6, target_embedded_size=4, **COMMON),
}


@pytest.fixture(autouse=True)
def one_thread():
    # the machine is shared: several threads per process only spin
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def world():
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand(*SHAPE, NB_FEATURES, generator=generator)
    mask = np.zeros(SHAPE, np.float32)
    mask[1:-1, 1:-1, 1:-1] = 1
    return volume, mask


def run(model, volume, mask, n_seeds, algo="det", **overrides):
    params = dict(step_size_vox=0.5, max_points=30, theta_deg=180, eos_threshold=0.6, n_slots=8, check_every=2)
    params.update(overrides)
    tracker = Tracker(model, volume, MaskStoppingCriterion(torch.as_tensor(mask)), SeedGenerator(mask, 5),
                      make_direction_decoder(algo, model.direction_getter, rng_seed=5),
                      TrackingParameters(**params))
    return tracker.track(n_seeds)


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_cached_transformer_tracking_equals_full_recomputation(name):
    torch.manual_seed(1)
    model = TRANSFORMERS[name]().eval()
    volume, mask = world()
    cached = run(model, volume, mask, 12)
    full = run(benchmark.FullRecomputeModel(model), volume, mask, 12)
    assert cached.lengths.max() > 5 and len(set(cached.lengths.tolist())) > 2  # backward halves included
    np.testing.assert_array_equal(cached.lengths, full.lengths)
    np.testing.assert_allclose(cached.points, full.points, atol=1e-4)
    np.testing.assert_array_equal(cached.end_reasons, full.end_reasons)


@pytest.mark.parametrize("name", ["TTO", "TTS"])
def test_caches_that_grow_with_the_streamlines_give_the_same_tractogram(name, monkeypatch):
    # The caches start at INITIAL_CACHE_POSITIONS and double when a plan or a prefill needs more: the same
    # bits as caches of max_points positions from the start, in less memory while the streamlines are short.
    torch.manual_seed(1)
    model = TRANSFORMERS[name]().eval()
    volume, mask = world()
    results, capacities = [], []
    for initial in (150, 2):  # max_points, then growth from 2 positions
        monkeypatch.setattr(transformers, "INITIAL_CACHE_POSITIONS", initial)
        tracker = Tracker(model, volume, MaskStoppingCriterion(torch.as_tensor(mask)), SeedGenerator(mask, 5),
                          make_direction_decoder("det", model.direction_getter, rng_seed=5),
                          TrackingParameters(step_size_vox=0.5, max_points=150, theta_deg=180, eos_threshold=0.6,
                                             n_slots=8, check_every=2))
        results.append(tracker.track(12))
        capacities.append(tracker.model_state.capacity)
    whole, grown = results
    assert whole.lengths.max() > 8
    assert capacities[0] == 150 and capacities[1] < 150
    for field in ("lengths", "points", "end_reasons"):
        np.testing.assert_array_equal(getattr(grown, field), getattr(whole, field))


def test_l2t_tracking_does_not_depend_on_slot_count_and_matches_reference_path():
    torch.manual_seed(2)
    model = Learn2TrackModel(nb_features=NB_FEATURES, step_size=0.5, input_embedding_key="nn_embedding",
                             input_embedded_size=8, nb_previous_dirs=2, rnn_key="lstm", rnn_layer_sizes=[8, 6],
                             **HEAD).eval()
    volume, mask = world()
    results = [run(model, volume, mask, 20, n_slots=n, eos_threshold=None) for n in (1, 6, 32)]
    for other in results[1:]:
        np.testing.assert_array_equal(other.lengths, results[0].lengths)
        np.testing.assert_allclose(other.points, results[0].points, atol=1e-5)
    # the dwi_ml-style reference loop (groups, lists) gives the same streamlines for seeds whose forward
    # half has more than the seed (dwi_ml drops the others)
    params = TrackingParameters(step_size_vox=0.5, max_points=30, theta_deg=180)
    seeds = SeedGenerator(mask, 5).positions(torch.arange(20))
    reference = benchmark.reference_track(model, volume, MaskStoppingCriterion(torch.as_tensor(mask)), seeds,
                                          params, group_size=7)
    engine = np.split(results[0].points, np.cumsum(results[0].lengths)[:-1])
    assert len(reference) == 20
    compared = [(ours, theirs) for ours, theirs in zip(engine, reference) if theirs is not None]
    assert len(compared) >= 10
    for ours, theirs in compared:
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)


# continuous heads: a classification head's vertex directions would hide small differences
@pytest.mark.parametrize("algo, dg_key", [("det", "cosine-regression"), ("prob", "gaussian")])
@pytest.mark.parametrize("rnn_key", ["gru", "lstm"])
def test_l2t_tracking_is_bit_identical_for_any_slot_count(rnn_key, algo, dg_key):
    torch.manual_seed(4)
    model = Learn2TrackModel(nb_features=NB_FEATURES, step_size=0.5, input_embedding_key="nn_embedding",
                             input_embedded_size=8, nb_previous_dirs=2, rnn_key=rnn_key, rnn_layer_sizes=[8, 6],
                             dg_key=dg_key, dg_args={"add_eos": True}).eval()
    volume, mask = world()
    # 1-3 slots: products of 1-3 rows; 5: a ragged block; 32, 64: more slots than seeds
    results = [run(model, volume, mask, 24, n_slots=n, eos_threshold=None, algo=algo)
               for n in (1, 2, 3, 5, 32, 64)]
    assert len(set(results[0].lengths.tolist())) > 3  # ragged backward-half prefills
    for other in results[1:]:
        np.testing.assert_array_equal(other.lengths, results[0].lengths)
        assert torch.equal(torch.from_numpy(other.points), torch.from_numpy(results[0].points))


# Known defect, not localized yet: on an AMD EPYC (MKL, one thread) a model whose width is not a multiple of 8
# (TTST here: 6 + 4) tracks 1 ulp apart for 1-2 slots and for 3 or more; widths of 8 give the same bits.
ON_AMD = "AuthenticAMD" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
TTST_ON_AMD = pytest.mark.xfail(ON_AMD, strict=True, reason="1 ulp across slot counts at width 10 on AMD")


@pytest.mark.parametrize("algo, dg_key", [("det", "cosine-regression"), ("prob", "gaussian")])
@pytest.mark.parametrize("name", [pytest.param(name, marks=TTST_ON_AMD) if name == "TTST" else name
                                  for name in sorted(TRANSFORMERS)])
def test_transformer_tracking_is_bit_identical_for_any_slot_count(name, algo, dg_key):
    # The rows of a step share its products and attention kernels; the slot count changes which rows meet
    # (and so the key groups' widths and the prefill buckets), not a row's result.
    torch.manual_seed(4)
    model = TRANSFORMERS[name]().eval()
    model = type(model)(**{**model.params_for_checkpoint(), "dg_key": dg_key}).eval()
    volume, mask = world()
    results = [run(model, volume, mask, 24, n_slots=n, eos_threshold=None, algo=algo, max_points=60)
               for n in (1, 2, 3, 5, 32, 64)]
    assert len(set(results[0].lengths.tolist())) > 3  # ragged backward-half prefills
    for other in results[1:]:
        np.testing.assert_array_equal(other.lengths, results[0].lengths)
        assert torch.equal(torch.from_numpy(other.points), torch.from_numpy(results[0].points))


L2T_WINDOWS = {f"l2t-{rnn}-prev{n}": (lambda rnn=rnn, n=n: Learn2TrackModel(
    nb_features=NB_FEATURES, step_size=0.5, input_embedding_key="nn_embedding", input_embedded_size=8,
    nb_previous_dirs=n, rnn_key=rnn, rnn_layer_sizes=[8, 6], **HEAD)) for rnn, n in (("gru", 0), ("lstm", 2))}


@pytest.mark.parametrize("name", sorted(TRANSFORMERS) + sorted(L2T_WINDOWS))
@torch.no_grad()  # as the tracker
def test_a_step_on_the_last_points_equals_a_step_on_the_whole_streamline(name):
    # what the tracker passes (the model's tracking_window points) gives bit for bit what the whole
    # padded history gives
    torch.manual_seed(3)
    model = {**TRANSFORMERS, **L2T_WINDOWS}[name]().eval()
    window = model.tracking_window
    volume, _ = world()
    generator = torch.Generator().manual_seed(3)
    n_rows, n_points = 5, 9
    lines = 3.0 + torch.cumsum(0.4 * torch.rand(n_rows, n_points, 3, generator=generator), dim=1)
    start = torch.tensor([1, 1, 2, 1, 3])  # ragged: row b starts with start[b] points
    whole, tail = (model.new_tracking_state(volume, n_rows, n_points) for _ in range(2))
    rows = torch.arange(n_rows)
    for state in (whole, tail):
        if model.prefills_prefixes:
            model.reset_tracking_rows(state, rows, lines, start)
        else:  # a recurrent model takes its prefix through steps, as the tracker feeds it
            model.reset_tracking_rows(state, rows, lines, torch.ones_like(start))
            for length in range(1, int(start.max())):
                feeding = (start > length).nonzero().squeeze(1)
                model.tracking_step(state, rows[feeding], lines[feeding], torch.full_like(feeding, length))
    for step in range(n_points - 3):
        lengths = start + step
        first = (lengths - window).clamp(min=0)
        index = torch.minimum(first[:, None] + torch.arange(window), lengths[:, None] - 1)
        expected = model.tracking_step(whole, rows, lines, lengths)
        got = model.tracking_step(tail, rows, lines[rows[:, None], index], lengths)
        assert torch.equal(got, expected)
