"""The EOS threshold of a trained model, chosen on the validation subjects (``--eos_stop auto``).

A classification head puts EOS in the same softmax as ~724 directions, so p(EOS) at a true end is often far
below 0.5 even when EOS is the most likely class; a sigmoid EOS output trained on one end per ~70 points is
shy too. The calibration runs the model along validation streamlines exactly as a validation pass does (no
noise, no augmentation), each streamline in both orientations (tracking ends both halves), and keeps the
threshold that, applied as tracking applies it (stop at the first point above it), stops the most
streamlines at their true end while cutting the fewest before it (``best_first_stop_threshold``).
"""

import numpy as np
import torch

from trackflow.errors import TrackflowError
from trackflow.training.batch_loader import Batch

# A stop within the last END_POINTS points of a streamline counts as a stop at its end (tracking stops one step
# before a point the mask refuses, and steps are not the hdf5's points).
END_POINTS = 2
# Validation streamlines used per subject at most (evenly spread over the subject's streamlines).
STREAMLINES_PER_SUBJECT = 1000
BATCH_STREAMLINES = 100


def best_first_stop_threshold(interior_max: np.ndarray, end_max: np.ndarray) -> dict:
    """The threshold t that best stops streamlines at their ends under the tracking rule 'stop at the first
    point with p(EOS) > t'.

    A streamline whose interior (all points but the last ``END_POINTS``) has a point above t is cut early; one
    that is not cut and has an end point above t stops right; the others do not stop by EOS, and the tracking
    mask stops them instead (at the end of the white matter, where most true ends are). So EOS helps by the
    streamlines it stops right and harms by those it cuts (they are lost, too short or connecting nothing):
    the returned t maximises right - cut (ties: the highest t). A per-point F1, or F1 of stopping right, would
    pick much lower thresholds that cut more streamlines than they stop right on a shy EOS output.

    Parameters
    ----------
    interior_max, end_max : float [S]
        Per streamline, the largest p(EOS) inside and in its last ``END_POINTS`` points.

    Returns
    -------
    dict with ``threshold`` (halfway between the lowest probability that fires and the next lower one),
    ``net_gain`` ((right - cut) / n, 0 when no threshold helps: t is then above every probability),
    ``precision`` (right / (right + cut)), ``recall`` (right / n), ``n_streamlines``.
    """
    interior_max = np.asarray(interior_max, dtype=np.float64)
    end_max = np.asarray(end_max, dtype=np.float64)
    n = len(end_max)
    if n == 0:
        raise TrackflowError("EOS calibration needs at least one streamline")
    # Candidates: just below each distinct value (every set 'p > t' is one of these).
    values = np.unique(np.concatenate([interior_max, end_max]))[::-1]  # descending
    candidates = (values + np.append(values[1:], 0.0)) / 2
    candidates = candidates[np.isfinite(candidates)]  # -inf: a streamline with no interior point
    cut = _count_above(interior_max, candidates)
    # right: interior <= t < end, i.e. end above t minus (end and interior) above t
    right = _count_above(end_max, candidates) - _count_above(np.minimum(end_max, interior_max), candidates)
    # t above every probability (never fires) is the baseline: gain 0
    candidates = np.concatenate([[min(1.0, float(values[0]) + 1e-6)], candidates])
    right, cut = np.concatenate([[0], right]), np.concatenate([[0], cut])
    gain = right - cut
    best = int(np.argmax(gain))
    fired = right[best] + cut[best]
    return {"threshold": float(candidates[best]), "net_gain": float(gain[best] / n),
            "precision": float(right[best] / fired) if fired else 0.0, "recall": float(right[best] / n),
            "n_streamlines": int(n)}


def _count_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, how many values are strictly above it."""
    return len(values) - np.searchsorted(np.sort(values), thresholds, side="right")


def _both_orientations(batch: Batch) -> Batch:
    """The batch's streamlines followed by the same streamlines reversed (one subject per batch)."""
    lines = torch.split(batch.points, batch.lengths.tolist())
    reversed_lines = [line.flip(0) for line in lines]
    points = torch.cat([batch.points, *reversed_lines])
    (subject, _, _), = batch.subjects
    return Batch(points, torch.cat([batch.lengths, batch.lengths]), [(subject, 0, 2 * len(lines))])


@torch.no_grad()
def eos_outputs_along_streamlines(model, loader, data, subjects) -> tuple:
    """(p(EOS) [N], EOS most likely [N], points per streamline [S]) along the validation streamlines of
    ``subjects`` (``STREAMLINES_PER_SUBJECT`` at most each), each in both orientations, streamline after
    streamline (its last point last); ``loader`` and ``data`` are the trainer's ``BatchLoader`` and
    validation ``SubsetData``."""
    model.eval()
    head = model.direction_getter
    parts = []
    for subject in subjects:
        n_streamlines = len(data.cohort.euclidean_lengths(subject, data.streamline_group))
        ids = np.unique(np.linspace(0, n_streamlines - 1, min(n_streamlines, STREAMLINES_PER_SUBJECT)).astype(np.int64))
        for start in range(0, len(ids), BATCH_STREAMLINES):
            batch = _both_orientations(loader.load(data, [(subject, ids[start:start + BATCH_STREAMLINES])], False))
            rows = loader.rows(model, data, batch, training=False)  # with EOS: one row per point
            raw = model(rows.inputs, rows.coordinates)
            parts.append((head.eos_probability(raw), head.eos_is_most_likely(raw), batch.lengths))
    return tuple(torch.cat(values).cpu().numpy() for values in zip(*parts))


def calibrate_eos(model, loader, data, subjects) -> dict:
    """The calibration record of a model with EOS: ``best_first_stop_threshold``'s dict plus, for information,
    ``mean_p_at_ends``, the share of points that are ends (``ends_share``) and the first-stop figures of the
    'EOS is most likely' rule (``--eos_stop max``): ``max_rule_recall``, ``max_rule_precision``."""
    probabilities, most_likely, lengths = eos_outputs_along_streamlines(model, loader, data, subjects)
    interior_max, end_max = _interior_and_end_maxima(probabilities, lengths)
    record = best_first_stop_threshold(interior_max, end_max)
    # the max rule: a first stop where EOS is most likely
    flagged_inside, flagged_end = _interior_and_end_maxima(most_likely.astype(np.float64), lengths)
    cut, right = flagged_inside > 0, (flagged_inside <= 0) & (flagged_end > 0)
    ends = np.cumsum(lengths) - 1
    record.update(mean_p_at_ends=float(probabilities[ends].mean()), ends_share=float(len(ends) / len(probabilities)),
                  max_rule_recall=float(right.mean()),
                  max_rule_precision=float(right.sum() / (right.sum() + cut.sum())) if (right | cut).any() else 0.0,
                  end_points=END_POINTS, subjects=list(subjects))
    return record


def _interior_and_end_maxima(values: np.ndarray, lengths: np.ndarray) -> tuple:
    """Per streamline (``lengths`` points each, >= 2): the largest value before its last ``END_POINTS`` points
    (-inf when there is none) and the largest among them."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    end_starts = starts + np.maximum(lengths - END_POINTS, 0)
    index = np.arange(len(values))
    streamline = np.repeat(np.arange(len(lengths)), lengths)
    in_end = index >= end_starts[streamline]
    interior_max = np.full(len(lengths), -np.inf)
    end_max = np.full(len(lengths), -np.inf)
    np.maximum.at(interior_max, streamline[~in_end], values[~in_end])
    np.maximum.at(end_max, streamline[in_end], values[in_end])
    return interior_max, end_max
