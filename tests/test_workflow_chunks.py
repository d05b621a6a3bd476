"""tracking.chunks: N track jobs (one seed range each) and one merge job per subject x model (dry run)."""

from test_workflow import DEMO_CONFIG, demo_config, job_counts, shell_commands, snakemake, write_config


def test_chunks_plan_n_track_jobs_and_one_merge_per_subject_and_model(tmp_path):
    tracking = dict(DEMO_CONFIG["tracking"], npv=None, nt=100, chunks=3)
    write_config(tmp_path, demo_config(tracking=tracking))
    result = snakemake(tmp_path, "-n", "-p")
    counts = job_counts(result.stdout)
    n_pairs = len(DEMO_CONFIG["tracking_subjects"]) * len(DEMO_CONFIG["models"])
    assert counts["track"] == 3 * n_pairs and counts["merge_tracking_chunks"] == n_pairs
    assert counts["filter_by_length"] == n_pairs  # downstream rules read the same final tractogram
    ranges = sorted(cmd.split("--seed_range ")[1].split()[:2]
                    for cmd in shell_commands(result.stdout, "l2t_track_from_model"))
    assert ranges[:3] == [["0", "33"], ["33", "66"], ["66", "100"]]
    merges = shell_commands(result.stdout, "trackflow_merge_tractograms")
    assert len(merges) == n_pairs and all(cmd.split()[1].startswith("results/tracking/") for cmd in merges)
