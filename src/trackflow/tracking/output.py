"""From tracked streamlines to a tractogram file: optional compression, length filter in mm, saving.

Lengths are measured on what is written (after compression), in mm, so ``--min_length 10`` never keeps a
9 mm streamline (dwi_ml counted points).
"""

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from dipy.io.stateful_tractogram import Origin, Space, StatefulTractogram
from dipy.io.streamline import save_tractogram
from nibabel.streamlines import ArraySequence

from trackflow.cli.common import atomic_output
from trackflow.data.streamlines import array_sequence_from_parts, compress, euclidean_lengths
from trackflow.errors import TrackflowError
from trackflow.tracking.tracker import TrackingResult


TRACTOGRAM_EXTENSIONS = (".trk", ".tck", ".trx")


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


def check_tractogram_path(path, save_seeds: bool = False) -> None:
    """Refuse unsupported extensions, and seeds in a format without per-streamline data."""
    suffix = Path(path).suffix.lower()
    if suffix not in TRACTOGRAM_EXTENSIONS:
        raise TrackflowError(f"output tractogram {path} must end in .trk, .tck or .trx")
    if save_seeds and suffix == ".tck":
        raise TrackflowError("--save_seeds needs a .trk or .trx output (.tck has no per-streamline data)")


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
    lengths_mm = (euclidean_lengths(streamlines) * voxel_size_mm if len(streamlines)
                  else np.zeros(0))
    too_short = lengths_mm < min_length_mm
    too_long = lengths_mm > max_length_mm
    kept = np.flatnonzero(~too_short & ~too_long)
    return FilteredTractogram(streamlines[kept], result.seeds[kept], lengths_mm[kept], kept,
                              int(too_short.sum()), int(too_long.sum()))


def save_tractogram_file(path, streamlines: ArraySequence, reference: nib.Nifti1Image,
                         seeds: np.ndarray | None = None) -> None:
    """Write vox/corner streamlines with the reference's header, atomically.

    ``seeds`` (vox/corner, [S, 3]) are stored as the per-streamline data ``seeds`` in vox/center, as dwi_ml
    does (minus 0.5).
    """
    dps = {"seeds": (seeds - 0.5).astype(np.float32)} if seeds is not None else {}
    sft = StatefulTractogram(streamlines, reference, Space.VOX, origin=Origin.TRACKVIS,
                             data_per_streamline=dps)
    with atomic_output(path) as tmp:
        save_tractogram(sft, str(tmp), bbox_valid_check=False)
