"""The batched tracker: one engine for every model, all state on the device, slots refilled as lines end.

The tracker only knows the model's tracking interface (``docs/design.md``): ``new_tracking_state``,
``tracking_step``, ``reset_tracking_rows`` and the head ``direction_getter``. Where a point may go is the
stopping criterion's business (``stopping.py``); seeds come from a ``SeedGenerator``.

Layout: ``n_slots`` slots, each holding one streamline in ``positions[slot, :lengths[slot]]``. A slot is
*live* while it holds a streamline not yet copied out and *active* while that streamline is growing. Steps
run on a fixed set of rows taken at the last check, with no host synchronisation; rows that stopped since
are redirected to one extra scratch slot (index ``n_slots``) so that the model never sees a stopped row
again. Every ``check_every`` steps one small host check (a) turns finished forward halves around (reversed
in place, seed last, the model state rebuilt with ``reset_tracking_rows``), (b) copies finished streamlines
out in bulk and (c) refills the free slots with the next seeds.

Rules (spec §6.4, with dwi_ml's defects fixed): a new point is refused when the head gives no finite
direction, when EOS is above the threshold, or when the turn exceeds theta; otherwise it is appended, even
outside the mask (the first point outside is kept) unless ``discard_last_point``; the total over both halves
never exceeds ``max_points``. A seed whose first forward step failed still gets its backward half, whose
first step is forced along the opposite of that refused first direction. Randomness comes from
``counter_uniforms`` keyed by seed index and step count, so results do not depend on the slot count.
"""

import enum
import math
from dataclasses import dataclass

import numpy as np
import torch

from trackflow.errors import TrackflowError
from trackflow.tracking.random import DIRECTION_STREAM, counter_uniforms
from trackflow.tracking.stopping import StreamlineStatus



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
    is above it (None: never); algo: ``"det"`` or ``"prob"``; rng_seed: seeds the sampling streams;
    discard_last_point: keep only points inside the tracking criterion; n_slots: streamlines tracked at
    once; check_every: steps between host checks.
    """

    step_size_vox: float
    max_points: int
    theta_deg: float = 90.0
    eos_threshold: float | None = None
    algo: str = "det"
    rng_seed: int = 0
    track_forward_only: bool = False
    discard_last_point: bool = False
    n_slots: int = 1000
    check_every: int = 4

    def __post_init__(self):
        # The user-facing rules (algo, step size, lengths, slot count) are tracking.run.TrackingOptions';
        # these two size the engine's buffers and loop.
        if self.max_points < 1:
            raise TrackflowError("the maximum length allows no step; raise --max_length")
        if self.check_every < 1:
            raise TrackflowError(f"check_every must be at least 1, got {self.check_every}")


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
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)


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


class Tracker:
    """Batched tracking of ``n_seeds`` seeds with a model that implements the tracking interface.

    Parameters
    ----------
    model : MainModel-like
        ``new_tracking_state``, ``tracking_step``, ``reset_tracking_rows``, ``direction_getter``.
    volume : Tensor [X, Y, Z, F]
        Model input volume, on the tracking device.
    stopping_criterion : object with ``check_points(points[B, 3]) -> int8[B]`` (``StreamlineStatus``)
    seed_generator : object with ``positions(seed_indices[B]) -> [B, 3]``
    params : TrackingParameters
    """

    def __init__(self, model, volume, stopping_criterion, seed_generator, params: TrackingParameters):
        self.model = model
        self.head = model.direction_getter
        if params.algo == "prob" and not getattr(self.head, "supports_sampling", False):
            raise TrackflowError(f"--algo prob needs a head that can sample; "
                                 f"{type(self.head).__name__} has no sampling (use --algo det)")
        self.volume = volume
        self.criterion = stopping_criterion
        self.seeds = seed_generator
        self.params = params
        self.device = volume.device
        # theta >= 180 means no angle stop (dwi_ml's generation-validation passes 360)
        self.cos_theta = (math.cos(math.radians(params.theta_deg)) if params.theta_deg < 180
                          else -math.inf)

    @torch.no_grad()
    def track(self, n_seeds: int, progress=None) -> TrackingResult:
        """Track seeds ``0 .. n_seeds-1``; ``progress`` (e.g. tqdm) gets ``update(n)`` per finished batch."""
        p, dev = self.params, self.device
        n_slots = min(p.n_slots, max(n_seeds, 1))
        scratch = n_slots
        # One extra row: the scratch slot that absorbs the steps of rows stopped since the last check.
        self.state = self.model.new_tracking_state(self.volume, n_slots + 1, p.max_points)
        self.positions = torch.zeros(n_slots + 1, p.max_points, 3, device=dev)
        self.lengths = torch.ones(n_slots + 1, dtype=torch.long, device=dev)
        self.live = torch.zeros(n_slots + 1, dtype=torch.bool, device=dev)
        self.active = torch.zeros(n_slots + 1, dtype=torch.bool, device=dev)
        self.backward = torch.zeros(n_slots + 1, dtype=torch.bool, device=dev)
        self.seed_index = torch.zeros(n_slots + 1, dtype=torch.long, device=dev)
        self.step_counter = torch.zeros(n_slots + 1, dtype=torch.long, device=dev)
        self.prev_dir = torch.zeros(n_slots + 1, 3, device=dev)
        self.has_prev = torch.zeros(n_slots + 1, dtype=torch.bool, device=dev)
        self.first_dir = torch.zeros(n_slots + 1, 3, device=dev)
        self.forced = torch.zeros(n_slots + 1, dtype=torch.bool, device=dev)
        self.end_reasons = torch.zeros(n_slots + 1, 2, dtype=torch.int8, device=dev)
        self.scratch = scratch
        self._out = []
        next_seed = 0
        while True:
            next_seed = self._check(next_seed, n_seeds, n_slots, progress)
            if next_seed >= n_seeds and not bool(self.live.any()):
                break
            rows = self.active.nonzero().squeeze(1)  # fixed until the next check
            if len(rows):
                for _ in range(p.check_every):
                    self._step(rows)
        return self._collect()

    # ---------------------------------------------------------------- one step, no host sync
    def _step(self, rows: torch.Tensor) -> None:
        p = self.params
        row_active = self.active[rows]
        model_rows = torch.where(row_active, rows, self.scratch)
        points = self.positions[model_rows]  # [B, T, 3]
        model_lengths = self.lengths[model_rows]  # [B]
        raw = self.model.tracking_step(self.state, model_rows, points, model_lengths)

        if p.algo == "prob":
            u = counter_uniforms(p.rng_seed, DIRECTION_STREAM, self.seed_index[rows], self.step_counter[rows],
                                 self.head.n_uniforms)
            direction = self.head.sample_from_uniforms(raw, u.to(raw.dtype))
        else:
            direction = self.head.deterministic(raw)
        direction = direction.to(torch.float32)
        norm = direction.norm(dim=1)
        no_direction = ~(norm > 1e-12) | ~torch.isfinite(norm)  # NaN norms fail both tests
        unit = torch.where(no_direction[:, None], 0.0, direction / norm.clamp_min(1e-12)[:, None])
        unit = torch.nan_to_num(unit)
        # A backward half whose forward half is only the seed takes its first step along -first_dir:
        # the model, given the same lone seed, would only repeat the step that failed.
        forced = self.forced[rows] & row_active
        unit = torch.where(forced[:, None], self.prev_dir[rows], unit)
        no_direction &= ~forced

        eos = torch.zeros_like(no_direction)
        if p.eos_threshold is not None:
            eos_probability = self.head.eos_probability(raw)
            if eos_probability is not None:
                eos = (eos_probability > p.eos_threshold) & ~forced
        cosine = (unit * self.prev_dir[rows]).sum(dim=1)
        too_sharp = self.has_prev[rows] & (cosine < self.cos_theta) & ~no_direction
        valid = ~no_direction & ~eos & ~too_sharp

        lengths = self.lengths[rows]
        last = points[torch.arange(len(rows), device=rows.device), model_lengths - 1]
        new_points = last + p.step_size_vox * unit
        status = self.criterion.check_points(new_points)
        in_tracking = status == StreamlineStatus.TRACKPOINT
        append = row_active & valid & (in_tracking | (not p.discard_last_point))
        new_lengths = lengths + append.long()
        keep_going = append & in_tracking & (new_lengths < p.max_points)

        # Write the new points by index; rows that do not append write their current value back.
        write_at = lengths.clamp(max=p.max_points - 1)
        current = self.positions[rows, write_at]
        self.positions[rows, write_at] = torch.where(append[:, None], new_points, current)
        self.lengths[rows] = new_lengths

        first_step = row_active & ~self.backward[rows] & (self.step_counter[rows] == 0)
        self.first_dir[rows] = torch.where(first_step[:, None], unit, self.first_dir[rows])
        self.prev_dir[rows] = torch.where(append[:, None], unit, self.prev_dir[rows])
        self.has_prev[rows] |= append
        self.step_counter[rows] += row_active.long()
        self.forced[rows] = False

        stopping = row_active & ~keep_going
        reason = torch.full_like(status, StopReason.MAX_LENGTH)
        reason = torch.where(status == StreamlineStatus.ENDPOINT, StopReason.MASK, reason)
        reason = torch.where(status == StreamlineStatus.OUTSIDEIMAGE, StopReason.VOLUME, reason)
        reason = torch.where(too_sharp, StopReason.ANGLE, reason)
        reason = torch.where(eos, StopReason.EOS, reason)
        reason = torch.where(no_direction, StopReason.NO_DIRECTION, reason)
        end = self.backward[rows].long()
        flat = self.end_reasons.view(-1)
        flat[rows * 2 + end] = torch.where(stopping, reason.to(torch.int8), flat[rows * 2 + end])
        self.active[rows] = row_active & keep_going

    # ---------------------------------------------------------------- the periodic host check
    def _check(self, next_seed: int, n_seeds: int, n_slots: int, progress) -> int:
        p = self.params
        ended = self.live & ~self.active
        can_go_back = ~self.backward & (self.lengths < p.max_points)
        if p.track_forward_only:
            can_go_back = torch.zeros_like(can_go_back)
        turn = ended & can_go_back
        done = ended & ~can_go_back
        turn_rows, done_rows = turn.nonzero().squeeze(1), done.nonzero().squeeze(1)  # the one sync

        if len(done_rows):
            self._copy_out(done_rows)
            self.live[done_rows] = False
            if progress is not None:
                progress.update(len(done_rows))
        if len(turn_rows):
            self._turn_back(turn_rows)

        free = (~self.live[:n_slots]).nonzero().squeeze(1)
        n_new = min(len(free), n_seeds - next_seed)
        if n_new > 0:
            self._start_seeds(free[:n_new], torch.arange(next_seed, next_seed + n_new, device=self.device))
        return next_seed + max(n_new, 0)

    def _copy_out(self, rows: torch.Tensor) -> None:
        lengths = self.lengths[rows]
        longest = int(lengths.max())
        padded = self.positions[rows, :longest].cpu().numpy()
        lengths = lengths.cpu().numpy()
        points = padded[np.arange(longest)[None, :] < lengths[:, None]]  # [sum lengths, 3], row order
        self._out.append((self.seed_index[rows].cpu().numpy(), lengths, points,
                          self.end_reasons[rows].cpu().numpy()))

    def _turn_back(self, rows: torch.Tensor) -> None:
        """Reverse each forward half in place (seed last) and rebuild the model state from it."""
        lengths = self.lengths[rows]
        self.positions[rows] = reverse_prefixes(self.positions[rows], lengths)
        self.model.reset_tracking_rows(self.state, rows, self.positions[rows], lengths)
        # Backward starts against the first forward step, even when that step was not kept.
        self.prev_dir[rows] = -self.first_dir[rows]
        self.has_prev[rows] = self.first_dir[rows].abs().sum(dim=1) > 0
        self.forced[rows] = self.has_prev[rows] & (lengths == 1)
        self.backward[rows] = True
        self.active[rows] = True

    def _start_seeds(self, rows: torch.Tensor, seed_indices: torch.Tensor) -> None:
        seeds = self.seeds.positions(seed_indices).to(self.positions.dtype)
        self.positions[rows] = 0.0
        self.positions[rows, 0] = seeds
        self.lengths[rows] = 1
        self.seed_index[rows] = seed_indices
        self.step_counter[rows] = 0
        self.prev_dir[rows] = 0.0
        self.has_prev[rows] = False
        self.first_dir[rows] = 0.0
        self.forced[rows] = False
        self.end_reasons[rows] = StopReason.NOT_TRACKED
        self.backward[rows] = False
        self.live[rows] = True
        self.active[rows] = True
        self.model.reset_tracking_rows(self.state, rows, self.positions[rows, :1],
                                       torch.ones_like(seed_indices))
        if self.params.discard_last_point:
            # Every kept point must be inside: a seed outside stays a single, finished point.
            outside = self.criterion.check_points(seeds) != StreamlineStatus.TRACKPOINT
            self.active[rows] = ~outside
            self.backward[rows] |= outside
            self.end_reasons[rows] = torch.where(outside[:, None], torch.tensor(
                int(StopReason.SEED_OUTSIDE_MASK), dtype=torch.int8, device=self.device),
                self.end_reasons[rows])

    def _collect(self) -> TrackingResult:
        if not self._out:
            return TrackingResult(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64),
                                  np.zeros((0, 3), np.float32), np.zeros((0, 2), np.int8))
        seed_indices, lengths, points, reasons = (np.concatenate(parts) for parts in zip(*self._out))
        order = np.argsort(seed_indices, kind="stable")
        lengths = lengths.astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        new_lengths = lengths[order]
        new_offsets = np.concatenate([[0], np.cumsum(new_lengths)[:-1]])
        # Each output point j of streamline i comes from old offset[order[i]] + (j - new_offset[i]).
        gather = np.repeat(offsets[order] - new_offsets, new_lengths) + np.arange(new_lengths.sum())
        seed_indices = seed_indices[order]
        seeds = self.seeds.positions(torch.as_tensor(seed_indices, device=self.device)).cpu().numpy()
        return TrackingResult(points[gather].astype(np.float32), new_lengths, seed_indices,
                              seeds.astype(np.float32), reasons[order])
