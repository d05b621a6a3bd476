"""Row-block padding and 64-byte row alignment for CPU matrix products whose rows must not depend on
their neighbours (Learn2track tracking; see ``ROW_BLOCK``)."""

import torch

# Measured with MKL's sgemm and torch's CPU kernels (AVX-512, 1-8 threads), a row's result changes with:
# - the row count of a product: under MIN_ROWS rows MKL takes small-matrix kernels that sum in another order
#   (1-3 rows on one Xeon; up to 10-15 rows, by shape, on a Sapphire Rapids), and with several threads a
#   count that is not a multiple of 4;
# - where the row sits in memory: a row not starting on a 64-byte boundary is summed in another order.
# Tracking therefore computes on row blocks of at least MIN_ROWS rows padded to a multiple of ROW_BLOCK, and
# feeds every matrix product rows aligned to ALIGN_FLOATS: a row's result never depends on the other rows or
# the slot count.
ROW_BLOCK = 4
MIN_ROWS = 16
ALIGN_FLOATS = 16


def padded_row_count(n_rows: int, min_rows: int = MIN_ROWS) -> int:
    """``n_rows`` rounded up to a multiple of ``ROW_BLOCK``, and to at least ``min_rows``."""
    return max(min_rows, -(-n_rows // ROW_BLOCK) * ROW_BLOCK)


def pad_rows_index(n_rows: int, device, min_rows: int = MIN_ROWS) -> torch.Tensor:
    """Indices [0, n_rows) followed by zeros up to ``padded_row_count(n_rows, min_rows)``: index_select with
    it repeats row 0 as padding (any content would do; rows never mix). ``min_rows`` below MIN_ROWS suits
    callers whose products get MIN_ROWS rows or more anyway (several tokens per row)."""
    index = torch.zeros(padded_row_count(n_rows, min_rows), dtype=torch.long, device=device)
    index[:n_rows] = torch.arange(n_rows, device=device)
    return index


def aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """Same values as x [B, K], as a view whose rows start on 64-byte boundaries (see ALIGN_FLOATS).

    Rows that are already aligned are returned as they are; otherwise they are copied into a buffer whose
    row stride is K rounded up to ALIGN_FLOATS (torch's CPU allocator aligns the buffer itself). Only
    CPU tensors are changed: the alignment rule is MKL's.
    """
    row_bytes = x.stride(0) * x.element_size()
    if x.device.type != "cpu" or (x.stride(1) == 1 and row_bytes % 64 == 0 and x.data_ptr() % 64 == 0):
        return x
    width = -(-x.shape[1] // ALIGN_FLOATS) * ALIGN_FLOATS
    out = x.new_empty(x.shape[0], width)[:, :x.shape[1]]
    return out.copy_(x)


def aligned_tokens(x: torch.Tensor) -> torch.Tensor:
    """:func:`aligned_rows` for x [..., K]: every last-dimension row on a 64-byte boundary, same shape."""
    return aligned_rows(x.reshape(-1, x.shape[-1])).unflatten(0, x.shape[:-1])
