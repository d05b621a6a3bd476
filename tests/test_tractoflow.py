"""trackflow_prepare_tractoflow on a TractoFlow-shaped results folder built from the tiny demo cohort, and the
workflow planned from such a folder (tractoflow.results)."""

import json
import shutil

import pytest
import yaml

from test_workflow import DEMO_CONFIG, planned_jobs, snakemake
from trackflow.cli.prepare_tractoflow import main as prepare_main
from trackflow.data.hdf5.creation import create_hdf5_dataset
from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.data.tractoflow import split_subjects

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
