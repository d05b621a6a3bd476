"""The batched tracking engine on hand-drawn volumes with known answers (no learned model needed).

``FieldModel`` implements the tracking interface by reading a direction field at the last point (flipped to
follow the previous segment, like dipy's peak getters) and, where an EOS mask says so, an EOS probability
of 1. It also checks the interface invariant: before each step a slot has consumed points 0 .. L-2.
"""

import math

import numpy as np
import pytest
import torch

from trackflow.data.streamlines import gather_ragged
from trackflow.errors import TrackflowError
from trackflow.models.direction_getters import CONE_CANDIDATES, DirectionGetter, make_direction_getter
from trackflow.tracking.decoders import DeterministicDecoder, SampledDecoder, make_direction_decoder
from trackflow.tracking.random import counter_uniforms
from trackflow.tracking.seeds import SeedGenerator, count_seeds
from trackflow.tracking.stopping import MaskStoppingCriterion, StreamlineStatus, VolumeStoppingCriterion
from trackflow.tracking.tracker import StopReason, Tracker, TrackingParameters, reverse_prefixes


class FieldHead:
    """raw = [dx, dy, dz, eos_probability]; sampling jitters the direction with 3 uniforms (``jitter`` wide);
    in the cone, the real heads' bounded rejection (``DirectionGetter.sample_in_cone``)."""

    n_uniforms = 3
    n_cone_uniforms = CONE_CANDIDATES * 3
    sample_in_cone = DirectionGetter.sample_in_cone

    def __init__(self, with_eos=True, supports_sampling=True, jitter=0.4):
        self.with_eos = with_eos
        self.supports_sampling = supports_sampling
        self.jitter = jitter

    def deterministic(self, raw):
        return raw[:, :3]

    def deterministic_in_cone(self, raw, previous, cos_theta):
        """A second candidate, the previous step: taken where the field turns sharper than theta."""
        sharp = torch.nn.functional.cosine_similarity(raw[:, :3], previous, dim=1) < cos_theta
        return torch.where(sharp[:, None], previous, raw[:, :3])

    def sample_from_uniforms(self, raw, u):
        return raw[:, :3] + self.jitter * (u - 0.5)

    def eos_probability(self, raw):
        return raw[:, 3] if self.with_eos else None

    def eos_is_most_likely(self, raw):
        return raw[:, 3] > 0.5 if self.with_eos else None


class FieldModel:
    """Tracking-interface model over a direction field [X, Y, Z, 3] and an optional EOS mask [X, Y, Z]."""

    def __init__(self, field, eos_mask=None, head=None):
        self.field = torch.as_tensor(field, dtype=torch.float32)
        shape = self.field.shape[:3]
        self.eos_mask = torch.zeros(shape) if eos_mask is None else torch.as_tensor(eos_mask, dtype=torch.float32)
        self.direction_getter = head or FieldHead()
        self.calls = 0

    def new_tracking_state(self, volume, n_slots, max_points):
        # consumed[s]: points consumed; last[s]: the last one (to check the prefix really is the streamline)
        return {"consumed": torch.zeros(n_slots, dtype=torch.long), "last": torch.zeros(n_slots, 3),
                "scratch": n_slots - 1}

    tracking_window = 2  # the last point and the one before it
    prefills_prefixes = True

    def _check_invariant(self, state, rows, points, lengths, in_window):
        real = rows != state["scratch"]
        assert torch.equal(state["consumed"][rows][real], (lengths - 1)[real])
        has_prefix = real & (lengths >= 2)
        idx = torch.arange(len(rows))[has_prefix]
        assert torch.equal(state["last"][rows[has_prefix]], points[idx, in_window[has_prefix] - 2])

    def tracking_step(self, state, rows, points, lengths):
        self.calls += 1
        # the tracker passes the window only, whatever the streamlines' lengths
        assert points.shape == (len(rows), self.tracking_window, 3)
        in_window = lengths.clamp(max=points.shape[1])
        self._check_invariant(state, rows, points, lengths, in_window)
        b = torch.arange(len(rows))
        last = points[b, in_window - 1]
        state["consumed"][rows] = lengths
        state["last"][rows] = last
        voxel = torch.floor(last).long()
        for axis, size in enumerate(self.field.shape[:3]):
            voxel[:, axis] = voxel[:, axis].clamp(0, size - 1)
        direction = self.field[voxel[:, 0], voxel[:, 1], voxel[:, 2]]
        segment = last - points[b, (in_window - 2).clamp(min=0)]
        flip = (direction * segment).sum(dim=1) < 0
        direction = torch.where(flip[:, None], -direction, direction)
        eos = self.eos_mask[voxel[:, 0], voxel[:, 1], voxel[:, 2]]
        return torch.cat([direction, eos[:, None]], dim=1)

    def reset_tracking_rows(self, state, rows, points, lengths):
        state["consumed"][rows] = lengths - 1
        b = torch.arange(len(rows))
        state["last"][rows] = points[b, (lengths - 2).clamp(min=0)]


class ReplayingFieldModel(FieldModel):
    """The same model taking prefixes one point at a time, as a recurrent model: the tracker replays them."""

    prefills_prefixes = False

    def reset_tracking_rows(self, state, rows, points, lengths):
        assert bool((lengths == 1).all())  # never asked to prefill
        super().reset_tracking_rows(state, rows, points, lengths)


class FixedSeeds:
    """Seed generator with given positions (seed k -> positions[k])."""

    def __init__(self, positions):
        self.positions_table = torch.as_tensor(positions, dtype=torch.float32)

    def positions(self, seed_indices):
        return self.positions_table[seed_indices]


def x_field(shape=(10, 5, 5)):
    field = np.zeros(shape + (3,), np.float32)
    field[..., 0] = 1.0
    return field


def track(model, criterion, seeds, n_seeds=None, **params):
    params.setdefault("step_size_vox", 1.0)
    params.setdefault("max_points", 100)
    params.setdefault("eos_threshold", 0.5)
    tracker = Tracker(model, torch.zeros(2, 2, 2, 1), criterion, seeds,
                      DeterministicDecoder(model.direction_getter), TrackingParameters(**params))
    n_seeds = n_seeds if n_seeds is not None else len(seeds.positions_table)
    result = tracker.track(n_seeds)
    streamlines = np.split(result.points, np.cumsum(result.lengths)[:-1])
    return result, streamlines


CENTRE = (4.5, 2.5, 2.5)


def xs(streamline):
    return streamline[:, 0].tolist()


def test_mask_stop_keeps_first_point_outside_by_default():
    mask = torch.zeros(10, 5, 5)
    mask[2:7] = 1  # voxels x = 2..6 inside
    result, (line,) = track(FieldModel(x_field()), MaskStoppingCriterion(mask), FixedSeeds([CENTRE]))
    # forward reaches 7.5 (first point outside, kept), backward 1.5; output goes forward end -> seed -> back
    assert xs(line) == [7.5, 6.5, 5.5, 4.5, 3.5, 2.5, 1.5]
    np.testing.assert_array_equal(line[:, 1:], 2.5)
    assert result.end_reasons.tolist() == [[StopReason.MASK, StopReason.MASK]]


def test_discard_last_keeps_only_points_inside_mask():
    mask = torch.zeros(10, 5, 5)
    mask[2:7] = 1
    result, (line,) = track(FieldModel(x_field()), MaskStoppingCriterion(mask), FixedSeeds([CENTRE]),
                            discard_last_point=True)
    assert xs(line) == [6.5, 5.5, 4.5, 3.5, 2.5]


def test_trilinear_mask_interpolation_moves_the_border():
    # dwi_ml's trilinear convention: coordinate i is voxel i, so 6.5 blends voxels 6 and 7 (0.5: inside)
    # and 7.5 blends 7 and 8 (0: outside); 1.5 blends 1 (0) and 2 (1) -> 0.5, inside; 0.5 is outside.
    mask = torch.zeros(10, 5, 5)
    mask[2:7] = 1
    _, (line,) = track(FieldModel(x_field()), MaskStoppingCriterion(mask, "trilinear"), FixedSeeds([CENTRE]),
                       discard_last_point=True)
    assert xs(line) == [6.5, 5.5, 4.5, 3.5, 2.5, 1.5]


def test_volume_bounds_stop_without_mask():
    result, (line,) = track(FieldModel(x_field()), VolumeStoppingCriterion((10, 5, 5)), FixedSeeds([CENTRE]))
    assert xs(line) == [10.5] + [x + 0.5 for x in range(9, -1, -1)] + [-0.5]
    assert result.end_reasons.tolist() == [[StopReason.VOLUME, StopReason.VOLUME]]


def test_angle_above_theta_stops_without_appending():
    field = x_field()
    field[6:, :, :] = (0.0, 1.0, 0.0)  # 90 degree turn from voxel x = 6 on
    seeds = FixedSeeds([CENTRE])
    result, (line,) = track(FieldModel(field), VolumeStoppingCriterion((10, 5, 5)), seeds, theta_deg=60,
                            track_forward_only=True)
    assert xs(line) == [4.5, 5.5, 6.5]
    assert result.end_reasons[0, 0] == StopReason.ANGLE
    _, (line,) = track(FieldModel(field), VolumeStoppingCriterion((10, 5, 5)), seeds, theta_deg=120,
                       track_forward_only=True)
    np.testing.assert_allclose(line[-1], [6.5, 5.5, 2.5])  # turned: +y until leaving the volume


def test_eos_above_threshold_stops_at_the_current_point():
    eos = np.zeros((10, 5, 5), np.float32)
    eos[7] = 0.8
    seeds = FixedSeeds([CENTRE])
    result, (line,) = track(FieldModel(x_field(), eos), VolumeStoppingCriterion((10, 5, 5)), seeds,
                            track_forward_only=True, eos_threshold=0.5)
    assert xs(line) == [4.5, 5.5, 6.5, 7.5]
    assert result.end_reasons[0, 0] == StopReason.EOS
    _, (line,) = track(FieldModel(x_field(), eos), VolumeStoppingCriterion((10, 5, 5)), seeds,
                       track_forward_only=True, eos_threshold=0.9)
    assert xs(line)[-1] == 10.5
    # A head without EOS never stops on it.
    model = FieldModel(x_field(), eos, head=FieldHead(with_eos=False))
    _, (line,) = track(model, VolumeStoppingCriterion((10, 5, 5)), seeds, track_forward_only=True)
    assert xs(line)[-1] == 10.5


def test_max_length_counts_both_halves():
    big = x_field((40, 5, 5))
    seeds = FixedSeeds([(20.5, 2.5, 2.5), (36.5, 2.5, 2.5)])
    result, lines = track(FieldModel(big), VolumeStoppingCriterion((40, 5, 5)), seeds, max_points=9)
    assert result.lengths.tolist() == [9, 9]
    # seed 0 fills all 9 points going forward (seed first), no room is left for a backward half
    assert xs(lines[0]) == [20.5 + k for k in range(9)]
    assert result.end_reasons[0].tolist() == [StopReason.MAX_LENGTH, StopReason.NOT_TRACKED]
    # seed 1 leaves the volume after 4 steps (5 points), its backward half is cut at 9 points in all
    assert xs(lines[1]) == [40.5 - k for k in range(9)]
    assert result.end_reasons[1].tolist() == [StopReason.VOLUME, StopReason.MAX_LENGTH]


def test_first_step_failure_still_tracks_backward_from_seed():
    # The first forward step leaves the mask (not kept with discard_last): the backward half still runs,
    # along the opposite of that first step.
    mask = torch.zeros(10, 5, 5)
    mask[2:5] = 1
    result, (line,) = track(FieldModel(x_field()), MaskStoppingCriterion(mask), FixedSeeds([CENTRE]),
                            discard_last_point=True)
    assert xs(line) == [4.5, 3.5, 2.5]
    # EOS at the seed: same, the backward half starts against the first (refused) direction.
    eos = np.zeros((10, 5, 5), np.float32)
    eos[4] = 1.0
    _, (line,) = track(FieldModel(x_field(), eos), VolumeStoppingCriterion((10, 5, 5)), FixedSeeds([CENTRE]))
    assert xs(line) == [4.5, 3.5, 2.5, 1.5, 0.5, -0.5]


def test_no_nan_point_is_written():
    field = x_field()
    field[6] = np.nan
    result, (line,) = track(FieldModel(field), VolumeStoppingCriterion((10, 5, 5)), FixedSeeds([CENTRE]))
    assert np.isfinite(result.points).all()
    assert xs(line)[0] == 6.5 and result.end_reasons[0, 0] == StopReason.NO_DIRECTION


def test_prob_needs_a_sampling_head():
    model = FieldModel(x_field(), head=FieldHead(supports_sampling=False))
    with pytest.raises(TrackflowError, match="sampl"):
        make_direction_decoder("prob", model.direction_getter, 0)
    assert isinstance(make_direction_decoder("det", model.direction_getter, 0), DeterministicDecoder)
    assert isinstance(make_direction_decoder("prob", FieldHead(), 0), SampledDecoder)
    with pytest.raises(TrackflowError, match="unknown tracking algorithm"):
        make_direction_decoder("fast", model.direction_getter, 0)


@pytest.mark.parametrize("params, message", [
    (dict(n_slots=0), "--simultaneous_tracking must be at least 1, got 0"),
    (dict(check_every=0), "check_every .* must be at least 1, got 0"),
    (dict(step_size_vox=0.0), "step size must be positive"),
    (dict(max_points=0), "raise --max_length"),
])
def test_tracking_parameters_say_what_is_wrong(params, message):
    with pytest.raises(TrackflowError, match=message):
        TrackingParameters(**{"step_size_vox": 1.0, "max_points": 10, **params})


def curved_world():
    """A rotating field in a 12^3 mask so that streamlines differ in length and end in every way."""
    g = np.stack(np.meshgrid(*[np.arange(12) + 0.5] * 3, indexing="ij"), -1)
    field = np.stack([np.cos(g[..., 2] / 3), np.sin(g[..., 2] / 3), 0.3 * np.cos(g[..., 0])], -1)
    mask = np.zeros((12, 12, 12), np.float32)
    mask[1:11, 1:11, 1:11] = 1
    eos = ((g[..., 0] - 6) ** 2 + (g[..., 1] - 6) ** 2 < 2).astype(np.float32)
    return field.astype(np.float32), mask, eos


@pytest.mark.parametrize("algo, sampling", [("det", "full"), ("det", "cone"), ("prob", "full"), ("prob", "cone")])
@pytest.mark.parametrize("model_class", [FieldModel, ReplayingFieldModel])
def test_same_tractogram_whatever_the_number_of_slots(algo, sampling, model_class):
    # The replaying model's invariant checks (FieldModel._check_invariant) assert that the replay feeds each
    # backward half's prefix point by point, at the right lengths.
    field, mask, eos = curved_world()
    results = []
    for n_slots in (1, 5, 32):
        model = model_class(field, eos, head=FieldHead(jitter=0.8))
        seeds = SeedGenerator(mask, rng_seed=3)
        tracker = Tracker(model, torch.zeros(1, 1, 1, 1), MaskStoppingCriterion(torch.as_tensor(mask)), seeds,
                          make_direction_decoder(algo, model.direction_getter, 11, sampling, theta_deg=50,
                                                 det_direction=sampling),
                          TrackingParameters(step_size_vox=0.5, max_points=16, theta_deg=50, eos_threshold=0.5,
                                             n_slots=n_slots, check_every=3))
        results.append(tracker.track(60))
    first = results[0]
    assert len(set(first.lengths.tolist())) > 5  # the world is not trivial
    assert set(first.end_reasons.ravel().tolist()) >= {StopReason.MASK, StopReason.EOS, StopReason.MAX_LENGTH}
    np.testing.assert_array_equal(first.seed_indices, np.arange(60))
    for other in results[1:]:
        np.testing.assert_array_equal(other.lengths, first.lengths)
        np.testing.assert_array_equal(other.points, first.points)
        np.testing.assert_array_equal(other.end_reasons, first.end_reasons)


@pytest.mark.parametrize("algo", ["det", "prob"])
def test_replayed_prefixes_give_the_prefilled_tractogram(algo):
    field, mask, eos = curved_world()
    results, calls = [], []
    for model_class in (FieldModel, ReplayingFieldModel):
        model = model_class(field, eos, head=FieldHead(jitter=0.8))
        tracker = Tracker(model, torch.zeros(1, 1, 1, 1), MaskStoppingCriterion(torch.as_tensor(mask)),
                          SeedGenerator(mask, rng_seed=3),
                          make_direction_decoder(algo, model.direction_getter, 11, "cone", theta_deg=50),
                          TrackingParameters(step_size_vox=0.5, max_points=16, theta_deg=50, eos_threshold=0.5,
                                             n_slots=7, check_every=3))
        results.append(tracker.track(60))
        calls.append(model.calls)
    prefilled, replayed = results
    for name in ("lengths", "points", "end_reasons", "seeds"):
        np.testing.assert_array_equal(getattr(replayed, name), getattr(prefilled, name))
    assert calls[1] > calls[0]  # the replays took steps


class PrefixStarts(FixedSeeds):
    """Streamlines that start as given first points (generation validation)."""

    def __init__(self, starts):
        self.starts = torch.as_tensor(starts, dtype=torch.float32)
        super().__init__(self.starts[:, 0])

    def start_points(self, seed_indices):
        return self.starts[seed_indices]


@pytest.mark.parametrize("model_class", [FieldModel, ReplayingFieldModel])
def test_a_start_of_several_points_goes_on_from_its_last_point(model_class):
    starts = [[(1.5, 2.5, 2.5), (2.5, 2.5, 2.5), (3.5, 2.5, 2.5)]]
    result, (line,) = track(model_class(x_field()), VolumeStoppingCriterion((10, 5, 5)), PrefixStarts(starts),
                            track_forward_only=True)
    assert xs(line) == [1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5, 10.5]
    np.testing.assert_array_equal(result.seeds, [starts[0][0]])
    with pytest.raises(TrackflowError, match="track_forward_only"):
        track(model_class(x_field()), VolumeStoppingCriterion((10, 5, 5)), PrefixStarts(starts))


def test_prob_tracking_depends_on_rng_seed():
    field, mask, eos = curved_world()
    out = []
    for rng_seed in (1, 2):
        model = FieldModel(field, eos)
        tracker = Tracker(model, torch.zeros(1, 1, 1, 1), MaskStoppingCriterion(torch.as_tensor(mask)),
                          SeedGenerator(mask, rng_seed=3), SampledDecoder(model.direction_getter, rng_seed),
                          TrackingParameters(step_size_vox=0.5, max_points=40,
                                             n_slots=16))
        out.append(tracker.track(20))
    assert not np.array_equal(out[0].points[:50], out[1].points[:50])


def test_gather_ragged_puts_streamlines_in_the_given_order():
    lengths = np.array([2, 3, 1])
    offsets = np.array([0, 2, 5])
    data = np.arange(6) * 10  # streamline 0: 0 10, 1: 20 30 40, 2: 50
    assert data[gather_ragged(offsets, lengths, np.array([2, 0, 1]))].tolist() == [50, 0, 10, 20, 30, 40]
    assert data[gather_ragged(offsets, lengths, np.array([1, 1]))].tolist() == [20, 30, 40, 20, 30, 40]
    assert gather_ragged(offsets, lengths, np.array([], dtype=np.int64)).tolist() == []


def test_reverse_prefixes():
    points = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    reversed_ = reverse_prefixes(points, torch.tensor([3, 1]))
    torch.testing.assert_close(reversed_[0, :3], points[0, [2, 1, 0]])
    torch.testing.assert_close(reversed_[1, 0], points[1, 0])


# ------------------------------------------------------------------ seeds, criteria, random numbers

def test_seeds_cover_mask_voxels_in_shuffled_order():
    mask = np.zeros((6, 5, 4))
    mask[1:3, 2, 1:4] = 1
    assert count_seeds(mask, npv=3, nt=None) == 18 and count_seeds(mask, None, nt=5) == 5
    generator = SeedGenerator(mask, rng_seed=0)
    seeds = generator.positions(torch.arange(18)).numpy()
    voxels = np.floor(seeds).astype(int)
    assert mask[tuple(voxels.T)].all()
    # npv 3 over 6 voxels: each voxel exactly 3 times (voxels are cycled through).
    _, counts = np.unique(voxels, axis=0, return_counts=True)
    assert counts.tolist() == [3] * 6
    # seed k does not depend on which other seeds are asked for
    torch.testing.assert_close(generator.positions(torch.tensor([7, 2])), torch.as_tensor(seeds[[7, 2]]))
    with pytest.raises(TrackflowError, match="empty"):
        SeedGenerator(np.zeros((3, 3, 3)), rng_seed=0)


def test_mask_criterion_statuses():
    mask = torch.zeros(4, 3, 3)
    mask[1:3] = 1
    criterion = MaskStoppingCriterion(mask)
    points = torch.tensor([[1.0, 1.5, 1.5], [2.99, 0.0, 2.99], [0.99, 1.0, 1.0], [3.5, 1, 1], [-0.01, 1, 1],
                           [4.0, 1, 1], [float("nan"), 1, 1]])
    assert criterion.check_points(points).tolist() == [
        StreamlineStatus.TRACKPOINT, StreamlineStatus.TRACKPOINT, StreamlineStatus.ENDPOINT,
        StreamlineStatus.ENDPOINT, StreamlineStatus.OUTSIDEIMAGE, StreamlineStatus.OUTSIDEIMAGE,
        StreamlineStatus.OUTSIDEIMAGE]
    # a fractional mask value away from 0 and 1 against the 0.5 threshold
    soft = torch.full((2, 2, 2), 0.4)
    assert MaskStoppingCriterion(soft).check_points(torch.tensor([[0.5, 0.5, 0.5]])).item() == \
        StreamlineStatus.ENDPOINT
    assert MaskStoppingCriterion(soft + 0.2).check_points(torch.tensor([[0.5, 0.5, 0.5]])).item() == \
        StreamlineStatus.TRACKPOINT


def _splitmix_reference(x):
    """Plain-Python SplitMix64 finaliser on unsigned ints (the independent reference)."""
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_counter_uniforms_match_python_reference_and_look_uniform():
    from scipy import stats

    seed_index = torch.tensor([0, 5, 123456789012])
    got = counter_uniforms(2**40 + 3, 2, seed_index, torch.tensor([0, 7, 3]), 4)
    for row, (s, c) in enumerate(zip([0, 5, 123456789012], [0, 7, 3])):
        key = _splitmix_reference((2**40 + 3) ^ 2)
        h = _splitmix_reference(_splitmix_reference(key ^ s) ^ c)
        for k in range(4):
            expected = ((_splitmix_reference(h ^ k) >> 41) + 0.5) / 2**23
            assert got[row, k].item() == pytest.approx(expected, abs=0)
    many = counter_uniforms(7, 2, torch.arange(20000), 0, 2)
    assert (many > 0).all() and (many < 1).all()
    assert stats.kstest(many[:, 0].numpy(), "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.03
    assert math.isclose(float(many.mean()), 0.5, abs_tol=0.01)


def _prob_run(sampling, head, theta=30.0, **params):
    field, mask, eos = curved_world()
    model = FieldModel(field, eos, head=head)
    tracker = Tracker(model, torch.zeros(1, 1, 1, 1), MaskStoppingCriterion(torch.as_tensor(mask)),
                      SeedGenerator(mask, rng_seed=3), make_direction_decoder("prob", head, 5, sampling, theta),
                      TrackingParameters(step_size_vox=0.5, max_points=40, theta_deg=theta, n_slots=16, **params))
    return tracker.track(80)


def test_cone_sampling_replaces_angle_stops_by_steps_inside_the_cone():
    full = _prob_run("full", FieldHead(jitter=1.0))
    cone = _prob_run("cone", FieldHead(jitter=1.0))
    angle_stops = [int((r.end_reasons == StopReason.ANGLE).sum()) for r in (full, cone)]
    print(angle_stops, full.lengths.mean(), cone.lengths.mean())
    assert angle_stops[0] > 40 and angle_stops[1] < angle_stops[0] / 4
    assert cone.lengths.mean() > 1.5 * full.lengths.mean()
    # a cone of 180 degrees is the whole distribution: the same streamlines
    wide = [_prob_run(sampling, FieldHead(jitter=2.0), theta=180) for sampling in ("full", "cone")]
    np.testing.assert_array_equal(wide[0].points, wide[1].points)


class ClassificationFieldModel(FieldModel):
    """The field model behind a real sphere-classification head: the field's direction is the likeliest
    vertex, and in the EOS mask the EOS logit is the argmax of all classes with p(EOS) ~ 0.02."""

    def __init__(self, field, eos_mask):
        super().__init__(field, eos_mask, head=make_direction_getter("sphere-classification", 4, {"add_eos": True}))

    def tracking_step(self, state, rows, points, lengths):
        out = super().tracking_step(state, rows, points, lengths)
        vertices = self.direction_getter.vertices
        logits = 5.0 * torch.nn.functional.normalize(out[:, :3], dim=1) @ vertices.T
        eos_logit = torch.where(out[:, 3] > 0, 5.5, -30.0)
        return torch.cat([logits, eos_logit[:, None]], dim=1)


@pytest.mark.parametrize("rule, stops_at_eos", [("max", True), (0.5, False), (0.01, True)])
def test_eos_max_stops_a_classification_head_whose_eos_probability_is_small(rule, stops_at_eos):
    eos = np.zeros((10, 5, 5), np.float32)
    eos[7] = 1.0
    model = ClassificationFieldModel(x_field(), eos)
    probability = model.direction_getter.eos_probability(
        model.tracking_step(model.new_tracking_state(None, 1, 1), torch.tensor([0]),
                            torch.tensor([[[7.5, 2.5, 2.5], [7.5, 2.5, 2.5]]]), torch.tensor([1])))
    assert probability.item() < 0.05
    result, (line,) = track(model, VolumeStoppingCriterion((10, 5, 5)), FixedSeeds([(1.5, 2.5, 2.5)]),
                            track_forward_only=True, eos_threshold=rule)
    assert (result.end_reasons[0, 0] == StopReason.EOS) == stops_at_eos
    # the likeliest vertex is close to +x: EOS stops in voxel 7; otherwise the first point outside is kept
    assert (math.floor(line[-1, 0]) == 7) if stops_at_eos else (line[-1, 0] > 10)


@pytest.mark.parametrize("rule", ["auto", 1.5, -0.1, "0.5"])
def test_eos_rule_must_be_a_probability_or_max(rule):
    with pytest.raises(TrackflowError, match="EOS stop"):
        TrackingParameters(step_size_vox=1.0, max_points=10, eos_threshold=rule)


def test_unknown_prob_sampling_is_refused():
    with pytest.raises(TrackflowError, match="prob_sampling"):
        make_direction_decoder("prob", FieldHead(), 0, "sphere")


def test_det_in_the_cone_turns_where_the_overall_best_would_stop():
    """A head whose best direction turns back and whose second best goes on: ``--det_direction full`` stops
    the streamline at the angle test, ``cone`` takes the second best (the classical det rule); the first
    step, with no previous direction, takes the overall best either way."""
    head = make_direction_getter("sphere-classification", 4, {})
    forward = int(torch.argmax(head.vertices @ torch.tensor([1.0, 0.0, 0.0])))
    backward = int(torch.argmax(head.vertices @ torch.tensor([-1.0, 0.0, 0.0])))
    raw = torch.full((2, head.nb_vertices), -10.0)
    raw[:, backward], raw[:, forward] = 5.0, 4.0
    previous = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    has_previous = torch.tensor([True, False])
    args = (torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), previous, has_previous)
    full = make_direction_decoder("det", head, 0, theta_deg=45).directions(raw, *args)
    cone = make_direction_decoder("det", head, 0, theta_deg=45, det_direction="cone").directions(raw, *args)
    torch.testing.assert_close(full, head.vertices[[backward, backward]])
    torch.testing.assert_close(cone, head.vertices[[forward, backward]])
    with pytest.raises(TrackflowError, match="det_direction"):
        make_direction_decoder("det", head, 0, det_direction="max")
