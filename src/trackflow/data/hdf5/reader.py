"""``HDF5Cohort``: the one validated reader of cohort hdf5 files (ours and dwi_ml's, spec §1.5).

Opening is cheap: only root attributes are read. Volumes and streamlines are read on request;
streamline groups are validated (``check_streamline_group``) each time they are read.
"""

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from nibabel.streamlines import ArraySequence
from nibabel.streamlines.trk import TrkFile

from trackflow.data.streamlines import array_sequence_from_parts, offsets_from_lengths
from trackflow.errors import TrackflowError

HDF5_LAYOUT_VERSION = 1  # our own root attribute `version`; dwi_ml files have none
NOT_DEFINED = "Not defined by user"  # dwi_ml's sentinel for unset step_size/nb_points/compress
SUBSETS = ("training_subjs", "validation_subjs", "testing_subjs")
SUBSET_NAMES = tuple(name.removesuffix("_subjs") for name in SUBSETS)  # what the scripts' --subset takes
_REQUIRED_ROOT_ATTRS = SUBSETS + ("step_size", "nb_points", "compress")
_STREAMLINE_DATASETS = ("data", "offsets", "lengths", "euclidean_lengths")

# Reading a few streamlines by slices beats reading the whole data block while the selection is
# smaller than this fraction of the group.
_SLICE_READ_FRACTION = 1 / 8
_FINITE_CHECK_ELEMENTS = 1 << 24  # values read at once by check_finite


@dataclass
class Volume:
    """One volume group of one subject.

    Attributes
    ----------
    data : ndarray [X, Y, Z, F] float32
    affine : ndarray [4, 4]
        Voxel (centre) to RASMM.
    voxres : ndarray [3]
        Voxel sizes in mm.
    """

    data: np.ndarray
    affine: np.ndarray
    voxres: np.ndarray


def check_streamline_group(group: h5py.Group) -> None:
    """Validate a streamline group's ArraySequence datasets (without reading the points).

    Checks: ``data`` is [P, 3] with P == lengths.sum(); ``offsets`` == exclusive cumsum of
    ``lengths``; every length > 0 (nibabel drops empty streamlines, which would misalign
    per-streamline data); ``euclidean_lengths`` and every ``data_per_streamline`` dataset have one
    entry per streamline.
    """
    where = group.name
    missing = [name for name in _STREAMLINE_DATASETS if name not in group]
    if missing:
        raise TrackflowError(f"streamline group {where} lacks dataset(s) {missing}")
    lengths = group["lengths"][()]
    offsets = group["offsets"][()]
    n_streamlines = len(lengths)
    if group["data"].ndim != 2 or group["data"].shape[1] != 3:
        raise TrackflowError(f"{where}/data must be [n_points, 3], got {group['data'].shape}")
    if group["data"].shape[0] != lengths.sum():
        raise TrackflowError(f"{where}: data has {group['data'].shape[0]} points but lengths sum "
                             f"to {lengths.sum()}")
    if (lengths <= 0).any():
        raise TrackflowError(f"{where}: {(lengths <= 0).sum()} streamline(s) have no point")
    expected_offsets = offsets_from_lengths(lengths)
    if offsets.shape != lengths.shape or not np.array_equal(offsets, expected_offsets):
        raise TrackflowError(f"{where}: offsets are not the cumulative sum of lengths")
    parallel = {"euclidean_lengths": group["euclidean_lengths"]}
    if "data_per_streamline" in group:
        parallel.update(group["data_per_streamline"].items())
    for name, dataset in parallel.items():
        if dataset.shape[:1] != (n_streamlines,):
            raise TrackflowError(f"{where}: {name} has shape {dataset.shape}, expected "
                                 f"{n_streamlines} entries")


def _decode(value):
    return value.decode() if isinstance(value, bytes) else value


def _optional_number(value):
    value = _decode(value)
    if isinstance(value, str):
        if value == NOT_DEFINED:
            return None
        raise TrackflowError(f"unexpected root attribute value {value!r}")
    return value.item() if isinstance(value, np.generic) else value


def _parse_space(text: str) -> "Space":
    # dwi_ml accepts 'Space.VOX' and 'vox', any case.
    from dipy.io.stateful_tractogram import Space  # dipy.io: half a second of every start-up (pandas)
    name = _decode(text).lower().removeprefix("space.")
    for space in Space:
        if name in (space.name.lower(), space.value.lower()):
            return space
    raise TrackflowError(f"unknown streamline space {text!r}")


def _parse_origin(text: str) -> "Origin":
    # 'Origin.TRACKVIS', 'trackvis' and 'corner' all mean vox/corner.
    from dipy.io.stateful_tractogram import Origin
    name = _decode(text).lower().removeprefix("origin.")
    for origin in Origin:
        if name in (origin.name.lower(), origin.value.lower()):
            return origin
    raise TrackflowError(f"unknown streamline origin {text!r}")


def _rows_of(offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Row indices [sum lengths] of the selected streamlines, concatenated in selection order."""
    starts = np.repeat(offsets - offsets_from_lengths(lengths), lengths)
    return starts + np.arange(lengths.sum())


def _damage_is_an_error(method):
    """h5py reports a damaged object header or data block as KeyError, OSError or RuntimeError when the
    object is opened or read: make it the one-line error of a bad input, for every reader of the file."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (KeyError, OSError, RuntimeError) as e:
            reason = str(e).strip("'\"") or type(e).__name__
            raise TrackflowError(f"{self.path} is damaged ({reason})") from None
    return wrapper


def _members(group: h5py.Group):
    # Not group.items(): it yields None, not an error, for a member whose object header is damaged.
    return ((name, group[name]) for name in group)


class HDF5Cohort:
    """Read-only view of a cohort hdf5 file; use as a context manager.

    Parameters
    ----------
    path : path
        An hdf5 file with the layout of dwi_ml spec §1.5.

    Attributes
    ----------
    path : Path
    step_size, compress : float or None
        Root attributes; None when the file says "Not defined by user".
    nb_points : int or None
    version : int or None
        Our layout version; None for files made by dwi_ml.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TrackflowError(f"hdf5 file {self.path} does not exist")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError:
            raise TrackflowError(f"{self.path} is not an hdf5 file") from None
        try:
            self._read_root_attributes()
        except BaseException:
            self._file.close()
            raise

    @_damage_is_an_error
    def _read_root_attributes(self) -> None:
        attrs = self._file.attrs
        missing = [a for a in _REQUIRED_ROOT_ATTRS if a not in attrs]
        if missing:
            raise TrackflowError(f"{self.path} is not a cohort hdf5 file (missing root "
                                 f"attribute(s) {missing})")
        self.step_size = _optional_number(attrs["step_size"])
        self.compress = _optional_number(attrs["compress"])
        nb_points = _optional_number(attrs["nb_points"])
        self.nb_points = None if nb_points is None else int(nb_points)
        self.version = int(attrs["version"]) if "version" in attrs else None
        self._subsets = {name.removesuffix("_subjs"): sorted(_decode(s) for s in attrs[name])
                         for name in SUBSETS}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._file.close()

    # -- discovery -------------------------------------------------------------------------

    def subjects(self, subset: str) -> list[str]:
        """Sorted subject ids of ``'training'``, ``'validation'`` or ``'testing'``."""
        if subset not in self._subsets:
            raise TrackflowError(f"unknown subset {subset!r}; expected one of "
                                 f"{list(self._subsets)}")
        return list(self._subsets[subset])

    def _first_subject(self) -> h5py.Group:
        # As dwi_ml: groups are discovered on the first subject of training, else validation...
        for subjects in self._subsets.values():
            if subjects:
                return self._subject(subjects[0])
        raise TrackflowError(f"{self.path} lists no subject")

    @_damage_is_an_error
    def volume_groups(self) -> dict[str, int]:
        """Volume group name -> number of features F (from the first subject)."""
        return {name: int(g.attrs["nb_features"]) for name, g in _members(self._first_subject())
                if _decode(g.attrs.get("type")) == "volume"}

    @_damage_is_an_error
    def streamline_groups(self) -> list[str]:
        return [name for name, g in _members(self._first_subject())
                if _decode(g.attrs.get("type")) == "streamlines"]

    def _subject(self, subject: str) -> h5py.Group:
        if subject not in self._file:
            raise TrackflowError(f"subject '{subject}' is not in {self.path}; it has "
                                 f"{sorted(self._file.keys())}")
        return self._file[subject]

    def _group(self, subject: str, group: str, group_type: str) -> h5py.Group:
        subject_group = self._subject(subject)
        if group not in subject_group:
            raise TrackflowError(f"group '{group}' is not in subject '{subject}' of {self.path}; "
                                 f"it has {sorted(subject_group.keys())}")
        h5_group = subject_group[group]
        actual = _decode(h5_group.attrs.get("type"))
        if actual != group_type:
            raise TrackflowError(f"group '{group}' of subject '{subject}' is of type {actual!r}, "
                                 f"not {group_type!r}")
        return h5_group

    @_damage_is_an_error
    def check_finite(self, subject: str, group: str, group_type: str) -> None:
        """Refuse NaN or infinite values in a ``'volume'`` group or a ``'streamlines'`` group's points.

        Read slab by slab, so that checking a large lazy cohort costs no more memory than one slab.
        """
        data = self._group(subject, group, group_type)["data"]
        step = max(1, _FINITE_CHECK_ELEMENTS // max(1, int(np.prod(data.shape[1:]))))
        bad = sum(int(np.count_nonzero(~np.isfinite(data[i:i + step]))) for i in range(0, data.shape[0], step))
        if bad:
            what = "voxel values" if group_type == "volume" else "point coordinates"
            raise TrackflowError(f"subject '{subject}', group '{group}' of {self.path}: {bad} NaN or "
                                 f"infinite {what}; fix the input files and recreate the hdf5")

    # -- volumes ---------------------------------------------------------------------------

    @_damage_is_an_error
    def read_volume(self, subject: str, group: str) -> Volume:
        """The whole volume group, [X, Y, Z, F] float32."""
        h5_group = self._group(subject, group, "volume")
        return Volume(data=np.asarray(h5_group["data"][()], dtype=np.float32),
                      affine=np.asarray(h5_group.attrs["affine"], dtype=np.float64),
                      voxres=np.asarray(h5_group.attrs["voxres"], dtype=np.float64))

    @_damage_is_an_error
    def standardization(self, subject: str, group: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(offset, scale) [F] float64 of a volume group, raw = data * scale + offset, or None for an hdf5
        written before these attributes existed."""
        attrs = self._group(subject, group, "volume").attrs
        if "standardization_offset" not in attrs or "standardization_scale" not in attrs:
            return None
        return (np.asarray(attrs["standardization_offset"], dtype=np.float64),
                np.asarray(attrs["standardization_scale"], dtype=np.float64))

    @_damage_is_an_error
    def reference_nifti(self, subject: str, group: str) -> nib.Nifti1Image:
        """A NIfTI image with the grid (shape, affine, voxel sizes) of a volume group.

        Its data is a zero-stride array of zeros: use it only as a header/reference for outputs.
        """
        h5_group = self._group(subject, group, "volume")
        shape = h5_group["data"].shape[:3]
        img = nib.Nifti1Image(np.broadcast_to(np.uint8(0), shape),
                              np.asarray(h5_group.attrs["affine"], dtype=np.float64))
        img.header.set_zooms(np.asarray(h5_group.attrs["voxres"], dtype=np.float64))
        return img

    # -- streamlines -----------------------------------------------------------------------

    def _streamline_group(self, subject: str, group: str) -> h5py.Group:
        h5_group = self._group(subject, group, "streamlines")
        check_streamline_group(h5_group)
        return h5_group

    @_damage_is_an_error
    def streamlines_count(self, subject: str, group: str) -> int:
        return int(self._group(subject, group, "streamlines")["lengths"].shape[0])

    @_damage_is_an_error
    def euclidean_lengths(self, subject: str, group: str) -> np.ndarray:
        """Length of each streamline in mm (computed in RASMM at creation), [S] float64."""
        return np.asarray(self._streamline_group(subject, group)["euclidean_lengths"][()],
                          dtype=np.float64)

    def _selection(self, h5_group: h5py.Group, indices) -> np.ndarray | None:
        if indices is None:
            return None
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n_streamlines = h5_group["lengths"].shape[0]
        if indices.size and (indices.min() < -n_streamlines or indices.max() >= n_streamlines):
            raise TrackflowError(f"streamline index out of range for {h5_group.name} "
                                 f"({n_streamlines} streamlines)")
        return indices % max(n_streamlines, 1)

    @_damage_is_an_error
    def read_streamlines(self, subject: str, group: str, indices=None) -> ArraySequence:
        """Streamlines in vox/corner, float32, in the order of ``indices`` (all when None).

        Parameters
        ----------
        indices : array-like of int [B], optional
            Streamline indices (repeats and any order allowed).

        Returns
        -------
        ArraySequence
            B streamlines; ``get_data()`` is [sum T_b, 3] float32.
        """
        h5_group = self._streamline_group(subject, group)
        offsets, lengths = h5_group["offsets"][()], h5_group["lengths"][()]
        data = h5_group["data"]
        selection = self._selection(h5_group, indices)
        if selection is None:
            points = np.asarray(data[()], dtype=np.float32)
            return array_sequence_from_parts(points, offsets, lengths)
        sel_offsets, sel_lengths = offsets[selection], lengths[selection]
        new_offsets = offsets_from_lengths(sel_lengths)
        if len(selection) < _SLICE_READ_FRACTION * len(lengths):
            points = np.empty((int(sel_lengths.sum()), 3), dtype=np.float32)
            # One read per selected streamline (not per point): only these rows leave the disk.
            for start, n, out_start in zip(sel_offsets, sel_lengths, new_offsets):
                points[out_start:out_start + n] = data[start:start + n]
        else:
            points = np.asarray(data[()], dtype=np.float32)[_rows_of(sel_offsets, sel_lengths)]
        return array_sequence_from_parts(points, new_offsets, sel_lengths)

    @_damage_is_an_error
    def data_per_streamline(self, subject: str, group: str, indices=None) -> dict[str, np.ndarray]:
        """Kept dps keys -> [B, K] arrays (all streamlines when ``indices`` is None)."""
        h5_group = self._streamline_group(subject, group)
        selection = self._selection(h5_group, indices)
        dps = h5_group.get("data_per_streamline", {})
        return {key: (dataset[()] if selection is None else dataset[()][selection])
                for key, dataset in dps.items()}

    def _space_attributes(self, h5_group: h5py.Group) -> dict:
        header = TrkFile.create_empty_header()
        header["voxel_to_rasmm"] = np.asarray(h5_group.attrs["affine"], dtype=np.float64)
        header["dimensions"] = np.asarray(h5_group.attrs["dimensions"], dtype=np.int16)
        header["voxel_sizes"] = np.asarray(h5_group.attrs["voxel_sizes"], dtype=np.float32)
        header["voxel_order"] = _decode(h5_group.attrs["voxel_order"])
        return header

    @_damage_is_an_error
    def to_sft(self, subject: str, group: str, indices=None) -> "StatefulTractogram":
        """The streamlines (and kept dps) as a vox/corner StatefulTractogram."""
        from dipy.io.stateful_tractogram import StatefulTractogram
        h5_group = self._streamline_group(subject, group)
        streamlines = self.read_streamlines(subject, group, indices)
        return StatefulTractogram(
            streamlines, self._space_attributes(h5_group), _parse_space(h5_group.attrs["space"]),
            origin=_parse_origin(h5_group.attrs["origin"]),
            data_per_streamline=self.data_per_streamline(subject, group, indices))


def print_architecture(path, out=None) -> None:
    """Print root attributes, subject lists and the first subject's groups (attrs, datasets).

    ``out`` is a text stream, stdout by default.
    """
    out = out if out is not None else sys.stdout
    with HDF5Cohort(path) as cohort:
        _damage_is_an_error(_print_architecture)(cohort, out)


def _print_architecture(cohort: HDF5Cohort, out) -> None:
    h5_file = cohort._file
    print(f"hdf5 file: {cohort.path}", file=out)
    print("root attributes:", file=out)
    for name, value in h5_file.attrs.items():
        print(f"  {name}: {_format_attr(value)}", file=out)
    for subset in SUBSET_NAMES:
        subjects = cohort.subjects(subset)
        print(f"{subset} subjects ({len(subjects)}): {', '.join(subjects)}", file=out)
    first = cohort._first_subject()
    print(f"groups of the first subject '{first.name.lstrip('/')}':", file=out)
    for name, group in _members(first):
        print(f"  {name}:", file=out)
        for attr, value in group.attrs.items():
            print(f"    attr {attr}: {_format_attr(value)}", file=out)
        group.visititems(lambda sub, obj: print(_format_member(sub, obj), file=out))


def _format_member(name: str, obj) -> str:
    if isinstance(obj, h5py.Dataset):
        return f"    dataset {name}: shape {obj.shape}, dtype {obj.dtype}"
    return f"    group {name}/ ({len(obj)} members)"  # e.g. an empty data_per_streamline/


def _format_attr(value) -> str:
    if isinstance(value, np.ndarray):
        is_text = value.dtype.kind in "OSU"
        value = [_decode(v) for v in value.tolist()] if is_text else value.tolist()
    return str(_decode(value))
