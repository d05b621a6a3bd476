"""The workflow on a real single-node SLURM cluster (../shared/slurm/slurm-setup.sh), through profiles/slurm.

Runs the demo chain (demo, hdf5, training, tracking on the fake GPU, filtering, summary) with the stand-in
CLIs of test_workflow.py; the stand-in tracker fails its first attempt, so the retry (with twice the
memory) is exercised too. Needs root, apt and the setup script; run with `pytest -m slurm`.
"""

import copy
import os
import re
import shutil
import subprocess

import nibabel as nib
import pytest
import yaml

from test_workflow import DEMO_CONFIG, REPO, read_calls, snakemake, write_config, write_standins

pytestmark = pytest.mark.slurm

SLURM_SETUP = REPO.parent / "shared" / "slurm" / "slurm-setup.sh"


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0 or not SLURM_SETUP.exists() or shutil.which("apt-get") is None:
        pytest.skip("needs root, apt-get and ../shared/slurm/slurm-setup.sh")
    subprocess.run(["bash", str(SLURM_SETUP), "start", "--fake-gpu"], check=True, timeout=600)
    try:
        yield
    finally:
        subprocess.run(["bash", str(SLURM_SETUP), "stop"], timeout=120)


def test_workflow_runs_through_the_slurm_profile_with_a_gpu_rule_and_a_retry(slurm_cluster, tmp_path):
    env = write_standins(tmp_path / "bin")
    env["STANDIN_FAIL_ONCE"] = str(tmp_path / "tracker_failed_once")

    config = copy.deepcopy(DEMO_CONFIG)
    config["demo"]["subjects"] = 3
    config["tracking_subjects"] = ["sub-03"]
    config["models"] = {"l2t_demo": config["models"]["l2t_demo"]}
    config["tracking"]["gpu"] = 1
    config["loss_visualization"]["enabled"] = False
    config["scoring"]["enabled"] = False
    workdir = tmp_path / "run"
    write_config(workdir, config)

    # what a cluster without accounting needs (profiles/slurm says so), on top of the shipped profile
    no_accounting = tmp_path / "no_accounting"
    no_accounting.mkdir()
    (no_accounting / "config.yaml").write_text(yaml.safe_dump({
        "slurm-status-command": "squeue", "slurm-init-seconds-before-status-checks": 5, "jobs": 2}))

    result = snakemake(workdir, "--profile", str(REPO / "profiles" / "slurm"), "--profile", str(no_accounting),
                       env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]

    filtered = nib.streamlines.load(str(workdir / "results/filtering/sub-03/sub-03__l2t_demo.trk"))
    assert len(filtered.streamlines) == config["tracking"]["nt"] // 2
    assert (workdir / "results/summary/cohort_summary.tsv").exists()
    tracker_calls = [c for c in read_calls(env) if c["cli"] == "l2t_track_from_model"]
    assert len(tracker_calls) == 2  # failed once, then succeeded
    # sbatch --gpus=1 on the fake-GPU node: SLURM hands the job GPU 0
    assert all(c["cuda"] == "0" for c in tracker_calls)
    assert "--use_gpu" in tracker_calls[-1]["args"]

    # SLURM's own logs are kept, for the failed attempt and the successful one; each job prints its
    # resources there: the retry asked for twice the memory, both asked for the GPU
    slurm_logs = sorted((workdir / "logs/slurm/rule_track").rglob("*.log"), key=lambda p: int(p.stem))
    assert len(slurm_logs) == 2
    resources = [re.search(r"resources: ([^\n]*)", p.read_text()).group(1) for p in slurm_logs]
    assert [int(re.search(r"\bmem_mb=(\d+)", r).group(1)) for r in resources] == [8000, 16000]
    assert all(re.search(r"\bgpu=1\b", r) for r in resources)
    assert (workdir / "logs/tracking/sub-03/l2t_demo.log").exists()
    assert (workdir / "benchmarks/tracking/sub-03/l2t_demo.tsv").exists()
