"""Length filtering with a counts TSV (.trk, .trx, .tck) and the cohort summary on hand-made inputs."""

import json
import runpy
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from dipy.io.stateful_tractogram import Space, StatefulTractogram
from dipy.io.streamline import load_tractogram, save_tractogram
from PIL import Image

import trackflow.evaluation.length_filter
from trackflow.cli.filter_by_length import main as filter_main
from trackflow.errors import TrackflowError
from trackflow.evaluation.length_filter import COUNT_COLUMNS, KEYS, filter_tractogram_by_length
from trackflow.visualization.summary import PLOTS, SCORE_COLUMNS, summarize_cohort, write_cohort_summary

REPO = Path(__file__).resolve().parents[1]
# Straight streamlines of known lengths (mm), some exactly on the bounds (kept: bounds are inclusive).
LENGTHS_MM = np.array([4.0, 10.0, 17.5, 30.0, 30.5, 55.0])
MIN_MM, MAX_MM = 10.0, 30.0
VOXEL_MM = 2.0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.nii.gz"
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = [-40.0, -10.0, -10.0]
    nib.save(nib.Nifti1Image(np.zeros((50, 10, 10), np.float32), affine), path)
    return path


def known_tractogram(path: Path, reference: Path, lengths_mm=LENGTHS_MM) -> Path:
    """Streamlines along x in RASMM, 1 mm steps, with per-streamline data ``id`` (its index)."""
    lines = []
    for i, total in enumerate(lengths_mm):
        n_steps = int(np.ceil(total))
        x = np.linspace(0.0, total, n_steps + 1) - 35.0
        lines.append(np.column_stack([x, np.full_like(x, 0.3 * i), np.zeros_like(x)]).astype(np.float32))
    sft = StatefulTractogram(lines, str(reference), Space.RASMM,
                             data_per_streamline={"id": np.arange(len(lines), dtype=np.float32)[:, None]})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tractogram(sft, str(path), bbox_valid_check=False)
    return path


def expected_row(lengths_mm):
    kept = lengths_mm[(lengths_mm >= MIN_MM) & (lengths_mm <= MAX_MM)]
    return {"n_before": len(lengths_mm), "n_after": len(kept),
            "mean_length_before_mm": lengths_mm.mean(), "median_length_before_mm": np.median(lengths_mm),
            "mean_length_after_mm": kept.mean(), "median_length_after_mm": np.median(kept)}


@pytest.mark.parametrize("ext", ["trk", "trx", "tck"])
def test_filter_counts_and_output(reference, tmp_path, ext):
    in_path = known_tractogram(tmp_path / "tracking" / "sub-01" / f"l2t.{ext}", reference)
    out_path, counts = tmp_path / f"out.{ext}", tmp_path / "counts.tsv"
    extra = ["--reference", str(reference)] if ext == "tck" else []
    filter_main([str(in_path), str(out_path), "--minL", str(MIN_MM), "--maxL", str(MAX_MM), "--out_counts",
                 str(counts), *extra])
    row = pd.read_csv(counts, sep="\t").iloc[0]
    # Labels default to the workflow layout <subject>/<model>.<ext>.
    assert (row["subject"], row["model"]) == ("sub-01", "l2t")
    for column, value in expected_row(LENGTHS_MM).items():
        assert row[column] == pytest.approx(value, rel=1e-5), column

    out = load_tractogram(str(out_path), str(reference) if ext == "tck" else "same")
    kept = np.flatnonzero((LENGTHS_MM >= MIN_MM) & (LENGTHS_MM <= MAX_MM))
    out_lengths = [np.linalg.norm(np.diff(s, axis=0), axis=1).sum() for s in out.streamlines]
    np.testing.assert_allclose(out_lengths, LENGTHS_MM[kept], rtol=1e-5)
    if ext != "tck":
        np.testing.assert_array_equal(out.data_per_streamline["id"][:, 0], kept)


def test_filter_labels_empty_result_and_errors(reference, tmp_path, capsys):
    in_path = known_tractogram(tmp_path / "in.trk", reference)
    counts = tmp_path / "c.tsv"
    filter_main([str(in_path), str(tmp_path / "none.trk"), "--minL", "100", "--out_counts", str(counts),
                 "--subject", "S", "--model", "M"])
    row = pd.read_csv(counts, sep="\t", keep_default_na=False).iloc[0]
    assert (row["subject"], row["model"], row["n_before"], row["n_after"]) == ("S", "M", 6, 0)
    assert row["mean_length_after_mm"] == "NA"

    def fails(args, message):
        with pytest.raises(SystemExit) as exit_info:
            filter_main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]

    fails([str(in_path), str(tmp_path / "none.trk"), "--out_counts", str(tmp_path / "new.tsv")], "already exists")
    tck = known_tractogram(tmp_path / "in.tck", reference)
    fails([str(tck), str(tmp_path / "o.tck"), "--out_counts", str(tmp_path / "o.tsv")], "--reference")
    fails([str(in_path), str(tmp_path / "o.trk"), "--minL", "50", "--maxL", "20", "--out_counts",
           str(tmp_path / "o.tsv")], "--minL")
    assert not (tmp_path / "o.trk").exists() and not (tmp_path / "o.tsv").exists()


@pytest.mark.parametrize("out,counts,message", [
    ("out.trk", "out.trk", "out.trk is the same file as output"),
    ("in.trk", "c.tsv", "in.trk is the same file as input"),
    ("out.trk", "in.trk", "in.trk is the same file as input"),
    ("out.xyz", "c.tsv", "must end in .trk, .tck or .trx"),
    ("out.trk", "folder", "folder is a directory"),
])
def test_filter_refuses_outputs_it_cannot_write_whole(reference, tmp_path, capsys, out, counts, message):
    in_path = known_tractogram(tmp_path / "in.trk", reference)
    (tmp_path / "folder").mkdir()
    before = {p: p.read_bytes() for p in tmp_path.glob("*.trk")}
    with pytest.raises(SystemExit) as exit_info:
        filter_main([str(in_path), str(tmp_path / out), "--out_counts", str(tmp_path / counts), "-f"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "in.trk"]
    assert {p: p.read_bytes() for p in tmp_path.glob("*.trk")} == before


def test_of_two_filters_racing_for_new_outputs_the_second_to_finish_writes_neither(reference, tmp_path,
                                                                                  monkeypatch):
    """Run A writes its tractogram's temporary and waits; run B, on the same absent outputs, completes; A must
    then fail without replacing either of B's files (tractogram and counts appear together or not at all)."""
    in_path = known_tractogram(tmp_path / "in.trk", reference)
    real_save = trackflow.evaluation.length_filter.save_tractogram
    a_wrote, b_done = threading.Event(), threading.Event()

    def save_then_wait_for_b(sft, filename, **kwargs):
        real_save(sft, filename, **kwargs)
        if threading.current_thread().name == "run A":
            a_wrote.set()
            b_done.wait(timeout=60)

    monkeypatch.setattr(trackflow.evaluation.length_filter, "save_tractogram", save_then_wait_for_b)
    out, counts = tmp_path / "out.trk", tmp_path / "counts.tsv"
    failures = []

    def run_a():
        try:
            filter_tractogram_by_length(in_path, out, counts, min_length=50.0)
        except TrackflowError as e:
            failures.append(str(e))

    thread = threading.Thread(target=run_a, name="run A")
    thread.start()
    assert a_wrote.wait(timeout=60)
    filter_tractogram_by_length(in_path, out, counts, min_length=MIN_MM)  # run B
    b_done.set()
    thread.join()
    assert len(failures) == 1 and "already exists" in failures[0]
    n_kept_by_b = int(np.sum(LENGTHS_MM >= MIN_MM))
    assert pd.read_csv(counts, sep="\t").iloc[0]["n_after"] == n_kept_by_b
    assert len(load_tractogram(str(out), "same", bbox_valid_check=False)) == n_kept_by_b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counts.tsv", "in.trk", "out.trk"]


# ---------------------------------------------------------------------------------------------- summary
@pytest.fixture
def cohort_files(reference, tmp_path):
    """2 subjects x 2 models: filter TSVs (real runs), scores for 3 of the 4, tracking and training benchmarks."""
    root = tmp_path / "results"
    files = {"counts": [], "scores": [], "benchmarks": [], "tractograms": [], "lengths": {}}
    rng = np.random.default_rng(0)
    for subject in ("s1", "s2"):
        for model in ("l2t", "tt"):
            lengths = rng.uniform(5, 40, size=8)
            files["lengths"][(subject, model)] = lengths
            tracked = known_tractogram(root / "tracking" / subject / f"{model}.trk", reference, lengths)
            filtered = root / "filtering" / subject / f"{model}.trk"
            counts = root / "filtering" / subject / f"{model}_counts.tsv"
            filter_main([str(tracked), str(filtered), "--minL", str(MIN_MM), "--maxL", str(MAX_MM),
                         "--out_counts", str(counts)])
            files["counts"].append(counts)
            files["tractograms"].append(filtered)
            bench = root / "benchmarks" / "tracking" / subject / f"{model}.tsv"
            bench.parent.mkdir(parents=True, exist_ok=True)
            seconds = {"l2t": 10.0, "tt": 20.0}[model] + {"s1": 1.0, "s2": 2.0}[subject]
            bench.write_text(f"s\th:m:s\tmax_rss\tcpu_time\n{seconds}\t0:00:10\t{100 + seconds}\t9.0\n")
            files["benchmarks"].append(bench)
            if (subject, model) != ("s2", "tt"):
                score = root / "scores" / subject / f"{model}.json"
                score.parent.mkdir(parents=True, exist_ok=True)
                f1 = {"l2t": 0.8, "tt": 0.6}[model] - {"s1": 0.0, "s2": 0.1}[subject]
                score.write_text(json.dumps({
                    "VB": 2, "IB": 1, "VS": 5, "IS": 2, "NC": 1, "VS_ratio": 0.625, "IS_ratio": 0.25,
                    "NC_ratio": 0.125, "OL": f1, "OR": 0.1, "F1": f1, "n_bundles": 2,
                    "bundles": {"AF": {"VS": 3, "OL": f1, "OR": 0.1, "F1": f1},
                                "CC": {"VS": 2, "OL": f1 / 2, "OR": 0.2, "F1": f1 / 2}}}))
                files["scores"].append(score)
    for model, seconds in (("l2t", 300.0), ("tt", 600.0)):
        bench = root / "benchmarks" / "models" / f"{model}.tsv"
        bench.parent.mkdir(parents=True, exist_ok=True)
        # Two repeats: time is their mean, memory their maximum; NA memory is accepted.
        bench.write_text(f"s\tmax_rss\n{seconds}\t500\n{seconds + 2}\tNA\n")
        files["benchmarks"].append(bench)
    return files


def test_summary_table_rows_and_columns(cohort_files):
    summary = summarize_cohort(cohort_files["counts"], cohort_files["scores"], cohort_files["benchmarks"],
                               cohort_files["tractograms"])
    table = summary.table
    assert list(table[KEYS].itertuples(index=False, name=None)) == [
        ("s1", "l2t"), ("s1", "tt"), ("s2", "l2t"), ("s2", "tt")]
    assert list(table.columns) == (KEYS + COUNT_COLUMNS + SCORE_COLUMNS
                                   + ["models_s", "models_max_rss_mb", "tracking_s", "tracking_max_rss_mb"])
    for _, row in table.iterrows():
        for column, value in expected_row(cohort_files["lengths"][(row["subject"], row["model"])]).items():
            assert row[column] == pytest.approx(value, rel=1e-5)
        assert row["tracking_s"] == {"l2t": 10.0, "tt": 20.0}[row["model"]] + {"s1": 1.0, "s2": 2.0}[row["subject"]]
        assert row["models_s"] == {"l2t": 301.0, "tt": 601.0}[row["model"]]
        assert row["models_max_rss_mb"] == 500
    assert table.loc[(table.subject == "s2") & (table.model == "tt"), SCORE_COLUMNS].isna().all(axis=None)
    assert table.loc[(table.subject == "s2") & (table.model == "l2t"), "F1"].item() == pytest.approx(0.7)
    assert len(summary.bundle_scores) == 6 and set(summary.bundle_scores["bundle"]) == {"AF", "CC"}
    kept = {m: np.concatenate([v[(v >= MIN_MM) & (v <= MAX_MM)] for (s, mm), v in cohort_files["lengths"].items()
                               if mm == m]) for m in ("l2t", "tt")}
    for model in ("l2t", "tt"):
        np.testing.assert_allclose(np.sort(summary.lengths[model]), np.sort(kept[model]), rtol=1e-5)


def test_summary_errors(cohort_files, tmp_path):
    from trackflow.errors import TrackflowError

    with pytest.raises(TrackflowError, match="no counts"):
        summarize_cohort([])
    with pytest.raises(TrackflowError, match="two counts files"):
        summarize_cohort(cohort_files["counts"] + cohort_files["counts"][:1])
    orphan = tmp_path / "scores" / "s9" / "l2t.json"
    orphan.parent.mkdir(parents=True)
    orphan.write_text(json.dumps({"F1": 0.5}))
    with pytest.raises(TrackflowError, match="s9"):
        summarize_cohort(cohort_files["counts"], [orphan])
    stray = tmp_path / "elsewhere.tsv"
    stray.write_text("s\tmax_rss\n1\t2\n")
    with pytest.raises(TrackflowError, match="benchmarks/"):
        summarize_cohort(cohort_files["counts"], benchmark_files=[stray])


class _Named(dict):
    """The parts of Snakemake's Namedlist the script uses (attributes and .get)."""

    __getattr__ = dict.__getitem__


def test_snakemake_script_writes_table_and_plots(cohort_files, tmp_path, monkeypatch):
    out = tmp_path / "summary"
    outputs = {"table": str(out / "cohort_summary.tsv"), **{name: str(out / f"{name}.png") for name in PLOTS}}
    snakemake = type("Snakemake", (), {
        # One score file as a plain string: what Snakemake gives for a named input holding one file.
        "input": _Named(counts=[str(p) for p in cohort_files["counts"]], scores=str(cohort_files["scores"][0]),
                        benchmarks=[str(p) for p in cohort_files["benchmarks"]],
                        tractograms=[str(p) for p in cohort_files["tractograms"]]),
        "output": _Named(outputs), "log": [str(tmp_path / "summary.log")]})()
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # the script redirects stderr to its log
    runpy.run_path(str(REPO / "scripts" / "cohort_summary.py"), init_globals={"snakemake": snakemake})
    table = pd.read_csv(outputs["table"], sep="\t")
    assert len(table) == 4 and table["F1"].notna().sum() == 1
    for name in PLOTS:
        width, height = Image.open(outputs[name]).size
        assert width >= 300 and height >= 300
    assert (tmp_path / "summary.log").exists()


def test_write_summary_refuses_existing_without_overwrite(cohort_files, tmp_path):
    from trackflow.errors import TrackflowError

    summary = summarize_cohort(cohort_files["counts"])
    table = tmp_path / "t.tsv"
    write_cohort_summary(summary, table, {"streamline_counts": tmp_path / "c.png",
                                          "overall_scores": tmp_path / "o.png"})
    assert set(pd.read_csv(table, sep="\t").columns) == set(KEYS + COUNT_COLUMNS)
    with pytest.raises(TrackflowError, match="already exists"):
        write_cohort_summary(summary, table, {}, overwrite=False)
