"""Tractogram files: the supported extensions, loading any of them, and atomic saving with per-streamline
and per-point data (streamlines in vox/corner, the grid of a reference image).
"""

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.streamlines import ArraySequence, Tractogram, detect_format
from nibabel.streamlines.trk import Field, TrkFile, encode_value_in_name

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


def load_tractogram_file(path, reference=None):
    """A .trk, .trx or .tck (``reference`` needed for .tck only) as a dipy ``StatefulTractogram``.

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
    points = streamlines.get_data().reshape(-1, 3)  # compact copy: row i of data_per_point is point i
    lengths = np.asarray(streamlines._lengths, np.int64)
    dpp = {key: _columns(values) for key, values in (data_per_point or {}).items()}
    dps = {"seeds": _columns(seeds - 0.5)} if seeds is not None else {}
    with atomic_output(path, overwrite=overwrite) as tmp:
        # The temporary name ends in the format's extension.
        if Path(tmp).suffix.lower() == ".trk":
            _save_trk(Path(tmp), points, lengths, reference, dps, dpp)
        else:
            _save_with_dipy(Path(tmp), points, lengths, reference, dps, dpp)
    LOGGER.info("wrote %s", path)


def _columns(values) -> np.ndarray:
    """Per-row values [N] or [N, ...] as float32 [N, K] (N may be 0)."""
    values = np.asarray(values, np.float32)
    return values.reshape(values.shape[0], int(np.prod(values.shape[1:])))


def _save_trk(path: Path, points: np.ndarray, lengths: np.ndarray, reference: nib.Nifti1Image,
              data_per_streamline: dict, data_per_point: dict) -> None:
    """A .trk as nibabel writes it (its header, its record layout), in one vectorised pass instead of its
    Python loop over streamlines (a second for 20,000 streamlines: a tenth of a tracking run).

    The header is the reference's grid with the voxel order of its affine, so TrackVis' voxmm coordinates
    are vox/corner times the voxel sizes. Each record: int32 point count, then per point x, y, z and the
    scalars (data_per_point, keys sorted), then the properties (data_per_streamline, keys sorted).
    """
    header = TrkFile._default_structarr(endianness="little")
    header[Field.VOXEL_TO_RASMM] = reference.affine
    header[Field.VOXEL_SIZES] = reference.header.get_zooms()[:3]
    header[Field.DIMENSIONS] = reference.shape[:3]
    header[Field.VOXEL_ORDER] = "".join(nib.orientations.aff2axcodes(reference.affine))
    scalar_keys, property_keys = sorted(data_per_point), sorted(data_per_streamline)
    scalars = [data_per_point[k] for k in scalar_keys]  # float32 [N, K] each (save_tractogram_file)
    properties = [data_per_streamline[k] for k in property_keys]
    for i, (key, values) in enumerate(zip(scalar_keys, scalars) if len(lengths) else ()):
        header["scalar_name"][i] = encode_value_in_name(values.shape[1], key)
    for i, (key, values) in enumerate(zip(property_keys, properties) if len(lengths) else ()):
        header["property_name"][i] = encode_value_in_name(values.shape[1], key)
    per_point = np.concatenate([points * header[Field.VOXEL_SIZES].astype(np.float64)] + scalars, axis=1)
    per_streamline = np.concatenate([np.zeros((len(lengths), 0))] + properties, axis=1)
    width, n_properties = per_point.shape[1], per_streamline.shape[1]
    header[Field.NB_STREAMLINES] = len(lengths)
    header[Field.NB_SCALARS_PER_POINT] = width - 3 if len(lengths) else 0
    header[Field.NB_PROPERTIES_PER_STREAMLINE] = n_properties if len(lengths) else 0

    words = 1 + lengths * width + n_properties  # 4-byte words of each record
    starts = offsets_from_lengths(words)
    body = np.empty(int(words.sum()), dtype="<f4")
    body.view("<i4")[starts] = lengths
    first_point_word = np.repeat(starts + 1, lengths) + (np.arange(len(points)) - np.repeat(
        offsets_from_lengths(lengths), lengths)) * width
    body[first_point_word[:, None] + np.arange(width)] = per_point
    if n_properties:
        body[(starts + 1 + lengths * width)[:, None] + np.arange(n_properties)] = per_streamline
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(body.tobytes())


def _save_with_dipy(path: Path, points: np.ndarray, lengths: np.ndarray, reference: nib.Nifti1Image,
                    data_per_streamline: dict, data_per_point: dict) -> None:
    """.tck and .trx: what dipy's ``save_tractogram`` does (the same bytes), written with nibabel and
    trx-python. Imported here: ``dipy.io`` costs half a second of start-up (pandas), and
    ``dipy.io.streamline`` imports vtk, which the tracking scripts never need."""
    import trx.trx_file_memmap as tmm
    from dipy.io.stateful_tractogram import Origin, Space, StatefulTractogram
    from dipy.io.utils import create_tractogram_header

    offsets = offsets_from_lengths(lengths)
    dpp = {key: array_sequence_from_parts(values, offsets, lengths) for key, values in data_per_point.items()}
    sft = StatefulTractogram(array_sequence_from_parts(points, offsets, lengths), reference, Space.VOX,
                             origin=Origin.TRACKVIS, data_per_streamline=data_per_streamline, data_per_point=dpp)
    sft.to_rasmm()
    sft.to_center()
    if path.suffix.lower() == ".trx":
        trx = tmm.TrxFile.from_sft(sft)
        tmm.save(trx, str(path))
        trx.close()
        return
    tractogram_type = detect_format(str(path))
    tractogram = Tractogram(sft.streamlines, affine_to_rasmm=np.eye(4))
    header = create_tractogram_header(tractogram_type, *sft.space_attributes)
    nib.streamlines.save(tractogram_type(tractogram, header=header), str(path))
