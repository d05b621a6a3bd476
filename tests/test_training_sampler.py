"""Batch sampler: coverage without replacement, budgets, subjects per batch, RNG state round trip."""

import numpy as np
import pytest

from trackflow.errors import TrackflowError
from trackflow.training.batch_sampler import BatchSampler, SamplerParams


def _lengths(seed=0, counts=(23, 17, 9)):
    rng = np.random.default_rng(seed)
    return {f"sub-{i}": rng.uniform(5.0, 60.0, size=n) for i, n in enumerate(counts)}


def _all_ids(batches):
    """(subject, id) pairs drawn over an epoch, in drawing order."""
    return [(subject, int(i)) for batch in batches for subject, ids in batch for i in ids]


def test_nb_streamlines_epoch_uses_every_streamline_once():
    lengths = _lengths()
    sampler = BatchSampler(lengths, SamplerParams(batch_size=9), seed=3)
    batches = list(sampler.epoch())
    drawn = _all_ids(batches)
    expected = {(s, i) for s, v in lengths.items() for i in range(len(v))}
    assert len(drawn) == len(expected) and set(drawn) == expected
    # Every subject with unused streamlines is in each batch; the budget is shared among them.
    for batch in batches:
        assert sum(len(ids) for _, ids in batch) <= 9
        assert all(len(ids) <= 9 // len(batch) for _, ids in batch)
    assert [len(batch) for batch in batches[:3]] == [3, 3, 3]
    # Two epochs draw different orders (the generator moves on).
    assert _all_ids(list(sampler.epoch())) != drawn


def test_max_batches_per_epoch_limits_the_epoch():
    sampler = BatchSampler(_lengths(), SamplerParams(batch_size=6, max_batches_per_epoch=2), seed=0)
    batches = list(sampler.epoch())
    assert len(batches) == 2
    assert len(_all_ids(batches)) == 12


def test_length_mm_budget_and_coverage():
    lengths = _lengths(seed=1)
    budget = 120.0
    params = SamplerParams(batch_size=budget, batch_size_units="length_mm", nb_streamlines_per_chunk=4,
                           nb_subjects_per_batch=1)
    batches = list(BatchSampler(lengths, params, seed=5).epoch())
    for batch in batches:
        (subject, ids), = batch
        total = lengths[subject][ids].sum()
        # The budget holds unless a single streamline is longer than it.
        assert total <= budget or len(ids) == 1
    drawn = _all_ids(batches)
    assert len(drawn) == sum(len(v) for v in lengths.values()) == len(set(drawn))
    # Greedy filling: adding the next streamline of the permutation would have exceeded the budget,
    # so batches are not trivially small: their mean fill is well above half the budget.
    fills = [lengths[s][ids].sum() for batch in batches[:-3] for s, ids in batch]
    assert np.mean(fills) > 0.6 * budget


def test_subjects_per_batch_and_cycles():
    lengths = _lengths(counts=(30, 30, 30))
    params = SamplerParams(batch_size=4, nb_subjects_per_batch=1, cycles=3)
    batches = list(BatchSampler(lengths, params, seed=2).epoch())
    subjects = [batch[0][0] for batch in batches]
    assert all(len(batch) == 1 for batch in batches)
    # Cycles: each drawn subject is reused for 3 consecutive batches.
    for start in range(0, 15, 3):
        assert len(set(subjects[start:start + 3])) == 1
    assert len(set(subjects)) > 1


def test_state_round_trip_replays_the_epoch():
    sampler = BatchSampler(_lengths(), SamplerParams(batch_size=5), seed=11)
    list(sampler.epoch())
    state = sampler.get_state()
    first = _all_ids(list(sampler.epoch()))
    other = BatchSampler(_lengths(), SamplerParams(batch_size=5), seed=999)
    other.set_state(state)
    assert _all_ids(list(other.epoch())) == first


def test_subjects_without_streamlines_are_refused():
    with pytest.raises(TrackflowError, match="no streamline"):
        BatchSampler({"sub-01": np.zeros(0)}, SamplerParams(), seed=0)


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(batch_size=2.5),
                                    dict(batch_size_units="mm"), dict(cycles=2)])
def test_bad_sampler_params(kwargs):
    with pytest.raises(TrackflowError):
        SamplerParams(**kwargs)
