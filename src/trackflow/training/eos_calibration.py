"""The EOS threshold of a trained model, chosen on the validation subjects (``--eos_stop auto``).

A classification head puts EOS in the same softmax as ~724 directions, so p(EOS) at a true end is often far
below 0.5 even when EOS is the most likely class; a sigmoid EOS output trained on one end per ~70 points is
shy too. The calibration runs the model along validation streamlines exactly as a validation pass does (no
noise, no augmentation), each streamline in both orientations (tracking ends both halves), and keeps the
threshold that best separates the true last points from the others: the largest F1 of "p(EOS) > threshold
means this point ends its streamline".
"""

import numpy as np
import torch

from trackflow.errors import TrackflowError
from trackflow.training.batch_loader import Batch

# Validation streamlines used per subject at most (evenly spread over the subject's streamlines).
STREAMLINES_PER_SUBJECT = 1000
BATCH_STREAMLINES = 100


def best_f1_threshold(probabilities: np.ndarray, is_end: np.ndarray) -> dict:
    """The threshold t maximising the F1 of ``probabilities > t`` as a detector of ``is_end``.

    Parameters
    ----------
    probabilities : float [N]
    is_end : bool [N], at least one True

    Returns
    -------
    dict with ``threshold`` (halfway between the lowest kept probability and the next lower one, so the kept
    points are exactly those above it), ``f1``, ``precision``, ``recall``, ``n_points``, ``n_ends``.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    is_end = np.asarray(is_end, dtype=bool)
    n_ends = int(is_end.sum())
    if n_ends == 0:
        raise TrackflowError("EOS calibration needs at least one streamline end")
    order = np.argsort(-probabilities, kind="stable")
    p, ends = probabilities[order], is_end[order]
    true_positives = np.cumsum(ends)
    kept = np.arange(1, len(p) + 1)
    f1 = 2 * true_positives / (kept + n_ends)
    # Only cut between distinct values: 'p > t' keeps all points of one value or none.
    cut_allowed = np.append(p[1:] < p[:-1], True)
    best = int(np.argmax(np.where(cut_allowed, f1, -1.0)))
    below = p[best + 1] if best + 1 < len(p) else 0.0
    return {"threshold": float((p[best] + below) / 2), "f1": float(f1[best]),
            "precision": float(true_positives[best] / kept[best]), "recall": float(true_positives[best] / n_ends),
            "n_points": int(len(p)), "n_ends": n_ends}


def _both_orientations(batch: Batch) -> Batch:
    """The batch's streamlines followed by the same streamlines reversed (one subject per batch)."""
    lines = torch.split(batch.points, batch.lengths.tolist())
    reversed_lines = [line.flip(0) for line in lines]
    points = torch.cat([batch.points, *reversed_lines])
    (subject, _, _), = batch.subjects
    return Batch(points, torch.cat([batch.lengths, batch.lengths]), [(subject, 0, 2 * len(lines))])


@torch.no_grad()
def eos_outputs_along_streamlines(model, loader, data, subjects) -> tuple:
    """(p(EOS) [N], is_end [N], EOS most likely [N]) at every point of the validation streamlines of
    ``subjects`` (``STREAMLINES_PER_SUBJECT`` at most each), both orientations; ``loader`` and ``data`` are the
    trainer's ``BatchLoader`` and validation ``SubsetData``."""
    model.eval()
    head = model.direction_getter
    parts = []
    for subject in subjects:
        n_streamlines = len(data.cohort.euclidean_lengths(subject, data.streamline_group))
        ids = np.unique(np.linspace(0, n_streamlines - 1, min(n_streamlines, STREAMLINES_PER_SUBJECT)).astype(np.int64))
        for start in range(0, len(ids), BATCH_STREAMLINES):
            batch = _both_orientations(loader.load(data, [(subject, ids[start:start + BATCH_STREAMLINES])], False))
            rows = loader.rows(model, data, batch, training=False)
            raw = model(rows.inputs, rows.coordinates)
            parts.append((head.eos_probability(raw), rows.eos_target, head.eos_is_most_likely(raw)))
    return tuple(torch.cat(values).cpu().numpy() for values in zip(*parts))


def calibrate_eos(model, loader, data, subjects) -> dict:
    """The calibration record of a model with EOS: ``best_f1_threshold``'s dict plus ``ends_share`` (share of
    the points that are ends) and ``argmax_recall`` / ``argmax_precision`` (the same detector with the 'EOS is
    most likely' rule, ``--eos_stop max``) and ``mean_p_at_ends``."""
    probabilities, is_end, most_likely = eos_outputs_along_streamlines(model, loader, data, subjects)
    record = best_f1_threshold(probabilities, is_end)
    n_flagged = int(most_likely.sum())
    record.update(ends_share=float(is_end.mean()), mean_p_at_ends=float(probabilities[is_end].mean()),
                  argmax_recall=float((most_likely & is_end).sum() / is_end.sum()),
                  argmax_precision=float((most_likely & is_end).sum() / n_flagged) if n_flagged else 0.0,
                  subjects=list(subjects))
    return record
