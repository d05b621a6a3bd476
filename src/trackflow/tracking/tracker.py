"""The batched tracker: one engine for every model, all state on the device, slots refilled as lines end.

The tracker only knows the model's tracking interface (``models/base.py``, ``MainModel``):
``new_tracking_state``, ``tracking_window``, ``tracking_step``, ``reset_tracking_rows`` and the head
``direction_getter``. How the head's output becomes a
direction (deterministic or sampled) is the decoder's business (``decoders.py``), where a point may go the
stopping criterion's (``stopping.py``); seeds come from a ``SeedGenerator``.

Layout: ``n_slots`` slots (``SlotState``), each holding one streamline in ``positions[slot, :lengths[slot]]``.
A slot is *live* while it holds a streamline not yet copied out and *active* while that streamline is
growing. Steps run on a fixed set of rows taken at the last check, with no host synchronisation; rows that
stopped since are redirected to one extra scratch slot (index ``n_slots``) so that the model never sees a
stopped row again. A step proposes one point per row (``_propose_steps``), then appends it or stops the row
(``_accept_steps``). Every ``check_every`` steps one small host check (``_turn_finish_and_refill``) (a) turns
finished forward halves around (reversed in place, seed last, the model state rebuilt: see below), (b) copies finished streamlines out in bulk and (c) refills the free slots with
the next seeds.

Rebuilding a state from a prefix (the reversed forward half, or the given first points of a start): a model
that can take a whole prefix at once (``prefills_prefixes``: a transformer fills its cache for every position
in one pass) gets it through ``reset_tracking_rows``. A recurrent model can only take it one point at a time;
its rows are reset and then *replay* the prefix through the ordinary batched steps (``fed`` < length - 1: the
step feeds the row's next stored point and proposes nothing), so that a replay shares the products of every
other row instead of running its own long chain of small steps at the check (measured: the replays of a GRU
2x64 took more time than all of its tracking steps).

Rules (spec §6.4, with dwi_ml's defects fixed): a new point is refused when the head gives no finite
direction, when the EOS rule says 'end' (probability above the threshold, or EOS most likely), or when
the turn exceeds theta; otherwise it is appended, even outside the mask (the first point outside is kept) unless ``discard_last_point``; the total over both halves
never exceeds ``max_points``. A seed whose first forward step failed still gets its backward half, whose
first step is forced along the opposite of that refused first direction. The sampled decoder's randomness is
keyed by seed index and step count, so results do not depend on the slot count; it gets each row's previous
step to sample within the theta cone.
"""

import enum
import math
from dataclasses import dataclass

import numpy as np
import torch

from trackflow.data.streamlines import gather_ragged, offsets_from_lengths
from trackflow.errors import TrackflowError
from trackflow.tracking.stopping import StreamlineStatus



EOS_MAX = "max"  # the EOS rule 'stop where ending is the most likely outcome'


class StopReason(enum.IntEnum):
    """Why one end of a streamline stopped (stored per end: forward, backward)."""

    NOT_TRACKED = 0  # backward end of a forward-only streamline, or a half cut by the length limit
    MASK = 1
    VOLUME = 2
    ANGLE = 3
    EOS = 4
    MAX_LENGTH = 5
    NO_DIRECTION = 6  # the head gave a zero or non-finite vector
    SEED_OUTSIDE_MASK = 7  # only with ``discard_last_point``


@dataclass
class TrackingParameters:
    """Tracker settings, in the units the tracker works in.

    step_size_vox: step in voxels; max_points: most points of a whole streamline (both halves);
    theta_deg: largest angle between consecutive steps; eos_threshold: stop when the head's EOS probability
    is above it, or ``EOS_MAX`` ('max'): when EOS is the head's most likely outcome
    (``head.eos_is_most_likely``), or None: never; discard_last_point: keep only points inside the tracking
    criterion; n_slots: streamlines tracked at once; check_every: steps between host checks. How directions
    are decoded (det or prob, and the seed of the sampling) is the decoder's business (``decoders.py``).
    """

    step_size_vox: float
    max_points: int
    theta_deg: float = 90.0
    eos_threshold: float | str | None = None
    track_forward_only: bool = False
    discard_last_point: bool = False
    n_slots: int = 1000
    check_every: int = 4

    def __post_init__(self):
        if not self.step_size_vox > 0:
            raise TrackflowError(f"the step size must be positive, got {self.step_size_vox} voxels")
        if self.max_points < 1:
            raise TrackflowError("the maximum length allows no step; raise --max_length")
        if self.n_slots < 1:
            raise TrackflowError(f"--simultaneous_tracking must be at least 1, got {self.n_slots}")
        if not (self.eos_threshold is None or self.eos_threshold == EOS_MAX
                or (not isinstance(self.eos_threshold, str) and 0 <= self.eos_threshold <= 1)):
            raise TrackflowError(f"the EOS stop must be a probability in [0, 1] or {EOS_MAX!r}, "
                                 f"got {self.eos_threshold!r}")
        if self.check_every < 1:
            raise TrackflowError(f"check_every (steps between host checks) must be at least 1, "
                                 f"got {self.check_every}")


@dataclass
class TrackingResult:
    """All seeds' streamlines, in seed-index order (vox/corner).

    points: float32 [P, 3]; lengths: int64 [S] (>= 1, P = sum); seed_indices: int64 [S]; seeds: float32
    [S, 3]; end_reasons: int8 [S, 2] (``StopReason`` of the forward and the backward end).
    """

    points: np.ndarray
    lengths: np.ndarray
    seed_indices: np.ndarray
    seeds: np.ndarray
    end_reasons: np.ndarray

    @property
    def offsets(self) -> np.ndarray:
        return offsets_from_lengths(self.lengths)


def reverse_prefixes(points: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first ``lengths[b]`` points; the padding after them is left as row b's point 0.

    Parameters
    ----------
    points : Tensor [B, T, 3]
    lengths : LongTensor [B], >= 1

    Returns
    -------
    Tensor [B, T, 3]
    """
    steps = torch.arange(points.shape[1], device=points.device)
    source = (lengths[:, None] - 1 - steps).clamp(min=0)  # [B, T]
    return points.gather(1, source[:, :, None].expand(-1, -1, 3))


@dataclass
class SlotState:
    """What the tracker knows of each slot, on the device; row ``n_slots`` is the scratch slot.

    positions: float32 [S, max_points, 3] (vox/corner), slot s's streamline in ``positions[s, :lengths[s]]``;
    lengths: long [S]; live, active, backward: bool [S] (holds a streamline not yet copied out / is growing /
    grows its backward half); seed_index: long [S]; step_counter: long [S] (steps taken from the seed, both
    halves: the sampled decoder's counter); prev_dir: float32 [S, 3] (last appended unit step, or the start
    direction of a backward half); has_prev: bool [S]; first_dir: float32 [S, 3] (the first forward direction,
    appended or not); forced: bool [S] (the next step goes along ``prev_dir``); end_reasons: int8 [S, 2]
    (``StopReason`` of the forward and the backward end); fed: long [S] (points of the streamline the model has
    consumed; ``lengths - 1`` before a proposing step, less while the row replays its prefix).
    """

    positions: torch.Tensor
    lengths: torch.Tensor
    live: torch.Tensor
    active: torch.Tensor
    backward: torch.Tensor
    seed_index: torch.Tensor
    step_counter: torch.Tensor
    prev_dir: torch.Tensor
    has_prev: torch.Tensor
    first_dir: torch.Tensor
    forced: torch.Tensor
    end_reasons: torch.Tensor
    fed: torch.Tensor

    @classmethod
    def allocate(cls, n_rows: int, max_points: int, device) -> "SlotState":
        """``n_rows`` free slots (live and active all False) of ``max_points`` points each."""
        def flags():
            return torch.zeros(n_rows, dtype=torch.bool, device=device)
        return cls(positions=torch.zeros(n_rows, max_points, 3, device=device),
                   lengths=torch.ones(n_rows, dtype=torch.long, device=device),
                   live=flags(), active=flags(), backward=flags(),
                   seed_index=torch.zeros(n_rows, dtype=torch.long, device=device),
                   step_counter=torch.zeros(n_rows, dtype=torch.long, device=device),
                   prev_dir=torch.zeros(n_rows, 3, device=device), has_prev=flags(),
                   first_dir=torch.zeros(n_rows, 3, device=device), forced=flags(),
                   end_reasons=torch.zeros(n_rows, 2, dtype=torch.int8, device=device),
                   fed=torch.zeros(n_rows, dtype=torch.long, device=device))

    def reset(self, rows: torch.Tensor) -> None:
        """Make ``rows`` live, active forward halves of one point at the origin, with no step taken yet
        (the caller writes the seed point and index)."""
        self.positions[rows] = 0.0
        self.lengths[rows] = 1
        self.fed[rows] = 0
        self.step_counter[rows] = 0
        self.prev_dir[rows] = 0.0
        self.has_prev[rows] = False
        self.first_dir[rows] = 0.0
        self.forced[rows] = False
        self.end_reasons[rows] = StopReason.NOT_TRACKED
        self.backward[rows] = False
        self.live[rows] = True
        self.active[rows] = True


@dataclass
class StepProposal:
    """The next step proposed for each of B rows, before the stopping criterion sees it.

    row_active: bool [B] (False: the row stopped since the last check and the model ran on the scratch
    slot); proposing: bool [B] (active and not replaying its prefix: only these rows may append or stop); last: float32 [B, 3] current last point; unit: float32 [B, 3] unit step direction (0 where none);
    no_direction, eos, too_sharp: bool [B], the three refusals; valid: bool [B], none of them; lengths,
    prev_dir, has_prev, step_counter: the rows' slot state the proposal was made from (read once per step).
    """

    row_active: torch.Tensor
    proposing: torch.Tensor
    last: torch.Tensor
    unit: torch.Tensor
    no_direction: torch.Tensor
    eos: torch.Tensor
    too_sharp: torch.Tensor
    valid: torch.Tensor
    lengths: torch.Tensor
    prev_dir: torch.Tensor
    has_prev: torch.Tensor
    step_counter: torch.Tensor


class Tracker:
    """Batched tracking of ``n_seeds`` seeds with a model that implements the tracking interface.

    Parameters
    ----------
    model : MainModel-like
        ``new_tracking_state``, ``tracking_window``, ``tracking_step``, ``reset_tracking_rows``,
        ``direction_getter``. A step passes the model each row's last ``tracking_window`` points only; the
        (rare) rebuild after turning around passes the whole padded forward half.
    volume : Tensor [X, Y, Z, F]
        Model input volume, on the tracking device.
    stopping_criterion : object with ``check_points(points[B, 3]) -> int8[B]`` (``StreamlineStatus``)
    seed_generator : object with ``positions(seed_indices[B]) -> [B, 3]``, and optionally
        ``start_points(seed_indices[B]) -> [B, K, 3]``: streamlines that start as their first K points (the
        last one is where tracking goes on; K > 1 only with ``track_forward_only``, e.g. generation validation)
    decoder : object with ``directions(raw[B, K], seed_indices[B], step_counts[B], previous[B, 3],
        has_previous[B]) -> [B, 3]`` (previous: the unit step the new one must not turn too sharply from)
        From ``decoders.make_direction_decoder``.
    params : TrackingParameters
    """

    def __init__(self, model, volume, stopping_criterion, seed_generator, decoder, params: TrackingParameters):
        self.model = model
        self.head = model.direction_getter
        self.volume = volume
        self.criterion = stopping_criterion
        self.seeds = seed_generator
        self.decoder = decoder
        self.params = params
        self.device = volume.device
        # theta >= 180 means no angle stop (dwi_ml's generation-validation passes 360)
        self.window = model.tracking_window
        self.cos_theta = (math.cos(math.radians(params.theta_deg)) if params.theta_deg < 180
                          else -math.inf)

    def track(self, n_seeds: int, progress=None) -> TrackingResult:
        """Track seeds ``0 .. n_seeds-1``; ``progress`` (e.g. tqdm) gets ``update(n)`` per finished batch."""
        return self.track_range(0, n_seeds, progress)

    @torch.no_grad()
    def track_range(self, start: int, end: int, progress=None) -> TrackingResult:
        """Track seeds ``start .. end-1`` of the seed sequence: the same streamlines as in ``track(n)`` for any
        n >= end (a seed's streamline depends only on its index), so ranges can be tracked apart and
        concatenated (``concatenate_results``)."""
        p = self.params
        n_slots = min(p.n_slots, max(end - start, 1))
        # One extra row: the scratch slot that absorbs the steps of rows stopped since the last check. A
        # previous range's state goes first: both at once would double the peak (GBs of caches on a GPU).
        self.model_state = self.slots = None
        self.model_state = self.model.new_tracking_state(self.volume, n_slots + 1, p.max_points)
        self.slots = SlotState.allocate(n_slots + 1, p.max_points, self.device)
        self.scratch = n_slots
        self._out = []
        next_seed = start
        while True:
            next_seed = self._turn_finish_and_refill(next_seed, end, n_slots, progress)
            if next_seed >= end and not bool(self.slots.live.any()):
                break
            rows = self.slots.active.nonzero().squeeze(1)  # fixed until the next check
            if len(rows):
                for _ in range(p.check_every):
                    self._accept_steps(rows, self._propose_steps(rows))
        return self._collect()

    # ---------------------------------------------------------------- one step, no host sync
    def _propose_steps(self, rows: torch.Tensor) -> StepProposal:
        """Run the model on ``rows`` (stopped ones on the scratch slot), decode one unit direction per row and
        test it: no finite direction, EOS above the threshold, turn sharper than theta."""
        s = self.slots
        # index_select, not s.x[rows]: 1-D advanced indexing is several times slower at these sizes.
        row_active = s.active.index_select(0, rows)
        lengths = s.lengths.index_select(0, rows)
        prev_dir = s.prev_dir.index_select(0, rows)
        has_prev = s.has_prev.index_select(0, rows)
        step_counter = s.step_counter.index_select(0, rows)
        model_rows = torch.where(row_active, rows, self.scratch)
        model_lengths = s.fed.index_select(0, model_rows) + 1  # [B], the point fed now included
        proposing = row_active & (model_lengths == lengths)
        window = self._last_points(model_rows, model_lengths)  # [B, W, 3]
        raw = self.model.tracking_step(self.model_state, model_rows, window, model_lengths)

        direction = self.decoder.directions(raw, s.seed_index.index_select(0, rows), step_counter, prev_dir,
                                            has_prev)
        direction = direction.to(torch.float32)
        norm = direction.norm(dim=1)
        no_direction = ~(norm > 1e-12) | ~torch.isfinite(norm)  # NaN norms fail both tests
        unit = torch.where(no_direction[:, None], 0.0, direction / norm.clamp_min(1e-12)[:, None])
        unit = torch.nan_to_num(unit)
        # A backward half whose forward half is only the seed takes its first step along -first_dir:
        # the model, given the same lone seed, would only repeat the step that failed.
        forced = s.forced.index_select(0, rows) & proposing
        unit = torch.where(forced[:, None], prev_dir, unit)
        no_direction &= ~forced

        eos = self._eos(raw)
        eos = torch.zeros_like(no_direction) if eos is None else eos & ~forced
        cosine = (unit * prev_dir).sum(dim=1)
        too_sharp = has_prev & (cosine < self.cos_theta) & ~no_direction
        valid = ~no_direction & ~eos & ~too_sharp
        last = window[torch.arange(len(rows), device=rows.device), model_lengths.clamp(max=self.window) - 1]
        return StepProposal(row_active, proposing, last, unit, no_direction, eos, too_sharp, valid,
                            lengths, prev_dir, has_prev, step_counter)

    def _eos(self, raw: torch.Tensor) -> torch.Tensor | None:
        """bool [B]: the head says 'end here' under the EOS rule; None without a rule or an EOS output."""
        threshold = self.params.eos_threshold
        if threshold is None:
            return None
        if threshold == EOS_MAX:
            return self.head.eos_is_most_likely(raw)
        probability = self.head.eos_probability(raw)
        return None if probability is None else probability > threshold

    def _last_points(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The model's window: the last ``min(lengths[b], W)`` points of each row first, [B, W, 3] (the
        padding after them repeats the last one). A step reads W points, whatever the streamlines' length."""
        steps = torch.arange(self.window, device=rows.device)
        first = (lengths - self.window).clamp(min=0)  # [B]
        index = torch.minimum(first[:, None] + steps, lengths[:, None] - 1)  # [B, W]
        return self.slots.positions[rows[:, None], index]

    def _accept_steps(self, rows: torch.Tensor, proposal: StepProposal) -> None:
        """Append the valid proposed points the stopping criterion allows, stop the rows that cannot go on
        (recording why) and update the direction bookkeeping of ``rows``."""
        p, s = self.params, self.slots
        row_active, proposing, lengths = proposal.row_active, proposal.proposing, proposal.lengths
        new_points = proposal.last + p.step_size_vox * proposal.unit
        status = self.criterion.check_points(new_points)
        in_tracking = status == StreamlineStatus.TRACKPOINT
        append = proposing & proposal.valid & (in_tracking | (not p.discard_last_point))
        new_lengths = lengths + append.long()
        keep_going = append & in_tracking & (new_lengths < p.max_points)

        # Write the new points by index (rows are distinct); rows that do not append write their current
        # value back. index_copy_ on flat views: advanced-index assignment is several times slower.
        flat_positions = s.positions.view(-1, 3)
        write_at = rows * p.max_points + lengths.clamp(max=p.max_points - 1)
        current = flat_positions.index_select(0, write_at)
        flat_positions.index_copy_(0, write_at, torch.where(append[:, None], new_points, current))
        s.lengths.index_copy_(0, rows, new_lengths)

        backward = s.backward.index_select(0, rows)
        first_step = proposing & ~backward & (proposal.step_counter == 0)
        s.first_dir.index_copy_(0, rows, torch.where(first_step[:, None], proposal.unit,
                                                     s.first_dir.index_select(0, rows)))
        s.prev_dir.index_copy_(0, rows, torch.where(append[:, None], proposal.unit, proposal.prev_dir))
        s.has_prev.index_copy_(0, rows, proposal.has_prev | append)
        s.step_counter.index_add_(0, rows, proposing.long())  # rows are distinct
        s.fed.index_add_(0, rows, row_active.long())
        s.forced.index_fill_(0, rows, False)

        stopping = proposing & ~keep_going
        reason = _stop_reasons(status, proposal)
        flat_reasons = s.end_reasons.view(-1)
        end_at = rows * 2 + backward.long()
        flat_reasons.index_copy_(0, end_at, torch.where(stopping, reason.to(torch.int8),
                                                        flat_reasons.index_select(0, end_at)))
        s.active.index_copy_(0, rows, row_active & (keep_going | ~proposing))

    # ---------------------------------------------------------------- the periodic host check
    def _turn_finish_and_refill(self, next_seed: int, end: int, n_slots: int, progress) -> int:
        """The host check between step blocks: turn the forward halves that ended around (when a backward
        half may follow), copy finished streamlines out and free their slots, then start seeds
        ``next_seed, ...`` (< end) in the free slots. Returns the next seed index still to start."""
        p, s = self.params, self.slots
        ended = s.live & ~s.active
        can_go_back = ~s.backward & (s.lengths < p.max_points)
        if p.track_forward_only:
            can_go_back = torch.zeros_like(can_go_back)
        turn = ended & can_go_back
        done = ended & ~can_go_back
        turn_rows, done_rows = turn.nonzero().squeeze(1), done.nonzero().squeeze(1)  # the one sync

        if len(done_rows):
            self._copy_out(done_rows)
            s.live[done_rows] = False
            if progress is not None:
                progress.update(len(done_rows))
        if len(turn_rows):
            self._turn_back(turn_rows)

        free = (~s.live[:n_slots]).nonzero().squeeze(1)
        n_new = min(len(free), end - next_seed)
        if n_new > 0:
            self._start_seeds(free[:n_new], torch.arange(next_seed, next_seed + n_new, device=self.device))
        return next_seed + max(n_new, 0)

    def _copy_out(self, rows: torch.Tensor) -> None:
        s = self.slots
        lengths = s.lengths[rows]
        longest = int(lengths.max())
        padded = s.positions[rows, :longest].cpu().numpy()
        lengths = lengths.cpu().numpy()
        points = padded[np.arange(longest)[None, :] < lengths[:, None]]  # [sum lengths, 3], row order
        self._out.append((s.seed_index[rows].cpu().numpy(), lengths, points, s.end_reasons[rows].cpu().numpy()))

    def _turn_back(self, rows: torch.Tensor) -> None:
        """Reverse each forward half in place (seed last) and rebuild the model state from it."""
        s = self.slots
        lengths = s.lengths[rows]
        s.positions[rows] = reverse_prefixes(s.positions[rows], lengths)
        self._feed_prefixes(rows, lengths)
        # Backward starts against the first forward step, even when that step was not kept.
        s.prev_dir[rows] = -s.first_dir[rows]
        s.has_prev[rows] = s.first_dir[rows].abs().sum(dim=1) > 0
        s.forced[rows] = s.has_prev[rows] & (lengths == 1)
        s.backward[rows] = True
        s.active[rows] = True

    def _feed_prefixes(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        """Rebuild the rows' model state from their first ``lengths - 1`` points (the last one goes with the
        next step): at once where the model prefills prefixes, else by replaying them in the next steps."""
        s = self.slots
        if self.model.prefills_prefixes:
            self.model.reset_tracking_rows(self.model_state, rows, s.positions[rows, :int(lengths.max())],
                                           lengths)
            s.fed[rows] = lengths - 1
        else:
            self.model.reset_tracking_rows(self.model_state, rows, s.positions[rows, :1],
                                           torch.ones_like(lengths))
            s.fed[rows] = 0

    def _start_seeds(self, rows: torch.Tensor, seed_indices: torch.Tensor) -> None:
        s = self.slots
        if hasattr(self.seeds, "start_points"):
            starts = self.seeds.start_points(seed_indices).to(s.positions.dtype)  # [B, K, 3]
        else:
            starts = self.seeds.positions(seed_indices).to(s.positions.dtype)[:, None]
        n_points = starts.shape[1]
        if n_points > 1 and not self.params.track_forward_only:
            # A backward half would start against a first step that the tracker never took.
            raise TrackflowError("streamlines that start as several points need track_forward_only")
        s.reset(rows)
        s.positions[rows, :n_points] = starts
        s.lengths[rows] = n_points
        s.seed_index[rows] = seed_indices
        if n_points > 1:
            last_step = starts[:, -1] - starts[:, -2]
            s.prev_dir[rows] = last_step / last_step.norm(dim=1, keepdim=True).clamp_min(1e-12)
            s.has_prev[rows] = True
        self._feed_prefixes(rows, s.lengths[rows])
        seeds = starts[:, -1]
        if self.params.discard_last_point:
            # Every kept point must be inside: a seed outside stays a single, finished point.
            outside = self.criterion.check_points(seeds) != StreamlineStatus.TRACKPOINT
            s.active[rows] = ~outside
            s.backward[rows] |= outside
            s.end_reasons[rows] = torch.where(outside[:, None], torch.tensor(
                int(StopReason.SEED_OUTSIDE_MASK), dtype=torch.int8, device=self.device), s.end_reasons[rows])

    def _collect(self) -> TrackingResult:
        if not self._out:
            return TrackingResult(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64),
                                  np.zeros((0, 3), np.float32), np.zeros((0, 2), np.int8))
        seed_indices, lengths, points, reasons = (np.concatenate(parts) for parts in zip(*self._out))
        order = np.argsort(seed_indices, kind="stable")
        lengths = lengths.astype(np.int64)
        gather = gather_ragged(offsets_from_lengths(lengths), lengths, order)
        seed_indices = seed_indices[order]
        seeds = self.seeds.positions(torch.as_tensor(seed_indices, device=self.device)).cpu().numpy()
        return TrackingResult(points[gather].astype(np.float32), lengths[order], seed_indices,
                              seeds.astype(np.float32), reasons[order])


def concatenate_results(results: list) -> TrackingResult:
    """One ``TrackingResult`` of consecutive seed ranges' results, given in seed order."""
    fields = ("points", "lengths", "seed_indices", "seeds", "end_reasons")
    return TrackingResult(*(np.concatenate([getattr(r, name) for r in results]) for name in fields))


def _stop_reasons(status: torch.Tensor, proposal: StepProposal) -> torch.Tensor:
    """Why each row would stop at this step, int8 [B] (``StopReason``): the refusals of the proposal first
    (no direction, then EOS, then angle), else the criterion's status, else the length limit."""
    reason = torch.full_like(status, StopReason.MAX_LENGTH)
    reason = torch.where(status == StreamlineStatus.ENDPOINT, StopReason.MASK, reason)
    reason = torch.where(status == StreamlineStatus.OUTSIDEIMAGE, StopReason.VOLUME, reason)
    reason = torch.where(proposal.too_sharp, StopReason.ANGLE, reason)
    reason = torch.where(proposal.eos, StopReason.EOS, reason)
    return torch.where(proposal.no_direction, StopReason.NO_DIRECTION, reason)
