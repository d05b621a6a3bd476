"""The report (`snakemake --report`): its figures on small real tractograms, and the whole report of a real
workflow run on the tiny cohort, rendered in headless Chromium.

The end-to-end test runs the real CLIs (hdf5, training, tracking, filtering, scoring, loss and log plots) on the
``tiny_cohort`` fixture with one small model; it is marked slow.
"""

import base64
import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from trackflow.visualization import summary as summary_module
from trackflow.visualization.snapshots import direction_segments, length_distribution, subsample, tractogram_snapshot
from trackflow.visualization.summary import CohortSummary, package_versions, write_settings_page

from test_workflow import DEMO_CONFIG, demo_config, snakemake, write_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def write_trk(path, streamlines):
    tractogram = nib.streamlines.Tractogram(streamlines, affine_to_rasmm=np.eye(4))
    header = {"dimensions": np.array([20, 20, 20], dtype=np.int16), "voxel_sizes": np.ones(3, np.float32),
              "voxel_to_rasmm": np.eye(4), "voxel_order": "RAS"}
    nib.streamlines.save(nib.streamlines.TrkFile(tractogram, header=header), str(path))
    return path


def line(direction, length_mm, start=(5.0, 5.0, 5.0)):
    direction = np.asarray(direction, float) / np.linalg.norm(direction)
    return np.asarray(start) + np.outer(np.arange(0, length_mm + 1e-9, 1.0), direction)


# ------------------------------------------------------------------------------------------- the pieces


def test_segments_are_coloured_by_their_direction():
    segments, colours = direction_segments([line([1, 0, 0], 3), line([0, 0, -1], 2), line([0, 1, 1], 1)])
    assert segments.shape == (3 + 2 + 1, 2, 3)
    np.testing.assert_allclose(colours[:3], [[1, 0, 0]] * 3)
    np.testing.assert_allclose(colours[3:5], [[0, 0, 1]] * 2)  # |dz|: the sign of the direction does not matter
    np.testing.assert_allclose(colours[5], [0, 2 ** -0.5, 2 ** -0.5])


def test_subsample_is_seeded_and_keeps_everything_when_small():
    streamlines = [line([1, 0, 0], k) for k in range(1, 50)]
    assert len(subsample(streamlines, 100)) == 49
    first, again = subsample(streamlines, 10, seed=3), subsample(streamlines, 10, seed=3)
    assert len(first) == 10 and all(np.array_equal(a, b) for a, b in zip(first, again))


def test_snapshot_draws_a_subsample_in_three_projections(tmp_path):
    trk = write_trk(tmp_path / "sub-01__m.trk", [line([1, 0, 0], 10)] * 30 + [line([0, 1, 0], 8)] * 30)
    assert tractogram_snapshot(trk, tmp_path / "snap.png", "sub-01, m", max_streamlines=25) == 25
    image = plt.imread(tmp_path / "snap.png")
    assert image.shape[1] > 2 * image.shape[0]  # three panels side by side
    # red (x) and green (y) segments are drawn on the black background
    rgb = image[..., :3]
    assert ((rgb[..., 0] > 0.5) & (rgb[..., 1] < 0.3)).sum() > 50
    assert ((rgb[..., 1] > 0.5) & (rgb[..., 0] < 0.3)).sum() > 50


def test_length_distribution_keeps_its_legend_outside_the_bars(tmp_path, monkeypatch):
    tracked = write_trk(tmp_path / "tracked.trk", [line([1, 0, 0], k) for k in range(2, 60)])
    filtered = write_trk(tmp_path / "filtered.trk", [line([1, 0, 0], k) for k in range(20, 50)])
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect its legend
    length_distribution(tracked, filtered, tmp_path / "lengths.png", "t", 20, 49)
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["tracked (n = 58)", "kept by the length filter (n = 30)", "filter bounds (20-49 mm)"]
    renderer = figures[0].canvas.get_renderer()
    assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1


def scored_summary(subjects):
    rows = [{"subject": s, "model": m, "n_before": 100, "n_after": 60, "VB": 3, "IB": 1, "VS_ratio": 0.5,
             "IS_ratio": 0.2, "NC_ratio": 0.3, "OL": 0.4 + 0.1 * i, "OR": 0.1, "F1": 0.5}
            for i, s in enumerate(subjects) for m in ("l2t", "tt")]
    bundles = pd.DataFrame([{"subject": s, "model": m, "bundle": "arc", "VS": 5, "OL": 0.4 + 0.1 * i, "OR": 0.2,
                             "F1": 0.5} for i, s in enumerate(subjects) for m in ("l2t", "tt")])
    return CohortSummary(pd.DataFrame(rows), bundles, {})


@pytest.mark.parametrize("subjects, error_bars", [(["sub-01"], False), (["sub-01", "sub-02"], True)])
def test_score_plots_show_a_spread_only_over_several_subjects(subjects, error_bars):
    for plot in ("overall_scores", "bundle_scores"):
        fig = summary_module._PLOTTERS[plot](scored_summary(subjects))
        for ax in fig.axes:
            assert ("±" in ax.get_title()) == error_bars
            assert (len(ax.lines) > 0) == error_bars  # error bars are drawn as lines
            assert ax.get_legend().get_bbox_to_anchor().x0 >= ax.get_window_extent().x1 - 1
        plt.close(fig)


def test_tractometer_plot_shows_bundle_counts_and_streamline_fractions():
    fig = summary_module._PLOTTERS["tractometer"](scored_summary(["sub-01"]))
    bundles, streamlines = fig.axes
    assert sorted(p.get_height() for p in bundles.patches) == [1, 1, 3, 3]
    heights = sorted(round(p.get_height(), 6) for p in streamlines.patches)
    assert heights == [0.2, 0.2, 0.3, 0.3, 0.5, 0.5]
    plt.close(fig)


def test_settings_page_lists_settings_and_versions(tmp_path):
    versions = package_versions()
    assert versions["trackflow"] != "not installed" and versions["torch"] != "not installed"
    write_settings_page(tmp_path / "settings.html", {"Tracking": {"nt": 5000, "eos_stop": None, "algo": "det"}},
                        versions)
    page = (tmp_path / "settings.html").read_text()
    for text in ("<h3>Tracking</h3>", "<td>nt</td><td>5000</td>", "<td>eos_stop</td><td>null</td>",
                 "<h3>Software versions</h3>", f"<td>torch</td><td>{versions['torch']}</td>",
                 "<td>scilpy</td>", "<td>dipy</td>"):
        assert text in page


# ------------------------------------------------------------------------------ the report of a real run

# One small model, a few seeds: the whole workflow on the tiny cohort in well under a minute of CPU.
TINY_MODEL = {"kind": "l2t", "experiment": None, "input_group": "input", "streamline_group": "streamlines",
              "gpu": 0, "training_options": {
                  "step_size": 1.0, "max_epochs": 2, "batch_size_training": 20, "max_batches_per_epoch_training": 2,
                  "batch_size_validation": 20, "max_batches_per_epoch_validation": 1, "input_embedding_key": "nn_embedding",
                  "input_embedded_size": 8, "rnn_key": "gru", "rnn_layer_sizes": [16], "dg_key": "cosine-regression",
                  "rng": 1234}}


def tiny_run_config(cohort):
    lists = cohort / "config"
    return demo_config(
        demo={**DEMO_CONFIG["demo"], "enabled": False},
        cohort={"dwi_ml_ready": str(cohort / "dwi_ml_ready"), "hdf5_config": str(lists / "hdf5_config.json"),
                "training_subjects": str(lists / "training_subjs.txt"),
                "validation_subjects": str(lists / "validation_subjs.txt"),
                "testing_subjects": str(lists / "testing_subjs.txt")},
        tracking_subjects=["sub-02"], models={"tiny_l2t": TINY_MODEL},
        tracking={**DEMO_CONFIG["tracking"], "subset": "validation", "nt": 300, "simultaneous_tracking": 100,
                  "min_length": 2, "max_length": 100},
        filtering={**DEMO_CONFIG["filtering"], "min_length": 8, "max_length": 100},
        loss_visualization={**DEMO_CONFIG["loss_visualization"], "batch_size": 100})


# (category, caption start) of every entry the tiny run's report must show
EXPECTED_ENTRIES = [
    ("Training", "Training and validation loss of model tiny_l2t"),
    ("Training", "Gradient norm of model tiny_l2t"),
    ("Training", "Duration of each epoch of model tiny_l2t"),
    ("Tractograms", "Length-filtered tractogram of subject sub-02 tracked with model tiny_l2t"),
    ("Tractograms", "Streamline lengths (mm) of subject sub-02 tracked with model tiny_l2t"),
    ("Losses", "Per-point and per-streamline loss of model tiny_l2t"),
    ("Cohort summary", "One row per subject and model"),
    ("Cohort summary", "Streamlines per subject and model"),
    ("Cohort summary", "Tractometer counts of each filtered tractogram"),
    ("Cohort summary", "Overlap (OL), overreach (OR) and F1"),
    ("Cohort summary", "Per ground-truth bundle"),
    ("Settings", "The settings that produced these results"),
]


def embedded_json(html, variable):
    """The JSON object that Snakemake's self-contained report assigns to ``var <variable> =``."""
    start = re.search(rf"\bvar {variable} = (?=\{{)", html).end()
    return json.JSONDecoder().raw_decode(html, start)[0]


def report_entries(html):
    """(category, caption text, mime type, data) of every result embedded in Snakemake's report."""
    results, categories = embedded_json(html, "results"), embedded_json(html, "categories")
    category_of = {path: category for category, subcategories in categories.items()
                   for paths in subcategories.values() for path in paths}
    return [(category_of[path], re.sub(r"<[^>]+>", "", result["caption"]).replace("\n", " ").strip(),
             result["mime_type"], result["data_uri"]) for path, result in results.items()]


def rendered_menu(report, screenshot):
    """The report's result categories as headless Chromium renders them (the menu its JavaScript builds, after
    the "Results" heading); also checks that a screenshot of the page is not blank."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (apt-get install -y chromium): the report cannot be rendered")
    page = report.as_uri()
    headless = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    dom = subprocess.run([*headless, "--dump-dom", page], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    subprocess.run([*headless, f"--screenshot={screenshot}", "--window-size=1400,2000", page],
                   check=True, capture_output=True, timeout=120)
    image = plt.imread(screenshot)
    assert image.shape[:2] == (2000, 1400)
    assert image[..., :3].std() > 0.05  # the page rendered, not a blank screen
    return re.findall(r"<span>([^<]+)</span>", dom.split(">Results</li>", 1)[1])


@pytest.mark.slow
def test_report_of_a_real_run_shows_every_entry_in_headless_chromium(tmp_path, tiny_cohort):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    workdir = tmp_path / "run"
    write_config(workdir, tiny_run_config(cohort))
    snakemake(workdir, "--cores", "2", timeout=600)
    snakemake(workdir, "--report", "results/report.html", timeout=300)
    html = (workdir / "results/report.html").read_text()
    entries = report_entries(html)
    for category, caption in EXPECTED_ENTRIES:
        assert any(c == category and text.startswith(caption) for c, text, _, _ in entries), \
            f"no {category!r} entry captioned {caption!r} in the report; it has {[e[:2] for e in entries]}"
    assert len(entries) == len(EXPECTED_ENTRIES)
    for category, caption, mime, data in entries:
        assert mime in ("image/png", "text/tab-separated-values", "text/html"), (caption, mime)
        assert len(base64.b64decode(data.split("base64,", 1)[1])) > 100, caption  # real content embedded

    menu = rendered_menu(workdir / "results/report.html", tmp_path / "report.png")
    assert {c for c, _ in EXPECTED_ENTRIES} <= set(menu), menu
