"""Figures and coloured tractograms of a model's per-point loss, and the ``visualize_loss`` run behind
``l2t_visualize_loss`` / ``tt_visualize_loss`` (spec dwi_ml.md §7).

The losses come from ``evaluation.point_losses`` (a validation pass through the training rows). Each
output tractogram point carries the value of its row, so without EOS the last point of every streamline
(which has no target, hence no loss) is not written.
"""

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from dipy.io.utils import is_header_compatible

from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.data.streamlines import gather_ragged, offsets_from_lengths
from trackflow.data.tractograms import load_tractogram_file, save_tractogram_file
from trackflow.device import select_device
from trackflow.errors import TrackflowError
from trackflow.evaluation.point_losses import (PointLosses, best_and_worst, check_best_and_worst_count,
                                               compute_point_losses)
from trackflow.files import atomic_output, check_outputs
from trackflow.models.persistence import load_experiment_model
from trackflow.models.registry import check_model_family
from trackflow.training.batch_loader import cohort_preprocessing

LOGGER = logging.getLogger(__name__)

HISTOGRAM_BINS = 200
EOS_HISTOGRAM_BINS = 40
DEFAULT_BEST_WORST_PERCENT = 10.0
EOS_COLORMAP = "viridis"
# Displacement figure: true streamlines in blue, model zig-zags ramping from green (start) to pink (end).
TRUE_STREAMLINE_RGB = np.array([0.0, 0.0, 255.0])
RAMP_START_RGB = np.array([0.0, 200.0, 0.0])
RAMP_END_RGB = np.array([255.0, 105.0, 180.0])
# The displacement streamlines are drawn at random, always the same ones for the same input.
DISPLACEMENT_SEED = 1234


@dataclass
class LossVisualizationOptions:
    """What ``visualize_loss`` reads and writes (the options of spec §7, named as on the command line).

    ``__post_init__`` is the one check of the rules that do not depend on the data; ``fig_size`` is in
    inches, ``min_range``/``max_range`` (and their EOS variants) clip the colour scale (None: data range).
    """

    streamlines_group: str | None = None
    streamlines_file: str | os.PathLike | None = None
    reference: str | os.PathLike | None = None
    subset: str = "testing"
    use_latest_epoch: bool = False
    batch_size: int | None = None
    use_gpu: bool = False
    processes: int | None = None
    out_dir: str | os.PathLike | None = None
    out_prefix: str | None = None
    compute_histogram: bool = False
    save_colored_tractogram: bool = False
    save_colored_best_and_worst: float | None = None
    save_colored_eos_probs: bool = False
    save_colored_eos_errors: bool = False
    save_displacement: int | None = None
    colormap: str = "plasma"
    min_range: float | None = None
    max_range: float | None = None
    min_range_eos_probs: float | None = None
    max_range_eos_probs: float | None = None
    min_range_eos_errors: float | None = None
    max_range_eos_errors: float | None = None
    show_now: bool = False
    fig_size: tuple = (10.0, 15.0)
    overwrite: bool = False

    def __post_init__(self):
        if (self.streamlines_group is None) == (self.streamlines_file is None):
            raise TrackflowError("give exactly one of --streamlines_group and --streamlines_file")
        if self.colormap not in matplotlib.colormaps:
            raise TrackflowError(f"unknown matplotlib colormap {self.colormap!r}")
        percent = self.save_colored_best_and_worst
        if percent is not None and not 0 < percent <= 100:
            raise TrackflowError(f"--save_colored_best_and_worst must be in (0, 100], got {percent}")
        if self.batch_size is not None and self.batch_size < 1:
            raise TrackflowError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.save_displacement is not None and self.save_displacement < 1:
            raise TrackflowError(f"--save_displacement must be at least 1, got {self.save_displacement}")
        self.fig_size = tuple(self.fig_size)

    @property
    def wants_eos(self) -> bool:
        """An output needs the model's EOS probability."""
        return self.save_colored_eos_probs or self.save_colored_eos_errors

    def clip_suffixes(self) -> tuple[str, str, str]:
        """File-name suffixes of the loss, EOS-probability and EOS-error colour ranges."""
        return (clip_suffix(self.min_range, self.max_range),
                clip_suffix(self.min_range_eos_probs, self.max_range_eos_probs),
                clip_suffix(self.min_range_eos_errors, self.max_range_eos_errors))


def map_to_colors(values: np.ndarray, colormap: str, vmin: float | None = None,
                  vmax: float | None = None) -> tuple[np.ndarray, float, float]:
    """RGB colours (0-255) of values clipped to [vmin, vmax] (data range by default) and scaled to [0, 1].

    Returns (colours [N, 3] float32, vmin, vmax used).
    """
    vmin = float(values.min()) if vmin is None else float(vmin)
    vmax = float(values.max()) if vmax is None else float(vmax)
    if vmin > vmax:
        raise TrackflowError(f"colour range minimum {vmin:g} is above its maximum {vmax:g}")
    span = vmax - vmin
    scaled = (np.clip(values, vmin, vmax) - vmin) / span if span > 0 else np.zeros_like(values)
    rgba = matplotlib.colormaps[colormap](scaled)                                        # [N, 4] in [0, 1]
    return (255.0 * rgba[:, :3]).astype(np.float32), vmin, vmax


def clip_suffix(vmin: float | None, vmax: float | None) -> str:
    """``_clipped<min>-<max>`` naming the user's colour range ('' without one).

    A bound not given is written ``datamin`` / ``datamax`` (the data's own), e.g. ``_clippeddatamin-0.5``.
    """
    if vmin is None and vmax is None:
        return ""
    low = "datamin" if vmin is None else f"{vmin:g}"
    high = "datamax" if vmax is None else f"{vmax:g}"
    return f"_clipped{low}-{high}"


def displacement_lines(losses: PointLosses, ids: np.ndarray) -> tuple[list, list]:
    """True streamlines and the model's zig-zags for streamlines ``ids``.

    A zig-zag goes from each true point one step along the head's deterministic direction (a step as long
    as the true one), then back to the next true point. EOS rows (no next point) get no step.

    Returns
    -------
    true_lines, zigzags : list of ndarray [T, 3] and [2T' + 1, 3] (vox/corner)
    """
    offsets = offsets_from_lengths(losses.lengths)
    true_lines, zigzags = [], []
    for b in ids:
        rows = slice(offsets[b], offsets[b] + losses.lengths[b])
        has_next = ~losses.eos_targets[rows] if losses.eos_targets is not None else np.ones(
            losses.lengths[b], bool)
        points = losses.rows[b][has_next]                                            # [T', 3]
        targets = losses.target_dirs[rows][has_next]                                 # [T', 3]
        directions = losses.directions[rows][has_next]
        unit = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
        tips = points + np.linalg.norm(targets, axis=1, keepdims=True) * unit        # [T', 3]
        last_true = points[-1:] + targets[-1:]
        true_lines.append(np.vstack([points, last_true]))
        zigzags.append(np.vstack([np.stack([points, tips], axis=1).reshape(-1, 3), last_true]))
    return true_lines, zigzags


# ---------------------------------------------------------------------------------------------- outputs
def _save_figure(fig, path: Path, keep_open: bool) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    if not keep_open:
        plt.close(fig)


def _colorbar_figure(label: str, colormap: str, vmin: float, vmax: float):
    fig, ax = plt.subplots(figsize=(6, 1.4))
    norm = matplotlib.colors.Normalize(vmin, vmax)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=colormap), cax=ax, orientation="horizontal",
                 label=label)
    ax.set_title(f"Tractogram colours ({colormap}; values outside the range are clipped)")
    return fig


def _loss_histograms(point_losses: np.ndarray, streamline_means: np.ndarray, fig_size):
    fig, axes = plt.subplots(3, 1, figsize=fig_size)
    for ax, values, log, title, ylabel in (
            (axes[0], point_losses, False, "Per-point loss", "number of points"),
            (axes[1], point_losses, True, "Per-point loss (log scale)", "number of points (log)"),
            (axes[2], streamline_means, False, "Mean loss per streamline", "number of streamlines")):
        ax.hist(values, bins=HISTOGRAM_BINS, log=log, color="tab:blue")
        ax.set_title(f"{title}: mean {values.mean():.4g} ± {values.std():.4g}, n = {len(values)}")
        ax.set_xlabel("loss (unitless)")
        ax.set_ylabel(ylabel)
    return fig


def _eos_error_histogram(eos_errors: np.ndarray, fig_size):
    fig, ax = plt.subplots(figsize=(fig_size[0], fig_size[1] / 3))
    ax.hist(eos_errors, bins=EOS_HISTOGRAM_BINS, range=(0.0, 1.0), log=True, color="tab:orange")
    ax.set_title(f"EOS error |p(EOS) - target| per point: mean {eos_errors.mean():.4g}, n = {len(eos_errors)}")
    ax.set_xlabel("EOS error (probability, 0-1)")
    ax.set_ylabel("number of points (log)")
    return fig


def _eos_probs_per_third(losses: PointLosses, fig_size):
    """Log histograms of p(EOS) in the first, second and last third of each streamline, and at its end."""
    lengths = losses.lengths
    position = np.arange(len(losses.losses)) - np.repeat(offsets_from_lengths(lengths), lengths)  # [R]
    is_last = losses.eos_targets
    third = np.minimum(3 * position // np.repeat(np.maximum(lengths - 1, 1), lengths), 2)           # [R]
    panels = [(~is_last & (third == k), f"{name} third of the streamline (last point excluded)")
              for k, name in enumerate(("first", "second", "last"))]
    panels.append((is_last, "last point"))
    fig, axes = plt.subplots(4, 1, figsize=fig_size)
    for ax, (selected, title) in zip(axes, panels):
        values = losses.eos_probs[selected]
        ax.hist(values, bins=EOS_HISTOGRAM_BINS, range=(0.0, 1.0), log=True, color="tab:green")
        ax.set_title(f"p(EOS), {title}: n = {len(values)}"
                     + (f", mean {values.mean():.3g}" if len(values) else ""))
        ax.set_xlabel("EOS probability")
        ax.set_ylabel("number of points (log)")
    return fig


def _summary_lines(losses: PointLosses) -> list[str]:
    def describe(name, values):
        return (f"{name}: mean {values.mean():.5g} ± {values.std():.5g}, range [{values.min():.5g}, "
                f"{values.max():.5g}]")

    lines = [describe("per-streamline mean loss", losses.streamline_means()),
             describe("per-point loss", losses.losses)]
    if losses.eos_probs is not None:
        lines.append(describe("per-point EOS error", losses.eos_errors()))
    return lines


def _display_available() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def output_paths(out_dir: Path, out_prefix: str, options: LossVisualizationOptions, has_eos: bool) -> dict:
    """Output name -> path for the enabled outputs (spec §7 names: ``<out_dir>/<out_prefix>_<what>``)."""
    loss_clip, eos_probs_clip, eos_errors_clip = options.clip_suffixes()
    best_worst_percent = options.save_colored_best_and_worst
    paths = {}
    if options.compute_histogram:
        paths["histogram"] = f"{out_prefix}_histogram.png"
        if has_eos:
            paths["histogram_eos_error"] = f"{out_prefix}_histogram_eos_error.png"
            paths["histogram_eos_probs_per_third"] = f"{out_prefix}_histogram_eos_probs_per_third.png"
    if options.save_colored_tractogram:
        paths["colored_loss"] = f"{out_prefix}_colored_loss{loss_clip}.trk"
    if best_worst_percent is not None:
        pct = f"{best_worst_percent:g}"
        paths["best"] = f"{out_prefix}_best{pct}percent{loss_clip}.trk"
        paths["worst"] = f"{out_prefix}_worst{pct}percent{loss_clip}.trk"
    if options.save_colored_tractogram or best_worst_percent is not None:
        paths["colorbar_loss"] = f"{out_prefix}_colorbar_loss{loss_clip}.png"
    for name, wanted, clip in (("eos_probs", options.save_colored_eos_probs, eos_probs_clip),
                               ("eos_errors", options.save_colored_eos_errors, eos_errors_clip)):
        if wanted:
            paths[f"colored_{name}"] = f"{out_prefix}_colored_{name}{clip}.trk"
            paths[f"colorbar_{name}"] = f"{out_prefix}_colorbar_{name}{clip}.png"
    if options.save_displacement is not None:
        paths["displacement"] = f"{out_prefix}_displacement.trk"
    return {name: Path(out_dir) / p for name, p in paths.items()}


def _load_reference_streamlines(cohort, subj_id: str, input_group: str, options: LossVisualizationOptions):
    """(streamlines vox/corner, the preprocessing they already have) from an hdf5 group or a file."""
    if options.streamlines_group is not None:
        return cohort.read_streamlines(subj_id, options.streamlines_group), cohort_preprocessing(cohort)
    grid = cohort.reference_nifti(subj_id, input_group)
    path = Path(options.streamlines_file)
    sft = load_tractogram_file(path, options.reference)
    # Unlike dwi_ml, refuse a tractogram drawn on another grid than the input volume.
    if not is_header_compatible(sft, grid):
        raise TrackflowError(f"{path} is not on the grid of input group '{input_group}' of subject {subj_id}")
    sft.to_vox()
    sft.to_corner()
    return sft.streamlines, {}


def visualize_loss(model_family: str, experiment_path, hdf5_file, subj_id: str, input_group: str,
                   options: LossVisualizationOptions) -> dict:
    """Compute a model's per-point loss on one subject's streamlines and write the asked outputs.

    ``model_family`` is ``"l2t"`` or ``"tt"`` (which script asked). Every input and output is checked
    before the model runs.

    Returns
    -------
    dict
        Output name -> path written (names as in ``output_paths``).
    """
    will_show = _choose_backend(options.show_now)
    device = select_device(options.use_gpu)
    if options.processes is not None and device.type == "cpu":
        torch.set_num_threads(options.processes)
    model = load_experiment_model(experiment_path, use_latest_epoch=options.use_latest_epoch, device=device)
    check_model_family(type(model).__name__, model_family, "visualize_loss")
    has_eos = bool(model.direction_getter.add_eos)
    if options.wants_eos and not has_eos:
        raise TrackflowError("the model has no EOS output: --save_colored_eos_probs/_errors are not available")
    paths = _planned_outputs(experiment_path, subj_id, options, has_eos,
                             inputs=[hdf5_file, options.streamlines_file, options.reference])

    with HDF5Cohort(hdf5_file) as cohort:
        _check_cohort(cohort, hdf5_file, subj_id, input_group, options.subset, model.nb_features)
        streamlines, preprocessing = _load_reference_streamlines(cohort, subj_id, input_group, options)
        if len(streamlines) == 0:
            raise TrackflowError("no reference streamline to evaluate")
        if options.save_colored_best_and_worst is not None:
            check_best_and_worst_count(len(streamlines))
        grid = cohort.reference_nifti(subj_id, input_group)
        losses = compute_point_losses(model, cohort, subj_id, input_group, streamlines, preprocessing,
                                      options.batch_size, device,
                                      with_directions=options.save_displacement is not None)

    for line in _summary_lines(losses):
        print(line)
    # Every output is written under a temporary name first, then all are renamed: they appear together.
    with contextlib.ExitStack() as staged:
        temporaries = {name: staged.enter_context(atomic_output(path, overwrite=options.overwrite))
                       for name, path in paths.items()}
        _write_outputs(losses, temporaries, grid, options, will_show)
    for path in paths.values():
        LOGGER.info("wrote %s", path)
    if will_show:
        plt.show()
    return paths


def _choose_backend(show_now: bool) -> bool:
    """Whether figures will also be shown; without a display matplotlib draws to files only (Agg)."""
    will_show = show_now and _display_available()
    if show_now and not will_show:
        LOGGER.info("--show_now: no display available, figures are only saved to files")
    if not will_show:
        matplotlib.use("Agg")
    return will_show


def _planned_outputs(experiment_path, subj_id: str, options: LossVisualizationOptions, has_eos: bool,
                     inputs) -> dict:
    """The output paths, checked (none exists unless overwriting, none is one of ``inputs``) before any work."""
    out_dir = Path(experiment_path) / "visu_loss" if options.out_dir is None else Path(options.out_dir)
    out_prefix = subj_id if options.out_prefix is None else options.out_prefix
    paths = output_paths(out_dir, out_prefix, options, has_eos)
    if not paths:
        raise TrackflowError("nothing to do: choose at least one output option")
    check_outputs(paths.values(), options.overwrite, inputs=inputs)
    others = sorted(set(out_dir.glob(f"{out_prefix}*")) - set(paths.values())) if out_dir.is_dir() else []
    if others:
        LOGGER.info("existing files with this prefix, left untouched: %s", ", ".join(map(str, others)))
    return paths


def _check_cohort(cohort, hdf5_file, subj_id: str, input_group: str, subset: str, nb_features: int) -> None:
    """The subject's input group exists and has the model's feature count (the subset: a warning only)."""
    if subj_id not in cohort.subjects(subset):
        LOGGER.warning("subject %s is not in the %s subset of %s; using it anyway", subj_id, subset, hdf5_file)
    volume_groups = cohort.volume_groups()
    if input_group not in volume_groups:
        raise TrackflowError(f"input group '{input_group}' is not a volume group of {hdf5_file}; volume "
                             f"groups: {sorted(volume_groups)}")
    if volume_groups[input_group] != nb_features:
        raise TrackflowError(f"input group '{input_group}' has {volume_groups[input_group]} features but "
                             f"the model expects {nb_features}")


def _write_outputs(losses: PointLosses, paths: dict, grid, options: LossVisualizationOptions,
                   keep_open: bool) -> None:
    means = losses.streamline_means()
    fig_size = options.fig_size
    if "histogram" in paths:
        _save_figure(_loss_histograms(losses.losses, means, fig_size), paths["histogram"], keep_open)
    if "histogram_eos_error" in paths:
        _save_figure(_eos_error_histogram(losses.eos_errors(), fig_size), paths["histogram_eos_error"], keep_open)
        _save_figure(_eos_probs_per_third(losses, fig_size), paths["histogram_eos_probs_per_third"], keep_open)
    if "colorbar_loss" in paths:
        _write_loss_tractograms(losses, means, paths, grid, options, keep_open)
    for name, values, value_range, label in (
            ("eos_probs", losses.eos_probs, (options.min_range_eos_probs, options.max_range_eos_probs),
             "EOS probability"),
            ("eos_errors", losses.eos_errors(), (options.min_range_eos_errors, options.max_range_eos_errors),
             "EOS error |p(EOS) - target|")):
        if f"colored_{name}" in paths:
            colors, vmin, vmax = map_to_colors(values, EOS_COLORMAP, *value_range)
            save_tractogram_file(paths[f"colored_{name}"], losses.rows, grid,
                                 data_per_point={name: values, "color": colors})
            _save_figure(_colorbar_figure(label, EOS_COLORMAP, vmin, vmax), paths[f"colorbar_{name}"], keep_open)
    if "displacement" in paths:
        _save_displacement(losses, options.save_displacement, paths["displacement"], grid)


def _write_loss_tractograms(losses: PointLosses, means: np.ndarray, paths: dict, grid,
                            options: LossVisualizationOptions, keep_open: bool) -> None:
    """The tractogram coloured by loss, the best and worst streamlines, and their colour bar."""
    colors, vmin, vmax = map_to_colors(losses.losses, options.colormap, options.min_range, options.max_range)
    dpp = {"losses": losses.losses, "color": colors}
    if "colored_loss" in paths:
        save_tractogram_file(paths["colored_loss"], losses.rows, grid, data_per_point=dpp)
    if options.save_colored_best_and_worst is not None:
        best, worst = best_and_worst(means, options.save_colored_best_and_worst)
        offsets = offsets_from_lengths(losses.lengths)
        for name, ids in (("best", best), ("worst", worst)):
            rows = gather_ragged(offsets, losses.lengths, ids)
            save_tractogram_file(paths[name], losses.rows[ids], grid,
                                 data_per_point={key: values[rows] for key, values in dpp.items()})
    _save_figure(_colorbar_figure("per-point loss (unitless)", options.colormap, vmin, vmax), paths["colorbar_loss"],
                 keep_open)


def _save_displacement(losses: PointLosses, n_streamlines: int, path: Path, grid) -> None:
    rng = np.random.default_rng(DISPLACEMENT_SEED)
    ids = np.sort(rng.choice(len(losses.lengths), size=min(n_streamlines, len(losses.lengths)), replace=False))
    true_lines, zigzags = displacement_lines(losses, ids)
    colors = [np.broadcast_to(TRUE_STREAMLINE_RGB, line.shape) for line in true_lines]
    for line in zigzags:
        ramp = np.linspace(0.0, 1.0, len(line))[:, None]                              # [T, 1]
        colors.append((1 - ramp) * RAMP_START_RGB + ramp * RAMP_END_RGB)
    colors = np.concatenate(colors)
    save_tractogram_file(path, true_lines + zigzags, grid,
                         data_per_point={"color_x": colors[:, 0], "color_y": colors[:, 1], "color_z": colors[:, 2]})


