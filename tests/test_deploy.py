"""Deploying the workflow as users deploy Snakemake workflows, in folders outside the repository: snakedeploy's
layout (config/ and profiles/ copied, a workflow/Snakefile that uses this workflow as a module), a hand-written
module with prefixed rules, and the conda env's post-deploy script installing trackflow from the workflow's
own source rather than from the working directory. Offline: the "repository" is a local copy, as
snakedeploy's provider for a local source makes one."""

import copy
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from test_workflow import COHORT_TEMPLATE, REPO, planned_jobs  # tests/ is on sys.path

# snakedeploy 0.17.1's templates/use_module.smk.jinja, rendered as `snakedeploy deploy-workflow` renders it
# (for a repository on a git host the snakefile line reads github("owner/repo", path="workflow/Snakefile", tag=...)).
SNAKEDEPLOY_SNAKEFILE = '''from snakemake.utils import min_version


min_version("6.10.0")


configfile: "config/config.yaml"


# declare {repo} as a module
module trackflow:
    snakefile:
        "{snakefile}"
    config:
        config


# use all rules from {repo}
use rule * from trackflow
'''


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The repository as a user has it: its files, none of this checkout's environment or results."""
    path = tmp_path_factory.mktemp("source") / "trackflow"
    shutil.copytree(REPO, path, ignore=shutil.ignore_patterns(
        ".git", ".venv", "results", "logs", ".snakemake", "__pycache__", "*.egg-info", "build", ".pytest_cache"))
    return path


def cohort_config(tiny_cohort):
    """The shipped template config, filled in for the tiny cohort (which has no testing subject: its validation
    subject stands in)."""
    config = copy.deepcopy(COHORT_TEMPLATE)
    lists = tiny_cohort / "config"
    config["cohort"] = {"dwi_ml_ready": str(tiny_cohort / "dwi_ml_ready"),
                        "hdf5_config": str(lists / "hdf5_config.json"),
                        "training_subjects": str(lists / "training_subjs.txt"),
                        "validation_subjects": str(lists / "validation_subjs.txt"),
                        "testing_subjects": str(lists / "validation_subjs.txt")}
    return config


def run_snakemake(workdir, *args):
    env = {key: value for key, value in os.environ.items() if key != "TRACKFLOW_SOURCE"}
    result = subprocess.run(["snakemake", *args], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_snakedeploy_layout_plans_the_cohort_in_its_own_folder(clone, tiny_cohort, tmp_path):
    deployed = tmp_path / "deployed"
    shutil.copytree(clone / "config", deployed / "config")  # what snakedeploy copies
    shutil.copytree(clone / "profiles", deployed / "profiles")
    shutil.copy(clone / "LICENSE", deployed)
    (deployed / "workflow").mkdir()
    (deployed / "workflow" / "Snakefile").write_text(
        SNAKEDEPLOY_SNAKEFILE.format(repo=clone, snakefile=clone / "workflow" / "Snakefile"))
    # the user then fills in the template config for their cohort
    (deployed / "config" / "config.yaml").write_text(yaml.safe_dump(cohort_config(tiny_cohort)))

    output = run_snakemake(deployed, "-n", "-p", "--profile", "profiles/local")
    jobs = planned_jobs(output)
    assert jobs == ["all", "create_hdf5", "filter_by_length subject=sub-02, model=l2t", "plot_training_logs model=l2t",
                    "report_settings", "score subject=sub-02, model=l2t", "summarize_cohort",
                    "track subject=sub-02, model=l2t", "tractogram_figures subject=sub-02, model=l2t",
                    "train_model model=l2t", "visualize_loss subject=sub-02, model=l2t"], output
    # every output lands in the deployment's working directory, nothing in the workflow's source
    outputs = re.findall(r"^\s+output: (.*)$", output, flags=re.MULTILINE)
    assert outputs and all(not path.startswith("/") for line in outputs for path in line.split(", ")), outputs


def test_used_as_a_module_with_prefixed_rules_and_the_conda_source_is_the_workflows(clone, tiny_cohort, tmp_path):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(cohort_config(tiny_cohort)))
    (tmp_path / "Snakefile").write_text(f'''import os

configfile: "mine.yaml"

module trackflow:
    snakefile:
        "{clone}/workflow/Snakefile"
    config:
        config

use rule * from trackflow as trackflow_*

rule all:
    default_target: True
    input:
        rules.trackflow_all.input,

print("TRACKFLOW_SOURCE=" + os.environ["TRACKFLOW_SOURCE"])
''')
    output = run_snakemake(tmp_path, "-n")
    jobs = planned_jobs(output)
    assert "trackflow_train_model model=l2t" in jobs and "trackflow_track subject=sub-02, model=l2t" in jobs, jobs
    assert f"TRACKFLOW_SOURCE={clone}\n" in output


def fresh_env(path):
    """A new Python environment with pip and setuptools reachable but no trackflow of its own (offline, the
    build runs without isolation), standing for the conda env that Snakemake has just created."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site_packages = next((path / "lib").glob("python3*/site-packages"))
    # Located, not imported: importing setuptools after the stdlib's distutils (torch's imports load it) fails.
    tools = {Path(importlib.util.find_spec(name).origin).parents[1] for name in ("pip", "setuptools")}
    (site_packages / "tools.pth").write_text("".join(f"{tool}\n" for tool in tools))
    return site_packages


def run_post_deploy(env_dir, cwd, source):
    env = {key: value for key, value in os.environ.items() if key != "TRACKFLOW_SOURCE"}
    env.update(PATH=f"{env_dir / 'bin'}:{env['PATH']}", PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0")
    if source is not None:
        env["TRACKFLOW_SOURCE"] = str(source)
    return subprocess.run(["bash", str(REPO / "envs" / "trackflow.post-deploy.sh")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_post_deploy_installs_trackflow_from_the_workflow_source_not_the_working_directory(clone, tmp_path):
    site_packages = fresh_env(tmp_path / "env")
    workdir = tmp_path / "deployed"  # the user's folder: no pyproject.toml, no src/
    workdir.mkdir()
    result = run_post_deploy(tmp_path / "env", workdir, clone)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site_packages / "trackflow" / "tracking" / "tracker.py").is_file()
    demo = subprocess.run([str(tmp_path / "env" / "bin" / "trackflow_make_demo"), "-h"], capture_output=True,
                          text=True, timeout=60)
    assert demo.returncode == 0 and "usage: trackflow_make_demo" in demo.stdout, demo.stderr

    result = run_post_deploy(tmp_path / "env", workdir, None)
    assert result.returncode == 1
    assert result.stderr == "trackflow.post-deploy.sh: TRACKFLOW_SOURCE is not set (run it through the " \
                            "trackflow workflow)\n"


def test_post_deploy_env_is_for_this_release_and_license_and_catalog_match():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    script = (REPO / "envs" / "trackflow.post-deploy.sh").read_text()
    assert re.search(r"^version=(\S+)$", script, flags=re.MULTILINE).group(1) == pyproject["version"]
    assert pyproject["license"] == "MIT"
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n")
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    assert catalog["usage"]["software-stack-deployment"] == {"conda": True}
    assert catalog["usage"]["report"] is True
