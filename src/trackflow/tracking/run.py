"""Track one subject of an hdf5 cohort with a trained model: what the two tracking CLIs call.

Everything that can be wrong with the inputs is checked before tracking starts, and the tractogram is
written atomically, so bad input means one error line and no output file.
"""

import logging
import math
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.device import select_device
from trackflow.errors import TrackflowError
from trackflow.experiment import ExperimentFolder
from trackflow.files import check_outputs
from trackflow.models.persistence import load_experiment_model
from trackflow.models.registry import check_model_family
from trackflow.tracking.decoders import make_direction_decoder
from trackflow.tracking.filtering import filter_streamlines
from trackflow.data.tractograms import check_tractogram_path, save_tractogram_file
from trackflow.tracking.seeds import SeedGenerator, count_seeds
from trackflow.tracking.stopping import MaskStoppingCriterion, VolumeStoppingCriterion
from trackflow.tracking.tracker import StopReason, Tracker, TrackingParameters

LOGGER = logging.getLogger(__name__)


@dataclass
class TrackingSummary:
    """What one tracking run produced (also printed as one line)."""

    n_seeds: int
    n_kept: int
    n_too_short: int
    n_too_long: int
    stop_counts: dict  # StopReason name -> number of streamline ends
    mean_length_mm: float
    seconds: float

    def line(self) -> str:
        stops = ", ".join(f"{name.lower()} {n}" for name, n in self.stop_counts.items() if n)
        rate = self.n_seeds / self.seconds if self.seconds > 0 else float("inf")
        return (f"kept {self.n_kept} of {self.n_seeds} streamlines; rejected: too short {self.n_too_short}, "
                f"too long {self.n_too_long}; ends: {stops}; mean length {self.mean_length_mm:.1f} mm; "
                f"{rate:.0f} streamlines/s")


def max_points_for(max_length_mm: float, step_size_mm: float) -> int:
    """Most points a streamline may have so that its length, (points - 1) * step, stays <= max_length."""
    return int(math.floor(max_length_mm / step_size_mm + 1e-6)) + 1


def _hdf5_path(experiment_path, hdf5_file) -> Path:
    if hdf5_file is not None:
        return Path(hdf5_file)
    experiment = ExperimentFolder(experiment_path)
    if not experiment.latest_parameters_file.is_file():
        raise TrackflowError(f"no --hdf5_file given and {experiment.latest_parameters_file} does not exist")
    path = experiment.read_latest_parameters().get("hdf5 file")
    if not path:
        raise TrackflowError(f"no --hdf5_file given and {experiment.latest_parameters_file} names no "
                             "'hdf5 file'")
    return Path(path)


def _step_size(model, step_size) -> float:
    if step_size is None:
        if model.step_size is None:
            raise TrackflowError("the model was not trained with a fixed step size (compressed or "
                                 "resampled streamlines): give --step_size")
        return float(model.step_size)
    if model.step_size is not None and not math.isclose(step_size, model.step_size):
        LOGGER.warning("--step_size %g mm differs from the model's training step size %g mm",
                       step_size, model.step_size)
    return float(step_size)


def track_from_experiment(model_family: str, experiment_path, subj_id: str, input_group: str,
                          out_tractogram, seeding_mask_group: str, *, hdf5_file=None, subset="testing",
                          use_latest_epoch=False, algo="det", step_size=None, theta=90.0, min_length=10.0,
                          max_length=300.0, tracking_mask_group=None, mask_interp="nearest", eos_stop=None,
                          discard_last_point=False, track_forward_only=False, npv=None, nt=None,
                          rng_seed=None, compress_th=None, save_seeds=False, use_gpu=False,
                          simultaneous_tracking=1000, overwrite=False) -> TrackingSummary:
    """Track ``subj_id`` with the experiment's model and write ``out_tractogram``.

    Options have the meaning of spec §6.1 (see ``cli_args.build_tracking_parser``); lengths in mm.
    ``model_family`` is ``"l2t"`` or ``"tt"`` (which script asked). Returns the run's summary.
    """
    check_tractogram_path(out_tractogram, save_seeds)
    check_outputs([out_tractogram], overwrite)
    if min_length < 0 or min_length > max_length:
        raise TrackflowError(f"--min_length must be in [0, --max_length], got {min_length}")
    device = select_device(use_gpu)
    hdf5_path = _hdf5_path(experiment_path, hdf5_file)
    model = load_experiment_model(experiment_path, use_latest_epoch=use_latest_epoch, device=device)
    check_model_family(type(model).__name__, model_family, "track_from_model")
    step_mm = _step_size(model, step_size)

    with HDF5Cohort(hdf5_path) as cohort:
        volume = cohort.read_volume(subj_id, input_group)  # first: a missing subject is an error
        if subj_id not in cohort.subjects(subset):
            LOGGER.warning("subject %s is not in the %s subset of %s; using it anyway", subj_id, subset,
                           hdf5_path)
        if volume.data.shape[3] != model.nb_features:
            raise TrackflowError(f"input group '{input_group}' has {volume.data.shape[3]} features but the "
                                 f"model expects {model.nb_features}")
        seeding_mask = cohort.read_volume(subj_id, seeding_mask_group).data[..., 0]
        tracking_mask = (cohort.read_volume(subj_id, tracking_mask_group).data[..., 0]
                         if tracking_mask_group is not None else None)
        reference = cohort.reference_nifti(subj_id, seeding_mask_group)

    voxres = np.asarray(volume.voxres, dtype=float)
    if not np.allclose(voxres, voxres[0], rtol=1e-4):
        raise TrackflowError(f"tracking needs isotropic voxels, got voxel sizes {voxres.tolist()}")
    voxel_mm = float(voxres[0])
    if eos_stop is not None and not getattr(model.direction_getter, "add_eos", False):
        LOGGER.warning("--eos_stop given but the model has no EOS output: ignored")
    n_seeds = count_seeds(seeding_mask, npv, nt)
    if n_seeds == 0:
        raise TrackflowError(f"the seeding mask group '{seeding_mask_group}' is empty (no voxel > 0)")
    if rng_seed is None:
        rng_seed = secrets.randbits(62)
        LOGGER.info("no --rng_seed given: using %d", rng_seed)

    volume_tensor = torch.as_tensor(volume.data, device=device)
    criterion = (MaskStoppingCriterion(torch.as_tensor(tracking_mask, device=device), mask_interp)
                 if tracking_mask is not None else VolumeStoppingCriterion(volume.data.shape))
    params = TrackingParameters(step_size_vox=step_mm / voxel_mm, max_points=max_points_for(max_length, step_mm),
                                theta_deg=theta, eos_threshold=0.5 if eos_stop is None else eos_stop,
                                track_forward_only=track_forward_only,
                                discard_last_point=discard_last_point, n_slots=simultaneous_tracking)
    decoder = make_direction_decoder(algo, model.direction_getter, rng_seed)
    tracker = Tracker(model, volume_tensor, criterion, SeedGenerator(seeding_mask, rng_seed, device), decoder,
                      params)

    started = time.perf_counter()
    with tqdm(total=n_seeds, unit="seed", file=sys.stderr, mininterval=1.0) as progress:
        result = tracker.track(n_seeds, progress)
    seconds = time.perf_counter() - started

    kept = filter_streamlines(result, voxel_mm, min_length, max_length, compress_th)
    if len(kept.streamlines):
        save_tractogram_file(out_tractogram, kept.streamlines, reference, kept.seeds if save_seeds else None)
    else:
        LOGGER.warning("no streamline survived: %s not written", out_tractogram)
    ends = result.end_reasons.ravel()  # both ends of every seed's streamline, kept or not
    summary = TrackingSummary(
        n_seeds=n_seeds, n_kept=len(kept.streamlines), n_too_short=kept.n_too_short,
        n_too_long=kept.n_too_long,
        stop_counts={r.name: int((ends == r).sum()) for r in StopReason if r != StopReason.NOT_TRACKED},
        mean_length_mm=float(kept.lengths_mm.mean()) if len(kept.lengths_mm) else 0.0, seconds=seconds)
    print(summary.line(), file=sys.stderr)
    return summary
