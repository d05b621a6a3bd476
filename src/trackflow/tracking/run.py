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
from trackflow.data.tractograms import check_tractogram_path, save_tractogram_file
from trackflow.tracking.decoders import DET_DIRECTIONS, PROB_SAMPLINGS, make_direction_decoder
from trackflow.tracking.filtering import FilteredTractogram, filter_streamlines
from trackflow.tracking.parallel import available_cpus, track_in_processes
from trackflow.tracking.seeds import SeedGenerator, check_seed_counts, count_seeds
from trackflow.tracking.stopping import MaskStoppingCriterion, VolumeStoppingCriterion
from trackflow.tracking.tracker import EOS_MAX, StopReason, Tracker, TrackingParameters, TrackingResult

LOGGER = logging.getLogger(__name__)

EOS_AUTO = "auto"
EOS_STOPS = (EOS_MAX, EOS_AUTO)


@dataclass(frozen=True)
class TrackingOptions:
    """The tracking scripts' options (spec §6.1); lengths in mm, angles in degrees.

    hdf5_file: cohort [the experiment's 'hdf5 file']; subset: where the subject is expected (a warning
    only); use_latest_epoch: checkpoint/model/ instead of best_model/; algo: one of ``decoders.ALGOS``;
    step_size [the model's]; theta: largest turn between steps; min_length, max_length: kept lengths (both halves);
    tracking_mask_group: volume group where tracking may go (value >= 0.5), else only the volume bounds;
    mask_interp: its interpolation; eos_stop: EOS rule, one of ``EOS_STOPS`` ('max': stop where EOS is the
    head's most likely outcome; 'auto': the threshold calibrated on the validation subjects, stored in the
    experiment) or a probability threshold [0.5 with EOS]; prob_sampling: one of ``decoders.PROB_SAMPLINGS``,
    within the theta cone or from the whole distribution ['cone']; det_direction: one of
    ``decoders.DET_DIRECTIONS``, the most likely direction within the theta cone or overall ['full'];
    discard_last_point:
    drop the first point outside the mask; track_forward_only: skip the backward half; npv / nt: seeds per
    seeding voxel [1] / in total; rng_seed [random, logged]; compress_th: compression tolerance [none];
    save_seeds: store seeds per streamline; use_gpu; simultaneous_tracking: slots of the batched tracker;
    overwrite: replace an existing output; processes: CPU processes sharing the seeds [the job's cores;
    refused with use_gpu]; seed_range: (START, END), track only seeds START..END-1 of the run's seed
    sequence (a chunk; ``trackflow_merge_tractograms`` joins chunks) [all].
    """

    hdf5_file: str | Path | None = None
    subset: str = "testing"
    use_latest_epoch: bool = False
    algo: str = "det"
    step_size: float | None = None
    theta: float = 90.0
    min_length: float = 10.0
    max_length: float = 300.0
    tracking_mask_group: str | None = None
    mask_interp: str = "nearest"
    eos_stop: float | str | None = None
    prob_sampling: str = "cone"
    det_direction: str = "full"
    discard_last_point: bool = False
    track_forward_only: bool = False
    npv: int | None = None
    nt: int | None = None
    rng_seed: int | None = None
    compress_th: float | None = None
    save_seeds: bool = False
    use_gpu: bool = False
    simultaneous_tracking: int | None = None  # None: the model's default_tracking_slots
    overwrite: bool = False
    processes: int | None = None
    seed_range: tuple | None = None

    def __post_init__(self):
        # One place per rule: the other options are checked where they are used, before tracking starts
        # (algo: decoders.make_direction_decoder; step size, slot count: TrackingParameters; subset:
        # HDF5Cohort.subjects; mask interpolation: MaskStoppingCriterion); the seed counts by the seeds
        # module, shared with the scilpy baseline.
        if not 0 < self.theta <= 180:
            raise TrackflowError(f"--theta must be in (0, 180] degrees, got {self.theta}")
        if not self.max_length > 0:
            raise TrackflowError(f"--max_length must be positive, got {self.max_length}")
        if self.min_length < 0 or self.min_length > self.max_length:
            raise TrackflowError(f"--min_length must be in [0, --max_length], got {self.min_length}")
        if isinstance(self.eos_stop, str):
            if self.eos_stop not in EOS_STOPS:
                raise TrackflowError(f"--eos_stop must be a probability or one of {', '.join(EOS_STOPS)}, "
                                     f"got {self.eos_stop!r}")
        elif self.eos_stop is not None and not 0 <= self.eos_stop <= 1:
            raise TrackflowError(f"--eos_stop must be in [0, 1], got {self.eos_stop}")
        if self.prob_sampling not in PROB_SAMPLINGS:
            raise TrackflowError(f"--prob_sampling must be one of {', '.join(PROB_SAMPLINGS)}, "
                                 f"got {self.prob_sampling!r}")
        if self.det_direction not in DET_DIRECTIONS:
            raise TrackflowError(f"--det_direction must be one of {', '.join(DET_DIRECTIONS)}, "
                                 f"got {self.det_direction!r}")
        check_seed_counts(self.npv, self.nt)
        if self.compress_th is not None and not self.compress_th > 0:
            raise TrackflowError(f"--compress must be positive, got {self.compress_th}")
        if self.processes is not None and (self.processes < 1 or self.use_gpu):
            raise TrackflowError(f"--processes must be at least 1, got {self.processes}" if self.processes < 1
                                 else "--processes is for CPU tracking: --use_gpu tracks in one process")
        if self.seed_range is not None and not 0 <= self.seed_range[0] < self.seed_range[1]:
            raise TrackflowError(f"--seed_range START END needs 0 <= START < END, got {list(self.seed_range)}")


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


def check_max_length(max_length_mm: float, step_mm: float, model_max_points: int | None) -> None:
    """A streamline must fit one step, and the model's longest sequence (a transformer's ``max_len``)."""
    if step_mm > max_length_mm:
        raise TrackflowError(f"--max_length {max_length_mm:g} mm is shorter than one step ({step_mm:g} mm): "
                             "lower --step_size or raise --max_length")
    if model_max_points is not None and max_points_for(max_length_mm, step_mm) > model_max_points:
        # The largest length whose max_points_for is model_max_points.
        longest = (model_max_points - 1) * step_mm
        raise TrackflowError(f"--max_length {max_length_mm:g} mm needs {max_points_for(max_length_mm, step_mm)} "
                             f"points at a {step_mm:g} mm step but the model's max_len is {model_max_points}: "
                             f"use --max_length {longest:g} or less")


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


@dataclass
class SubjectInputs:
    """What tracking reads of one subject: the model input, the masks and the output's reference.

    volume: the input group (``data`` [X, Y, Z, F], ``voxres`` in mm); seeding_mask, tracking_mask:
    [X, Y, Z] (tracking_mask None without ``--tracking_mask_group``); reference: the seeding mask's NIfTI;
    voxel_mm: the isotropic voxel size.
    """

    volume: object
    seeding_mask: np.ndarray
    tracking_mask: np.ndarray | None
    reference: object
    voxel_mm: float


def read_subject_inputs(hdf5_path: Path, subj_id: str, input_group: str, seeding_mask_group: str,
                        options: TrackingOptions, nb_features: int) -> SubjectInputs:
    """Read the subject's groups, checking the input's feature count (the model's ``nb_features``) and
    that voxels are isotropic; an empty seeding mask is the caller's check (it needs the seed count)."""
    with HDF5Cohort(hdf5_path) as cohort:
        volume = cohort.read_volume(subj_id, input_group)  # first: a missing subject is an error
        if subj_id not in cohort.subjects(options.subset):
            LOGGER.warning("subject %s is not in the %s subset of %s; using it anyway", subj_id,
                           options.subset, hdf5_path)
        if volume.data.shape[3] != nb_features:
            raise TrackflowError(f"input group '{input_group}' has {volume.data.shape[3]} features but the "
                                 f"model expects {nb_features}")
        cohort.check_finite(subj_id, input_group, "volume")  # NaN inputs would stop streamlines silently
        seeding_mask = _read_mask(cohort, subj_id, seeding_mask_group, "seeding")
        tracking_mask = (_read_mask(cohort, subj_id, options.tracking_mask_group, "tracking")
                         if options.tracking_mask_group is not None else None)
        reference = cohort.reference_nifti(subj_id, seeding_mask_group)

    voxres = np.asarray(volume.voxres, dtype=float)
    if not np.allclose(voxres, voxres[0], rtol=1e-4):
        raise TrackflowError(f"tracking needs isotropic voxels, got voxel sizes {voxres.tolist()}")
    return SubjectInputs(volume, seeding_mask, tracking_mask, reference, float(voxres[0]))


def _read_mask(cohort: HDF5Cohort, subj_id: str, group: str, role: str) -> np.ndarray:
    """A mask group as [X, Y, Z]: one volume of finite values (NaN would count as inside everywhere)."""
    data = cohort.read_volume(subj_id, group).data
    if data.shape[3] != 1:
        raise TrackflowError(f"the {role} mask group '{group}' holds {data.shape[3]} volumes, not one: "
                             "combine the masks into one file")
    if not np.isfinite(data).all():
        raise TrackflowError(f"the {role} mask group '{group}' of subject {subj_id} has non-finite values "
                             "(NaN or infinity)")
    return data[..., 0]


def eos_threshold(options: TrackingOptions, experiment_path, model) -> float | str | None:
    """The tracker's EOS rule: ``--eos_stop`` with 'auto' replaced by the experiment's calibrated threshold
    (an error when it has none); not given: the calibrated threshold when the model has one (dwi_ml's models and
    those trained without a validation subject do not), else 0.5; None (no EOS stop) for a model without EOS."""
    if not getattr(model.direction_getter, "add_eos", False):
        if options.eos_stop is not None:
            LOGGER.warning("--eos_stop given but the model has no EOS output: ignored")
        return None
    experiment = ExperimentFolder(experiment_path)
    if options.eos_stop == EOS_AUTO or (options.eos_stop is None
                                        and experiment.has_eos_calibration(options.use_latest_epoch)):
        threshold = experiment.read_eos_threshold(options.use_latest_epoch)
        LOGGER.info("EOS stop: threshold %.4g, calibrated on the validation subjects", threshold)
        return threshold
    if options.eos_stop is None:
        LOGGER.info("EOS stop: threshold 0.5 (the model folder holds no EOS calibration)")
        return 0.5
    return options.eos_stop


def build_tracker(model, inputs: SubjectInputs, options: TrackingOptions, step_mm: float, rng_seed: int,
                  device, eos_rule: float | str | None = 0.5) -> Tracker:
    """The batched tracker of this run, its volume, criterion and seeds on ``device``; ``eos_rule`` from
    ``eos_threshold``."""
    volume_tensor = torch.as_tensor(inputs.volume.data, device=device)
    criterion = (MaskStoppingCriterion(torch.as_tensor(inputs.tracking_mask, device=device), options.mask_interp)
                 if inputs.tracking_mask is not None else VolumeStoppingCriterion(inputs.volume.data.shape))
    params = TrackingParameters(step_size_vox=step_mm / inputs.voxel_mm,
                                max_points=max_points_for(options.max_length, step_mm),
                                theta_deg=options.theta,
                                eos_threshold=eos_rule,
                                track_forward_only=options.track_forward_only,
                                discard_last_point=options.discard_last_point,
                                n_slots=options.simultaneous_tracking or model.default_tracking_slots)
    decoder = make_direction_decoder(options.algo, model.direction_getter, rng_seed, options.prob_sampling,
                                     options.theta, options.det_direction)
    return Tracker(model, volume_tensor, criterion, SeedGenerator(inputs.seeding_mask, rng_seed, device), decoder,
                   params)


def write_tractogram(result: TrackingResult, out_tractogram, inputs: SubjectInputs,
                     options: TrackingOptions) -> FilteredTractogram:
    """Length-filter (after the optional compression) and write what is kept (nothing kept: an empty
    tractogram, which the workflow's next steps read as such)."""
    kept = filter_streamlines(result, inputs.voxel_mm, options.min_length, options.max_length,
                              options.compress_th)
    save_tractogram_file(out_tractogram, kept.streamlines, inputs.reference,
                         kept.seeds if options.save_seeds else None, overwrite=options.overwrite)
    if not len(kept.streamlines):
        LOGGER.warning("no streamline survived: wrote an empty tractogram %s", out_tractogram)
    return kept


def summarize(result: TrackingResult, kept: FilteredTractogram, n_seeds: int, seconds: float) -> TrackingSummary:
    ends = result.end_reasons.ravel()  # both ends of every seed's streamline, kept or not
    return TrackingSummary(
        n_seeds=n_seeds, n_kept=len(kept.streamlines), n_too_short=kept.n_too_short,
        n_too_long=kept.n_too_long,
        stop_counts={r.name: int((ends == r).sum()) for r in StopReason if r != StopReason.NOT_TRACKED},
        mean_length_mm=float(kept.lengths_mm.mean()) if len(kept.lengths_mm) else 0.0, seconds=seconds)


def seed_bounds(options: TrackingOptions, n_seeds: int) -> tuple:
    """The (start, end) seed indices to track: ``--seed_range`` (checked against the seed count) or all."""
    if options.seed_range is None:
        return 0, n_seeds
    start, end = options.seed_range
    if end > n_seeds:
        raise TrackflowError(f"--seed_range {start} {end} goes past the run's {n_seeds} seeds")
    return start, end


def process_count(options: TrackingOptions, device) -> int:
    """``--processes``, else every core the job was given on the CPU, one process on a GPU."""
    if options.processes is not None:
        return options.processes
    return available_cpus() if device.type == "cpu" else 1


def track_from_experiment(model_family: str, experiment_path, subj_id: str, input_group: str,
                          out_tractogram, seeding_mask_group: str,
                          options: TrackingOptions) -> TrackingSummary:
    """Track ``subj_id`` with the experiment's model and write ``out_tractogram``.

    ``model_family`` is ``"l2t"`` or ``"tt"`` (which script asked). Everything is checked before tracking
    starts. Returns the run's summary (also printed on stderr).
    """
    reading_started = time.perf_counter()
    check_tractogram_path(out_tractogram, options.save_seeds)
    hdf5_path = _hdf5_path(experiment_path, options.hdf5_file)
    check_outputs([out_tractogram], options.overwrite, inputs=[hdf5_path])
    device = select_device(options.use_gpu)
    model = load_experiment_model(experiment_path, use_latest_epoch=options.use_latest_epoch, device=device)
    check_model_family(type(model).__name__, model_family, "track_from_model")
    step_mm = _step_size(model, options.step_size)
    check_max_length(options.max_length, step_mm, getattr(model, "max_len", None))
    inputs = read_subject_inputs(hdf5_path, subj_id, input_group, seeding_mask_group, options,
                                 model.nb_features)
    eos_rule = eos_threshold(options, experiment_path, model)
    n_seeds = count_seeds(inputs.seeding_mask, options.npv, options.nt)
    if n_seeds == 0:
        raise TrackflowError(f"the seeding mask group '{seeding_mask_group}' is empty (no voxel > 0)")
    start, end = seed_bounds(options, n_seeds)
    rng_seed = options.rng_seed
    if rng_seed is None:
        rng_seed = secrets.randbits(62)
        LOGGER.info("no --rng_seed given: using %d", rng_seed)
    tracker = build_tracker(model, inputs, options, step_mm, rng_seed, device, eos_rule)
    processes = process_count(options, device)
    # In a log (no progress bar there) this line says that tracking has started.
    LOGGER.info("tracking seeds %d..%d of %s with %s (%s, %d in flight, %d process%s)", start, end - 1, subj_id,
                type(model).__name__, options.algo, tracker.params.n_slots, processes,
                "" if processes == 1 else "es")

    started = time.perf_counter()
    # disable=None: a bar on a terminal only, no carriage-return noise in rule and SLURM logs
    with tqdm(total=end - start, unit="seed", file=sys.stderr, mininterval=1.0, disable=None) as progress:
        result = track_in_processes(tracker, start, end, processes, progress)
    seconds = time.perf_counter() - started

    kept = write_tractogram(result, out_tractogram, inputs, options)
    LOGGER.info("times: reading the model and the subject %.2f s, tracking %.2f s, filtering and writing %.2f s",
                started - reading_started, seconds, time.perf_counter() - started - seconds)
    summary = summarize(result, kept, end - start, seconds)
    print(summary.line(), file=sys.stderr)
    return summary
