"""From sampled streamline ids to the rows a model trains on (spec dwi_ml.md §5.2).

Two steps per batch:

1. ``BatchLoader.load``: read the sampled streamlines (vox/corner), resample them to the model's
   preprocessing when it differs from the hdf5's, apply split and reverse augmentation (training only),
   and move them to the training device as one concatenated ``[P, 3]`` tensor plus lengths.
2. ``BatchLoader.rows``: on the device, interpolate the model inputs at the clean points, add the
   truncated Gaussian coordinate noise (training only) to the coordinates the model sees and to the loss
   targets, and build the per-row targets (N-1 rows without EOS, N rows with EOS).

Rotation augmentation (``rotation_augmentation_deg`` > 0, training only): each streamline gets its own
random rotation R about its centroid c, as if its subject had been rotated: the model sees the rotated points
R (x - c) + c (previous directions, target tokens, loss targets), and inputs interpolated in the ORIGINAL
volume at x + R^T o for each neighbourhood offset o, the SH features rotated by M(R) (``geometry.sh_rotation``,
exact, through the standardization stored in the hdf5) and the scalar features only resampled.

Randomness: a numpy Generator (split / reverse choices and rotations, on CPU) and a torch Generator on the
training device (noise), both seeded from ``--rng`` and saved in the checkpoint. Each augmentation draws only
when it is on, so turning one off leaves the others' draws unchanged.
"""

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from trackflow.data import streamlines as streamline_ops
from trackflow.errors import TrackflowError
from trackflow.geometry.interpolation import interpolate_trilinear
from trackflow.geometry.sh_rotation import SH_BASES, random_rotations, sh_order_of_count, sh_rotation_matrices

# Split augmentation (dwi_ml): only streamlines with more than 12 points; each half keeps >= 6 points.
MIN_POINTS_TO_SPLIT = 13
MIN_POINTS_PER_HALF = 6
# Coordinate noise is a normal law truncated at +-2 standard deviations.
NOISE_TRUNCATION_SIGMAS = 2.0


@dataclass
class LoaderParams:
    """Data-augmentation options, as stored in ``parameters_*.json`` and the checkpoint."""

    noise_gaussian_size_forward: float = 0.0
    noise_gaussian_size_loss: float = 0.0
    split_ratio: float = 0.0
    reverse_ratio: float = 0.0
    # Random rotation of each training streamline (largest angle, degrees; 0: off), the SH features of the
    # input group rotated with it: [first feature, count] (None: every feature is a scalar) in sh_basis.
    rotation_augmentation_deg: float = 0.0
    rotation_axis: list | None = None  # voxel axes; None: uniform on the sphere
    sh_features: list | None = None
    sh_basis: str = "descoteaux07"

    def __post_init__(self):
        for name in ("split_ratio", "reverse_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise TrackflowError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("noise_gaussian_size_forward", "noise_gaussian_size_loss"):
            if getattr(self, name) < 0:
                raise TrackflowError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.rotation_augmentation_deg <= 180.0:
            raise TrackflowError(f"--rotation_augmentation must be in [0, 180] degrees, got "
                                 f"{self.rotation_augmentation_deg}")
        if self.rotation_axis is not None:
            self.rotation_axis = [float(v) for v in self.rotation_axis]
            if len(self.rotation_axis) != 3 or not np.linalg.norm(self.rotation_axis) > 0:
                raise TrackflowError(f"--rotation_axis takes X Y Z, not all zero, got {self.rotation_axis}")
            if self.rotation_augmentation_deg == 0:
                raise TrackflowError("--rotation_axis is only used by --rotation_augmentation, which is off")
        if self.sh_basis not in SH_BASES:
            raise TrackflowError(f"--sh_basis must be one of {list(SH_BASES)}, got {self.sh_basis!r}")
        if self.sh_features is not None:
            self.sh_features = [int(v) for v in self.sh_features]
            if len(self.sh_features) != 2 or self.sh_features[0] < 0:
                raise TrackflowError(f"--sh_features takes FIRST COUNT (first >= 0), got {self.sh_features}")
            sh_order_of_count(self.sh_features[1])
            if self.rotation_augmentation_deg == 0:
                raise TrackflowError("--sh_features is only used by --rotation_augmentation, which is off")

    @property
    def sh_slice(self) -> slice | None:
        """The SH features of one neighbour, or None."""
        if self.sh_features is None:
            return None
        return slice(self.sh_features[0], self.sh_features[0] + self.sh_features[1])

    def check_features(self, nb_features: int) -> None:
        """The SH block must lie within the input group's ``nb_features`` features."""
        if self.sh_features is not None and self.sh_slice.stop > nb_features:
            raise TrackflowError(f"--sh_features {self.sh_features[0]} {self.sh_features[1]} (features "
                                 f"{self.sh_slice.start}..{self.sh_slice.stop - 1}) goes past the input group's "
                                 f"{nb_features} features")


def recorded_standardization(cohort, subject: str, group: str) -> tuple[np.ndarray, np.ndarray]:
    """(offset, scale) [F] of a volume group as the hdf5 records it; a TrackflowError for an hdf5 written
    before these attributes existed (the rotation augmentation cannot rotate its SH features)."""
    stats = cohort.standardization(subject, group)
    if stats is None:
        raise TrackflowError(f"{cohort.path} does not record the standardization of group {group!r} (needed by "
                             "--rotation_augmentation with --sh_features): recreate the hdf5 with this version of "
                             "trackflow")
    return stats


@dataclass
class Batch:
    """Streamlines of one batch on the training device, grouped by subject.

    Attributes
    ----------
    points : Tensor [P, 3] float32
        All points, vox/corner, streamline after streamline.
    lengths : LongTensor [B]
        Points per streamline (on the device).
    subjects : list[tuple[str, int, int]]
        (subject, first streamline, end streamline) for each subject of the batch, in order.
    rotations : ndarray [B, 3, 3] float64 or None
        Rotation augmentation: one rotation per streamline (training only), applied by ``rows``.
    """

    points: torch.Tensor
    lengths: torch.Tensor
    subjects: list
    rotations: np.ndarray | None = None


@dataclass
class Rows:
    """What one batch gives the model and the loss; R = rows = sum of per-streamline input counts.

    Attributes
    ----------
    inputs : list[Tensor [N_i, Fin]]
    coordinates : list[Tensor [N_i, 3]]
        Points the model sees (previous directions, target tokens), with forward noise when training.
    target_dirs : Tensor [R, 3]
        Displacement to the next point (voxel units); zero on EOS rows.
    eos_target : BoolTensor [R] or None
        True on the last point of each streamline; None without EOS.
    """

    inputs: list
    coordinates: list
    target_dirs: torch.Tensor
    eos_target: torch.Tensor | None


class SubsetData:
    """Volumes and streamlines of one subset (training or validation), read through ``HDF5Cohort``.

    Non-lazy: every volume and every streamline group is read once, at construction (volumes on the
    device). Lazy: streamlines are read per batch and volumes through a FIFO cache of ``cache_size``.
    ``of_streamlines`` builds one for given streamlines (the loss evaluation's reference streamlines).
    """

    def __init__(self, cohort, subjects, input_group: str, streamline_group: str, device,
                 lazy: bool = False, cache_size: int = 1):
        self.cohort = cohort
        self.input_group = input_group
        self.streamline_group = streamline_group
        self.device = torch.device(device)
        self.lazy = lazy
        self.cache_size = cache_size
        self._volumes = OrderedDict()   # subject -> (Tensor [X, Y, Z, F], voxres [3])
        self._streamlines = {}
        self._standardization = {}  # subject -> (offset, scale) [F]
        if not lazy:
            for subject in subjects:
                self._volumes[subject] = self._read_volume(subject)
                self._streamlines[subject] = cohort.read_streamlines(subject, streamline_group)

    @classmethod
    def of_streamlines(cls, cohort, subject: str, input_group: str, streamlines, device) -> "SubsetData":
        """One subject whose streamlines are given (vox/corner, e.g. from a tractogram file) instead of
        read from a streamline group; its volume is read from the hdf5 on first use and kept."""
        data = cls(cohort, [subject], input_group, streamline_group=None, device=device, lazy=True, cache_size=1)
        data._streamlines[subject] = streamlines
        return data

    def standardization(self, subject: str) -> tuple[np.ndarray, np.ndarray]:
        """(offset, scale) [F] of the input group (raw = data * scale + offset), read from the hdf5."""
        if subject not in self._standardization:
            self._standardization[subject] = recorded_standardization(self.cohort, subject, self.input_group)
        return self._standardization[subject]

    def _read_volume(self, subject):
        volume = self.cohort.read_volume(subject, self.input_group)
        return torch.as_tensor(volume.data, dtype=torch.float32).to(self.device), np.asarray(volume.voxres)

    def volume(self, subject: str):
        """The input volume ``Tensor [X, Y, Z, F]`` on the device and its voxel sizes ``[3]`` (mm)."""
        if subject in self._volumes:
            return self._volumes[subject]
        entry = self._read_volume(subject)
        if self.cache_size > 0:
            while len(self._volumes) >= self.cache_size:
                self._volumes.popitem(last=False)
            self._volumes[subject] = entry
        return entry

    def streamlines(self, subject: str, ids: np.ndarray):
        """Streamlines ``ids`` of ``subject`` as an ArraySequence (vox/corner)."""
        if subject in self._streamlines:
            return self._streamlines[subject][ids]
        return self.cohort.read_streamlines(subject, self.streamline_group, ids)

    def clear_cache(self) -> None:
        """Drop lazily cached volumes (called between training and validation, as dwi_ml)."""
        if self.lazy:
            self._volumes.clear()


def cohort_preprocessing(cohort) -> dict:
    """The preprocessing of an hdf5's streamlines, under ``MainModel.preprocessing``'s key names (what
    ``BatchLoader`` compares with the model's to decide whether to resample)."""
    return {"step_size": cohort.step_size, "compress_lines": cohort.compress, "nb_points": cohort.nb_points}


class BatchLoader:
    """Turns sampled ids into device tensors and training rows.

    Parameters
    ----------
    params : LoaderParams
    model_preprocessing : dict
        The model's ``step_size`` (mm), ``compress_lines`` (mm) and ``nb_points``; at most one set.
    hdf5_preprocessing : dict
        The same three keys as stored in the hdf5 (None when not defined).
    seed : int
    device : torch.device
    """

    def __init__(self, params: LoaderParams, model_preprocessing: dict, hdf5_preprocessing: dict,
                 seed: int, device):
        self.params = params
        self.device = torch.device(device)
        self.rng = np.random.default_rng(seed)
        self.noise_generator = torch.Generator(device=self.device)
        self.noise_generator.manual_seed(seed)
        self.resampling = {k: v for k, v in model_preprocessing.items()
                           if v not in (None, False) and v != hdf5_preprocessing.get(k)}
        if len(self.resampling) > 1:
            raise TrackflowError("only one of step_size, compress and nb_points can be set")

    def get_state(self) -> dict:
        """RNG states, as plain values: numpy bit-generator dict and the torch generator's ByteTensor."""
        return {"numpy": self.rng.bit_generator.state, "torch": self.noise_generator.get_state()}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["numpy"]
        self.noise_generator.set_state(state["torch"])

    # ------------------------------------------------------------------ step 1: streamlines
    def load(self, data: SubsetData, sampled, training: bool) -> Batch:
        """Read, resample and (training only) augment the sampled streamlines.

        Parameters
        ----------
        data : SubsetData
        sampled : list[tuple[str, np.ndarray]]
            Batch from ``BatchSampler.epoch``.
        training : bool
            Split and reverse augmentation only when True.
        """
        arrays, subjects = [], []
        for subject, ids in sampled:
            _, voxres = data.volume(subject)
            streamlines = self._resample(data.streamlines(subject, ids), voxres)
            lines = [np.asarray(s, dtype=np.float32) for s in streamlines]
            if training:
                lines = self._reverse(self._split(lines))
                if self.params.rotation_augmentation_deg > 0 and not np.allclose(voxres, voxres[0]):
                    raise TrackflowError(f"--rotation_augmentation needs isotropic voxels; subject {subject!r} "
                                         f"has {list(voxres)} mm")
            subjects.append((subject, len(arrays), len(arrays) + len(lines)))
            arrays.extend(lines)
        lengths = torch.tensor([len(s) for s in arrays], dtype=torch.long)
        if bool((lengths < 2).any()):
            raise TrackflowError("a batch contains a streamline with fewer than 2 points")
        points = torch.from_numpy(np.concatenate(arrays)).to(self.device)
        rotations = None
        if training and self.params.rotation_augmentation_deg > 0:  # no draw when off
            rotations = random_rotations(self.rng, len(arrays), self.params.rotation_augmentation_deg,
                                         self.params.rotation_axis)
        return Batch(points, lengths.to(self.device), subjects, rotations)

    def _resample(self, streamlines, voxres):
        """Resample to the model's setting; lengths in mm become voxel units (isotropic voxels)."""
        if self.resampling and not np.allclose(voxres, voxres[0]):
            raise TrackflowError(f"cannot resample streamlines on anisotropic voxels {list(voxres)}; "
                                 "resample them when creating the hdf5 instead")
        if "step_size" in self.resampling:
            return streamline_ops.resample_step_size(streamlines, self.resampling["step_size"] / voxres[0])
        if "compress_lines" in self.resampling:
            return streamline_ops.compress(streamlines, self.resampling["compress_lines"] / voxres[0])
        if "nb_points" in self.resampling:
            return streamline_ops.resample_nb_points(streamlines, self.resampling["nb_points"])
        return streamlines

    def _split(self, lines: list) -> list:
        """Cut ``split_ratio`` of the streamlines in two halves sharing the cut point.

        Only streamlines with at least 13 points can be cut; those drawn are among them, so unlike
        dwi_ml no streamline is dropped.
        """
        n_wanted = int(round(self.params.split_ratio * len(lines)))
        eligible = np.flatnonzero([len(s) >= MIN_POINTS_TO_SPLIT for s in lines])
        n_split = min(n_wanted, len(eligible))
        if n_split == 0:
            return lines
        chosen = np.sort(self.rng.choice(eligible, size=n_split, replace=False))
        n_points = np.array([len(lines[i]) for i in chosen])
        # Cut at point k: halves [0, k] and [k, N-1], each with >= MIN_POINTS_PER_HALF points.
        cuts = self.rng.integers(MIN_POINTS_PER_HALF - 1, n_points - MIN_POINTS_PER_HALF + 1)
        cut_of = dict(zip(chosen.tolist(), cuts.tolist()))
        out = []
        for i, line in enumerate(lines):
            if i in cut_of:
                out.extend((line[:cut_of[i] + 1], line[cut_of[i]:]))
            else:
                out.append(line)
        return out

    def _reverse(self, lines: list) -> list:
        n_reverse = int(round(self.params.reverse_ratio * len(lines)))
        if n_reverse == 0:
            return lines
        chosen = set(self.rng.choice(len(lines), size=n_reverse, replace=False).tolist())
        return [np.ascontiguousarray(s[::-1]) if i in chosen else s for i, s in enumerate(lines)]

    # ------------------------------------------------------------------ step 2: rows
    def rows(self, model, data: SubsetData, batch: Batch, training: bool) -> Rows:
        """Model inputs and loss targets of a batch (on the device).

        Without EOS the last point of each streamline has no target and is not an input row
        (N-1 rows); with EOS all N points are rows and the last one's target is EOS.
        """
        add_eos = bool(model.direction_getter.add_eos)
        n_points = batch.points.shape[0]
        # is_last[p]: point p ends its streamline.  [P]
        ends = torch.cumsum(batch.lengths, 0) - 1
        is_last = torch.zeros(n_points, dtype=torch.bool, device=self.device)
        is_last[ends] = True
        row_mask = torch.ones_like(is_last) if add_eos else ~is_last
        rows_per_line = batch.lengths if add_eos else batch.lengths - 1
        rows_per_line_list = rows_per_line.tolist()

        clean_rows = batch.points[row_mask]                       # [R, 3]
        if batch.rotations is None:
            inputs = self._interpolate(model, data, batch, clean_rows, rows_per_line_list)
            seen_points = batch.points
        else:
            inputs = self._interpolate_rotated(model, data, batch, clean_rows, rows_per_line_list)
            seen_points = self._rotate_points(batch)

        loss_points = self._noisy(seen_points, self.params.noise_gaussian_size_loss, training)
        next_points = torch.roll(loss_points, shifts=-1, dims=0)  # wraps only on last points, zeroed below
        target_dirs = torch.where(is_last[:, None], torch.zeros_like(loss_points),
                                  next_points - loss_points)[row_mask]
        model_rows = self._noisy(seen_points[row_mask], self.params.noise_gaussian_size_forward, training)
        return Rows(inputs=inputs,
                    coordinates=list(torch.split(model_rows, rows_per_line_list)),
                    target_dirs=target_dirs,
                    eos_target=is_last[row_mask] if add_eos else None)

    def _interpolate(self, model, data, batch, clean_rows, rows_per_line_list):
        """Inputs at the clean row points, one ``compute_inputs`` call per subject (its own volume)."""
        row_starts = np.concatenate([[0], np.cumsum(rows_per_line_list)])
        inputs = []
        for subject, first, end in batch.subjects:
            volume, _ = data.volume(subject)
            subject_rows = clean_rows[int(row_starts[first]):int(row_starts[end])]
            features = model.compute_inputs(volume, subject_rows)          # [R_s, Fin]
            inputs.extend(torch.split(features, rows_per_line_list[first:end]))
        return inputs

    def _rotate_points(self, batch: Batch) -> torch.Tensor:
        """R_b (x - c_b) + c_b for every point of streamline b (c_b: its centroid).   [P, 3]"""
        rotations = torch.as_tensor(batch.rotations, dtype=batch.points.dtype, device=self.device)  # [B, 3, 3]
        line_of_point = torch.repeat_interleave(torch.arange(len(batch.lengths), device=self.device),
                                                batch.lengths)                                # [P]
        centroids = torch.zeros_like(rotations[:, :, 0]).index_add_(0, line_of_point, batch.points)
        centroids = (centroids / batch.lengths[:, None].to(centroids))[line_of_point]          # [P, 3]
        return torch.einsum("pij,pj->pi", rotations[line_of_point], batch.points - centroids) + centroids

    def _interpolate_rotated(self, model, data, batch, clean_rows, rows_per_line_list):
        """Inputs of the rotated streamlines: the original volume at x + R^T o, SH features rotated by M(R).

        With standardized features s = (raw - offset) / scale (per feature), the rotated raw SH M raw gives
        s' = D^-1 M D s + D^-1 (M - I) offset, D = diag(scale) of the SH block (D^-1 M D = M when the block
        shares one scale, as with per_file / all standardization).
        """
        params = self.params
        sh = params.sh_slice
        n_lines = len(rows_per_line_list)
        rotations = torch.as_tensor(batch.rotations, dtype=torch.float32, device=self.device)     # [B, 3, 3]
        offsets = model.neighborhood_offsets
        if offsets is None:
            offsets = torch.zeros(1, 3, device=self.device)
        offsets = offsets.to(device=self.device, dtype=torch.float32)                             # [M, 3]
        # R^T o per streamline: (R^T o)_i = sum_j R_ji o_j.   [B, M, 3]
        line_offsets = torch.einsum("bji,mj->bmi", rotations, offsets)
        line_of_row = torch.repeat_interleave(torch.arange(n_lines, device=self.device),
                                              torch.as_tensor(rows_per_line_list, device=self.device))
        if sh is not None:
            order = sh_order_of_count(sh.stop - sh.start)
            raw_matrices = sh_rotation_matrices(batch.rotations, order, params.sh_basis)      # [B, C, C]
        row_starts = np.concatenate([[0], np.cumsum(rows_per_line_list)])
        inputs = []
        for subject, first, end in batch.subjects:
            volume, _ = data.volume(subject)
            n_features = volume.shape[-1]
            rows = slice(int(row_starts[first]), int(row_starts[end]))
            points = clean_rows[rows][:, None, :] + line_offsets[line_of_row[rows]]             # [R_s, M, 3]
            features = interpolate_trilinear(volume, points.reshape(-1, 3))                   # [R_s*M, F]
            features = features.reshape(-1, offsets.shape[0], n_features)                     # [R_s, M, F]
            if sh is not None:
                offset, scale = data.standardization(subject)
                offset, scale = offset[sh], scale[sh]
                matrices = raw_matrices[first:end] / scale[None, :, None] * scale[None, None, :]  # D^-1 M D
                shifts = ((raw_matrices[first:end] - np.eye(len(offset))) @ offset) / scale  # [B_s, C]
                sh_matrices = torch.as_tensor(matrices, dtype=volume.dtype, device=self.device)
                shifts = torch.as_tensor(shifts, dtype=volume.dtype, device=self.device)
                # One small product per streamline (a per-row gather of the C x C matrices would not fit).
                rotated = torch.cat([block @ matrix.T + shift for block, matrix, shift in
                                     zip(torch.split(features[..., sh], rows_per_line_list[first:end]),
                                         sh_matrices, shifts)])                               # [R_s, M, C]
                features = torch.cat([features[..., :sh.start], rotated, features[..., sh.stop:]], dim=-1)
            features = features.reshape(features.shape[0], -1)                              # [R_s, M*F]
            inputs.extend(torch.split(features, rows_per_line_list[first:end]))
        return inputs

    def _noisy(self, points: torch.Tensor, sigma: float, training: bool) -> torch.Tensor:
        """``points`` plus Gaussian noise of std ``sigma`` truncated at +-2 sigma (training only)."""
        if not training or sigma == 0:
            return points
        noise = torch.empty_like(points)
        torch.nn.init.trunc_normal_(noise, 0.0, sigma, -NOISE_TRUNCATION_SIGMAS * sigma,
                                    NOISE_TRUNCATION_SIGMAS * sigma, generator=self.noise_generator)
        return points + noise
