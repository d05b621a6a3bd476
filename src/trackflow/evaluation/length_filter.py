"""Length filtering of tractogram files (``trackflow_filter_by_length``) and the counts TSV it writes.

Files go through scilpy's ``filter_streamlines_by_length`` (bounds inclusive, lengths in mm on any grid);
each run writes a one-row TSV of counts and length statistics (``KEYS`` + ``COUNT_COLUMNS``), which the
cohort summary reads back with ``read_counts``.
"""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from dipy.io.streamline import save_tractogram

from trackflow.data.streamlines import euclidean_lengths
from trackflow.data.tractograms import check_tractogram_path, load_tractogram_file
from trackflow.errors import TrackflowError
from trackflow.files import atomic_output, check_inputs, check_outputs

LOGGER = logging.getLogger(__name__)

# Columns of the counts TSV (one row per subject and model).
KEYS = ["subject", "model"]
COUNT_COLUMNS = ["n_before", "n_after", "mean_length_before_mm", "median_length_before_mm",
                 "mean_length_after_mm", "median_length_after_mm"]


def _length_stats(lengths_mm: np.ndarray, when: str) -> dict:
    empty = len(lengths_mm) == 0
    return {f"mean_length_{when}_mm": np.nan if empty else float(np.mean(lengths_mm)),
            f"median_length_{when}_mm": np.nan if empty else float(np.median(lengths_mm))}


def filter_tractogram_by_length(in_tractogram, out_tractogram, out_counts, min_length: float = 0.0,
                                max_length: float = np.inf, subject: str | None = None, model: str | None = None,
                                reference=None, overwrite: bool = False) -> dict:
    """Keep streamlines with ``min_length <= length <= max_length`` (mm) and write their counts.

    Parameters
    ----------
    in_tractogram, out_tractogram : path
        ``.trk``, ``.trx`` or ``.tck`` (with ``reference``); per-streamline and per-point data are kept.
    out_counts : path
        One-row TSV: subject, model, n_before, n_after, mean/median length before and after (mm; NA when
        there is no streamline).
    min_length, max_length : float
        Bounds in mm, inclusive.
    subject, model : str or None
        Row labels; default: the input's folder name and file stem (``<subject>/<model>.trk``).
    reference : path or None
        Image of the grid, for ``.tck`` only.

    Returns
    -------
    dict
        The TSV row.
    """
    in_tractogram, out_tractogram, out_counts = Path(in_tractogram), Path(out_tractogram), Path(out_counts)
    check_inputs([in_tractogram, reference])
    check_tractogram_path(out_tractogram)
    check_outputs([out_tractogram, out_counts], overwrite, inputs=[in_tractogram, reference])
    if not 0 <= min_length <= max_length:
        raise TrackflowError(f"lengths must satisfy 0 <= --minL <= --maxL, got {min_length} and {max_length}")
    if out_tractogram.suffix.lower() == ".tck" and in_tractogram.suffix.lower() != ".tck":
        LOGGER.warning("writing .tck: per-streamline and per-point data are dropped")

    sft = load_tractogram_file(in_tractogram, reference)
    sft.to_rasmm()  # lengths in mm on any grid, anisotropic voxels included
    lengths_before = euclidean_lengths(sft.streamlines)
    # scilpy's own filter rather than a rewrite; it keeps the dps/dpp of kept lines. Imported here: it
    # costs over a second, which the tracking scripts (users of this module) should not pay.
    from scilpy.tractograms.streamline_operations import filter_streamlines_by_length

    filtered, kept = filter_streamlines_by_length(sft, min_length, max_length)
    lengths_after = lengths_before[np.asarray(kept, dtype=bool)] if len(lengths_before) else lengths_before
    row = {"subject": subject if subject is not None else in_tractogram.parent.name,
           "model": model if model is not None else in_tractogram.name.split(".")[0],
           "n_before": len(lengths_before), "n_after": len(lengths_after),
           **_length_stats(lengths_before, "before"), **_length_stats(lengths_after, "after")}
    # Both written before either is renamed into place: they appear together or not at all.
    with (atomic_output(out_tractogram, overwrite=overwrite) as tmp_tractogram,
          atomic_output(out_counts, overwrite=overwrite) as tmp_counts):
        save_tractogram(filtered, str(tmp_tractogram), bbox_valid_check=False)
        pd.DataFrame([row], columns=KEYS + COUNT_COLUMNS).to_csv(tmp_counts, sep="\t", index=False,
                                                                 na_rep="NA", float_format="%.6g")
    LOGGER.info("kept %d of %d streamlines (%g-%g mm): %s", row["n_after"], row["n_before"], min_length,
                max_length, out_tractogram)
    return row


def read_counts(paths) -> pd.DataFrame:
    """The rows of counts TSVs written by ``filter_tractogram_by_length``, one table.

    Parameters
    ----------
    paths : list of path

    Returns
    -------
    DataFrame
        Columns ``KEYS + COUNT_COLUMNS`` (other columns dropped), one row per (subject, model), files in order.
    """
    frames = []
    for path in map(Path, paths):
        try:
            frame = pd.read_csv(path, sep="\t", dtype={"subject": str, "model": str})
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise TrackflowError(f"cannot read counts file {path}: {e}") from None
        missing = [c for c in KEYS + COUNT_COLUMNS if c not in frame.columns]
        if missing:
            raise TrackflowError(f"counts file {path} lacks column(s) {missing} (not written by "
                                 "trackflow_filter_by_length?)")
        frames.append(frame[KEYS + COUNT_COLUMNS])
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=KEYS + COUNT_COLUMNS)
    duplicated = table.duplicated(KEYS)
    if duplicated.any():
        first = table[duplicated].iloc[0]
        raise TrackflowError(f"two counts files for subject {first['subject']} and model {first['model']}")
    return table
