"""Direction decoders: how the tracker turns the head's raw output into one direction per row.

The method is chosen once, before tracking (``make_direction_decoder``), so the step itself never asks
which one it runs. Both decoders take the same arguments; the deterministic one ignores the seed indices and
step counts, the sampled one keys its uniforms on them (``random.counter_uniforms``), so a streamline's
draws do not depend on the slot it is tracked in.
"""

import torch

from trackflow.errors import TrackflowError
from trackflow.tracking.random import DIRECTION_STREAM, counter_uniforms

ALGOS = ("det", "prob")


class DeterministicDecoder:
    """The head's most likely direction (``head.deterministic``)."""

    def __init__(self, head):
        self.head = head

    def directions(self, raw: torch.Tensor, seed_indices: torch.Tensor, step_counts: torch.Tensor
                   ) -> torch.Tensor:
        """raw [B, K] -> directions [B, 3] (not normalised; seed_indices, step_counts [B] unused)."""
        return self.head.deterministic(raw)


class SampledDecoder:
    """A direction drawn from the head's distribution with counter-based uniforms.

    Parameters
    ----------
    head : direction getter with ``supports_sampling``, ``n_uniforms`` and ``sample_from_uniforms``
    rng_seed : int
        Seeds the direction stream (``random.DIRECTION_STREAM``).
    """

    def __init__(self, head, rng_seed: int):
        if not getattr(head, "supports_sampling", False):
            raise TrackflowError(f"--algo prob needs a head that can sample; "
                                 f"{type(head).__name__} has no sampling (use --algo det)")
        self.head = head
        self.rng_seed = rng_seed

    def directions(self, raw: torch.Tensor, seed_indices: torch.Tensor, step_counts: torch.Tensor
                   ) -> torch.Tensor:
        """raw [B, K], seed_indices [B], step_counts [B] (steps already taken from each row's seed, both
        halves) -> directions [B, 3] (not normalised), a pure function of (rng_seed, seed index, count)."""
        u = counter_uniforms(self.rng_seed, DIRECTION_STREAM, seed_indices, step_counts, self.head.n_uniforms)
        return self.head.sample_from_uniforms(raw, u.to(raw.dtype))


def make_direction_decoder(algo: str, head, rng_seed: int):
    """The decoder for ``algo`` (one of ``ALGOS``): ``DeterministicDecoder`` or ``SampledDecoder``."""
    if algo == "det":
        return DeterministicDecoder(head)
    if algo == "prob":
        return SampledDecoder(head, rng_seed)
    raise TrackflowError(f"unknown tracking algorithm {algo!r} (det or prob)")
