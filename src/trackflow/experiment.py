"""The experiment folder written by training (spec dwi_ml.md §5.5)::

    <experiments_path>/<experiment_name>/
      parameters_<dd-mm-YYYY_HHhMM>.json, parameters_latest.json
      best_epoch_losses.json
      best_model/        parameters.json  model_type.txt  model_state.pkl  [eos_calibration.json]
      checkpoint/        checkpoint_state.pkl  model/{parameters.json, model_type.txt, model_state.pkl,
                                                     [eos_calibration.json]}
      logs/              <monitor>_per_epoch.npy, <monitor>_duration.npy

A new experiment is trained in a temporary folder beside its final name (``ExperimentFolder.building``)
and renamed when training ends. Model directories are written by
``trackflow.models.persistence.save_model_dir``. Directories are replaced
atomically (written under a temporary name, then renamed; ``checkpoint/`` as a whole, model and trainer
state together), so a run killed while saving leaves the previous checkpoint intact.
``checkpoint_state.pkl`` holds only tensors, numbers, strings, lists and dicts: it loads with
``torch.load(..., weights_only=True)``.

``eos_calibration.json`` (the EOS threshold chosen on the validation subjects, ``--eos_stop auto``) lives in
the model folder it was computed for: saving a new model there replaces the folder, so a threshold never
outlives the weights it belongs to.
"""

import contextlib
import datetime
import json
from pathlib import Path

import numpy as np
import torch

from trackflow.errors import TrackflowError
from trackflow.files import atomic_directory, atomic_output
from trackflow.models.persistence import load_torch_file, save_model_dir

EOS_CALIBRATION_FILE = "eos_calibration.json"

# Trainer monitor name -> file name in logs/ (dwi_ml's names).
LOG_FILES = {
    "train_loss": "train_loss_monitor_per_epoch.npy",
    "valid_loss": "valid_local_loss_monitor_per_epoch.npy",
    "unclipped_grad_norm": "unclipped_grad_norm_monitor_per_epoch.npy",
    "grad_norm": "grad_norm_monitor_per_epoch.npy",
    "training_time": "training_time_monitor_duration.npy",
    "validation_time": "validation_time_monitor_duration.npy",
    # generation-validation phase only: mean distance (mm) of the tracked validation streamlines' ends
    "tracking_mean_final_distance": "tracking_mean_final_distance_monitor_per_epoch.npy",
}
TRACKING_MONITOR = "tracking_mean_final_distance"


class ExperimentFolder:
    """Paths and readers/writers of one experiment folder."""

    def __init__(self, path):
        self.path = Path(path)
        self.best_model_dir = self.path / "best_model"
        self.checkpoint_dir = self.path / "checkpoint"
        self.checkpoint_model_dir = self.checkpoint_dir / "model"
        self.checkpoint_state_file = self.checkpoint_dir / "checkpoint_state.pkl"
        self.logs_dir = self.path / "logs"
        self.best_epoch_losses_file = self.path / "best_epoch_losses.json"
        self.latest_parameters_file = self.path / "parameters_latest.json"

    @classmethod
    def check_new(cls, experiments_path, experiment_name: str, overwrite: bool) -> "ExperimentFolder":
        """Check that a new experiment can be created (nothing is written yet)."""
        experiments_path = Path(experiments_path)
        if not experiments_path.is_dir():
            raise TrackflowError(f"experiments path {experiments_path} does not exist")
        folder = cls(experiments_path / experiment_name)
        if folder.path.exists() and not overwrite:
            raise TrackflowError(f"experiment {folder.path} already exists (use -f to replace it, or the "
                                 "resume script to continue it)")
        return folder

    @contextlib.contextmanager
    def building(self, overwrite: bool):
        """Yield an ``ExperimentFolder`` under a temporary name beside this one; it replaces this folder
        only when the block completes.

        A failed or interrupted training therefore leaves no folder without a model, and an experiment
        replaced with ``-f`` survives until its replacement is complete. Without ``overwrite`` the final
        rename refuses an experiment created meanwhile by another run.
        """
        with atomic_directory(self.path, overwrite=overwrite) as tmp_dir:
            new = ExperimentFolder(tmp_dir)
            new.logs_dir.mkdir()
            yield new

    @classmethod
    def open_existing(cls, experiments_path, experiment_name: str) -> "ExperimentFolder":
        folder = cls(Path(experiments_path) / experiment_name)
        if not folder.checkpoint_state_file.is_file():
            raise TrackflowError(f"{folder.path} is not an experiment with a checkpoint "
                                 f"(missing {folder.checkpoint_state_file})")
        return folder

    # ------------------------------------------------------------------ parameters
    def write_parameters(self, parameters: dict) -> Path:
        """Write ``parameters_<date>.json`` (one per start or resume) and its copy ``parameters_latest.json``."""
        now = datetime.datetime.now()
        parameters = {"Date": now.strftime("%d %B %Y %H:%M:%S"), **parameters}
        text = json.dumps(parameters, indent=4, allow_nan=False)
        dated = self.path / f"parameters_{now.strftime('%d-%m-%Y_%Hh%M')}.json"
        for target in (dated, self.latest_parameters_file):
            with atomic_output(target) as tmp:
                tmp.write_text(text)
        return dated

    def read_latest_parameters(self) -> dict:
        # Python's json reads dwi_ml's non-strict "Infinity" values too.
        return json.loads(self.latest_parameters_file.read_text())

    # ------------------------------------------------------------------ EOS calibration
    def model_dir(self, use_latest_epoch: bool) -> Path:
        """``checkpoint/model/`` (latest epoch) or ``best_model/``."""
        return self.checkpoint_model_dir if use_latest_epoch else self.best_model_dir

    def write_eos_calibration(self, model_dir: Path, calibration: dict) -> None:
        """Store ``calibration`` (with its ``threshold``) beside the model of ``model_dir``."""
        with atomic_output(model_dir / EOS_CALIBRATION_FILE) as tmp:
            tmp.write_text(json.dumps(calibration, indent=4, allow_nan=False))

    def eos_calibration_file(self, use_latest_epoch: bool) -> Path:
        """Where the calibration of the model ``use_latest_epoch`` selects is (or would be)."""
        return self.model_dir(use_latest_epoch) / EOS_CALIBRATION_FILE

    def has_eos_calibration(self, use_latest_epoch: bool) -> bool:
        return self.eos_calibration_file(use_latest_epoch).is_file()

    def read_eos_threshold(self, use_latest_epoch: bool) -> float:
        """The calibrated EOS threshold of the model ``use_latest_epoch`` selects; an error without one."""
        path = self.eos_calibration_file(use_latest_epoch)
        if not path.is_file():
            raise TrackflowError(f"--eos_stop auto: {path} does not exist (the model was not calibrated: it has no "
                                 "EOS output, no validation subject, or was trained before calibration existed)")
        try:
            threshold = json.loads(path.read_text())["threshold"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise TrackflowError(f"{path} holds no EOS 'threshold'") from None
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise TrackflowError(f"{path}: the EOS threshold must be a probability, got {threshold!r}")
        return float(threshold)

    # ------------------------------------------------------------------ models and checkpoint
    def save_best_model(self, model, train_loss: float, valid_loss: float | None) -> None:
        save_model_dir(model, self.best_model_dir)
        with atomic_output(self.best_epoch_losses_file) as tmp:
            tmp.write_text(json.dumps({"train_loss": train_loss, "valid_loss": valid_loss}, indent=4))

    def save_checkpoint(self, model, state: dict) -> None:
        """Write ``checkpoint/`` (model dir and trainer state) as one atomic directory replacement."""
        with atomic_directory(self.checkpoint_dir) as tmp_dir:
            save_model_dir(model, tmp_dir / "model")
            torch.save(state, tmp_dir / "checkpoint_state.pkl")

    def load_checkpoint_state(self, device="cpu") -> dict:
        state = load_torch_file(self.checkpoint_state_file, device, "checkpoint")
        if not isinstance(state, dict):
            raise TrackflowError(f"{self.checkpoint_state_file} does not hold a checkpoint dict")
        return state

    # ------------------------------------------------------------------ logs
    def save_logs(self, monitors: dict) -> None:
        """One 1-D ``.npy`` per monitor given (names of ``LOG_FILES``; one value per epoch; NaN where
        undefined)."""
        for name, per_epoch in monitors.items():
            values = np.array([np.nan if v is None else v for v in per_epoch], dtype=np.float64)
            with atomic_output(self.logs_dir / LOG_FILES[name]) as tmp:
                np.save(tmp, values)

    def read_logs(self) -> dict:
        """Monitor name -> per-epoch array, for the log files present."""
        return {name: _read_log(self.logs_dir / file_name) for name, file_name in LOG_FILES.items()
                if (self.logs_dir / file_name).exists()}  # a folder in a log's place is an error, not skipped


def _read_log(path: Path) -> np.ndarray:
    """A 1-D numeric ``.npy`` log; a truncated, garbage or pickled file is one error."""
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise TrackflowError(f"cannot read log {path}: {e}") from None
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.number):
        raise TrackflowError(f"log {path} is not a 1-D numeric array (shape {values.shape}, {values.dtype})")
    return values
