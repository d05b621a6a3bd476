"""The training loop shared by Learn2track and TractoTransformer models (spec dwi_ml.md §5.2, §5.3).

``train_new_experiment`` checks every input, builds the model, then trains; ``resume_experiment``
continues from ``checkpoint/``. Per epoch: set the learning rate, train, validate (no grad, no noise, no
augmentation), keep the best model by validation loss (training loss when there is no validation subset),
save the logs and the checkpoint, stop on patience or ``max_epochs``; at the end, with EOS, store the EOS
threshold chosen on the validation subjects beside the best and the latest model (``eos_calibration``).

Reproducibility: the model is initialised after ``torch.manual_seed(rng)``; the samplers and the loader
own generators seeded from ``rng``; the checkpoint stores every RNG state (global torch RNG for dropout,
sampler and loader generators) and the optimizer state, so a resumed run continues the exact sample
stream of an uninterrupted one.
"""

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.device import keep_freed_host_memory, select_device
from trackflow.errors import TrackflowError
from trackflow.experiment import LOG_FILES, TRACKING_MONITOR, ExperimentFolder
from trackflow.models.base import ModelConfig
from trackflow.models.persistence import load_model_dir
from trackflow.models.registry import check_model_family, model_class
from trackflow.training.batch_loader import (BatchLoader, LoaderParams, SubsetData, cohort_preprocessing,
                                             recorded_standardization)
from trackflow.training.batch_sampler import BatchSampler, SamplerParams
from trackflow.training.eos_calibration import calibrate_eos

LOGGER = logging.getLogger(__name__)

OPTIMIZERS = {"Adam": torch.optim.Adam, "RAdam": torch.optim.RAdam, "SGD": torch.optim.SGD}
DEFAULT_LEARNING_RATE = 0.001
CHECKPOINT_FORMAT = "trackflow-checkpoint-1"


@dataclass
class TrainerParams:
    """Trainer options (spec §5.1), as stored in ``parameters_*.json`` and the checkpoint.

    ``learning_rates[e]`` is the rate of epoch e (0-based); the last value holds for later epochs. The device
    is not one of them: it is chosen at each start (``--use_gpu``), so a run may continue on another machine.
    """

    learning_rates: list = field(default_factory=lambda: [DEFAULT_LEARNING_RATE])
    weight_decay: float = 0.01
    optimizer: str = "Adam"
    max_epochs: int = 100
    patience: int | None = None
    patience_delta: float = 1e-6
    clip_grad: float | None = None
    rng: int = 1234
    # Generation-validation (dwi_ml's GV phase): the best epoch is the one whose model tracks a fixed draw of
    # validation streamlines, from their first tracking_phase_nb_segments_init + 1 points, closest to their ends.
    add_a_tracking_validation_phase: bool = False
    tracking_phase_frequency: int = 1
    tracking_mask: str | None = None
    tracking_phase_nb_segments_init: int = 1

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise TrackflowError(f"unknown optimizer {self.optimizer!r}; expected one of {sorted(OPTIMIZERS)}")
        if self.max_epochs < 1:
            raise TrackflowError(f"--max_epochs must be at least 1, got {self.max_epochs}")
        if self.patience is not None and self.patience < 1:
            raise TrackflowError(f"--patience must be at least 1, got {self.patience}")
        if not self.weight_decay >= 0:
            raise TrackflowError(f"--weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise TrackflowError(f"--clip_grad must be positive, got {self.clip_grad}")
        if not self.learning_rates or any(not lr > 0 for lr in self.learning_rates):
            raise TrackflowError(f"learning rates must be positive, got {self.learning_rates}")
        if self.add_a_tracking_validation_phase and self.tracking_mask is None:
            raise TrackflowError("--add_a_tracking_validation_phase needs --tracking_mask (the volume group "
                                 "that stops the tracked streamlines)")
        if self.tracking_phase_frequency < 1:
            raise TrackflowError(f"--tracking_phase_frequency must be at least 1, got {self.tracking_phase_frequency}")
        if self.tracking_phase_nb_segments_init < 1:
            raise TrackflowError("--tracking_phase_nb_segments_init must be at least 1, got "
                                 f"{self.tracking_phase_nb_segments_init}")

    def learning_rate(self, epoch: int) -> float:
        return self.learning_rates[min(epoch, len(self.learning_rates) - 1)]


@dataclass
class DataParams:
    """How volumes and streamlines are read (spec §1.5, lazy vs non-lazy)."""

    lazy: bool = False
    cache_size: int = 1

    def __post_init__(self):
        if self.cache_size < 0:
            raise TrackflowError(f"--cache_size must be >= 0, got {self.cache_size}")


def parse_learning_rates(tokens) -> list:
    """``['0.001*3', '0.0001']`` -> ``[0.001, 0.001, 0.001, 0.0001]``; None -> ``[0.001]``."""
    if not tokens:
        return [DEFAULT_LEARNING_RATE]
    rates = []
    for token in tokens:
        value, _, repeats = str(token).partition("*")
        try:
            rates.extend([float(value)] * (int(repeats) if repeats else 1))
        except ValueError:
            raise TrackflowError(f"bad learning rate {token!r}; expected a number or 'value*epochs'") from None
    return rates


def component_seeds(rng: int) -> dict:
    """Independent seeds for the training sampler, validation sampler and loader, derived from ``rng``."""
    seeds = np.random.SeedSequence(rng).generate_state(3)
    return dict(zip(("training_sampler", "validation_sampler", "loader"), (int(s) for s in seeds)))


class Trainer:
    """Runs epochs, selects the best model, writes logs and checkpoints.

    Parameters
    ----------
    model : MainModel
        On ``device``.
    folder : ExperimentFolder
    cohort : HDF5Cohort
        Opened; read through for the whole training.
    input_group, streamline_group : str
    model_type : str
        Class name written in ``model_type.txt``.
    training_sampler_params, validation_sampler_params : SamplerParams
    loader_params : LoaderParams
    params : TrainerParams
    data_params : DataParams
    device : torch.device
    tracking_validator : callable or None
        ``() -> float``, the generation-validation score of the model as it is (lower is better), given with
        ``params.add_a_tracking_validation_phase``; the best epoch is then chosen on it.
    """

    def __init__(self, model, folder: ExperimentFolder, cohort, input_group: str, streamline_group: str,
                 model_type: str, training_sampler_params: SamplerParams,
                 validation_sampler_params: SamplerParams, loader_params: LoaderParams,
                 params: TrainerParams, data_params: DataParams, device, tracking_validator=None):
        self.model = model
        self.folder = folder
        self.cohort = cohort
        self.input_group = input_group
        self.streamline_group = streamline_group
        self.model_type = model_type
        self.params = params
        self.data_params = data_params
        self.device = torch.device(device)
        self.sampler_params = {"training": training_sampler_params, "validation": validation_sampler_params}
        seeds = component_seeds(params.rng)

        self.training_sampler = BatchSampler.from_cohort(cohort, "training", streamline_group,
                                                         training_sampler_params, seeds["training_sampler"])
        if self.training_sampler is None:
            raise TrackflowError(f"{cohort.path} has no training subject")
        self.validation_sampler = BatchSampler.from_cohort(
            cohort, "validation", streamline_group, validation_sampler_params, seeds["validation_sampler"])
        if self.validation_sampler is None:
            LOGGER.warning("no validation subject: the best model is chosen on the training loss")
        self.loader = BatchLoader(
            loader_params,
            model.preprocessing,
            cohort_preprocessing(cohort),
            seeds["loader"], self.device)
        self.training_data = SubsetData(cohort, cohort.subjects("training"), input_group, streamline_group,
                                        self.device, data_params.lazy, data_params.cache_size)
        self.validation_data = (None if self.validation_sampler is None else
                                SubsetData(cohort, cohort.subjects("validation"), input_group,
                                           streamline_group, self.device, data_params.lazy,
                                           data_params.cache_size))
        self.optimizer = OPTIMIZERS[params.optimizer](model.parameters(), lr=params.learning_rate(0),
                                                      weight_decay=params.weight_decay)
        self.tracking_validator = tracking_validator
        self.monitors = {name: [] for name in LOG_FILES
                         if name != TRACKING_MONITOR or self.tracking_validator is not None}
        self.completed_epochs = 0
        self.best = {"epoch": None, "value": None, "train_loss": None, "valid_loss": None}
        self.epochs_without_improvement = 0

    # ------------------------------------------------------------------ description and state
    def run_parameters(self) -> dict:
        """What ``parameters_<date>.json`` records about this run."""
        return {
            "hdf5 file": str(self.cohort.path.resolve()),
            "Input group": self.input_group,
            "Streamline group": self.streamline_group,
            "Model type": self.model_type,
            "Trainer params": asdict(self.params),
            "Data params": asdict(self.data_params),
            "Sampler params": {k: asdict(v) for k, v in self.sampler_params.items()},
            "Loader params": asdict(self.loader.params),
            "Model params": self.model.params_for_checkpoint(),
            "Patience": self.params.patience,
            "Patience_delta": self.params.patience_delta,
        }

    def checkpoint_state(self) -> dict:
        """Everything needed to resume, as tensors, numbers, strings, lists and dicts (weights_only-safe)."""
        validation = self.validation_sampler
        return {
            "format": CHECKPOINT_FORMAT,
            "model_type": self.model_type,
            "dataset_params": {"hdf5_file": str(self.cohort.path.resolve()), "input_group": self.input_group,
                               "streamline_group": self.streamline_group, **asdict(self.data_params)},
            "batch_sampler_params": {k: asdict(v) for k, v in self.sampler_params.items()},
            "batch_loader_params": asdict(self.loader.params),
            "params_for_init": asdict(self.params),
            "current_states": {
                "torch_rng_state": torch.get_rng_state(),
                "cuda_rng_states": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "training_sampler_rng": self.training_sampler.get_state(),
                "validation_sampler_rng": None if validation is None else validation.get_state(),
                "loader_rng": self.loader.get_state(),
                "completed_epochs": self.completed_epochs,
                "optimizer_state": self.optimizer.state_dict(),
                "monitors": self.monitors,
                "best": self.best,
                "epochs_without_improvement": self.epochs_without_improvement,
            },
        }

    def restore_states(self, states: dict) -> None:
        """Restore what ``checkpoint_state()['current_states']`` saved."""
        self.optimizer.load_state_dict(states["optimizer_state"])
        self.training_sampler.set_state(states["training_sampler_rng"])
        if self.validation_sampler is not None and states["validation_sampler_rng"] is not None:
            self.validation_sampler.set_state(states["validation_sampler_rng"])
        self.loader.set_state(states["loader_rng"])
        self.completed_epochs = int(states["completed_epochs"])
        self.monitors = {name: list(states["monitors"].get(name, [None] * self.completed_epochs))
                         for name in self.monitors}
        self.best = dict(states["best"])
        self.epochs_without_improvement = int(states["epochs_without_improvement"])
        torch.set_rng_state(states["torch_rng_state"].cpu())
        if self.device.type == "cuda" and states["cuda_rng_states"]:
            torch.cuda.set_rng_state_all(list(states["cuda_rng_states"]))

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        """Train until ``max_epochs`` or until patience runs out."""
        keep_freed_host_memory()
        while self.completed_epochs < self.params.max_epochs:
            epoch = self.completed_epochs
            lr = self.params.learning_rate(epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            start = time.perf_counter()
            train_loss, grad_norm, unclipped_grad_norm = self._train_epoch(epoch)
            training_time = time.perf_counter() - start
            self.training_data.clear_cache()
            start = time.perf_counter()
            valid_loss = None if self.validation_sampler is None else self._validation_epoch(epoch)
            validation_time = time.perf_counter() - start
            if self.validation_data is not None:
                self.validation_data.clear_cache()
            tracking_score = self._tracking_validation(epoch)

            for name, value in (("train_loss", train_loss), ("valid_loss", valid_loss),
                                ("grad_norm", grad_norm), ("unclipped_grad_norm", unclipped_grad_norm),
                                ("training_time", training_time / 60),
                                ("validation_time", validation_time / 60), (TRACKING_MONITOR, tracking_score)):
                if name in self.monitors:
                    self.monitors[name].append(value)
            self.completed_epochs = epoch + 1
            improved = self._update_best(epoch, train_loss, valid_loss, tracking_score)
            LOGGER.info("epoch %d/%d: train loss %.5f, valid loss %s%s, lr %g, %.1f s%s", epoch + 1,
                        self.params.max_epochs, train_loss,
                        "n/a" if valid_loss is None else f"{valid_loss:.5f}",
                        "" if tracking_score is None else f", tracked ends {tracking_score:.2f} mm off", lr,
                        time.perf_counter() - start + training_time, " (best)" if improved else "")
            if improved:
                self.folder.save_best_model(self.model, train_loss, valid_loss)
            self.folder.save_logs(self.monitors)
            self.folder.save_checkpoint(self.model, self.checkpoint_state())
            if self.patience_exhausted():
                LOGGER.info("stopping: no improvement for %d epochs", self.epochs_without_improvement)
                break

    def patience_exhausted(self) -> bool:
        return self.params.patience is not None and self.epochs_without_improvement >= self.params.patience

    def _tracking_validation(self, epoch: int) -> float | None:
        """The generation-validation score of this epoch (None without the phase); between two phases
        (``tracking_phase_frequency``) the last score is repeated, so those epochs cannot become the best."""
        if self.tracking_validator is None:
            return None
        if epoch % self.params.tracking_phase_frequency and self.monitors[TRACKING_MONITOR]:
            return self.monitors[TRACKING_MONITOR][-1]
        self.model.eval()
        return self.tracking_validator()

    def _update_best(self, epoch: int, train_loss: float, valid_loss: float | None,
                     tracking_score: float | None = None) -> bool:
        """Best by the tracking score with the generation-validation phase, else by the validation loss,
        else by the training loss."""
        value = tracking_score if tracking_score is not None else train_loss if valid_loss is None else valid_loss
        if self.best["value"] is None or value < self.best["value"] - self.params.patience_delta:
            self.best = {"epoch": epoch, "value": value, "train_loss": train_loss, "valid_loss": valid_loss}
            self.epochs_without_improvement = 0
            return True
        self.epochs_without_improvement += 1
        return False

    def _progress(self, description: str):
        # On stderr, only for an interactive terminal at INFO level or more verbose.
        disable = not sys.stderr.isatty() or logging.getLogger("trackflow").getEffectiveLevel() > logging.INFO
        return tqdm(desc=description, unit="batch", file=sys.stderr, disable=disable, leave=False)

    def _train_epoch(self, epoch: int):
        """One pass over the training batches; returns (mean loss, mean grad norm, mean unclipped norm)."""
        self.model.train()
        total_loss, total_rows, grad_norms, unclipped_norms = 0.0, 0, [], []
        max_norm = self.params.clip_grad if self.params.clip_grad is not None else math.inf
        with self._progress(f"epoch {epoch + 1} training") as bar:
            for sampled in self.training_sampler.epoch():
                loss, n_rows = self._batch_loss(self.training_data, sampled, training=True)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                unclipped = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
                if not math.isfinite(unclipped):
                    raise TrackflowError(f"the gradient norm became {unclipped} at epoch {epoch + 1}; "
                                         "lower the learning rate or use --clip_grad")
                self.optimizer.step()
                total_loss += loss.item() * n_rows
                total_rows += n_rows
                unclipped_norms.append(unclipped)
                grad_norms.append(min(unclipped, max_norm))
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
        return total_loss / total_rows, float(np.mean(grad_norms)), float(np.mean(unclipped_norms))

    def _validation_epoch(self, epoch: int) -> float:
        """Mean validation loss over rows (no gradient, no noise, no augmentation)."""
        self.model.eval()
        total_loss, total_rows = 0.0, 0
        with torch.no_grad(), self._progress(f"epoch {epoch + 1} validation") as bar:
            for sampled in self.validation_sampler.epoch():
                loss, n_rows = self._batch_loss(self.validation_data, sampled, training=False)
                total_loss += loss.item() * n_rows
                total_rows += n_rows
                bar.update()
        return total_loss / total_rows

    def calibrate_eos(self) -> None:
        """After training: store the EOS threshold of the best and of the latest model, chosen on the
        validation subjects (``eos_calibration``; read by ``--eos_stop auto``)."""
        if not self.model.direction_getter.add_eos:
            return
        if self.validation_data is None:
            LOGGER.warning("no validation subject: no EOS calibration (--eos_stop auto will refuse this model)")
            return
        latest_is_best = self.best["epoch"] == self.completed_epochs - 1
        models = {self.folder.checkpoint_model_dir: self.model}
        if not latest_is_best:
            models[self.folder.best_model_dir] = load_model_dir(self.folder.best_model_dir, self.device)
        subjects = self.cohort.subjects("validation")
        for model_dir, model in models.items():
            record = calibrate_eos(model, self.loader, self.validation_data, subjects)
            LOGGER.info("EOS calibration of %s: threshold %.4g stops %.0f%% of the validation streamlines at their "
                        "end and cuts %.0f%% of those it stops before ('max' rule: %.0f%%, %.0f%%)", model_dir.name,
                        record["threshold"], 100 * record["recall"], 100 * (1 - record["precision"]),
                        100 * record["max_rule_recall"], 100 * (1 - record["max_rule_precision"]))
            self.folder.write_eos_calibration(model_dir, record)
            if latest_is_best:
                self.folder.write_eos_calibration(self.folder.best_model_dir, record)

    def _batch_loss(self, data: SubsetData, sampled, training: bool):
        """Mean per-row loss of one batch and its number of rows."""
        batch = self.loader.load(data, sampled, training)
        rows = self.loader.rows(self.model, data, batch, training)
        raw = self.model(rows.inputs, rows.coordinates)                      # [R, K]
        per_row = self.model.direction_getter.loss(raw, rows.target_dirs, rows.eos_target)  # [R]
        return per_row.mean(), per_row.shape[0]


# ---------------------------------------------------------------------------------------------- entry points
def _check_groups(cohort, input_group: str, streamline_group: str) -> int:
    """Validate the two groups; return the input group's number of features."""
    volume_groups, streamline_groups = cohort.volume_groups(), cohort.streamline_groups()
    if input_group not in volume_groups:
        kind = "a streamline group, not a volume group" if input_group in streamline_groups else "unknown"
        raise TrackflowError(f"input group {input_group!r} is {kind} in {cohort.path}; volume groups: "
                             f"{sorted(volume_groups)}")
    if streamline_group not in streamline_groups:
        kind = "a volume group, not a streamline group" if streamline_group in volume_groups else "unknown"
        raise TrackflowError(f"streamline group {streamline_group!r} is {kind} in {cohort.path}; "
                             f"streamline groups: {sorted(streamline_groups)}")
    return int(volume_groups[input_group])


def _check_augmentation(cohort, input_group: str, loader: LoaderParams, nb_features: int) -> None:
    """Rotation augmentation: the SH block lies within the input features, and (with SH features) the hdf5
    records the standardization of the input group of every training subject."""
    if loader.rotation_augmentation_deg == 0:
        return
    loader.check_features(nb_features)
    if loader.sh_features is None:
        LOGGER.warning("--rotation_augmentation without --sh_features: every input feature is resampled as a "
                       "scalar (rotation-invariant) feature")
        return
    for subject in cohort.subjects("training"):
        recorded_standardization(cohort, subject, input_group)


def _check_cohort(cohort, input_group: str, streamline_group: str) -> int:
    """Validate the groups and refuse non-finite training data (which would only show up later as a NaN
    gradient); return the input group's number of features."""
    nb_features = _check_groups(cohort, input_group, streamline_group)
    for subset in ("training", "validation"):
        for subject in cohort.subjects(subset):
            cohort.check_finite(subject, input_group, "volume")
            cohort.check_finite(subject, streamline_group, "streamlines")
    return nb_features


def train_new_experiment(experiments_path, experiment_name: str, hdf5_file, input_group: str,
                         streamline_group: str, *, model_type: str, model_config: ModelConfig,
                         training_sampler: SamplerParams, validation_sampler: SamplerParams,
                         loader: LoaderParams, trainer: TrainerParams, data: DataParams,
                         use_gpu: bool = False, overwrite: bool = False,
                         tracking_validator_factory=None) -> ExperimentFolder:
    """Create ``experiments_path/experiment_name`` and train a new model in it.

    Every check (folder, hdf5, groups, finite data, model parameters) runs before anything is written. The
    experiment is built under a temporary name and replaces ``experiment_name`` only once training ends, so
    a failed or interrupted run leaves no folder without a model, and an experiment replaced with
    ``overwrite`` survives until then.

    Parameters
    ----------
    model_type : str
        Class name (``Learn2TrackModel``, ``OriginalTransformerModel``, ...).
    model_config : ModelConfig
        The config of ``model_type`` (its ``config_class``); ``nb_features`` is read from the hdf5. When none
        of ``step_size``, ``compress_lines``, ``nb_points`` is set, the hdf5's preprocessing is recorded.
        The model's constructor validates it.
    use_gpu : bool
        Train on the GPU (CPU with a warning when CUDA is missing).
    tracking_validator_factory : callable or None
        ``(cohort, model, input_group, streamline_group, trainer, device) -> tracking validator`` (see
        ``Trainer``); required with ``trainer.add_a_tracking_validation_phase``. Tracking is not training's
        business: the caller brings it (``tracking.validation.make_tracking_validator``).
    """
    folder = ExperimentFolder.check_new(experiments_path, experiment_name, overwrite)
    device = select_device(use_gpu)
    with HDF5Cohort(hdf5_file) as cohort:
        nb_features = _check_cohort(cohort, input_group, streamline_group)
        _check_augmentation(cohort, input_group, loader, nb_features)
        model_params = dict(asdict(model_config), nb_features=nb_features)
        if all(model_params.get(k) in (None, False) for k in ("step_size", "compress_lines", "nb_points")):
            model_params.update(step_size=cohort.step_size, compress_lines=cohort.compress or None,
                                nb_points=cohort.nb_points)
        torch.manual_seed(trainer.rng)
        model = model_class(model_type)(**model_params).to(device)
        validator = _tracking_validator(tracking_validator_factory, cohort, model, input_group, streamline_group,
                                        trainer, device)
        with folder.building(overwrite) as new_folder:
            runner = Trainer(model, new_folder, cohort, input_group, streamline_group, model_type,
                             training_sampler, validation_sampler, loader, trainer, data, device, validator)
            new_folder.write_parameters(runner.run_parameters())
            runner.run()
            runner.calibrate_eos()
    return folder


def _tracking_validator(factory, cohort, model, input_group: str, streamline_group: str, params: TrainerParams,
                        device):
    """The generation-validation callable when the phase is on (its data read and checked now), else None."""
    if not params.add_a_tracking_validation_phase:
        return None
    if not cohort.subjects("validation"):
        raise TrackflowError("--add_a_tracking_validation_phase needs validation subjects")
    if factory is None:
        raise TrackflowError("the tracking validation phase needs a tracking validator factory")
    if params.tracking_mask not in cohort.volume_groups():
        raise TrackflowError(f"--tracking_mask {params.tracking_mask!r} is not a volume group of {cohort.path}")
    return factory(cohort, model, input_group, streamline_group, params, device)


def resume_experiment(model_family: str, experiments_path, experiment_name: str, hdf5_file=None,
                      new_patience: int | None = None, new_max_epochs: int | None = None,
                      use_gpu: bool = False, tracking_validator_factory=None) -> ExperimentFolder:
    """Continue an experiment from its ``checkpoint/`` (same sample stream as an uninterrupted run).

    Parameters
    ----------
    model_family : str
        ``"l2t"`` or ``"tt"`` (which script asked): the l2t script refuses a transformer folder.
    hdf5_file : path or None
        Replaces the hdf5 recorded in the checkpoint.
    new_patience, new_max_epochs : int or None
        Replace the stored values; needed when the stored ones already stopped the training.
    use_gpu : bool
        Continue on the GPU (CPU with a warning when CUDA is missing), whatever device the run started on.
    tracking_validator_factory : callable or None
        As for ``train_new_experiment``, when the run has the generation-validation phase.
    """
    folder = ExperimentFolder.open_existing(experiments_path, experiment_name)
    state = folder.load_checkpoint_state()
    if state.get("format") != CHECKPOINT_FORMAT:
        raise TrackflowError(f"{folder.checkpoint_state_file} is not a trackflow checkpoint")
    check_model_family(state["model_type"], model_family, "resume_training_from_checkpoint")
    # Checkpoints written before the device became a runtime choice store use_gpu: ignored.
    stored = {k: v for k, v in state["params_for_init"].items() if k != "use_gpu"}
    trainer_params = TrainerParams(**stored)
    states = state["current_states"]
    completed = int(states["completed_epochs"])
    if new_max_epochs is not None:
        trainer_params.max_epochs = new_max_epochs
    if completed >= trainer_params.max_epochs:
        raise TrackflowError(f"{folder.path} already trained {completed} epochs (max_epochs "
                             f"{trainer_params.max_epochs}); give a larger --new_max_epochs")
    if new_patience is not None:
        trainer_params.patience = new_patience
    waited = int(states["epochs_without_improvement"])
    if trainer_params.patience is not None and waited >= trainer_params.patience:
        raise TrackflowError(f"{folder.path} stopped after {waited} epochs without improvement (patience "
                             f"{trainer_params.patience}); give a larger --new_patience")

    dataset = state["dataset_params"]
    device = select_device(use_gpu)
    model = load_model_dir(folder.checkpoint_model_dir, device)
    with HDF5Cohort(hdf5_file if hdf5_file is not None else dataset["hdf5_file"]) as cohort:
        nb_features = _check_cohort(cohort, dataset["input_group"], dataset["streamline_group"])
        if nb_features != model.nb_features:
            raise TrackflowError(f"input group {dataset['input_group']!r} of {cohort.path} has {nb_features} "
                                 f"features but the model of {folder.path} takes {model.nb_features}")
        loader_params = LoaderParams(**state["batch_loader_params"])
        _check_augmentation(cohort, dataset["input_group"], loader_params, nb_features)
        samplers = state["batch_sampler_params"]
        validator = _tracking_validator(tracking_validator_factory, cohort, model, dataset["input_group"],
                                        dataset["streamline_group"], trainer_params, device)
        runner = Trainer(model, folder, cohort, dataset["input_group"], dataset["streamline_group"],
                         state["model_type"], SamplerParams(**samplers["training"]),
                         SamplerParams(**samplers["validation"]), loader_params,
                         trainer_params, DataParams(lazy=dataset["lazy"], cache_size=dataset["cache_size"]),
                         device, validator)
        runner.restore_states(states)
        folder.write_parameters(runner.run_parameters())
        LOGGER.info("resuming %s after epoch %d", folder.path, completed)
        runner.run()
        runner.calibrate_eos()
    return folder


def calibrate_experiment_eos(experiment_path, hdf5_file=None, use_gpu: bool = False) -> dict:
    """(Re)compute the EOS calibration of an existing experiment's best and latest models on the validation
    subjects of its hdf5 (or ``hdf5_file``), as the end of training does; returns model folder (relative to
    the experiment) -> record."""
    folder = ExperimentFolder(experiment_path)
    if not folder.latest_parameters_file.is_file():
        raise TrackflowError(f"{folder.path} is not an experiment (missing {folder.latest_parameters_file})")
    parameters = folder.read_latest_parameters()
    device = select_device(use_gpu)
    records = {}
    with HDF5Cohort(hdf5_file if hdf5_file is not None else parameters["hdf5 file"]) as cohort:
        input_group, streamline_group = parameters["Input group"], parameters["Streamline group"]
        _check_groups(cohort, input_group, streamline_group)
        subjects = cohort.subjects("validation")
        if not subjects:
            raise TrackflowError(f"{cohort.path} has no validation subject to calibrate the EOS threshold on")
        data = SubsetData(cohort, subjects, input_group, streamline_group, device)
        for model_dir in (folder.best_model_dir, folder.checkpoint_model_dir):
            if not model_dir.is_dir():
                continue
            model = load_model_dir(model_dir, device)
            if not model.direction_getter.add_eos:
                raise TrackflowError(f"the model of {model_dir} has no EOS output: nothing to calibrate")
            loader = BatchLoader(LoaderParams(), model.preprocessing, cohort_preprocessing(cohort), 0, device)
            record = calibrate_eos(model, loader, data, subjects)
            folder.write_eos_calibration(model_dir, record)
            records[str(model_dir.relative_to(folder.path))] = record
    return records
