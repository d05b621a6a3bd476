"""Plots of the per-epoch training logs of one or more experiments (``dwiml_visualize_logs``).

Reads ``<experiment>/logs/*.npy`` (names in ``trackflow.experiment.LOG_FILES``) and draws three
figures, one curve per experiment and monitor: the losses, the gradient norms and the epoch durations.
"""

import csv
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trackflow.errors import TrackflowError  # noqa: E402
from trackflow.experiment import LOG_FILES, ExperimentFolder  # noqa: E402
from trackflow.files import atomic_output, check_outputs

LOGGER = logging.getLogger(__name__)

# Figure name -> (title, y label, [(monitor, curve label, line style)]).
FIGURES = {
    "loss": ("Training and validation loss", "loss (mean over points)",
             [("train_loss", "train", "-"), ("valid_loss", "validation", "--")]),
    "grad_norm": ("Gradient norm (mean over batches)", "gradient L2 norm",
                  [("unclipped_grad_norm", "before clipping", "-"), ("grad_norm", "after clipping", ":")]),
    "time": ("Epoch duration", "duration (minutes)",
             [("training_time", "training", "-"), ("validation_time", "validation", "--")]),
}


def figure_paths(prefix) -> dict:
    """Figure name -> output PNG path (``<prefix><name>.png``)."""
    return {name: Path(f"{prefix}{name}.png") for name in FIGURES}


def plot_logs(experiments, save_prefix=None, overwrite: bool = False, csv_file=None,
              remove_outliers: bool = False) -> list:
    """Write the log figures of the given experiment folders as PNG files.

    Parameters
    ----------
    experiments : list of path
        Experiment folders (each with a ``logs/`` folder).
    save_prefix : str or None
        Output prefix: figures go to ``<prefix>loss.png``, ``<prefix>grad_norm.png``, ``<prefix>time.png``.
        Default: ``<first experiment>/logs/``.
    overwrite : bool
    csv_file : path or None
        Also write the logs as CSV, as dwi_ml does: one row per experiment and log, ``experiment, log name
        (file name without .npy), value per epoch...``.
    remove_outliers : bool
        Draw values more than 3 std from a curve's mean as stars, off the line (not in the CSV).

    Returns
    -------
    list of Path
        The PNG files written.
    """
    logs = {}
    for path in experiments:
        folder = ExperimentFolder(path)
        if not folder.logs_dir.is_dir():
            raise TrackflowError(f"{folder.path} has no logs/ folder (not a training experiment?)")
        logs[folder.path.name if folder.path.name not in logs else str(folder.path)] = folder.read_logs()
    if not any(logs.values()):
        raise TrackflowError("no log file found in the given experiments")
    prefix = save_prefix if save_prefix is not None else f"{Path(experiments[0]) / 'logs'}/"
    outputs = figure_paths(prefix)
    check_outputs([*outputs.values(), *([csv_file] if csv_file is not None else [])], overwrite)

    for name, (title, ylabel, curves) in FIGURES.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = 0
        for exp_index, (exp_name, exp_logs) in enumerate(logs.items()):
            colour = f"C{exp_index % 10}"
            for monitor, label, style in curves:
                values = exp_logs.get(monitor)
                if values is None or not np.isfinite(values).any():
                    continue
                epochs = np.arange(1, len(values) + 1)
                if remove_outliers:
                    outliers = np.abs(values - np.nanmean(values)) > 3 * np.nanstd(values)
                    ax.scatter(epochs[outliers], values[outliers], marker="*", color=colour)
                    epochs, values = epochs[~outliers], values[~outliers]
                ax.plot(epochs, values, style, color=colour, marker="o", markersize=3,
                        label=f"{exp_name}: {label}" if len(logs) > 1 else label)
                drawn += 1
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend()
        fig.tight_layout()
        with atomic_output(outputs[name], overwrite=overwrite) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        LOGGER.info("wrote %s", outputs[name])
    if csv_file is None:
        return list(outputs.values())
    rows = [[exp_name, LOG_FILES[monitor].removesuffix(".npy"), *(f"{v:.6g}" for v in values)]
            for exp_name, exp_logs in logs.items() for monitor, values in exp_logs.items()]
    with atomic_output(csv_file, overwrite=overwrite) as tmp, open(tmp, "w", newline="") as out:
        csv.writer(out).writerows(rows)
    LOGGER.info("wrote %s", csv_file)
    return [*outputs.values(), Path(csv_file)]
