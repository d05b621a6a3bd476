"""Generation-validation: how well a model tracks the validation streamlines from their first points.

dwi_ml's ``--add_a_tracking_validation_phase`` (its §5.4), with its defects fixed: steps are converted from mm
to voxels, distances are reported in mm, and the streamlines tracked are the same ones at every epoch (a
fixed draw), so that epochs are compared on the same set. Each validation streamline, resampled to the
model's step, gives its first ``nb_segments_init + 1`` points as the start; the model tracks forward from
there, deterministically, with the tracker the tracking scripts use (EOS above 0.5 stops, no angle stop,
the tracking mask stops, at most ``max_length_mm``). The score is the mean distance between the tracked and
the true last points: lower is better, and it falls only when the model follows the bundles to their ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.data.streamlines import resample_step_size
from trackflow.errors import TrackflowError
from trackflow.tracking.decoders import DeterministicDecoder
from trackflow.tracking.run import max_points_for
from trackflow.tracking.stopping import MaskStoppingCriterion
from trackflow.tracking.tracker import Tracker, TrackingParameters


@dataclass
class ValidationSubject:
    """What tracking one subject's validation streamlines needs, on the device.

    volume: [X, Y, Z, F]; mask: [X, Y, Z] tracking mask; starts: [N, K, 3] the streamlines' first points
    (vox/corner); true_ends: [N, 3] their last points; voxel_mm: isotropic voxel size.
    """

    volume: torch.Tensor
    mask: torch.Tensor
    starts: torch.Tensor
    true_ends: torch.Tensor
    voxel_mm: float


class _Starts:
    """The tracker's starts: the given first points of each streamline (the first one is its seed)."""

    def __init__(self, starts: torch.Tensor):
        self.starts = starts  # [S, K, 3]

    def positions(self, seed_indices: torch.Tensor) -> torch.Tensor:
        return self.starts[seed_indices, 0]

    def start_points(self, seed_indices: torch.Tensor) -> torch.Tensor:
        return self.starts[seed_indices]


def read_validation_subjects(cohort: HDF5Cohort, subjects: list[str], input_group: str, streamline_group: str,
                             mask_group: str, step_mm: float, nb_segments_init: int, max_streamlines: int,
                             rng_seed: int, device) -> list[ValidationSubject]:
    """The fixed draw of at most ``max_streamlines`` validation streamlines per subject (those with more than
    ``nb_segments_init + 1`` points at the model's step), with their subject's input and tracking mask."""
    rng = np.random.default_rng(rng_seed)
    out = []
    for subject in subjects:
        volume = cohort.read_volume(subject, input_group)
        voxel_mm = float(np.asarray(volume.voxres, dtype=float)[0])
        mask = cohort.read_volume(subject, mask_group).data
        if mask.shape[3] != 1:
            raise TrackflowError(f"--tracking_mask '{mask_group}' holds {mask.shape[3]} volumes, not one")
        n_streamlines = cohort.streamlines_count(subject, streamline_group)
        chosen = np.sort(rng.permutation(n_streamlines)[:max_streamlines])
        streamlines = resample_step_size(cohort.read_streamlines(subject, streamline_group, chosen),
                                         step_mm / voxel_mm)
        long_enough = [s for s in streamlines if len(s) > nb_segments_init + 1]
        if not long_enough:
            continue
        out.append(ValidationSubject(
            torch.as_tensor(volume.data, device=device), torch.as_tensor(mask[..., 0], device=device),
            torch.as_tensor(np.stack([s[:nb_segments_init + 1] for s in long_enough]), device=device),
            torch.as_tensor(np.stack([s[-1] for s in long_enough]), device=device), voxel_mm))
    if not out:
        raise TrackflowError("the tracking validation phase found no validation streamline longer than "
                             f"{nb_segments_init + 1} points at the model's step")
    return out


@torch.no_grad()
def tracking_validation_score(model, subjects: list[ValidationSubject], step_mm: float,
                              max_length_mm: float = 200.0, n_slots: int = 1000) -> float:
    """Mean distance (mm) between the tracked and the true last points over every subject's streamlines
    (the model in eval mode)."""
    distances = []
    for subject in subjects:
        params = TrackingParameters(step_size_vox=step_mm / subject.voxel_mm,
                                    max_points=max_points_for(max_length_mm, step_mm),
                                    theta_deg=180.0, eos_threshold=0.5, track_forward_only=True,
                                    discard_last_point=True, n_slots=n_slots)
        tracker = Tracker(model, subject.volume, MaskStoppingCriterion(subject.mask),
                                 _Starts(subject.starts), DeterministicDecoder(model.direction_getter), params)
        result = tracker.track(len(subject.starts))
        last_points = result.points[np.cumsum(result.lengths) - 1]
        distances.append(np.linalg.norm(last_points - subject.true_ends.cpu().numpy(), axis=1) * subject.voxel_mm)
    return float(np.concatenate(distances).mean())


# Validation streamlines tracked per subject at each phase: enough for a stable mean, a few seconds on a CPU.
MAX_STREAMLINES = 500


def make_tracking_validator(cohort: HDF5Cohort, model, input_group: str, streamline_group: str, params,
                            device):
    """The trainer's generation-validation callable, ``() -> mean end distance (mm)`` of ``model`` as it is.

    ``params``: the trainer's options (``tracking_mask``, ``tracking_phase_nb_segments_init``, ``rng``); the
    draw of validation streamlines is fixed by ``rng``.
    """
    step_mm = model.preprocessing["step_size"] or cohort.step_size
    if step_mm is None:
        raise TrackflowError("the tracking validation phase needs streamlines of a fixed step: give --step_size")
    subjects = read_validation_subjects(cohort, cohort.subjects("validation"), input_group, streamline_group,
                                        params.tracking_mask, float(step_mm), params.tracking_phase_nb_segments_init,
                                        MAX_STREAMLINES, params.rng, device)
    return lambda: tracking_validation_score(model, subjects, float(step_mm))
