"""Counter-based random numbers for tracking, computed on the device.

A stateful generator hands out numbers in the order they are requested, so the values a streamline gets
would depend on how many slots run at once and on the order streamlines finish in. Here every number is a
pure function of ``(rng_seed, stream, seed_index, counter, k)``: a SplitMix64-style integer hash in int64
torch ops. The same seed index therefore gets the same seed position and the same sampled directions
whatever ``--simultaneous_tracking`` is.
"""

import torch

_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    """Two's-complement view of an unsigned 64-bit constant, so torch can hold it in an int64."""
    value &= _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN_GAMMA = _as_int64(0x9E3779B97F4A7C15)
_MIX_1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX_2 = _as_int64(0x94D049BB133111EB)

# Streams: one per use, so that seed offsets and direction sampling never share numbers.
SEED_OFFSET_STREAM = 1
DIRECTION_STREAM = 2


def _shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking the sign-extended bits gives the unsigned shift.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (multiplication wraps modulo 2**64, as in C)."""
    x = x + _GOLDEN_GAMMA
    x = (x ^ _shift_right_logical(x, 30)) * _MIX_1
    x = (x ^ _shift_right_logical(x, 27)) * _MIX_2
    return x ^ _shift_right_logical(x, 31)


def counter_uniforms(rng_seed: int, stream: int, seed_index: torch.Tensor, counter: torch.Tensor | int,
                     n_uniforms: int) -> torch.Tensor:
    """Uniform numbers in the open interval (0, 1), one row per seed index.

    Parameters
    ----------
    rng_seed : int
        User seed (any Python int; reduced modulo 2**64).
    stream : int
        Purpose of the numbers (``SEED_OFFSET_STREAM``, ``DIRECTION_STREAM``).
    seed_index : LongTensor [B]
        Global index of each streamline's seed.
    counter : LongTensor [B] or int
        Step counter of each streamline (the same numbers come back for the same counter).
    n_uniforms : int
        Numbers per row (K).

    Returns
    -------
    Tensor [B, K], float32 on ``seed_index``'s device, values (j + 0.5) / 2**23 with j < 2**23, so never
    exactly 0 or 1.
    """
    device = seed_index.device
    key = _mix(torch.full((), _as_int64(rng_seed), dtype=torch.int64, device=device) ^ stream)
    h = _mix(key ^ seed_index.to(torch.int64))
    h = _mix(h ^ torch.as_tensor(counter, dtype=torch.int64, device=device))  # [B]
    k = torch.arange(n_uniforms, dtype=torch.int64, device=device)
    h = _mix(h[:, None] ^ k)  # [B, K]
    # 23 bits so that (j + 0.5) / 2**23 is exact in float32 and strictly inside (0, 1).
    top_bits = _shift_right_logical(h, 41)
    return ((top_bits.to(torch.float32) + 0.5) * (1.0 / (1 << 23)))
