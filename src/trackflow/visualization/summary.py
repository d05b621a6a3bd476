"""The cohort summary after tracking: one table and a few plots.

``summarize_cohort`` gathers, from plain file lists (what the Snakemake rule passes), one row per subject
and model: the counts and lengths of ``trackflow_filter_by_length`` (``evaluation.length_filter``), the
``trackflow_score`` metrics and the Snakemake benchmark times and memory of each step.
``write_cohort_summary`` writes the table (TSV) and the figures.

Path conventions (the workflow's, see ``workflow/rules``): scores are ``<...>/<subject>/<subject>__<model>.json``;
benchmarks are ``<...>/benchmarks/<step>/<subject>/<model>.tsv`` or, for per-model steps such as training,
``<...>/benchmarks/<step>/<model>.tsv``; tractograms for the length histograms are
``<...>/<subject>/<subject>__<model>.<trk|tck|trx>``. A file name without the ``<subject>__`` prefix is read
as the model name.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd

from trackflow.data.streamlines import euclidean_lengths
from trackflow.errors import TrackflowError
from trackflow.files import atomic_output, check_outputs
from trackflow.evaluation.length_filter import COUNT_COLUMNS, KEYS, read_counts
from trackflow.data.tractograms import load_tractogram_file

LOGGER = logging.getLogger(__name__)

SCORE_COLUMNS = ["VB", "IB", "VS", "IS", "NC", "VS_ratio", "IS_ratio", "NC_ratio", "OL", "OR", "F1"]
BUNDLE_METRICS = ["OL", "OR", "F1"]
# Names of the figures `write_cohort_summary` can draw (the keys of its plot_paths).
PLOTS = ("streamline_counts", "lengths", "bundle_scores", "overall_scores", "tractometer")


# ---------------------------------------------------------------------------------------------- cohort table
@dataclass
class CohortSummary:
    """Everything the cohort report shows.

    Attributes
    ----------
    table : DataFrame
        One row per (subject, model), sorted; columns ``KEYS``, ``COUNT_COLUMNS``, the ``SCORE_COLUMNS``
        present in the scores, then ``<step>_s`` and ``<step>_max_rss_mb`` per benchmarked step.
    bundle_scores : DataFrame
        Long format: subject, model, bundle, VS, OL, OR, F1 (empty without scores).
    lengths : dict
        model -> ndarray of streamline lengths (mm), all subjects pooled (empty without tractograms).
    """

    table: pd.DataFrame
    bundle_scores: pd.DataFrame
    lengths: dict


def _paths(files) -> list[Path]:
    """A list of paths; Snakemake gives a plain string for a named input holding one file."""
    return [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]


def _subject_and_model(path: Path) -> tuple[str, str]:
    """(subject, model) of ``<...>/<subject>/<subject>__<model>.<ext>`` or ``<...>/<subject>/<model>.<ext>``."""
    subject = path.parent.name
    return subject, path.name.split(".")[0].removeprefix(f"{subject}__")


def _read_scores(files) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(overall scores, one row per subject/model; per-bundle scores, long format)."""
    overall, per_bundle = [], []
    for path in _paths(files):
        try:
            scores = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrackflowError(f"cannot read scores file {path}: {e}") from None
        subject, model = _subject_and_model(path)
        overall.append({"subject": subject, "model": model,
                        **{k: scores[k] for k in SCORE_COLUMNS if k in scores}})
        for bundle, metrics in scores.get("bundles", {}).items():
            per_bundle.append({"subject": subject, "model": model, "bundle": bundle,
                               **{k: metrics.get(k, np.nan) for k in ["VS"] + BUNDLE_METRICS}})
    overall = pd.DataFrame(overall, columns=KEYS + SCORE_COLUMNS)
    present = [c for c in SCORE_COLUMNS if overall[c].notna().any()]
    return overall[KEYS + present], pd.DataFrame(per_bundle, columns=KEYS + ["bundle", "VS"] + BUNDLE_METRICS)


def _read_benchmarks(files) -> pd.DataFrame:
    """Per step: wall time (s, mean over repeats) and peak memory (MB, max over repeats).

    Rows of per-model steps (``benchmarks/<step>/<model>.tsv``) have subject NaN (they apply to every
    subject of the model).
    """
    records = []
    for path in _paths(files):
        if path.parent.parent.name == "benchmarks":
            step, subject, model = path.parent.name, None, path.name.split(".")[0]
        elif path.parent.parent.parent.name == "benchmarks":
            step, (subject, model) = path.parent.parent.name, _subject_and_model(path)
        else:
            raise TrackflowError(f"benchmark file {path} is not under benchmarks/<step>/[<subject>/]")
        try:
            bench = pd.read_csv(path, sep="\t")
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise TrackflowError(f"cannot read benchmark file {path}: {e}") from None
        if "s" not in bench.columns or "max_rss" not in bench.columns:
            raise TrackflowError(f"benchmark file {path} lacks the columns s and max_rss")
        # Snakemake writes "NA" for memory it could not measure (very short jobs).
        max_rss = pd.to_numeric(bench["max_rss"], errors="coerce")
        records.append({"subject": subject, "model": model, "step": step, "s": float(bench["s"].mean()),
                        "max_rss_mb": float(max_rss.max())})
    return pd.DataFrame(records, columns=KEYS + ["step", "s", "max_rss_mb"])


def tractogram_streamlines_mm(path):
    """Streamlines (points in mm, RASMM) of a .trk, .tck or .trx file; no reference needed."""
    path = Path(path)
    if path.suffix.lower() == ".trx":
        sft = load_tractogram_file(path)
        sft.to_rasmm()
        return sft.streamlines
    try:
        return nib.streamlines.load(str(path)).streamlines  # nibabel returns RASMM points
    except Exception as e:  # nibabel raises many types for unreadable files
        raise TrackflowError(f"cannot read tractogram {path}: {e}") from None


def tractogram_lengths_mm(path) -> np.ndarray:
    """Streamline lengths (mm) of a .trk, .tck or .trx file."""
    return euclidean_lengths(tractogram_streamlines_mm(path))


def summarize_cohort(counts_files, score_files=(), benchmark_files=(), tractogram_files=()) -> CohortSummary:
    """One row per subject and model from the per-tractogram files of the workflow.

    Parameters
    ----------
    counts_files : list of path
        TSVs of ``trackflow_filter_by_length`` (they define the rows).
    score_files : list of path
        ``trackflow_score`` JSONs, ``<subject>/<subject>__<model>.json``.
    benchmark_files : list of path
        Snakemake benchmark TSVs, ``benchmarks/<step>/<subject>/<model>.tsv`` or
        ``benchmarks/<step>/<model>.tsv``.
    tractogram_files : list of path
        Filtered tractograms ``<subject>/<subject>__<model>.<ext>``, for the length histograms.

    Returns
    -------
    CohortSummary
    """
    table = read_counts(_paths(counts_files))
    if table.empty:
        raise TrackflowError("no counts file given: the summary has no row")
    overall, bundle_scores = _read_scores(score_files)
    unknown = overall.merge(table[KEYS], how="left", indicator=True).query("_merge == 'left_only'")
    if not unknown.empty:
        raise TrackflowError(f"scores for subject {unknown.iloc[0]['subject']} and model "
                             f"{unknown.iloc[0]['model']} have no counts file")
    table = table.merge(overall, on=KEYS, how="left")

    benchmarks = _read_benchmarks(benchmark_files)
    for step, rows in benchmarks.groupby("step", sort=True):
        per_model = rows["subject"].isna()
        if per_model.any() != per_model.all():
            raise TrackflowError(f"benchmarks of step {step} mix per-model and per-subject files")
        keys = ["model"] if per_model.all() else KEYS
        if rows.duplicated(keys).any():
            raise TrackflowError(f"two benchmark files of step {step} for the same {' and '.join(keys)}")
        values = rows[keys + ["s", "max_rss_mb"]].rename(
            columns={"s": f"{step}_s", "max_rss_mb": f"{step}_max_rss_mb"})
        table = table.merge(values, on=keys, how="left")

    lengths = {}
    for path in _paths(tractogram_files):
        _, model = _subject_and_model(path)
        lengths.setdefault(model, []).append(tractogram_lengths_mm(path))
    lengths = {model: np.concatenate(parts) for model, parts in sorted(lengths.items())}
    return CohortSummary(table.sort_values(KEYS, ignore_index=True), bundle_scores, lengths)


# ---------------------------------------------------------------------------------------------- figures
def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _legend_outside(ax, **kwargs) -> None:
    """The legend right of the axes, so that it never covers data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), **kwargs)


def _plot_counts(summary: CohortSummary):
    table = summary.table
    fig, ax = plt.subplots(figsize=(max(7.0, 0.7 * len(table) + 3.5), 4.5))
    labels = table["subject"] + "\n" + table["model"]
    ax.bar(labels, table["n_before"], color="lightgray", label="tracked (before length filtering)")
    ax.bar(labels, table["n_after"], color="tab:blue", label="kept (after length filtering)")
    ax.set_title("Streamlines per subject and model")
    ax.set_xlabel("subject / model")
    ax.set_ylabel("number of streamlines")
    _legend_outside(ax)
    return fig


def _plot_lengths(summary: CohortSummary):
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if not summary.lengths:
        _no_data(ax, "tractogram given")
        return fig
    everything = np.concatenate(list(summary.lengths.values()))
    bins = np.linspace(0.0, max(float(everything.max()) if len(everything) else 1.0, 1.0), 50)
    for model, lengths in summary.lengths.items():
        ax.hist(lengths, bins=bins, histtype="step", linewidth=1.5, label=f"{model} (n = {len(lengths)})")
    ax.set_title("Streamline lengths per model (all subjects, after filtering)")
    ax.set_xlabel("streamline length (mm)")
    ax.set_ylabel("number of streamlines")
    _legend_outside(ax)
    return fig


def _grouped_bars(ax, means: pd.DataFrame, errors: pd.DataFrame | None) -> None:
    """Bars of ``means`` (index = groups on x, columns = series), with optional error bars."""
    n_series = len(means.columns)
    width = 0.8 / n_series
    x = np.arange(len(means.index))
    for k, series in enumerate(means.columns):
        ax.bar(x + (k - (n_series - 1) / 2) * width, means[series], width, label=str(series),
               yerr=None if errors is None else errors[series], capsize=3)
    ax.set_xticks(x, [str(i) for i in means.index])


def _mean_and_spread(grouped, n_subjects: int):
    """(means, std or None, what the bars show): no error bars, and no "± std" in the title, for one subject."""
    if n_subjects > 1:
        return grouped.mean(), grouped.std(), f"mean ± std over {n_subjects} subjects"
    return grouped.mean(), None, "one subject"


def _plot_bundle_scores(summary: CohortSummary):
    scores = summary.bundle_scores
    fig, axes = plt.subplots(len(BUNDLE_METRICS), 1, figsize=(max(8.5, 0.9 * scores["bundle"].nunique() + 2), 9),
                             squeeze=False)
    for ax, metric in zip(axes[:, 0], BUNDLE_METRICS):
        if scores.empty:
            _no_data(ax, "scores")
            continue
        means, spread, shown = _mean_and_spread(scores.groupby(["bundle", "model"])[metric],
                                                scores["subject"].nunique())
        _grouped_bars(ax, means.unstack("model"), None if spread is None else spread.unstack("model"))
        ax.set_title(f"{metric} per bundle ({shown})")
        ax.set_xlabel("bundle")
        ax.set_ylabel(f"{metric} (fraction of the bundle volume)" if metric != "F1" else "F1 (Dice, 0-1)")
        _legend_outside(ax, title="model")
    return fig


def _plot_overall_scores(summary: CohortSummary):
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    present = [m for m in BUNDLE_METRICS if m in summary.table.columns]
    scored = summary.table.dropna(subset=present) if present else summary.table.iloc[:0]
    if scored.empty:
        _no_data(ax, "scores")
        return fig
    means, spread, shown = _mean_and_spread(scored.groupby("model")[present], scored["subject"].nunique())
    _grouped_bars(ax, means.T, None if spread is None else spread.T)
    ax.set_title(f"Overall scores per model ({shown})")
    ax.set_xlabel("metric (OL overlap, OR overreach, F1 Dice)")
    ax.set_ylabel("score (fraction, 0-1 for OL and F1)")
    _legend_outside(ax, title="model")
    return fig


def _plot_tractometer(summary: CohortSummary):
    """Per scored subject and model: bundle counts (VB, IB) and the fractions of streamlines VS, IS, NC."""
    table = summary.table.dropna(subset=["VB", "IB"]) if {"VB", "IB"} <= set(summary.table.columns) else None
    if table is None or table.empty:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _no_data(ax, "scores")
        return fig
    labels = (table["subject"] + "\n" + table["model"]).tolist()
    fig, (bundles, streamlines) = plt.subplots(1, 2, figsize=(max(11.0, 1.4 * len(table) + 6), 4.8))
    _grouped_bars(bundles, table.set_index(pd.Index(labels))[["VB", "IB"]].astype(float), None)
    bundles.set_title("Bundles: valid (VB) and invalid (IB)")
    bundles.set_xlabel("subject / model")
    bundles.set_ylabel("number of bundles")
    _legend_outside(bundles)
    bottom = np.zeros(len(table))
    for column, name, colour in (("VS_ratio", "valid (VS)", "tab:green"), ("IS_ratio", "invalid (IS)", "tab:red"),
                                 ("NC_ratio", "no connection (NC)", "tab:gray")):
        values = table[column].to_numpy(float) if column in table.columns else np.zeros(len(table))
        streamlines.bar(labels, values, bottom=bottom, color=colour, label=name)
        bottom += np.nan_to_num(values)
    streamlines.set_title("Streamlines: valid, invalid, no connection")
    streamlines.set_xlabel("subject / model")
    streamlines.set_ylabel("fraction of the filtered streamlines")
    streamlines.set_ylim(0, 1)
    _legend_outside(streamlines)
    return fig


_PLOTTERS = {"streamline_counts": _plot_counts, "lengths": _plot_lengths, "bundle_scores": _plot_bundle_scores,
             "overall_scores": _plot_overall_scores, "tractometer": _plot_tractometer}


def write_cohort_summary(summary: CohortSummary, table_path, plot_paths: dict, overwrite: bool = True) -> None:
    """Write the table (TSV, NA for missing values) and the figures named in ``plot_paths`` (PNG).

    Parameters
    ----------
    plot_paths : dict
        Plot name (one of ``PLOTS``) -> output path; names left out are not drawn.
    overwrite : bool
        Snakemake removes outputs before running a job, so the workflow's default is True.
    """
    unknown = sorted(set(plot_paths) - set(PLOTS))
    if unknown:
        raise TrackflowError(f"unknown plot name(s) {unknown}; expected some of {list(PLOTS)}")
    check_outputs([table_path, *plot_paths.values()], overwrite)
    matplotlib.use("Agg")  # files only; no display needed
    with atomic_output(table_path) as tmp:
        summary.table.to_csv(tmp, sep="\t", index=False, na_rep="NA", float_format="%.6g")
    LOGGER.info("%d rows written to %s", len(summary.table), table_path)
    for name, path in plot_paths.items():
        fig = _PLOTTERS[name](summary)
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")  # keeps the outside legends
        plt.close(fig)
        LOGGER.info("wrote %s", path)


# ---------------------------------------------------------------------------------------------- settings page
# Distributions whose versions the settings page lists.
REPORTED_PACKAGES = ("trackflow", "torch", "scilpy", "dipy", "nibabel", "numpy")


def package_versions(packages=REPORTED_PACKAGES) -> dict:
    """Installed version of each distribution ("not installed" when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_settings_page(path, sections: dict, versions: dict, overwrite: bool = True) -> None:
    """Write a self-contained HTML page: one table per section ({title: {setting: value}}), then the versions.

    Values that are lists or dicts are shown as JSON; None as "null" (the config's spelling)."""
    from html import escape

    def cell(value):
        return escape(value if isinstance(value, str) else json.dumps(value))

    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>trackflow settings</title><style>"
             "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "td,th{border:1px solid #bbb;padding:2px 8px;text-align:left;font-size:90%}"
             "th{background:#eee}</style></head><body>"]
    for title, settings in [*sections.items(), ("Software versions", versions)]:
        parts.append(f"<h3>{escape(title)}</h3><table><tr><th>setting</th><th>value</th></tr>")
        parts += [f"<tr><td>{escape(str(k))}</td><td>{cell(v)}</td></tr>" for k, v in settings.items()]
        parts.append("</table>")
    parts.append("</body></html>\n")
    check_outputs([path], overwrite)
    with atomic_output(path) as tmp:
        Path(tmp).write_text("".join(parts))
    LOGGER.info("wrote %s", path)
