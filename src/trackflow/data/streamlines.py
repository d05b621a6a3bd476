"""Resampling, compression and lengths of ragged streamlines (thin wrappers around dipy).

Every function takes and returns ragged streamlines: a nibabel ``ArraySequence`` (or a list of
``[T_i, 3]`` arrays) whose element i is streamline i. Lengths, step sizes and tolerances are in the
units of the coordinates, so pass streamlines in RASMM to work in mm (as dwi_ml does at hdf5
creation).
"""

import numpy as np
from dipy.tracking.streamlinespeed import compress_streamlines, length, set_number_of_points
from nibabel.streamlines import ArraySequence

from trackflow.errors import TrackflowError


def _as_array_sequence(streamlines) -> ArraySequence:
    if isinstance(streamlines, ArraySequence):
        return streamlines
    # ArraySequence silently drops empty elements, which would shift per-streamline data.
    if any(len(s) == 0 for s in streamlines):
        raise TrackflowError("streamlines contain an empty (zero-point) streamline")
    return ArraySequence(streamlines)


def _check_resamplable(streamlines: ArraySequence) -> None:
    # dipy's set_number_of_points fills single-point streamlines with zeros instead of failing.
    short = np.flatnonzero(np.asarray(streamlines._lengths) < 2)
    if short.size:
        raise TrackflowError(f"{short.size} streamline(s) have fewer than 2 points (first: index "
                             f"{short[0]}) and cannot be resampled")


def euclidean_lengths(streamlines) -> np.ndarray:
    """Arc length of each streamline.

    Parameters
    ----------
    streamlines : ArraySequence or list of ndarray [T_i, 3]
        B streamlines.

    Returns
    -------
    ndarray [B] float64
        Sum of segment lengths, in coordinate units (mm for RASMM input); 0 for a single point.
    """
    streamlines = _as_array_sequence(streamlines)
    if len(streamlines) == 0:
        return np.zeros(0)
    return np.asarray(length(streamlines), dtype=np.float64)


def resample_nb_points(streamlines, nb_points: int) -> ArraySequence:
    """Resample every streamline to ``nb_points`` equally spaced points (endpoints kept).

    Parameters
    ----------
    streamlines : ArraySequence or list of ndarray [T_i, 3]
        B streamlines, each with at least 2 points.
    nb_points : int
        Points per output streamline, >= 2.

    Returns
    -------
    ArraySequence
        B streamlines of ``nb_points`` points each, same dtype as the input.
    """
    if nb_points < 2:
        raise TrackflowError(f"nb_points must be at least 2, got {nb_points}")
    streamlines = _as_array_sequence(streamlines)
    if len(streamlines) == 0:
        return ArraySequence()
    _check_resamplable(streamlines)
    return set_number_of_points(streamlines, nb_points)


def resample_step_size(streamlines, step_size: float) -> ArraySequence:
    """Resample every streamline to a constant step (scilpy's rule: ``ceil(length / step)`` points).

    As in scilpy's ``resample_streamlines_step_size`` (hence in dwi_ml's hdf5 files), a streamline
    gets ``ceil(length / step_size)`` points (at least 2), i.e. ``length / (n - 1)`` between points:
    slightly MORE than ``step_size`` for streamlines longer than it. Kept for compatibility with
    files and models made by dwi_ml.

    Parameters
    ----------
    streamlines : ArraySequence or list of ndarray [T_i, 3]
        B streamlines, each with at least 2 points.
    step_size : float
        Wanted distance between consecutive points, > 0, in coordinate units.

    Returns
    -------
    ArraySequence
        B resampled streamlines, in input order.
    """
    if not step_size > 0:
        raise TrackflowError(f"step_size must be positive, got {step_size}")
    streamlines = _as_array_sequence(streamlines)
    if len(streamlines) == 0:
        return ArraySequence()
    _check_resamplable(streamlines)
    new_lengths = np.maximum(np.ceil(euclidean_lengths(streamlines) / step_size), 2)
    new_lengths = new_lengths.astype(np.int64)
    new_offsets = offsets_from_lengths(new_lengths)
    data = np.empty((int(new_lengths.sum()), 3), dtype=streamlines._data.dtype)
    # One dipy call per distinct point count instead of one per streamline.
    for nb_points in np.unique(new_lengths):
        rows = np.flatnonzero(new_lengths == nb_points)
        resampled = set_number_of_points(streamlines[rows], int(nb_points)).get_data()
        target = (new_offsets[rows, None] + np.arange(nb_points)).reshape(-1)  # [len(rows) * T]
        data[target] = resampled
    return array_sequence_from_parts(data, new_offsets, new_lengths)


def compress(streamlines, tol_error: float) -> ArraySequence:
    """Drop nearly collinear points (dipy's ``compress_streamlines``, tolerance ``tol_error``).

    Parameters
    ----------
    streamlines : ArraySequence or list of ndarray [T_i, 3]
        B streamlines.
    tol_error : float
        Largest distance allowed between a removed point and the compressed streamline.

    Returns
    -------
    ArraySequence
        B streamlines with their endpoints kept.
    """
    if not tol_error > 0:
        raise TrackflowError(f"compression tolerance must be positive, got {tol_error}")
    streamlines = _as_array_sequence(streamlines)
    if len(streamlines) == 0:
        return ArraySequence()
    return ArraySequence(compress_streamlines(streamlines, tol_error=tol_error))


def offsets_from_lengths(lengths) -> np.ndarray:
    """Start row of each streamline in a compact data block: exclusive cumsum, [B] int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.cumsum(lengths) - lengths


def gather_ragged(offsets: np.ndarray, lengths: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Flat point indices that put streamlines ``order`` one after the other.

    Parameters
    ----------
    offsets, lengths : ndarray [S] int
        Start row and point count of each streamline in a flat [P, ...] per-point array.
    order : ndarray [S'] int
        Streamlines to take, in output order (repeats allowed).

    Returns
    -------
    ndarray [sum lengths[order]] int64
        ``data[gather_ragged(offsets, lengths, order)]``: the points of ``order[0]``, then ``order[1]``...
    """
    new_lengths = np.asarray(lengths, dtype=np.int64)[order]
    # Output point j of streamline i comes from offsets[order[i]] + (j - new_offsets[i]).
    shift = np.asarray(offsets, dtype=np.int64)[order] - offsets_from_lengths(new_lengths)
    return np.repeat(shift, new_lengths) + np.arange(new_lengths.sum())


def array_sequence_from_parts(data: np.ndarray, offsets: np.ndarray, lengths: np.ndarray
                               ) -> ArraySequence:
    """Wrap ``data [P, 3]``, ``offsets [B]``, ``lengths [B]`` as an ArraySequence without copying.

    nibabel has no public constructor from the three arrays; its own readers set them the same way.
    """
    seq = ArraySequence()
    seq._data = data
    seq._offsets = np.asarray(offsets, dtype=np.intp)
    seq._lengths = np.asarray(lengths, dtype=np.intp)
    return seq

