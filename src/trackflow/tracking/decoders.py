"""Direction decoders: how the tracker turns the head's raw output into one direction per row.

The method is chosen once, before tracking (``make_direction_decoder``), so the step itself never asks
which one it runs. Both decoders take the same arguments; the deterministic one reads the raw output and
the previous step, the sampled one also keys its uniforms on the seed indices and step counts
(``random.counter_uniforms``), so a streamline's draws do not depend on the slot it is tracked in.

Deterministic directions (``DET_DIRECTIONS``): ``cone``, the classical rule (dipy's and scilpy's det), takes
the head's most likely direction among those within theta of the previous step (``head.deterministic_in_cone``:
the best vertex of a classification head, the best component of a mixture; a one-mode head has no other
candidate); ``full`` takes its overall most likely direction, as dwi_ml does, and a sharper one ends the
streamline.

Probabilistic sampling (``PROB_SAMPLINGS``): ``cone``, the classical rule (dipy's and scilpy's probabilistic
tracking), draws from the head's distribution restricted to the directions within theta of the previous step
(``head.sample_in_cone``); ``full`` draws from the whole distribution, as dwi_ml does, and leaves the angle
test to refuse a sharp draw (the streamline then ends). A step with no previous direction (a seed's first
step) draws from the whole distribution either way.
"""

import math

import torch

from trackflow.errors import TrackflowError
from trackflow.tracking.random import DIRECTION_STREAM, counter_uniforms

ALGOS = ("det", "prob")
PROB_SAMPLINGS = ("cone", "full")
DET_DIRECTIONS = ("cone", "full")


class DeterministicDecoder:
    """The head's most likely direction (``head.deterministic``), or with ``cos_theta`` its most likely
    direction within theta of the previous step (``head.deterministic_in_cone``)."""

    def __init__(self, head, cos_theta: float | None = None):
        self.head = head
        self.cos_theta = cos_theta

    def directions(self, raw: torch.Tensor, seed_indices: torch.Tensor, step_counts: torch.Tensor,
                   previous: torch.Tensor, has_previous: torch.Tensor) -> torch.Tensor:
        """raw [B, K], previous [B, 3], has_previous bool [B] -> directions [B, 3] (not normalised; the
        seed indices and step counts are unused)."""
        best = self.head.deterministic(raw)
        if self.cos_theta is None:
            return best
        in_cone = self.head.deterministic_in_cone(raw, previous.to(raw.dtype), self.cos_theta)
        return torch.where(has_previous[:, None], in_cone, best)


class SampledDecoder:
    """A direction drawn from the head's distribution with counter-based uniforms.

    Parameters
    ----------
    head : direction getter with ``supports_sampling``, ``n_uniforms`` and ``sample_from_uniforms`` (and, for
        the cone, ``n_cone_uniforms`` and ``sample_in_cone``)
    rng_seed : int
        Seeds the direction stream (``random.DIRECTION_STREAM``).
    cos_theta : float or None
        Sample within the cone of directions whose cosine with the previous step is >= cos_theta; None: the
        whole distribution.
    """

    def __init__(self, head, rng_seed: int, cos_theta: float | None = None):
        if not getattr(head, "supports_sampling", False):
            raise TrackflowError(f"--algo prob needs a head that can sample; "
                                 f"{type(head).__name__} has no sampling (use --algo det)")
        self.head = head
        self.rng_seed = rng_seed
        self.cos_theta = cos_theta

    def directions(self, raw: torch.Tensor, seed_indices: torch.Tensor, step_counts: torch.Tensor,
                   previous: torch.Tensor, has_previous: torch.Tensor) -> torch.Tensor:
        """raw [B, K], seed_indices [B], step_counts [B] (steps already taken from each row's seed, both
        halves), previous [B, 3] (unit previous step), has_previous bool [B] -> directions [B, 3] (not
        normalised), a pure function of (rng_seed, seed index, count) and the row's own inputs."""
        n_uniforms = self.head.n_uniforms if self.cos_theta is None else max(self.head.n_uniforms,
                                                                              self.head.n_cone_uniforms)
        u = counter_uniforms(self.rng_seed, DIRECTION_STREAM, seed_indices, step_counts, n_uniforms).to(raw.dtype)
        whole = self.head.sample_from_uniforms(raw, u[:, :self.head.n_uniforms])
        if self.cos_theta is None:
            return whole
        in_cone = self.head.sample_in_cone(raw, u[:, :self.head.n_cone_uniforms], previous.to(raw.dtype),
                                           self.cos_theta)
        return torch.where(has_previous[:, None], in_cone, whole)


def make_direction_decoder(algo: str, head, rng_seed: int, prob_sampling: str = "cone",
                           theta_deg: float = 180.0, det_direction: str = "full"):
    """The decoder for ``algo`` (one of ``ALGOS``): ``DeterministicDecoder``, within the ``theta_deg`` cone
    (``det_direction`` 'cone', one of ``DET_DIRECTIONS``) or not ('full'), or ``SampledDecoder``, within the
    cone (``prob_sampling`` 'cone', one of ``PROB_SAMPLINGS``) or not ('full')."""
    if prob_sampling not in PROB_SAMPLINGS:
        raise TrackflowError(f"unknown --prob_sampling {prob_sampling!r} (one of {', '.join(PROB_SAMPLINGS)})")
    if det_direction not in DET_DIRECTIONS:
        raise TrackflowError(f"unknown --det_direction {det_direction!r} (one of {', '.join(DET_DIRECTIONS)})")
    # theta >= 180: the cone is the whole sphere (no angle stop either, see Tracker)
    cos_theta = math.cos(math.radians(theta_deg)) if theta_deg < 180 else None
    if algo == "det":
        return DeterministicDecoder(head, cos_theta if det_direction == "cone" else None)
    if algo == "prob":
        return SampledDecoder(head, rng_seed, cos_theta if prob_sampling == "cone" else None)
    raise TrackflowError(f"unknown tracking algorithm {algo!r} (det or prob)")
