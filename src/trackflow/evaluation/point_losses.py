"""Per-point loss of a trained model on reference streamlines (the evaluation behind ``l2t_visualize_loss`` /
``tt_visualize_loss``, spec dwi_ml.md §7).

The streamlines go through exactly the rows of a validation pass (``BatchLoader.load`` then ``rows`` with
``training=False``: model resampling, no noise, last point dropped from the rows when the head has no EOS),
and the loss is the head's own ``direction_getter.loss``: there is no second implementation of any loss.
"""

import sys
from dataclasses import dataclass

import numpy as np
import torch
from nibabel.streamlines import ArraySequence
from tqdm import tqdm

from trackflow.data.streamlines import array_sequence_from_parts, offsets_from_lengths
from trackflow.errors import TrackflowError
from trackflow.training.batch_loader import BatchLoader, LoaderParams, SubsetData

_PARTS = ("points", "lengths", "losses", "target_dirs", "eos_targets", "eos_probs", "directions")


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
    # Seed unused: no randomness without training augmentation.
    loader = BatchLoader(LoaderParams(), model.preprocessing, hdf5_preprocessing, seed=0, device=device)
    data = SubsetData.of_streamlines(cohort, subject, input_group, streamlines, device)
    parts = {name: [] for name in _PARTS}
    starts = range(0, n_streamlines, batch_size)
    # On stderr, only for an interactive terminal.
    with torch.no_grad(), tqdm(starts, desc="loss", unit="batch", file=sys.stderr, disable=None) as bar:
        for start in bar:
            ids = np.arange(start, min(start + batch_size, n_streamlines))
            _append_batch(parts, model, loader, data, subject, ids, with_directions)
    return _merge(parts)


def _append_batch(parts: dict, model, loader: BatchLoader, data: SubsetData, subject: str, ids: np.ndarray,
                  with_directions: bool) -> None:
    """Append the per-row values of streamlines ``ids`` (one batch, on the device) to ``parts``."""
    head = model.direction_getter
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


def _merge(parts: dict) -> PointLosses:
    """One ``PointLosses`` (numpy, on the CPU) from the per-batch tensors."""
    merged = {name: torch.cat(values).cpu().numpy() if values else None for name, values in parts.items()}
    lengths = merged["lengths"].astype(np.int64)
    return PointLosses(
        rows=array_sequence_from_parts(merged["points"].astype(np.float32), offsets_from_lengths(lengths),
                                       lengths),
        losses=merged["losses"].astype(np.float32), target_dirs=merged["target_dirs"].astype(np.float32),
        eos_targets=merged["eos_targets"], eos_probs=merged["eos_probs"], directions=merged["directions"])


def check_best_and_worst_count(n_streamlines: int) -> None:
    """The best and the worst streamlines are two disjoint sets of at least one: 2 streamlines or more."""
    if n_streamlines < 2:
        raise TrackflowError("--save_colored_best_and_worst needs at least 2 streamlines")


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
    check_best_and_worst_count(n_streamlines)
    count = min(max(1, int(round(percent / 100 * n_streamlines))), n_streamlines // 2)
    order = np.argsort(streamline_means, kind="stable")
    return order[:count], order[::-1][:count]
