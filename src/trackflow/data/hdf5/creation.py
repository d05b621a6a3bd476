"""Pack a ``dwi_ml_ready`` folder into one hdf5 file (dwi_ml spec §1.2-1.5).

Subjects are processed one at a time: each subject's groups are written to the file and freed before
the next one is read, so peak memory is that of the largest subject, not of the cohort. The file is
written under a temporary name and renamed at the end, so a failed or interrupted run leaves nothing
under the output name.
"""

import logging
import shutil
from datetime import datetime
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from dipy.io.stateful_tractogram import Origin, Space, StatefulTractogram
from dipy.io.streamline import load_tractogram, save_tractogram
from dipy.io.utils import get_reference_info

from trackflow.data import streamlines as sl
from trackflow.data.hdf5.config import (StreamlineGroupConfig, VolumeGroupConfig, file_patterns,
                                        read_groups_config)
from trackflow.data.hdf5.reader import (HDF5_LAYOUT_VERSION, NOT_DEFINED, SUBSETS,
                                        check_streamline_group)
from trackflow.errors import TrackflowError
from trackflow.files import atomic_output, check_outputs

LOGGER = logging.getLogger(__name__)

STD_FLOOR = 1e-6  # dwi_ml floors the standard deviation so that constant volumes do not divide by 0
AFFINE_ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Subject lists and file lookup
# ---------------------------------------------------------------------------------------------

def read_subject_list(path) -> list[str]:
    """Whitespace-separated subject ids; an empty file is an empty list; duplicates are an error."""
    path = Path(path)
    if not path.is_file():
        raise TrackflowError(f"subject list {path} does not exist")
    try:
        subjects = path.read_text().split()
    except UnicodeDecodeError:
        raise TrackflowError(f"subject list {path} is not a text file") from None
    seen = set()
    for subject in subjects:
        if subject in seen:
            raise TrackflowError(f"subject '{subject}' is listed twice in {path}")
        seen.add(subject)
    return subjects


def _match_files(subject_dir: Path, patterns, enforce_presence: bool, what: str) -> list[Path]:
    """Files matching each pattern (sorted within a pattern, patterns in config order)."""
    found = []
    for pattern in patterns:
        try:
            matches = sorted(subject_dir.glob(pattern))
        except (NotImplementedError, ValueError):  # pathlib refuses absolute or empty patterns
            raise TrackflowError(f"{what}: '{pattern}' must be a path relative to the subject "
                                 "folder") from None
        if not matches:
            message = f"{what}: '{pattern}' matches no file in {subject_dir}"
            if enforce_presence:
                raise TrackflowError(message)
            LOGGER.warning("%s; skipped", message)
        found.extend(matches)
    return found


def _check_presence(root: Path, subjects, groups) -> None:
    """dwi_ml checks every pattern of every subject before processing anything."""
    for subject in subjects:
        for group in groups:
            _match_files(root / subject, file_patterns(group), True, f"group '{group.name}'")


# ---------------------------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------------------------

def _load_nifti_header(path: Path) -> nib.Nifti1Image:
    if not path.name.endswith((".nii", ".nii.gz")):
        raise TrackflowError(f"{path} is not a NIfTI file (.nii or .nii.gz)")
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises several types for corrupt files
        raise TrackflowError(f"cannot read {path} as NIfTI: {_first_line(e)}") from None
    if len(img.shape) not in (3, 4):
        raise TrackflowError(f"{path} is {len(img.shape)}D; expected a 3D or 4D volume")
    return img


def _check_same_grid(img: nib.Nifti1Image, path: Path, ref: nib.Nifti1Image, ref_path) -> None:
    same = (img.shape[:3] == ref.shape[:3]
            and np.allclose(img.affine, ref.affine, atol=AFFINE_ATOL)
            and np.allclose(img.header.get_zooms()[:3], ref.header.get_zooms()[:3]))
    if not same:
        raise TrackflowError(f"{path} is not on the grid of {ref_path} (shape, affine or voxel "
                             "size differ)")


def _read_data(img: nib.Nifti1Image, path: Path, dtype=None) -> np.ndarray:
    """The image's voxels (the header was read at load; a truncated or damaged body fails here)."""
    try:
        return np.asarray(img.dataobj, dtype=dtype)  # dataobj: nibabel keeps no cached copy
    except Exception as e:  # gzip, zlib and nibabel raise EOFError, zlib.error, OSError, ValueError...
        raise TrackflowError(f"cannot read the voxels of {path} (truncated or damaged?): "
                             f"{type(e).__name__}: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _read_float32_4d(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    data = _read_data(img, path, np.float32)
    return data[..., None] if data.ndim == 3 else data


def standardize_in_place(data: np.ndarray, mask: np.ndarray, per_feature: bool, where: str
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``(x - mean) / max(std, 1e-6)`` on every voxel, with statistics taken inside ``mask``.

    Parameters
    ----------
    data : ndarray [X, Y, Z, F] float32
        Modified in place.
    mask : ndarray [X, Y, Z] bool
        Voxels used for the statistics.
    per_feature : bool
        One mean/std per feature (``independent``) instead of one for all features pooled.
    where : str
        Names the volume in error messages.

    Returns
    -------
    offset, scale : ndarray [F] float64
        The float32 mean and std applied to each feature (raw = standardized * scale + offset).
    """
    if not mask.any():
        raise TrackflowError(f"{where}: the standardization mask is empty")
    inside = data[mask].astype(np.float64)  # [N, F]; float64 so that large volumes sum exactly
    if not np.isfinite(inside).all():
        raise TrackflowError(f"{where}: NaN or infinite values inside the standardization mask")
    axis = 0 if per_feature else None
    mean = inside.mean(axis=axis)
    std = np.maximum(inside.std(axis=axis), STD_FLOOR)
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    data -= mean
    data /= std
    n_features = data.shape[-1]
    return (np.broadcast_to(mean, (n_features,)).astype(np.float64),
            np.broadcast_to(std, (n_features,)).astype(np.float64))


def _std_mask(subject_dir, group: VolumeGroupConfig, ref_img, ref_path, enforce
              ) -> np.ndarray | None:
    """Union of the group's ``std_mask`` files (``> 0``), or None when the group has none."""
    paths = _match_files(subject_dir, group.std_mask, enforce, f"group '{group.name}' std_mask")
    if not paths:
        return None
    mask = np.zeros(ref_img.shape[:3], dtype=bool)
    for path in paths:
        img = _load_nifti_header(path)
        _check_same_grid(img, path, ref_img, ref_path)
        mask |= (_read_float32_4d(img, path) > 0).any(axis=-1)
    return mask


def load_volume_group(subject_dir: Path, group: VolumeGroupConfig, enforce_presence: bool = True
                      ) -> tuple[np.ndarray, nib.Nifti1Image, dict]:
    """Concatenate and standardize one volume group of one subject.

    Returns
    -------
    data : ndarray [X, Y, Z, F] float32
        Files concatenated along F in config order, standardized as configured.
    reference : Nifti1Image
        The first file's image (header and affine only are used; its data is not cached).
    stats : dict
        ``standardization_offset`` and ``standardization_scale``, ndarray [F] float64 each: raw =
        data * scale + offset, for every mode ('none': 0 and 1). What undoes or transforms the
        standardization later (the SH rotation of the training augmentation).
    """
    paths = _match_files(subject_dir, group.files, enforce_presence, f"group '{group.name}'")
    if not paths:
        raise TrackflowError(f"group '{group.name}' has no file in {subject_dir}")
    images = [_load_nifti_header(p) for p in paths]
    for img, path in zip(images[1:], paths[1:]):
        _check_same_grid(img, path, images[0], paths[0])

    mode = group.standardization
    mask = None
    if mode == "none":
        if group.std_mask:
            LOGGER.warning("group '%s': std_mask ignored with standardization 'none'", group.name)
    else:
        mask = _std_mask(subject_dir, group, images[0], paths[0], enforce_presence)

    # Headers give each file's F, so the output is allocated once and filled file by file.
    n_features = [1 if len(img.shape) == 3 else img.shape[3] for img in images]
    data = np.empty(images[0].shape[:3] + (sum(n_features),), dtype=np.float32)
    offset, scale = np.zeros(data.shape[-1]), np.ones(data.shape[-1])
    start = 0
    for img, path, n in zip(images, paths, n_features):
        block = data[..., start:start + n]
        block[...] = _read_float32_4d(img, path)
        if mode == "per_file":
            file_mask = mask if mask is not None else (block != 0).all(axis=-1)
            offset[start:start + n], scale[start:start + n] = standardize_in_place(
                block, file_mask, per_feature=False, where=str(path))
        start += n
    if mode in ("all", "independent"):
        if mask is None:
            mask = (data != 0).all(axis=-1)
        offset, scale = standardize_in_place(data, mask, per_feature=(mode == "independent"),
                                             where=f"group '{group.name}' of {subject_dir.name}")
    return data, images[0], {"standardization_offset": offset, "standardization_scale": scale}


def _write_volume_group(h5_group: h5py.Group, data: np.ndarray, ref_img: nib.Nifti1Image,
                        stats: dict) -> None:
    for name, values in stats.items():  # standardization_offset / _scale [F]: extra attributes dwi_ml ignores
        h5_group.attrs[name] = np.asarray(values, dtype=np.float64)
    h5_group.attrs["type"] = "volume"
    h5_group.attrs["affine"] = ref_img.affine
    h5_group.attrs["voxres"] = np.asarray(ref_img.header.get_zooms()[:3], dtype=np.float64)
    h5_group.attrs["nb_features"] = data.shape[-1]
    h5_group.create_dataset("data", data=data)


# ---------------------------------------------------------------------------------------------
# Streamlines
# ---------------------------------------------------------------------------------------------

def _as_2d(values: np.ndarray) -> np.ndarray:
    """Per-streamline values as [B, K] (dwi_ml stores every dps key as a 2D dataset)."""
    return values[:, None] if values.ndim == 1 else values.reshape(values.shape[0], -1)


def _same_space(reference_a, reference_b) -> bool:
    """dipy's header-compatibility rule (affine, dimensions, voxel sizes, order), without its
    error logging (our caller raises one clean error instead)."""
    affine_a, dims_a, sizes_a, order_a = get_reference_info(reference_a)
    affine_b, dims_b, sizes_b, order_b = get_reference_info(reference_b)
    return (np.allclose(affine_a, affine_b, rtol=1e-3, atol=1e-3) and np.array_equal(dims_a, dims_b)
            and np.allclose(sizes_a, sizes_b, rtol=1e-3, atol=1e-3) and order_a == order_b)


def _process_tractogram(path: Path, group: StreamlineGroupConfig, ref_img, options: dict
                        ) -> StatefulTractogram:
    """Load one tractogram, keep its dps keys, resample/compress in mm; returned in vox/corner.

    ``euclidean_lengths`` (mm, after resampling) is added to its data_per_streamline.
    """
    suffix = path.suffix.lower()
    if suffix not in (".trk", ".tck"):
        raise TrackflowError(f"{path}: only .trk and .tck tractograms are supported")
    if suffix == ".tck" and ref_img is None:
        raise TrackflowError(f"{path}: a .tck file needs a volume group in the config to give its "
                             "reference space")
    try:
        # Reading the header of an empty or garbage .trk fails too: it belongs inside the try.
        if suffix == ".trk" and ref_img is not None and not _same_space(str(path), ref_img):
            raise TrackflowError(f"{path} is not header-compatible with the subject's volumes")
        sft = load_tractogram(str(path), ref_img if suffix == ".tck" else "same",
                              bbox_valid_check=False)
    except TrackflowError:
        raise
    except Exception as e:  # nibabel/dipy raise many types for corrupt files
        raise TrackflowError(f"cannot read tractogram {path}: {_first_line(e)}") from None
    if not np.isfinite(sft.streamlines.get_data()).all():
        raise TrackflowError(f"tractogram {path} has non-finite (NaN or inf) coordinates")

    missing = [k for k in group.dps_keys if k not in sft.data_per_streamline]
    if missing:
        raise TrackflowError(f"{path} lacks data_per_streamline key(s) {missing} (has "
                             f"{sorted(sft.data_per_streamline)})")
    dps = {k: _as_2d(np.asarray(sft.data_per_streamline[k])) for k in group.dps_keys}

    sft.to_rasmm()
    streamlines = sft.streamlines
    if options["step_size"] is not None:
        streamlines = sl.resample_step_size(streamlines, options["step_size"])
    elif options["nb_points"] is not None:
        streamlines = sl.resample_nb_points(streamlines, options["nb_points"])
    elif options["compress"] is not None:
        streamlines = sl.compress(streamlines, options["compress"])
    sft = StatefulTractogram.from_sft(streamlines, sft, data_per_streamline=dps)
    if options["remove_invalid"]:
        sft.remove_invalid_streamlines()
    sft.data_per_streamline["euclidean_lengths"] = sl.euclidean_lengths(sft.streamlines)[:, None]
    sft.to_vox()
    sft.to_corner()
    return sft


def load_streamline_group(subject_dir: Path, group: StreamlineGroupConfig, ref_img,
                          options: dict) -> StatefulTractogram:
    """Union of a streamline group's tractograms, in vox/corner, with ``euclidean_lengths`` (mm).

    ``options``: ``step_size``, ``nb_points``, ``compress``, ``remove_invalid``,
    ``enforce_presence``.
    """
    paths = _match_files(subject_dir, group.files, options["enforce_presence"],
                         f"group '{group.name}'")
    if not paths:
        raise TrackflowError(f"group '{group.name}' has no file in {subject_dir}")
    sfts = []
    for path in paths:
        sft = _process_tractogram(path, group, ref_img, options)
        if sfts and not _same_space(sft, sfts[0]):
            raise TrackflowError(f"{path} is not header-compatible with {paths[0]}")
        sfts.append(sft)
    if len(sfts) == 1:
        return sfts[0]
    lengths = np.concatenate([s.streamlines._lengths for s in sfts])
    streamlines = sl.array_sequence_from_parts(
        np.concatenate([s.streamlines.get_data() for s in sfts]),
        sl.offsets_from_lengths(lengths), lengths)
    dps = {k: np.concatenate([s.data_per_streamline[k] for s in sfts])
           for k in sfts[0].data_per_streamline}
    return StatefulTractogram.from_sft(streamlines, sfts[0], data_per_streamline=dps)


def _write_streamline_group(h5_group: h5py.Group, sft: StatefulTractogram,
                            group: StreamlineGroupConfig, subject_dir: Path) -> None:
    affine, dimensions, voxel_sizes, voxel_order = sft.space_attributes
    h5_group.attrs["type"] = "streamlines"
    h5_group.attrs["space"] = str(Space.VOX)
    h5_group.attrs["origin"] = str(Origin.TRACKVIS)
    h5_group.attrs["affine"] = affine
    h5_group.attrs["dimensions"] = np.asarray(dimensions, dtype=np.int64)
    h5_group.attrs["voxel_sizes"] = np.asarray(voxel_sizes, dtype=np.float64)
    h5_group.attrs["voxel_order"] = voxel_order

    lengths = np.asarray(sft.streamlines._lengths, dtype=np.int64)
    h5_group.create_dataset("data", data=sft.streamlines.get_data().astype(np.float32)
                            .reshape(-1, 3))
    h5_group.create_dataset("offsets", data=sl.offsets_from_lengths(lengths))
    h5_group.create_dataset("lengths", data=lengths)
    h5_group.create_dataset("euclidean_lengths",
                            data=np.asarray(sft.data_per_streamline["euclidean_lengths"]).ravel())
    dps_group = h5_group.create_group("data_per_streamline")
    for key in group.dps_keys:
        dps_group.create_dataset(key, data=np.asarray(sft.data_per_streamline[key]))
    if group.connectivity_matrix:
        _write_connectivity(h5_group, group, subject_dir)
    check_streamline_group(h5_group)


def _write_connectivity(h5_group: h5py.Group, group: StreamlineGroupConfig, subject_dir: Path
                        ) -> None:
    """Binarised reference connectivity matrix, with the blocs or the label volume that made it."""
    path = subject_dir / group.connectivity_matrix
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise TrackflowError(f"cannot read connectivity matrix {path}: {e}") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise TrackflowError(f"connectivity matrix {path} must be square 2D, got {matrix.shape}")
    h5_group.create_dataset("connectivity_matrix", data=matrix > 0)
    if group.connectivity_nb_blocs is not None:
        h5_group.attrs["connectivity_matrix_type"] = "from_blocs"
        h5_group.attrs["connectivity_nb_blocs"] = np.asarray(group.connectivity_nb_blocs,
                                                             dtype=np.int64)
    else:
        labels_path = subject_dir / group.connectivity_labels
        labels = _read_data(_load_nifti_header(labels_path), labels_path)
        if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels,
                                                                              np.round(labels)):
            raise TrackflowError(f"connectivity labels {labels_path} are not integer labels")
        h5_group.attrs["connectivity_matrix_type"] = "from_labels"
        h5_group.create_dataset("connectivity_label_volume", data=labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def _string_array(values: list[str]) -> np.ndarray:
    # An explicit string dtype keeps empty lists typed as strings in the file.
    return np.array(values, dtype=h5py.string_dtype())


def _attr_or_not_defined(value):
    return NOT_DEFINED if value is None else value


def is_mask_group(group: VolumeGroupConfig) -> bool:
    """Whether a volume group holds a mask (seeding, tracking, WM...): the config has no mask type, so an
    unstandardized group whose name or files say so (``wm_mask``, ``masks/*__mask_wm.nii.gz``); a
    standardized group is a model input, whatever its name."""
    named_mask = "mask" in group.name.lower() or any("mask" in pattern.lower() for pattern in group.files)
    return named_mask and group.standardization == "none"


def _check_mask_values(data: np.ndarray, subject: str, group: VolumeGroupConfig) -> None:
    # A NaN mask voxel compares false everywhere, so an all-NaN mask would mean "inside everywhere".
    if data.shape[-1] != 1:  # several masks in one group: which one counts would be a silent choice
        raise TrackflowError(f"subject '{subject}', mask group '{group.name}' holds {data.shape[-1]} volumes, "
                             "not one: combine the masks into one file")
    bad = np.count_nonzero(~np.isfinite(data))
    if bad:
        raise TrackflowError(f"subject '{subject}', mask group '{group.name}': {bad} NaN or infinite "
                             "voxel values")


def _process_subject(h5_file: h5py.File, root: Path, subject: str, groups, options: dict,
                     intermediate_dir: Path | None) -> dict[str, int]:
    """Write one subject's groups; return each volume group's number of features."""
    subject_dir = root / subject
    nb_features = {}
    h5_subject = h5_file.create_group(subject)
    ref_img, ref_group = None, None
    for group in groups:
        if not isinstance(group, VolumeGroupConfig):
            continue
        data, img, stats = load_volume_group(subject_dir, group, options["enforce_presence"])
        if is_mask_group(group):
            _check_mask_values(data, subject, group)
        nb_features[group.name] = data.shape[-1]
        if ref_img is None:
            ref_img, ref_group = img, group.name
        else:
            _check_same_grid(img, Path(f"{subject}/{group.name}"), ref_img, f"group '{ref_group}'")
        _write_volume_group(h5_subject.create_group(group.name), data, img, stats)
        if intermediate_dir is not None:
            nib.save(nib.Nifti1Image(data, img.affine, img.header),
                     intermediate_dir / f"{subject}_{group.name}.nii.gz")
        del data  # free before reading the next group
    for group in groups:
        if not isinstance(group, StreamlineGroupConfig):
            continue
        sft = load_streamline_group(subject_dir, group, ref_img, options)
        _write_streamline_group(h5_subject.create_group(group.name), sft, group, subject_dir)
        if intermediate_dir is not None:
            save_tractogram(sft, str(intermediate_dir / f"{subject}_{group.name}.trk"),
                            bbox_valid_check=False)
        del sft
    h5_file.flush()
    return nb_features


def _check_same_features(nb_features: dict[str, int], subject: str, first: dict) -> None:
    """Every subject's volume group has the first subject's number of features (what the model takes).

    ``first`` maps group -> (subject, count) and is filled on the way.
    """
    for group, count in nb_features.items():
        first_subject, first_count = first.setdefault(group, (subject, count))
        if count != first_count:
            raise TrackflowError(f"group '{group}' has {count} features in subject '{subject}' but "
                                 f"{first_count} in subject '{first_subject}'; every subject needs the "
                                 "same files")


def create_hdf5_dataset(dwi_ml_ready_folder, out_hdf5_file, config_file, training_subjs,
                        validation_subjs, testing_subjs, *, enforce_files_presence: bool = True,
                        save_intermediate: bool = False, step_size: float | None = None,
                        nb_points: int | None = None, compress: float | None = None,
                        remove_invalid: bool = False, overwrite: bool = False) -> Path:
    """Create the hdf5 file of a cohort (layout of dwi_ml spec §1.5 plus a ``version`` attribute).

    Parameters
    ----------
    dwi_ml_ready_folder : path
        One sub-folder per subject (the folder name is the subject id).
    out_hdf5_file : path
        ``.hdf5`` is appended when there is no extension; any other extension is an error.
    config_file : path
        Groups config (see ``trackflow.data.hdf5.config``); copied beside the output as
        ``<out basename>.json``.
    training_subjs, validation_subjs, testing_subjs : path
        Subject lists (whitespace-separated ids; may be empty).
    enforce_files_presence : bool
        When False, patterns matching nothing only warn.
    save_intermediate : bool
        Also write each subject's final volumes (``.nii.gz``) and streamlines (``.trk``) in
        ``<out dir>/intermediate_<YYYY_mm_dd_HHMMSS>/``.
    step_size, nb_points, compress : optional
        At most one: resample to a step (mm), to a number of points, or compress (tolerance, mm).
    remove_invalid : bool
        Drop streamlines leaving the bounding box after resampling.
    overwrite : bool
        Replace existing outputs.

    Returns
    -------
    Path
        The hdf5 file written.
    """
    root = Path(dwi_ml_ready_folder)
    if not root.is_dir():
        raise TrackflowError(f"dwi_ml_ready folder {root} does not exist or is not a directory")
    out = Path(out_hdf5_file)
    if out.suffix == "":
        out = out.with_suffix(".hdf5")
    elif out.suffix != ".hdf5":
        raise TrackflowError(f"output {out} must have the .hdf5 extension")
    out_config = out.with_suffix(".json")
    for path in (out, out_config):
        if path.is_dir():
            raise TrackflowError(f"output {path} is a directory")
    check_outputs([out, out_config], overwrite)
    if sum(v is not None for v in (step_size, nb_points, compress)) > 1:
        raise TrackflowError("give at most one of step_size, nb_points and compress")

    raw_config, groups = read_groups_config(config_file)
    subsets = {name: read_subject_list(path) for name, path in
               zip(SUBSETS, (training_subjs, validation_subjs, testing_subjs))}
    chosen = _check_subjects(root, subsets)
    if enforce_files_presence:
        _check_presence(root, chosen, groups)
    options = dict(step_size=step_size, nb_points=nb_points, compress=compress,
                   remove_invalid=remove_invalid, enforce_presence=enforce_files_presence)

    intermediate_dir = None
    if save_intermediate:
        intermediate_dir = out.parent / f"intermediate_{datetime.now():%Y_%m_%d_%H%M%S}"
        intermediate_dir.mkdir(parents=True, exist_ok=True)

    # The hdf5 and its .json appear together: the .json is renamed into place only after the hdf5.
    with atomic_output(out_config, overwrite=overwrite) as tmp_config, \
            atomic_output(out, overwrite=overwrite) as tmp:
        shutil.copyfile(config_file, tmp_config)
        with h5py.File(tmp, "w") as h5_file:
            h5_file.attrs["data_and_time"] = datetime.now().strftime("%d %B %Y %H:%M:%S")
            h5_file.attrs["chosen_subjs"] = _string_array(chosen)
            h5_file.attrs["groups_config"] = str(raw_config)
            for name, subjects in subsets.items():
                h5_file.attrs[name] = _string_array(subjects)
            h5_file.attrs["step_size"] = _attr_or_not_defined(step_size)
            h5_file.attrs["nb_points"] = _attr_or_not_defined(nb_points)
            h5_file.attrs["compress"] = _attr_or_not_defined(compress)
            h5_file.attrs["version"] = HDF5_LAYOUT_VERSION
            first_features = {}
            for i, subject in enumerate(chosen):
                LOGGER.info("subject %s (%d/%d)", subject, i + 1, len(chosen))
                nb_features = _process_subject(h5_file, root, subject, groups, options, intermediate_dir)
                _check_same_features(nb_features, subject, first_features)
    return out


def _check_subjects(root: Path, subsets: dict[str, list[str]]) -> list[str]:
    """All listed subjects (each once, in list order); each must have a folder."""
    chosen = []
    for name, subjects in subsets.items():
        for subject in subjects:
            if subject in chosen:
                LOGGER.warning("subject '%s' is in more than one subject list", subject)
                continue
            if not (root / subject).is_dir():
                raise TrackflowError(f"subject '{subject}' ({name} list) has no folder in {root}")
            chosen.append(subject)
    if not chosen:
        raise TrackflowError("the three subject lists are empty")
    unlisted = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in chosen)
    if unlisted:
        LOGGER.warning("folders of %d unlisted subject(s) ignored: %s", len(unlisted),
                       ", ".join(unlisted))
    return chosen
