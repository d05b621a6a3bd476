"""Length filtering in mm, measured on what is written.

``select_by_length`` (bounds inclusive, scilpy's rule) filters a ``TrackingResult`` after the optional
compression (``filter_streamlines``, what the tracking scripts write) without leaving the device arrays;
tractogram files go through scilpy's ``filter_streamlines_by_length`` (``filter_tractogram_by_length``,
``trackflow_filter_by_length``, which also writes a one-row TSV of counts and length statistics). Lengths are in mm, never in points, so
``--min_length 10`` never keeps a 9 mm streamline (dwi_ml counted points).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from dipy.io.streamline import save_tractogram
from nibabel.streamlines import ArraySequence

from trackflow.data.streamlines import array_sequence_from_parts, compress, euclidean_lengths
from trackflow.errors import TrackflowError
from trackflow.files import atomic_output, check_inputs, check_outputs
from trackflow.tracking.output import load_tractogram_file

if TYPE_CHECKING:  # the file filter (its own console script) should not pay for importing torch
    from trackflow.tracking.tracker import TrackingResult

LOGGER = logging.getLogger(__name__)

# Columns of the counts TSV (one row per subject and model), read back by ``visualization.summary``.
KEYS = ["subject", "model"]
COUNT_COLUMNS = ["n_before", "n_after", "mean_length_before_mm", "median_length_before_mm",
                 "mean_length_after_mm", "median_length_after_mm"]


@dataclass
class LengthSelection:
    """Which of B streamlines have ``min_length <= length <= max_length``.

    kept: int64 [B'] indices, increasing; n_too_short / n_too_long: rejected counts.
    """

    kept: np.ndarray
    n_too_short: int
    n_too_long: int


def select_by_length(lengths_mm: np.ndarray, min_length_mm: float, max_length_mm: float) -> LengthSelection:
    """Keep the streamlines whose length (mm, [B]) lies in ``[min_length_mm, max_length_mm]`` (inclusive)."""
    lengths_mm = np.asarray(lengths_mm, dtype=np.float64)
    too_short = lengths_mm < min_length_mm
    too_long = lengths_mm > max_length_mm
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
    """Compress (optional), then keep streamlines with ``min_length <= length <= max_length`` (mm).

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


def _length_stats(lengths_mm: np.ndarray, when: str) -> dict:
    empty = len(lengths_mm) == 0
    return {f"mean_length_{when}_mm": np.nan if empty else float(np.mean(lengths_mm)),
            f"median_length_{when}_mm": np.nan if empty else float(np.median(lengths_mm))}


def filter_tractogram_by_length(in_tractogram, out_tractogram, out_counts, min_length: float = 0.0,
                                max_length: float = np.inf, subject: str | None = None, model: str | None = None,
                                reference=None, overwrite: bool = False) -> dict:
    """Keep streamlines with ``min_length <= length <= max_length`` (mm) and write their counts.

    Parameters
    ----------
    in_tractogram, out_tractogram : path
        ``.trk``, ``.trx`` or ``.tck`` (with ``reference``); per-streamline and per-point data are kept.
    out_counts : path
        One-row TSV: subject, model, n_before, n_after, mean/median length before and after (mm; NA when
        there is no streamline).
    min_length, max_length : float
        Bounds in mm, inclusive.
    subject, model : str or None
        Row labels; default: the input's folder name and file stem (``<subject>/<model>.trk``).
    reference : path or None
        Image of the grid, for ``.tck`` only.

    Returns
    -------
    dict
        The TSV row.
    """
    in_tractogram, out_tractogram, out_counts = Path(in_tractogram), Path(out_tractogram), Path(out_counts)
    check_inputs([in_tractogram, reference])
    check_outputs([out_tractogram, out_counts], overwrite)
    if not 0 <= min_length <= max_length:
        raise TrackflowError(f"lengths must satisfy 0 <= --minL <= --maxL, got {min_length} and {max_length}")
    if out_tractogram.suffix.lower() == ".tck" and in_tractogram.suffix.lower() != ".tck":
        LOGGER.warning("writing .tck: per-streamline and per-point data are dropped")

    sft = load_tractogram_file(in_tractogram, reference)
    sft.to_rasmm()  # lengths in mm on any grid, anisotropic voxels included
    lengths_before = euclidean_lengths(sft.streamlines)
    # scilpy's own filter rather than a rewrite; it keeps the dps/dpp of kept lines. Imported here: it
    # costs over a second, which the tracking scripts (users of this module) should not pay.
    from scilpy.tractograms.streamline_operations import filter_streamlines_by_length

    filtered, kept = filter_streamlines_by_length(sft, min_length, max_length)
    lengths_after = lengths_before[np.asarray(kept, dtype=bool)] if len(lengths_before) else lengths_before
    row = {"subject": subject if subject is not None else in_tractogram.parent.name,
           "model": model if model is not None else in_tractogram.name.split(".")[0],
           "n_before": len(lengths_before), "n_after": len(lengths_after),
           **_length_stats(lengths_before, "before"), **_length_stats(lengths_after, "after")}
    with atomic_output(out_tractogram) as tmp:
        save_tractogram(filtered, str(tmp), bbox_valid_check=False)
    with atomic_output(out_counts) as tmp:
        pd.DataFrame([row], columns=KEYS + COUNT_COLUMNS).to_csv(tmp, sep="\t", index=False, na_rep="NA")
    LOGGER.info("kept %d of %d streamlines (%g-%g mm): %s", row["n_after"], row["n_before"], min_length,
                max_length, out_tractogram)
    return row
