"""trackflow_prepare_tractoflow on a TractoFlow-shaped results folder built from the tiny demo cohort, and the
workflow planned from such a folder (tractoflow.results)."""

import copy
import json
import shutil

import pandas as pd
import pytest
import yaml

from test_report import EXPECTED_ENTRIES, rendered_menu, report_entries
from test_workflow import COHORT_TEMPLATE, DEMO_CONFIG, job_counts, planned_jobs, snakemake, write_config
from trackflow.cli.prepare_tractoflow import main as prepare_main
from trackflow.cli.train import l2t_main
from trackflow.data.hdf5.creation import create_hdf5_dataset
from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.data.tractoflow import split_subjects
from trackflow.visualization.summary import SCORE_COLUMNS

# TractoFlow 2.4.4 file (results/<S>/...) <- the demo cohort's file (dwi_ml_ready/<S>/...)
TRACTOFLOW_FROM_DEMO = {
    "Register_T1/{s}__t1_warped.nii.gz": "anat/{s}__T1w.nii.gz",
    "DTI_Metrics/{s}__fa.nii.gz": "dwi/{s}__fa.nii.gz",
    "FODF_Metrics/{s}__fodf.nii.gz": "dwi/{s}__fodf.nii.gz",
    "Segment_Tissues/{s}__mask_wm.nii.gz": "masks/{s}__mask_wm.nii.gz",
    "PFT_Tracking_Maps/{s}__interface.nii.gz": "other_masks/{s}__interface.nii.gz",
    "PFT_Tracking/{s}__pft_tracking_prob_wm_seed_0.trk": "tractograms/{s}__arc.trk",
}


@pytest.fixture
def tractoflow_results(tiny_cohort, tmp_path):
    """results/<S>/<Process>/<S>__<name> for the demo's sub-01 and sub-02, and TractoFlow's cohort-wide folders."""
    results = tmp_path / "tractoflow" / "results"
    for subject_dir in sorted((tiny_cohort / "dwi_ml_ready").iterdir()):
        s = subject_dir.name
        for target, source in TRACTOFLOW_FROM_DEMO.items():
            path = results / s / target.format(s=s)
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(subject_dir / source.format(s=s), path)
    for folder in ("Mean_FRF", "Readme"):
        (results / folder).mkdir()
    return results


def test_prepare_lays_out_a_cohort_that_builds_an_hdf5(tractoflow_results, tmp_path):
    out = tmp_path / "cohort"
    prepare_main([str(tractoflow_results), str(out), "--training", "sub-01", "--testing", "sub-02"])
    link = out / "dwi_ml_ready" / "sub-02" / "dwi" / "sub-02__fodf.nii.gz"
    assert link.is_symlink() and link.resolve() == (tractoflow_results / "sub-02/FODF_Metrics/sub-02__fodf.nii.gz")
    groups = json.loads((out / "hdf5_config.json").read_text())
    assert groups["input"] == {"type": "volume", "standardization": "per_file",
                               "files": ["anat/*__t1.nii.gz", "dwi/*__fa.nii.gz", "dwi/*__fodf.nii.gz"]}
    assert set(groups) == {"input", "wm_mask", "interface_mask", "streamlines"}
    assert [(out / f"{s}_subjs.txt").read_text() for s in ("training", "validation", "testing")] \
        == ["sub-01\n", "", "sub-02\n"]
    hdf5 = create_hdf5_dataset(out / "dwi_ml_ready", tmp_path / "cohort.hdf5", out / "hdf5_config.json",
                               out / "training_subjs.txt", out / "validation_subjs.txt", out / "testing_subjs.txt")
    with HDF5Cohort(hdf5) as cohort:
        assert cohort.subjects("testing") == ["sub-02"]
        assert cohort.streamlines_count("sub-01", "streamlines") > 0


def test_missing_files_are_listed_per_subject_in_one_error_and_nothing_is_written(tractoflow_results, tmp_path,
                                                                                 capsys):
    (tractoflow_results / "sub-01/DTI_Metrics/sub-01__fa.nii.gz").unlink()
    shutil.rmtree(tractoflow_results / "sub-02/PFT_Tracking_Maps")
    out = tmp_path / "cohort"
    with pytest.raises(SystemExit) as exit_info:
        prepare_main([str(tractoflow_results), str(out)])
    assert exit_info.value.code == 2
    assert "error: missing TractoFlow files: sub-01: sub-01/DTI_Metrics/sub-01__fa.nii.gz; " \
           "sub-02: sub-02/PFT_Tracking_Maps/sub-02__interface.nii.gz" in capsys.readouterr().err
    assert not out.exists()


def test_the_split_is_seeded_disjoint_and_covers_every_subject():
    subjects = [f"sub-{i:02d}" for i in range(10)]
    lists = split_subjects(subjects, [0.7, 0.15, 0.15], seed=3)
    assert lists == split_subjects(list(reversed(subjects)), [0.7, 0.15, 0.15], seed=3)
    assert sorted(sum(lists.values(), [])) == subjects and [len(ids) for ids in lists.values()] == [6, 2, 2]
    assert lists != split_subjects(subjects, [0.7, 0.15, 0.15], seed=4)


def test_workflow_plans_prepare_then_the_cohort_and_reports_missing_files_at_dag_time(tractoflow_results,
                                                                                      tmp_path):
    experiment = tmp_path / "experiments" / "mine"
    (experiment / "best_model").mkdir(parents=True)
    config = {"tractoflow": {"results": str(tractoflow_results), "training": ["sub-01"], "testing": ["sub-02"]},
              "models": {"mine": {"kind": "l2t", "experiment": str(experiment)}},
              "tracking": dict(DEMO_CONFIG["tracking"])}
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    jobs = planned_jobs(snakemake(tmp_path, "-n", "--configfile", "my.yaml").stdout)
    # no ground truth in TractoFlow results: nothing is scored
    assert jobs == sorted(["all", "create_hdf5", "prepare_tractoflow", "summarize_cohort", "report_settings"] + [
        f"{rule} subject=sub-02, model=mine"
        for rule in ("track", "filter_by_length", "visualize_loss", "tractogram_figures")])

    (tractoflow_results / "sub-02/FODF_Metrics/sub-02__fodf.nii.gz").unlink()
    result = snakemake(tmp_path, "-n", "--configfile", "my.yaml", check=False)
    assert result.returncode != 0
    assert "config tractoflow: missing TractoFlow files: sub-02: sub-02/FODF_Metrics/sub-02__fodf.nii.gz" \
        in result.stdout + result.stderr


def experiment_trained_elsewhere(tractoflow_results, root):
    """A Learn2track experiment folder as a user brings one: 1 epoch x 1 batch of l2t_train_model on an hdf5
    made by hand from the same TractoFlow results (so its input has their feature count: T1 + FA + fODF)."""
    cohort = root / "cohort"
    prepare_main([str(tractoflow_results), str(cohort), "--training", "sub-01", "--validation", "sub-02"])
    hdf5 = create_hdf5_dataset(cohort / "dwi_ml_ready", root / "cohort.hdf5", cohort / "hdf5_config.json",
                               *(cohort / f"{s}_subjs.txt" for s in ("training", "validation", "testing")),
                               step_size=1.0)
    l2t_main([str(root), "mine", str(hdf5), "input", "streamlines", "--max_epochs", "1",
              "--max_batches_per_epoch_training", "1", "--batch_size_training", "20",
              "--max_batches_per_epoch_validation", "1", "--batch_size_validation", "20",
              "--rnn_key", "gru", "--rnn_layer_sizes", "8", "--step_size", "1.0", "--rng", "1234"])
    return root / "mine"


@pytest.mark.slow
def test_tractoflow_results_and_an_existing_experiment_run_to_a_report_without_scores(
        tractoflow_results, tmp_path, one_torch_thread):
    experiment = experiment_trained_elsewhere(tractoflow_results, tmp_path / "elsewhere")
    config = copy.deepcopy(COHORT_TEMPLATE)
    config["tractoflow"].update(results=str(tractoflow_results), training=["sub-01"], testing=["sub-02"])
    # the template's model, pointed at the experiment (named as in test_report's run, whose entries are reused)
    config["models"] = {"tiny_l2t": {**config["models"]["l2t"], "experiment": str(experiment)}}
    config["tracking"].update(npv=None, nt=200, simultaneous_tracking=100, min_length=2, max_length=100)
    config["filtering"].update(min_length=5, max_length=100)
    config["loss_visualization"]["batch_size"] = 100
    workdir = tmp_path / "run"
    write_config(workdir, config)

    run = snakemake(workdir, "--cores", "2", timeout=600)
    # no score (no ground truth) and no train_model (the experiment is given); its logs/ give the training curves
    assert job_counts(run.stdout + run.stderr) == dict.fromkeys(
        ["all", "prepare_tractoflow", "create_hdf5", "track", "filter_by_length", "visualize_loss",
         "plot_training_logs", "tractogram_figures", "summarize_cohort", "report_settings"], 1)
    fodf = workdir / "results/cohort/dwi_ml_ready/sub-02/dwi/sub-02__fodf.nii.gz"
    assert fodf.resolve() == tractoflow_results / "sub-02/FODF_Metrics/sub-02__fodf.nii.gz"
    assert not (workdir / "results/scores").exists() and not (workdir / "results/models").exists()
    assert (workdir / "results/filtering/sub-02/sub-02__tiny_l2t.trk").is_file()
    summary = pd.read_csv(workdir / "results/summary/cohort_summary.tsv", sep="\t")
    assert list(summary[["subject", "model"]].itertuples(index=False, name=None)) == [("sub-02", "tiny_l2t")]
    assert summary["n_after"].item() > 0  # the snapshot draws streamlines
    assert not set(SCORE_COLUMNS) & set(summary.columns), list(summary.columns)

    snakemake(workdir, "--report", "report.html", timeout=300)
    report = workdir / "report.html"
    entries = report_entries(report.read_text())
    # the scored run's entries less its three score plots
    expected = [(category, caption) for category, caption in EXPECTED_ENTRIES
                if not caption.startswith(("Tractometer counts", "Overlap (OL)", "Per ground-truth bundle"))]
    assert len(expected) == len(EXPECTED_ENTRIES) - 3
    for category, caption in expected:
        assert any(c == category and text.startswith(caption) for c, text, _, _ in entries), \
            f"no {category!r} entry captioned {caption!r} in the report; it has {[e[:2] for e in entries]}"
    assert len(entries) == len(expected), [e[:2] for e in entries]
    menu = rendered_menu(report, tmp_path / "report.png")
    assert {"Training", "Tractograms", "Losses", "Cohort summary", "Settings"} == set(menu), menu
