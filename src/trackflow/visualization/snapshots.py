"""Pictures of one tractogram for the report: a snapshot in three projections and its length distribution.

``tractogram_snapshot`` draws a subsample of the streamlines, each segment coloured by its direction
(RGB = |dx|, |dy|, |dz|, the usual diffusion-MRI colour code), projected on the axial (x-y), coronal (x-z) and
sagittal (y-z) planes; segments are drawn from far to near along the viewing axis. ``length_distribution``
draws the length histograms of a tractogram before and after length filtering. Both only need matplotlib's
Agg backend (no display).
"""

import logging

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from trackflow.files import atomic_output, check_outputs  # noqa: E402
from trackflow.visualization.summary import tractogram_lengths_mm, tractogram_streamlines_mm  # noqa: E402

LOGGER = logging.getLogger(__name__)

# (title, horizontal axis, vertical axis, viewing axis): RAS+ points, the viewer in front of the nearest face.
PROJECTIONS = [("axial (seen from above)", 0, 1, 2), ("coronal (seen from the front)", 0, 2, 1),
               ("sagittal (seen from the right)", 1, 2, 0)]
AXIS_NAMES = ["x (mm, left → right)", "y (mm, posterior → anterior)", "z (mm, inferior → superior)"]


def subsample(streamlines, max_streamlines: int, seed: int = 0) -> list:
    """At most ``max_streamlines`` streamlines, drawn without replacement with ``seed`` (all, in order, if fewer)."""
    if len(streamlines) <= max_streamlines:
        return list(streamlines)
    keep = np.sort(np.random.default_rng(seed).choice(len(streamlines), max_streamlines, replace=False))
    return [streamlines[i] for i in keep]


def direction_segments(streamlines) -> tuple[np.ndarray, np.ndarray]:
    """(segments, colours): every segment of the streamlines as a (n, 2, 3) array of end points and its
    direction colour (n, 3), RGB = |unit direction|."""
    parts = [np.stack([s[:-1], s[1:]], axis=1) for s in streamlines if len(s) > 1]
    if not parts:
        return np.zeros((0, 2, 3)), np.zeros((0, 3))
    segments = np.concatenate(parts).astype(float)
    directions = segments[:, 1] - segments[:, 0]
    norms = np.linalg.norm(directions, axis=1, keepdims=True)
    colours = np.abs(directions) / np.where(norms > 0, norms, 1.0)
    return segments, colours


def tractogram_snapshot(tractogram, out_png, title: str, max_streamlines: int = 2000, seed: int = 0,
                        overwrite: bool = True) -> int:
    """Write the three-projection snapshot of a .trk/.tck/.trx file; returns the number of streamlines drawn."""
    check_outputs([out_png], overwrite)
    streamlines = tractogram_streamlines_mm(tractogram)
    drawn = subsample(streamlines, max_streamlines, seed)
    segments, colours = direction_segments(drawn)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8), facecolor="black")
    for ax, (view, horizontal, vertical, depth) in zip(axes, PROJECTIONS):
        ax.set_facecolor("black")
        order = np.argsort(segments[:, :, depth].mean(axis=1))  # far to near: the nearest are drawn last
        ax.add_collection(LineCollection(segments[order][:, :, [horizontal, vertical]], colors=colours[order],
                                         linewidths=0.6, alpha=0.8))
        if len(segments):
            ax.autoscale_view()
        else:
            ax.text(0.5, 0.5, "no streamline", color="white", ha="center", va="center", transform=ax.transAxes)
        ax.set_aspect("equal")
        ax.set_title(view, color="white")
        ax.set_xlabel(AXIS_NAMES[horizontal], color="white")
        ax.set_ylabel(AXIS_NAMES[vertical], color="white")
        ax.tick_params(colors="white")
    fig.suptitle(f"{title}: {len(drawn)} of {len(streamlines)} streamlines, coloured by direction "
                 "(red |x|, green |y|, blue |z|)", color="white")
    fig.tight_layout()
    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100, facecolor="black")
    plt.close(fig)
    LOGGER.info("wrote %s (%d of %d streamlines)", out_png, len(drawn), len(streamlines))
    return len(drawn)


def length_distribution(tracked, filtered, out_png, title: str, min_length: float, max_length: float,
                        overwrite: bool = True) -> None:
    """Write the length histograms (mm) of a tractogram before (``tracked``) and after (``filtered``) length
    filtering, with the filter's bounds."""
    check_outputs([out_png], overwrite)
    before, after = tractogram_lengths_mm(tracked), tractogram_lengths_mm(filtered)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    top = max(float(before.max()) if len(before) else 0.0, max_length if np.isfinite(max_length) else 0.0, 1.0)
    bins = np.linspace(0.0, top, 60)
    ax.hist(before, bins=bins, color="lightgray", label=f"tracked (n = {len(before)})")
    ax.hist(after, bins=bins, histtype="step", linewidth=1.5, color="tab:blue",
            label=f"kept by the length filter (n = {len(after)})")
    for bound in (min_length, max_length):
        if np.isfinite(bound):
            ax.axvline(bound, color="black", linestyle="--", linewidth=1)
    ax.plot([], [], color="black", linestyle="--", linewidth=1,
            label=f"filter bounds ({min_length:g}-{max_length:g} mm)")
    ax.set_title(title)
    ax.set_xlabel("streamline length (mm)")
    ax.set_ylabel("number of streamlines")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the axes: never over the bars
    fig.tight_layout()
    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    LOGGER.info("wrote %s", out_png)
