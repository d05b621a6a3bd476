"""Length selection of tracked streamlines, in mm measured on what is written.

``select_by_length`` (bounds inclusive, scilpy's rule) is the one length rule; ``filter_streamlines``
applies it to a ``TrackingResult`` (numpy arrays copied out of the tracker) after the optional compression:
what the tracking scripts write. Lengths are in mm, never in points, so ``--min_length 10`` never keeps a
9 mm streamline (dwi_ml counted points). Tractogram files are filtered by
``evaluation.length_filter``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from nibabel.streamlines import ArraySequence

from trackflow.data.streamlines import array_sequence_from_parts, compress, euclidean_lengths

if TYPE_CHECKING:  # filtering needs no torch
    from trackflow.tracking.tracker import TrackingResult


@dataclass
class LengthSelection:
    """Which of B streamlines have ``min_length <= length <= max_length``.

    kept: int64 [B'] indices, increasing; n_too_short / n_too_long: rejected counts.
    """

    kept: np.ndarray
    n_too_short: int
    n_too_long: int


# Lengths measured on float32 points differ from their number of steps x the step by up to ~1e-4 mm over
# a few hundred steps: a streamline the tracker stopped at exactly max_length must not be dropped by it.
ROUNDING_MM = 1e-3


def select_by_length(lengths_mm: np.ndarray, min_length_mm: float, max_length_mm: float) -> LengthSelection:
    """Keep the streamlines whose length (mm, [B]) lies in ``[min_length_mm, max_length_mm]`` (inclusive,
    each bound widened by ``ROUNDING_MM``)."""
    lengths_mm = np.asarray(lengths_mm, dtype=np.float64)
    too_short = lengths_mm < min_length_mm - ROUNDING_MM
    too_long = lengths_mm > max_length_mm + ROUNDING_MM
    return LengthSelection(np.flatnonzero(~too_short & ~too_long), int(too_short.sum()), int(too_long.sum()))


@dataclass
class FilteredTractogram:
    """Kept streamlines (vox/corner), their seeds (vox/corner), lengths (mm) and indices in the result.

    streamlines: ArraySequence of S' streamlines; seeds: float32 [S', 3]; lengths_mm: [S'];
    kept: int64 [S'] indices into the ``TrackingResult``; n_too_short / n_too_long: rejected counts.
    """

    streamlines: ArraySequence
    seeds: np.ndarray
    lengths_mm: np.ndarray
    kept: np.ndarray
    n_too_short: int
    n_too_long: int


def filter_streamlines(result: TrackingResult, voxel_size_mm: float, min_length_mm: float,
                       max_length_mm: float, compress_mm: float | None = None) -> FilteredTractogram:
    """Compress (optional), then keep streamlines with ``min_length <= length <= max_length`` (mm, up to
    the rounding of float32 points, ``ROUNDING_MM``).

    Parameters
    ----------
    result : TrackingResult
        S streamlines in vox/corner.
    voxel_size_mm : float
        Isotropic voxel size, to convert voxel lengths and the tolerance.
    min_length_mm, max_length_mm : float
    compress_mm : float or None
        Compression tolerance in mm (None: no compression).
    """
    streamlines = array_sequence_from_parts(result.points, result.offsets, result.lengths)
    if compress_mm is not None and len(streamlines):
        streamlines = compress(streamlines, compress_mm / voxel_size_mm)
    lengths_mm = euclidean_lengths(streamlines) * voxel_size_mm
    selection = select_by_length(lengths_mm, min_length_mm, max_length_mm)
    kept = selection.kept
    return FilteredTractogram(streamlines[kept], result.seeds[kept], lengths_mm[kept], kept,
                              selection.n_too_short, selection.n_too_long)
