"""Per-point loss of a trained model on reference streamlines: statistics, histograms, coloured tractograms
(``l2t_visualize_loss`` / ``tt_visualize_loss``, spec dwi_ml.md §7).

The streamlines go through exactly the rows of a validation pass (``BatchLoader.load`` then ``rows`` with
``training=False``: model resampling, no noise, last point dropped from the rows when the head has no EOS),
and the loss is the head's own ``direction_getter.loss``: there is no second implementation of any loss.
Each output tractogram point carries the value of its row, so without EOS the last point of every
streamline (which has no target, hence no loss) is not written.
"""

import argparse
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
from nibabel.streamlines import ArraySequence
from tqdm import tqdm

from trackflow.cli.common import add_overwrite_arg, add_verbose_arg
from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.data.streamlines import array_sequence_from_parts, offsets_from_lengths
from trackflow.device import select_device
from trackflow.errors import TrackflowError
from trackflow.files import atomic_output, check_outputs
from trackflow.models.persistence import load_experiment_model
from trackflow.models.registry import check_model_family
from trackflow.data.tractograms import load_tractogram_file, save_tractogram_file
from trackflow.training.batch_loader import BatchLoader, LoaderParams, SubsetData

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
class PointLosses:
    """What the model says on B reference streamlines; R rows (points that have a loss) in all.

    Attributes
    ----------
    rows : ArraySequence
        B streamlines, vox/corner, after the model's resampling; point t of streamline b is row t of b
        (all points with EOS, all but the last without).
    losses : ndarray [R] float32
        Per-point loss (``direction_getter.loss``, not averaged).
    target_dirs : ndarray [R, 3] float32
        Displacement to the next true point (voxel units); zero on EOS rows.
    eos_targets : ndarray [R] bool or None
        True on the last point of each streamline; None without EOS.
    eos_probs : ndarray [R] float32 or None
        Model probability of ending at each point; None without EOS.
    directions : ndarray [R, 3] float32 or None
        The head's deterministic direction at each point (only when asked for).
    """

    rows: ArraySequence
    losses: np.ndarray
    target_dirs: np.ndarray
    eos_targets: np.ndarray | None
    eos_probs: np.ndarray | None
    directions: np.ndarray | None

    @property
    def lengths(self) -> np.ndarray:
        """Rows per streamline, [B] int."""
        return np.asarray(self.rows._lengths)

    def streamline_means(self) -> np.ndarray:
        """Mean loss of each streamline, [B] float64."""
        return np.add.reduceat(self.losses.astype(np.float64), offsets_from_lengths(self.lengths)) / self.lengths

    def eos_errors(self) -> np.ndarray | None:
        """|p_eos - target| per point, [R] (target 1 on the last point, 0 elsewhere); None without EOS."""
        if self.eos_probs is None:
            return None
        return np.abs(self.eos_probs - self.eos_targets.astype(np.float32))


class _PreloadedStreamlines(SubsetData):
    """``SubsetData`` of one subject whose reference streamlines are given (from a file or an hdf5 group).

    The volume is read from the hdf5 on first use and kept (cache of one); only ``streamlines`` differs.
    """

    def __init__(self, cohort, subject: str, input_group: str, streamlines: ArraySequence, device):
        super().__init__(cohort, [subject], input_group, streamline_group=None, device=device, lazy=True,
                         cache_size=1)
        self._given = streamlines

    def streamlines(self, subject: str, ids: np.ndarray) -> ArraySequence:
        return self._given[ids]


def compute_point_losses(model, cohort, subject: str, input_group: str, streamlines: ArraySequence,
                         hdf5_preprocessing: dict, batch_size: int | None, device,
                         with_directions: bool = False) -> PointLosses:
    """Run the model on reference streamlines as a validation pass and keep every per-point value.

    Parameters
    ----------
    model : MainModel
        In eval mode, on ``device``.
    cohort : HDF5Cohort
        Open; holds the subject's input volume.
    streamlines : ArraySequence
        B reference streamlines, vox/corner, each with at least 2 points.
    hdf5_preprocessing : dict
        ``step_size``, ``compress_lines``, ``nb_points`` the streamlines already have (the hdf5's for an
        hdf5 group, empty for a file): the model's setting is applied when it differs.
    batch_size : int or None
        Streamlines per batch; None runs them all at once.
    with_directions : bool
        Also keep the head's deterministic direction at each row.

    Returns
    -------
    PointLosses
    """
    n_streamlines = len(streamlines)
    batch_size = n_streamlines if batch_size is None else batch_size
    model_preprocessing = {"step_size": model.step_size, "compress_lines": model.compress_lines,
                           "nb_points": model.nb_points}
    # Seed unused: no randomness without training augmentation.
    loader = BatchLoader(LoaderParams(), model_preprocessing, hdf5_preprocessing, seed=0, device=device)
    data = _PreloadedStreamlines(cohort, subject, input_group, streamlines, device)
    head = model.direction_getter
    parts = {name: [] for name in ("points", "lengths", "losses", "target_dirs", "eos_targets", "eos_probs",
                                   "directions")}
    starts = range(0, n_streamlines, batch_size)
    # On stderr, only for an interactive terminal.
    with torch.no_grad(), tqdm(starts, desc="loss", unit="batch", file=sys.stderr, disable=None) as bar:
        for start in bar:
            ids = np.arange(start, min(start + batch_size, n_streamlines))
            batch = loader.load(data, [(subject, ids)], training=False)
            rows = loader.rows(model, data, batch, training=False)
            raw = model(rows.inputs, rows.coordinates)                                  # [R_b, K]
            parts["losses"].append(head.loss(raw, rows.target_dirs, rows.eos_target))  # [R_b]
            parts["points"].append(torch.cat(rows.coordinates))                        # [R_b, 3]
            parts["lengths"].append(torch.tensor([len(c) for c in rows.coordinates]))
            parts["target_dirs"].append(rows.target_dirs)
            if head.add_eos:
                parts["eos_targets"].append(rows.eos_target)
                parts["eos_probs"].append(head.eos_probability(raw))
            if with_directions:
                parts["directions"].append(head.deterministic(raw))
    merged = {name: torch.cat(values).cpu().numpy() if values else None for name, values in parts.items()}
    lengths = merged["lengths"].astype(np.int64)
    return PointLosses(
        rows=array_sequence_from_parts(merged["points"].astype(np.float32), offsets_from_lengths(lengths),
                                       lengths),
        losses=merged["losses"].astype(np.float32), target_dirs=merged["target_dirs"].astype(np.float32),
        eos_targets=merged["eos_targets"], eos_probs=merged["eos_probs"], directions=merged["directions"])


def best_and_worst(streamline_means: np.ndarray, percent: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``percent`` % streamlines with the lowest and with the highest mean loss.

    The count is ``round(percent / 100 * B)``, at least 1 and at most ``B // 2`` so the two sets never
    share a streamline.

    Parameters
    ----------
    streamline_means : ndarray [B]
    percent : float
        In (0, 100].

    Returns
    -------
    best, worst : ndarray [n] int
        Best sorted by increasing mean loss, worst by decreasing mean loss.
    """
    n_streamlines = len(streamline_means)
    if n_streamlines < 2:
        raise TrackflowError("--save_colored_best_and_worst needs at least 2 streamlines")
    count = min(max(1, int(round(percent / 100 * n_streamlines))), n_streamlines // 2)
    order = np.argsort(streamline_means, kind="stable")
    return order[:count], order[::-1][:count]


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
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    LOGGER.info("wrote %s", path)
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


def output_paths(out_dir: Path, out_prefix: str, *, compute_histogram: bool, has_eos: bool,
                 save_colored_tractogram: bool, best_worst_percent: float | None, save_colored_eos_probs: bool,
                 save_colored_eos_errors: bool, save_displacement: int | None, loss_clip: str,
                 eos_probs_clip: str, eos_errors_clip: str) -> dict:
    """Output name -> path for the enabled outputs (spec §7 names: ``<out_dir>/<out_prefix>_<what>``)."""
    paths = {}
    if compute_histogram:
        paths["histogram"] = f"{out_prefix}_histogram.png"
        if has_eos:
            paths["histogram_eos_error"] = f"{out_prefix}_histogram_eos_error.png"
            paths["histogram_eos_probs_per_third"] = f"{out_prefix}_histogram_eos_probs_per_third.png"
    if save_colored_tractogram:
        paths["colored_loss"] = f"{out_prefix}_colored_loss{loss_clip}.trk"
    if best_worst_percent is not None:
        pct = f"{best_worst_percent:g}"
        paths["best"] = f"{out_prefix}_best{pct}percent{loss_clip}.trk"
        paths["worst"] = f"{out_prefix}_worst{pct}percent{loss_clip}.trk"
    if save_colored_tractogram or best_worst_percent is not None:
        paths["colorbar_loss"] = f"{out_prefix}_colorbar_loss{loss_clip}.png"
    for name, wanted, clip in (("eos_probs", save_colored_eos_probs, eos_probs_clip),
                               ("eos_errors", save_colored_eos_errors, eos_errors_clip)):
        if wanted:
            paths[f"colored_{name}"] = f"{out_prefix}_colored_{name}{clip}.trk"
            paths[f"colorbar_{name}"] = f"{out_prefix}_colorbar_{name}{clip}.png"
    if save_displacement is not None:
        paths["displacement"] = f"{out_prefix}_displacement.trk"
    return {name: Path(out_dir) / p for name, p in paths.items()}


def _load_reference_streamlines(cohort, subj_id, input_group, streamlines_group, streamlines_file,
                                reference):
    """(streamlines vox/corner, the preprocessing they already have) from an hdf5 group or a file."""
    if streamlines_group is not None:
        preprocessing = {"step_size": cohort.step_size, "compress_lines": cohort.compress,
                         "nb_points": cohort.nb_points}
        return cohort.read_streamlines(subj_id, streamlines_group), preprocessing
    grid = cohort.reference_nifti(subj_id, input_group)
    path = Path(streamlines_file)
    sft = load_tractogram_file(path, reference)
    # Unlike dwi_ml, refuse a tractogram drawn on another grid than the input volume.
    if not is_header_compatible(sft, grid):
        raise TrackflowError(f"{path} is not on the grid of input group '{input_group}' of subject {subj_id}")
    sft.to_vox()
    sft.to_corner()
    return sft.streamlines, {}


def visualize_loss(model_family: str, experiment_path, hdf5_file, subj_id: str, input_group: str, *,
                   streamlines_group: str | None = None, streamlines_file=None, reference=None,
                   subset: str = "testing", use_latest_epoch: bool = False, batch_size: int | None = None,
                   use_gpu: bool = False, processes: int | None = None, out_dir=None,
                   out_prefix: str | None = None,
                   compute_histogram: bool = False, save_colored_tractogram: bool = False,
                   save_colored_best_and_worst: float | None = None, save_colored_eos_probs: bool = False,
                   save_colored_eos_errors: bool = False, save_displacement: int | None = None,
                   colormap: str = "plasma", min_range: float | None = None, max_range: float | None = None,
                   min_range_eos_probs: float | None = None, max_range_eos_probs: float | None = None,
                   min_range_eos_errors: float | None = None, max_range_eos_errors: float | None = None,
                   show_now: bool = False, fig_size=(10.0, 15.0), overwrite: bool = False) -> dict:
    """Compute a model's per-point loss on one subject's streamlines and write the asked outputs.

    Options have the meaning of spec §7 (see ``build_parser``). ``model_family`` is ``"l2t"`` or
    ``"tt"`` (which script asked). Every input and output is checked before the model runs.

    Returns
    -------
    dict
        Output name -> path written (names as in ``output_paths``).
    """
    if (streamlines_group is None) == (streamlines_file is None):
        raise TrackflowError("give exactly one of --streamlines_group and --streamlines_file")
    if colormap not in matplotlib.colormaps:
        raise TrackflowError(f"unknown matplotlib colormap {colormap!r}")
    if save_colored_best_and_worst is not None and not 0 < save_colored_best_and_worst <= 100:
        raise TrackflowError(f"--save_colored_best_and_worst must be in (0, 100], got {save_colored_best_and_worst}")
    if batch_size is not None and batch_size < 1:
        raise TrackflowError(f"--batch_size must be at least 1, got {batch_size}")
    if save_displacement is not None and save_displacement < 1:
        raise TrackflowError(f"--save_displacement must be at least 1, got {save_displacement}")
    will_show = show_now and _display_available()
    if show_now and not will_show:
        LOGGER.info("--show_now: no display available, figures are only saved to files")
    if not will_show:
        matplotlib.use("Agg")

    device = select_device(use_gpu)
    if processes is not None and device.type == "cpu":
        torch.set_num_threads(processes)
    model = load_experiment_model(experiment_path, use_latest_epoch=use_latest_epoch, device=device)
    check_model_family(type(model).__name__, model_family, "visualize_loss")
    has_eos = bool(model.direction_getter.add_eos)
    if (save_colored_eos_probs or save_colored_eos_errors) and not has_eos:
        raise TrackflowError("the model has no EOS output: --save_colored_eos_probs/_errors are not available")

    out_dir = Path(experiment_path) / "visu_loss" if out_dir is None else Path(out_dir)
    out_prefix = subj_id if out_prefix is None else out_prefix
    paths = output_paths(
        out_dir, out_prefix, compute_histogram=compute_histogram, has_eos=has_eos,
        save_colored_tractogram=save_colored_tractogram, best_worst_percent=save_colored_best_and_worst,
        save_colored_eos_probs=save_colored_eos_probs, save_colored_eos_errors=save_colored_eos_errors,
        save_displacement=save_displacement, loss_clip=clip_suffix(min_range, max_range),
        eos_probs_clip=clip_suffix(min_range_eos_probs, max_range_eos_probs),
        eos_errors_clip=clip_suffix(min_range_eos_errors, max_range_eos_errors))
    if not paths:
        raise TrackflowError("nothing to do: choose at least one output option")
    check_outputs(paths.values(), overwrite)
    others = sorted(set(out_dir.glob(f"{out_prefix}*")) - set(paths.values())) if out_dir.is_dir() else []
    if others:
        LOGGER.info("existing files with this prefix, left untouched: %s", ", ".join(map(str, others)))

    with HDF5Cohort(hdf5_file) as cohort:
        if subj_id not in cohort.subjects(subset):
            LOGGER.warning("subject %s is not in the %s subset of %s; using it anyway", subj_id, subset, hdf5_file)
        volume_groups = cohort.volume_groups()
        if input_group not in volume_groups:
            raise TrackflowError(f"input group '{input_group}' is not a volume group of {hdf5_file}; volume "
                                 f"groups: {sorted(volume_groups)}")
        if volume_groups[input_group] != model.nb_features:
            raise TrackflowError(f"input group '{input_group}' has {volume_groups[input_group]} features but "
                                 f"the model expects {model.nb_features}")
        streamlines, preprocessing = _load_reference_streamlines(
            cohort, subj_id, input_group, streamlines_group, streamlines_file, reference)
        if len(streamlines) == 0:
            raise TrackflowError("no reference streamline to evaluate")
        if save_colored_best_and_worst is not None and len(streamlines) < 2:
            raise TrackflowError("--save_colored_best_and_worst needs at least 2 streamlines")
        grid = cohort.reference_nifti(subj_id, input_group)
        losses = compute_point_losses(model, cohort, subj_id, input_group, streamlines, preprocessing,
                                      batch_size, device, with_directions=save_displacement is not None)

    for line in _summary_lines(losses):
        print(line)
    _write_outputs(losses, paths, grid, colormap, (min_range, max_range),
                   (min_range_eos_probs, max_range_eos_probs), (min_range_eos_errors, max_range_eos_errors),
                   save_colored_best_and_worst, save_displacement, tuple(fig_size), will_show)
    if will_show:
        plt.show()
    return paths


def _write_outputs(losses: PointLosses, paths: dict, grid, colormap: str, loss_range, eos_probs_range,
                   eos_errors_range, best_worst_percent, n_displacement, fig_size, keep_open: bool) -> None:
    means = losses.streamline_means()
    if "histogram" in paths:
        _save_figure(_loss_histograms(losses.losses, means, fig_size), paths["histogram"], keep_open)
    if "histogram_eos_error" in paths:
        _save_figure(_eos_error_histogram(losses.eos_errors(), fig_size), paths["histogram_eos_error"], keep_open)
        _save_figure(_eos_probs_per_third(losses, fig_size), paths["histogram_eos_probs_per_third"], keep_open)

    if "colorbar_loss" in paths:
        colors, vmin, vmax = map_to_colors(losses.losses, colormap, *loss_range)
        dpp = {"losses": losses.losses, "color": colors}
        if "colored_loss" in paths:
            save_tractogram_file(paths["colored_loss"], losses.rows, grid, data_per_point=dpp)
        if best_worst_percent is not None:
            best, worst = best_and_worst(means, best_worst_percent)
            for name, ids in (("best", best), ("worst", worst)):
                save_tractogram_file(paths[name], losses.rows[ids], grid,
                                     data_per_point=_select_points(dpp, losses.lengths, ids))
        _save_figure(_colorbar_figure("per-point loss (unitless)", colormap, vmin, vmax), paths["colorbar_loss"],
                     keep_open)
    for name, values, value_range, label in (
            ("eos_probs", losses.eos_probs, eos_probs_range, "EOS probability"),
            ("eos_errors", losses.eos_errors(), eos_errors_range, "EOS error |p(EOS) - target|")):
        if f"colored_{name}" in paths:
            colors, vmin, vmax = map_to_colors(values, EOS_COLORMAP, *value_range)
            save_tractogram_file(paths[f"colored_{name}"], losses.rows, grid,
                                 data_per_point={name: values, "color": colors})
            _save_figure(_colorbar_figure(label, EOS_COLORMAP, vmin, vmax), paths[f"colorbar_{name}"], keep_open)
    if "displacement" in paths:
        _save_displacement(losses, n_displacement, paths["displacement"], grid)


def _select_points(data_per_point: dict, lengths: np.ndarray, ids: np.ndarray) -> dict:
    """The per-point rows of streamlines ``ids`` (in that order) of every [R, ...] array."""
    offsets = offsets_from_lengths(lengths)
    selected_lengths = lengths[ids]
    rows = np.repeat(offsets[ids] - offsets_from_lengths(selected_lengths), selected_lengths) + np.arange(
        selected_lengths.sum())
    return {key: values[rows] for key, values in data_per_point.items()}


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


# ---------------------------------------------------------------------------------------------- command line
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _percent(text: str) -> float:
    value = float(text)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"expected a percentage in (0, 100], got {text}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, example command lines kept as written."""


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Parser of ``l2t_visualize_loss`` and ``tt_visualize_loss``; ``vars(args)`` minus ``verbose`` are
    ``visualize_loss``'s keyword arguments."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter)
    p.add_argument("experiment_path", help="Experiment folder (with best_model/).")
    p.add_argument("hdf5_file", help="Cohort hdf5 file.")
    p.add_argument("subj_id", help="Subject id in the hdf5 file.")
    p.add_argument("input_group", help="Volume group holding the model's input.")

    data = p.add_argument_group("Reference streamlines (one of)")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--streamlines_group", help="Streamline group of the subject in the hdf5.")
    source.add_argument("--streamlines_file", help="Tractogram file (.trk, .trx, or .tck with --reference) on "
                                                   "the grid of the input volume.")
    data.add_argument("--reference", help="Reference image of a .tck --streamlines_file.")
    data.add_argument("--subset", default="testing", choices=["training", "validation", "testing"],
                      help="Subset expected to hold the subject (a warning only).")
    data.add_argument("--use_latest_epoch", action="store_true",
                      help="Use checkpoint/model/ instead of best_model/.")

    run = p.add_argument_group("Computation")
    run.add_argument("--batch_size", type=_positive_int, help="Streamlines per batch [all at once].")
    device = run.add_mutually_exclusive_group()
    device.add_argument("--use_gpu", action="store_true",
                        help="Run on the GPU (CUDA); falls back to the CPU with a warning.")
    device.add_argument("--processes", type=_positive_int, help="CPU threads for torch [torch's default].")

    out = p.add_argument_group("Outputs (at least one)")
    out.add_argument("--out_dir", help="Output folder [<experiment_path>/visu_loss].")
    out.add_argument("--out_prefix", help="Prefix of every output file name [subj_id].")
    out.add_argument("--compute_histogram", action="store_true",
                     help="Histograms of the per-point and per-streamline loss (and of EOS values).")
    out.add_argument("--save_colored_tractogram", action="store_true",
                     help="Tractogram with per-point data 'losses' and 'color'.")
    out.add_argument("--save_colored_best_and_worst", type=_percent, nargs="?", const=DEFAULT_BEST_WORST_PERCENT,
                     metavar="PCT", help="Tractograms of the PCT%% streamlines of lowest and of highest mean "
                                         "loss (PCT %(const)s if no value; at most half of them each).")
    out.add_argument("--save_colored_eos_probs", action="store_true",
                     help="Tractogram coloured by the EOS probability (models with EOS).")
    out.add_argument("--save_colored_eos_errors", action="store_true",
                     help="Tractogram coloured by the EOS error |p(EOS) - target| (models with EOS).")
    out.add_argument("--save_displacement", type=_positive_int, nargs="?", const=1, metavar="N",
                     help="N random streamlines (blue) with the model's one-step predictions from each point "
                          "(zig-zag, green to pink) [1 if no value].")

    look = p.add_argument_group("Colours and figures")
    look.add_argument("--colormap", default="plasma", help="Matplotlib colormap of the loss.")
    look.add_argument("--min_range", type=float, help="Clip losses below this value [data minimum].")
    look.add_argument("--max_range", type=float, help="Clip losses above this value [data maximum].")
    look.add_argument("--min_range_eos_probs", type=float, help="Lower clip of EOS probabilities.")
    look.add_argument("--max_range_eos_probs", type=float, help="Upper clip of EOS probabilities.")
    look.add_argument("--min_range_eos_errors", type=float, help="Lower clip of EOS errors.")
    look.add_argument("--max_range_eos_errors", type=float, help="Upper clip of EOS errors.")
    look.add_argument("--show_now", action="store_true",
                      help="Also show the figures (on a machine without display they are only saved).")
    look.add_argument("--fig_size", type=float, nargs=2, default=(10.0, 15.0), metavar=("WIDTH", "HEIGHT"),
                      help="Histogram figure size in inches.")
    add_overwrite_arg(p)
    add_verbose_arg(p)
    return p
