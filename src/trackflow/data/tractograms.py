"""Tractogram files: the supported extensions, loading any of them, and atomic saving with per-streamline
and per-point data (streamlines in vox/corner, the grid of a reference image).
"""

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import trx.trx_file_memmap as tmm
from dipy.io.stateful_tractogram import Origin, Space, StatefulTractogram
from dipy.io.utils import create_tractogram_header
from nibabel.streamlines import ArraySequence, Tractogram, detect_format

from trackflow.data.streamlines import array_sequence_from_parts, offsets_from_lengths
from trackflow.errors import TrackflowError
from trackflow.files import atomic_output

LOGGER = logging.getLogger(__name__)

TRACTOGRAM_EXTENSIONS = (".trk", ".tck", ".trx")


def check_tractogram_path(path, save_seeds: bool = False) -> None:
    """Refuse unsupported extensions, and seeds in a format without per-streamline data."""
    suffix = Path(path).suffix.lower()
    if suffix not in TRACTOGRAM_EXTENSIONS:
        raise TrackflowError(f"output tractogram {path} must end in .trk, .tck or .trx")
    if save_seeds and suffix == ".tck":
        raise TrackflowError("--save_seeds needs a .trk or .trx output (.tck has no per-streamline data)")


def load_tractogram_file(path, reference=None) -> StatefulTractogram:
    """A .trk, .trx or .tck (``reference`` needed for .tck only) as a dipy StatefulTractogram.

    Unreadable files, and a .trk whose header is not the grid of a given ``reference``, raise
    ``TrackflowError``; no bounding-box check (tracked streamlines may end one step outside the volume).
    """
    path = Path(path)
    if not path.is_file():
        raise TrackflowError(f"tractogram {path} does not exist")
    if path.suffix.lower() == ".tck" and reference is None:
        raise TrackflowError(f"{path} is a .tck file: give --reference (an image of its grid)")
    # Imported here: dipy.io.streamline imports vtk (about 1.2 s), which the tracking scripts never need.
    from dipy.io.streamline import load_tractogram

    dipy_logger = logging.getLogger("dipy")
    level = dipy_logger.level
    dipy_logger.setLevel(logging.CRITICAL)  # its header-mismatch lines would repeat our one-line error
    try:
        sft = load_tractogram(str(path), reference if reference is not None else "same", bbox_valid_check=False)
    except Exception as e:  # dipy raises many types for unreadable or incompatible files
        raise TrackflowError(f"cannot read tractogram {path}: {e}") from None
    finally:
        dipy_logger.setLevel(level)
    if sft is False:  # dipy's answer to a .trk header that does not match the reference
        raise TrackflowError(f"tractogram {path} is not on the grid of the reference image")
    if not np.isfinite(sft.streamlines.get_data()).all():
        raise TrackflowError(f"tractogram {path} has non-finite (NaN or inf) coordinates")
    return sft


def save_tractogram_file(path, streamlines, reference: nib.Nifti1Image, seeds: np.ndarray | None = None,
                         data_per_point: dict | None = None, overwrite: bool = True) -> None:
    """Write vox/corner streamlines with the reference's header, atomically.

    Parameters
    ----------
    path : path
        ``.trk``, ``.tck`` or ``.trx`` (the format follows the extension).
    streamlines : ArraySequence or list of ndarray [T_b, 3]
        B streamlines, vox/corner; a selection (view) of a larger sequence is fine.
    reference : Nifti1Image
        The grid the coordinates refer to.
    seeds : ndarray [B, 3] or None
        Seeds in vox/corner, stored as the per-streamline data ``seeds`` in vox/center, as dwi_ml does
        (minus 0.5).
    data_per_point : dict or None
        Name -> values of every point in streamline order, [sum T_b] or [sum T_b, K]; stored as float32.
    overwrite : bool
        False: refuse an existing ``path``, atomically at the final rename (two runs racing for one output).
    """
    streamlines = streamlines if isinstance(streamlines, ArraySequence) else ArraySequence(streamlines)
    points = streamlines.get_data()  # compact copy, so that row i of data_per_point is point i
    lengths = np.asarray(streamlines._lengths)
    offsets = offsets_from_lengths(lengths)
    dpp = {key: array_sequence_from_parts(np.asarray(values, np.float32).reshape(len(points), -1), offsets,
                                          lengths)
           for key, values in (data_per_point or {}).items()}
    dps = {"seeds": (seeds - 0.5).astype(np.float32)} if seeds is not None else {}
    sft = StatefulTractogram(array_sequence_from_parts(points, offsets, lengths), reference, Space.VOX,
                             origin=Origin.TRACKVIS, data_per_streamline=dps, data_per_point=dpp)
    with atomic_output(path, overwrite=overwrite) as tmp:
        _save_tractogram(sft, Path(tmp))  # the temporary name ends in the format's extension
    LOGGER.info("wrote %s", path)


def _save_tractogram(sft: StatefulTractogram, path: Path) -> None:
    """What dipy's ``save_tractogram`` does for .trk, .tck and .trx (the same bytes), written with nibabel
    and trx-python: ``dipy.io.streamline`` imports vtk, about a second of every tracking run's start-up."""
    suffix = path.suffix.lower()
    sft.to_rasmm()
    sft.to_center()
    if suffix == ".trx":
        trx = tmm.TrxFile.from_sft(sft)
        tmm.save(trx, str(path))
        trx.close()
        return
    tractogram_type = detect_format(str(path))
    tractogram = Tractogram(sft.streamlines, affine_to_rasmm=np.eye(4))
    if suffix == ".trk":
        tractogram.data_per_point = sft.data_per_point
        tractogram.data_per_streamline = sft.data_per_streamline
    header = create_tractogram_header(tractogram_type, *sft.space_attributes)
    nib.streamlines.save(tractogram_type(tractogram, header=header), str(path))
