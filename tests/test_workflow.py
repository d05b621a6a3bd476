"""The Snakemake workflow: dry runs of several configs, lint, schema, profiles, envs and rerun behaviour.

Most tests run the real workflow (real Snakemake scheduling, metadata and rerun logic) with stand-in
command lines prepended to PATH: each stand-in writes small placeholder outputs where the documented CLI
writes its real ones and records its call, so that the tests see which steps ran.
"""

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
SNAKEFILE = REPO / "workflow" / "Snakefile"
DEMO_CONFIG = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
COHORT_TEMPLATE = yaml.safe_load((REPO / "config" / "config.yaml").read_text())

# One script for every CLI the rules call; it acts according to the name it is called by.
STANDIN = r'''#!{python}
"""Stand-in for a trackflow/scilpy CLI: writes placeholder outputs and appends its call to $STANDIN_CALLS."""
import json, os, sys
from pathlib import Path

name, args = Path(sys.argv[0]).name, sys.argv[1:]
with open(os.environ["STANDIN_CALLS"], "a") as calls:
    calls.write(json.dumps({{"cli": name, "args": args,
                             "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}}) + "\n")
# the rules write positional arguments first
positional = args[:next((i for i, a in enumerate(args) if a.startswith("-")), len(args))]

def option(flag, default=None):
    return args[args.index(flag) + 1] if flag in args else default

def write_tractogram(path, n):
    """n straight streamlines of 2 to 41 mm, a real .trk/.tck (the report's figures read them)."""
    import nibabel as nib
    import numpy as np
    lines = [np.outer(np.arange(2 + k % 40), [1.0, 0.0, 0.0]) for k in range(n)]
    nib.streamlines.save(nib.streamlines.Tractogram(lines, affine_to_rasmm=np.eye(4)), str(path))

def count_streamlines(path):
    import nibabel as nib
    return len(nib.streamlines.load(str(path)).streamlines)

if name == "trackflow_make_demo":
    out, n = Path(positional[0]), int(option("--subjects"))
    subjects = [f"sub-{{i:02d}}" for i in range(1, n + 1)]
    for s in subjects:
        (out / "dwi_ml_ready" / s / "bundles").mkdir(parents=True, exist_ok=True)
    (out / "config").mkdir()
    (out / "README.txt").write_text("demo")
    (out / "config" / "hdf5_config.json").write_text(json.dumps({{
        "input": {{"type": "volume", "files": ["dwi/fodf.nii.gz"], "standardization": "none"}},
        "wm_mask": {{"type": "volume", "files": ["masks/wm.nii.gz"], "standardization": "none"}},
        "streamlines": {{"type": "streamlines", "files": ["tractograms/*.trk"]}}}}))
    lists = {{"training": subjects[:-2], "validation": subjects[-2:-1], "testing": subjects[-1:]}}
    for subset, ids in lists.items():
        (out / "config" / f"{{subset}}_subjs.txt").write_text("\n".join(ids) + "\n")
elif name == "trackflow_prepare_tractoflow":
    from trackflow.cli.prepare_tractoflow import main
    main(args)
elif name == "dwiml_create_hdf5_dataset":
    Path(positional[1]).write_text(" ".join(args))
elif name.endswith("_train_model"):
    best = Path(positional[0]) / positional[1] / "best_model"
    best.mkdir(parents=True)
    (best / "parameters.json").write_text(json.dumps(args))
elif name.endswith("_track_from_model"):
    fail_marker = os.environ.get("STANDIN_FAIL_ONCE")
    if fail_marker and not Path(fail_marker).exists():
        Path(fail_marker).touch()
        sys.exit("stand-in tracker: failing on purpose, once")
    n_streamlines = int(option("--nt", 0)) or 10 * int(option("--npv", 1))
    write_tractogram(positional[3], n_streamlines)
elif name == "trackflow_filter_by_length":
    from trackflow.visualization.summary import COUNT_COLUMNS, KEYS
    if positional[0].endswith(".tck") and not Path(option("--reference", "")).is_file():
        sys.exit("stand-in filter: a .tck needs an existing --reference")
    n_before = count_streamlines(positional[0])
    n_after = n_before // 2
    write_tractogram(positional[1], n_after)
    row = dict.fromkeys(COUNT_COLUMNS, 10.0)
    row.update(subject=option("--subject"), model=option("--model"), n_before=n_before, n_after=n_after)
    Path(option("--out_counts")).write_text(
        "\t".join(KEYS + COUNT_COLUMNS) + "\n" + "\t".join(str(row[c]) for c in KEYS + COUNT_COLUMNS) + "\n")
elif name.endswith("_visualize_loss"):
    prefix = Path(option("--out_dir")) / option("--out_prefix")
    Path(f"{{prefix}}_histogram.png").write_bytes(b"png")
    Path(f"{{prefix}}_colored_loss.trk").write_text("colored")
elif name == "dwiml_visualize_logs":
    for figure in ("loss", "grad_norm", "time"):
        Path(f"{{option('--save_figures')}}{{figure}}.png").write_bytes(b"png")
elif name == "trackflow_score":
    Path(positional[2]).write_text(json.dumps({{
        "VB": 1, "IB": 0, "VS_ratio": 0.5, "IS_ratio": 0.1, "OL": 0.4, "OR": 0.2, "F1": 0.5, "n_bundles": 2,
        "bundles": {{"arc": {{"VS": 5, "OL": 0.4, "OR": 0.2, "F1": 0.5}}}}}}))
else:
    sys.exit(f"no stand-in for {{name}}")
'''
STANDIN_CLIS = ["trackflow_make_demo", "trackflow_prepare_tractoflow", "dwiml_create_hdf5_dataset", "l2t_train_model", "tt_train_model",
                "l2t_track_from_model", "tt_track_from_model", "trackflow_filter_by_length",
                "l2t_visualize_loss", "tt_visualize_loss", "trackflow_score", "dwiml_visualize_logs"]


def write_standins(bin_dir):
    """Install the stand-in CLIs in `bin_dir`; returns the environment that puts them first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "standin.py"
    script.write_text(STANDIN.format(python=sys.executable))
    script.chmod(0o755)
    for cli in STANDIN_CLIS:
        (bin_dir / cli).symlink_to(script)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "STANDIN_CALLS": str(bin_dir / "calls.jsonl")}


def read_calls(env):
    path = Path(env["STANDIN_CALLS"])
    calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    path.unlink(missing_ok=True)
    return calls


def write_config(workdir, config):
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def with_venv_on_path(env):
    """The rules call the console scripts by name: those of this environment come after any stand-ins."""
    return {**env, "PATH": f"{env['PATH']}:{SNAKEMAKE.parent}"}


def snakemake(workdir, *args, env=None, timeout=120, check=True):
    """Run Snakemake on the repository's workflow in `workdir` (which holds config/config.yaml)."""
    env = with_venv_on_path(env if env is not None else dict(os.environ))
    result = subprocess.run([str(SNAKEMAKE), "-s", str(SNAKEFILE), *args], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def job_counts(output):
    """{rule: count} from the "Job stats" table that Snakemake prints (empty when nothing is to be done)."""
    if "Job stats:" not in output:
        return {}
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", table, re.MULTILINE))
    counts.pop("total", None)
    return {rule: int(n) for rule, n in counts.items()}


def planned_jobs(output):
    """Sorted "rule subject=..., model=..." of every job a dry run plans (rule name alone without wildcards)."""
    jobs = []
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", output, flags=re.MULTILINE)[1:]:
        rule = re.match(r"(?:local)?rule (\w+):", block).group(1)
        wildcards = re.search(r"^\s+wildcards: (.*)$", block.split("\n\n", 1)[0], re.MULTILINE)
        jobs.append(f"{rule} {wildcards.group(1)}" if wildcards else rule)
    return sorted(jobs)


def shell_commands(output, cli):
    """Shell command lines of a `-n -p` run that call `cli`."""
    commands = [line.strip().removeprefix("Shell command: ") for line in output.splitlines()]
    return [command for command in commands if command.startswith(cli + " ")]


def demo_config(**sections):
    config = copy.deepcopy(DEMO_CONFIG)
    config.update(sections)
    return config


def placeholder_cohort(root, subjects):
    """A dwi_ml-ready cohort of empty placeholder files, as the workflow sees it before hdf5 creation."""
    ready = root / "dwi_ml_ready"
    for s in subjects:
        for relative in ("dwi/fodf.nii.gz", "masks/wm.nii.gz", "tractograms/bundle.trk"):
            (ready / s / relative).parent.mkdir(parents=True, exist_ok=True)
            (ready / s / relative).touch()
    (root / "hdf5_config.json").write_text(json.dumps({
        "input": {"type": "volume", "files": ["dwi/fodf.nii.gz"], "standardization": "none"},
        "wm_mask": {"type": "volume", "files": ["masks/wm.nii.gz"], "standardization": "none"},
        "streamlines": {"type": "streamlines", "files": ["tractograms/*.trk"]},
    }))
    (root / "train.txt").write_text("\n".join(subjects[:2]))
    (root / "valid.txt").write_text("")
    (root / "test.txt").write_text("\n".join(subjects))
    return {"dwi_ml_ready": str(ready), "hdf5_config": str(root / "hdf5_config.json"),
            "training_subjects": str(root / "train.txt"), "validation_subjects": str(root / "valid.txt"),
            "testing_subjects": str(root / "test.txt")}


def existing_experiment(path):
    (path / "best_model").mkdir(parents=True)
    return str(path)


# ---------------------------------------------------------------------------------------------- dry runs


def test_demo_dry_run_builds_every_step_for_every_subject_and_model(tmp_path):
    write_config(tmp_path, DEMO_CONFIG)
    result = snakemake(tmp_path, "-n")
    n_pairs = len(DEMO_CONFIG["tracking_subjects"]) * len(DEMO_CONFIG["models"])
    assert job_counts(result.stdout) == {
        "make_demo": 1, "create_hdf5": 1, "train_model": len(DEMO_CONFIG["models"]), "track": n_pairs,
        "filter_by_length": n_pairs, "visualize_loss": n_pairs, "score": n_pairs, "summarize_cohort": 1,
        "plot_training_logs": len(DEMO_CONFIG["models"]), "tractogram_figures": n_pairs, "report_settings": 1,
        "all": 1}


def test_existing_experiment_is_tracked_without_training(tmp_path):
    cohort = placeholder_cohort(tmp_path / "cohort", ["s1", "s2", "s3"])
    experiment = existing_experiment(tmp_path / "experiments" / "my_l2t")
    config = demo_config(demo={"enabled": False}, cohort=cohort, tracking_subjects=[],
                         models={"mine": {"kind": "l2t", "experiment": experiment}})
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "-n", "-p")
    counts = job_counts(result.stdout)
    assert "train_model" not in counts and "make_demo" not in counts
    # tracking_subjects empty: every subject of the testing list is tracked
    assert counts["track"] == 3
    tracks = shell_commands(result.stdout, "l2t_track_from_model")
    assert sorted(cmd.split()[2] for cmd in tracks) == ["s1", "s2", "s3"]
    assert all(cmd.split()[1] == experiment for cmd in tracks)


def test_a_config_of_its_own_plans_only_its_own_model_never_the_demo(tmp_path):
    # the demo's config lies where the Snakefile would read a default; --configfile must replace it, not merge
    write_config(tmp_path, DEMO_CONFIG)
    cohort = placeholder_cohort(tmp_path / "cohort", ["s1", "s2", "s3"])
    mine = {"cohort": cohort, "models": {"mine": {"kind": "l2t", "training_options": {"max_epochs": 1}}}}
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(mine))
    result = snakemake(tmp_path, "-n", "--configfile", "my.yaml")
    pairs = [f"subject={s}, model=mine" for s in ("s1", "s2", "s3")]
    # no ground truth in this cohort: nothing to score (scoring.enabled: auto)
    assert planned_jobs(result.stdout) == sorted(
        ["all", "create_hdf5", "summarize_cohort", "train_model model=mine", "plot_training_logs model=mine",
         "report_settings"]
        + [f"{rule} {pair}" for rule in ("track", "filter_by_length", "visualize_loss", "tractogram_figures")
           for pair in pairs])


def test_the_cohort_template_asks_for_a_cohort_and_runs_once_filled(tmp_path):
    write_config(tmp_path, COHORT_TEMPLATE)
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0
    assert "config cohort: dwi_ml_ready, hdf5_config, training_subjects, validation_subjects, testing_subjects " \
           "must be set" in result.stdout + result.stderr
    write_config(tmp_path, dict(COHORT_TEMPLATE, cohort=placeholder_cohort(tmp_path / "cohort", ["s1"])))
    assert job_counts(snakemake(tmp_path, "-n").stdout)["train_model"] == 1


def test_tt_only_uses_the_tt_scripts_with_the_configured_training_options(tmp_path):
    models = {"tt_demo": DEMO_CONFIG["models"]["tt_demo"]}
    write_config(tmp_path, demo_config(models=models))
    result = snakemake(tmp_path, "-n", "-p")
    out = result.stdout
    assert not shell_commands(out, "l2t_train_model") and not shell_commands(out, "l2t_track_from_model")
    (train,) = shell_commands(out, "tt_train_model")
    assert train.split()[1:6] == ["results/models", "tt_demo", "results/hdf5/cohort.hdf5", "input",
                                  "streamlines"]
    epochs = models["tt_demo"]["training_options"]["max_epochs"]
    assert "--model TTS" in train and f"--max_epochs {epochs}" in train
    assert len(shell_commands(out, "tt_track_from_model")) == len(DEMO_CONFIG["tracking_subjects"])
    assert len(shell_commands(out, "tt_visualize_loss")) == len(DEMO_CONFIG["tracking_subjects"])


def test_prob_tracking_passes_every_tracking_option(tmp_path):
    tracking = dict(DEMO_CONFIG["tracking"], algo="prob", npv=3, nt=None, step_size=0.75, theta=45,
                    eos_stop=0.3, discard_last=True, rng_seed=7, output_format="trx")
    write_config(tmp_path, demo_config(tracking=tracking))
    result = snakemake(tmp_path, "-n", "-p")
    (track, *_) = shell_commands(result.stdout, "l2t_track_from_model")
    words = track.split()
    assert words[4].endswith(".trx") and words[5] == DEMO_CONFIG["tracking"]["seeding_mask_group"]
    for option, value in [("--algo", "prob"), ("--npv", "3"), ("--step_size", "0.75"), ("--theta", "45"),
                          ("--eos_stop", "0.3"), ("--rng_seed", "7"), ("--tracking_mask_group", "wm_mask"),
                          ("--hdf5_file", "results/hdf5/cohort.hdf5"), ("--subset", "testing")]:
        assert words[words.index(option) + 1] == value, option
    assert "--discard_last_point" in words and "--nt" not in words and "--use_gpu" not in words


def test_tck_runs_end_to_end_with_a_subject_reference_and_plans_hdf5_grids_without_one(tmp_path):
    env = write_standins(tmp_path / "bin")
    cohort = placeholder_cohort(tmp_path / "cohort", ["s1", "s2"])
    experiment = existing_experiment(tmp_path / "experiments" / "mine")
    tracking = dict(DEMO_CONFIG["tracking"], output_format="tck")
    config = demo_config(demo={"enabled": False}, cohort=cohort, tracking_subjects=[], tracking=tracking,
                         models={"mine": {"kind": "l2t", "experiment": experiment}})
    write_config(tmp_path, config)
    # no filtering.reference: each subject's grid comes from its hdf5 volume
    jobs = planned_jobs(snakemake(tmp_path, "-n").stdout)
    assert [job for job in jobs if job.startswith("hdf5_reference")] == ["hdf5_reference subject=s1",
                                                                         "hdf5_reference subject=s2"]
    write_config(tmp_path, dict(config, filtering=dict(DEMO_CONFIG["filtering"],
                                                       reference=f"{cohort['dwi_ml_ready']}/{{subject}}/dwi/fodf.nii.gz")))
    snakemake(tmp_path, "--cores", "2", env=env)
    filters = [call["args"] for call in read_calls(env) if call["cli"] == "trackflow_filter_by_length"]
    assert sorted(args[args.index("--reference") + 1] for args in filters) == [
        f"{cohort['dwi_ml_ready']}/{s}/dwi/fodf.nii.gz" for s in ("s1", "s2")]
    assert (tmp_path / "results/filtering/s2/s2__mine.tck").exists()
    assert [(r["subject"], r["model"]) for r in summary_rows(tmp_path)] == [("s1", "mine"), ("s2", "mine")]


def test_gpu_given_as_a_string_on_the_command_line_becomes_an_integer_resource(tmp_path):
    write_config(tmp_path, DEMO_CONFIG)
    # --config turns nested values into strings: the rules must still ask for gpu=1 and pass --use_gpu
    result = snakemake(tmp_path, "-n", "-p", "--config", 'tracking={"gpu": "1"}')
    track_block = result.stdout.split("rule track:", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"resources:.*\bgpu=1\b", track_block)
    assert all("--use_gpu" in cmd for cmd in shell_commands(result.stdout, "l2t_track_from_model"))


def test_dag_of_500_subjects_plans_every_job(tmp_path):
    """A large cohort's DAG (its build time is a figure to measure, not a test: no wall-clock bound here)."""
    subjects = [f"sub-{i:03d}" for i in range(500)]
    cohort = placeholder_cohort(tmp_path / "cohort", subjects)
    for s in subjects:  # ground truth everywhere, so that every subject is scored (scoring.enabled: auto)
        (Path(cohort["dwi_ml_ready"]) / s / "bundles").mkdir()
    config = demo_config(demo={"enabled": False}, cohort=cohort, tracking_subjects=[],
                         models={"l2t": {"kind": "l2t", "training_options": {"max_epochs": 1}}})
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "-n", "--quiet", "rules")
    counts = job_counts(result.stdout)
    assert counts["track"] == counts["filter_by_length"] == counts["score"] == 500
    assert counts["train_model"] == 1


# ------------------------------------------------------------------------------------ lint, schema, envs


def test_lint_is_clean(tmp_path):
    write_config(tmp_path, DEMO_CONFIG)
    result = snakemake(tmp_path, "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["tracking"].update(npvv=2), "'npvv' was unexpected"),
    (lambda c: c["tracking"].update(npv="many"), "'many' is not of type 'integer', 'null'"),
    (lambda c: c["tracking"].update(npv=2, nt=100), "give npv or nt, not both"),
])
def test_bad_config_fails_with_a_clear_message(tmp_path, edit, message):
    config = copy.deepcopy(DEMO_CONFIG)
    edit(config)
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


def training_option(**options):
    return lambda c: c["models"]["l2t_demo"]["training_options"].update(options)


@pytest.mark.parametrize("edit, message", [
    # argparse prefixes refused: max_epoch is not --max_epochs
    (training_option(max_epoch=3), "config models.l2t_demo.training_options: unrecognized arguments: --max_epoch 3"),
    (training_option(max_epochs=0), "config models.l2t_demo.training_options: --max_epochs must be at least 1"),
    (training_option(batch_size_training=-5),
     "config models.l2t_demo.training_options: the batch size must be positive"),
    (training_option(dg_nb_gaussians=3), "config models.l2t_demo.training_options: --dg_nb_gaussians does not "
                                         "apply to --dg_key sphere-classification"),
    (lambda c: c["models"]["tt_demo"]["training_options"].update(n_layers_d=2),
     "config models.tt_demo.training_options: --n_layers_d is only for --model TTO"),
    (lambda c: c["tracking"].update(min_length=250),
     "config tracking.min_length (250) is above tracking.max_length (200)"),
    (lambda c: c["filtering"].update(min_length=300),
     "config filtering.min_length (300) is above filtering.max_length (200)"),
    (lambda c: c["tracking"].update(npv=None, nt=None), "config tracking: give npv or nt (both are null)"),
])
def test_late_failures_are_caught_by_a_dry_run(tmp_path, edit, message):
    test_bad_config_fails_with_a_clear_message(tmp_path, edit, message)


def test_tracking_subjects_must_be_in_the_tracked_subject_list(tmp_path):
    cohort = placeholder_cohort(tmp_path / "cohort", ["s1", "s2"])
    write_config(tmp_path, demo_config(demo={"enabled": False}, cohort=cohort, tracking_subjects=["s2", "s9"]))
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0
    assert f"config tracking_subjects: s9 not in the testing subject list ({cohort['testing_subjects']}; " \
           "tracking.subset: testing)" in result.stderr + result.stdout


def test_scoring_true_requires_ground_truth_and_auto_scores_only_where_it_exists(tmp_path):
    cohort = placeholder_cohort(tmp_path / "cohort", ["s1", "s2"])
    (Path(cohort["dwi_ml_ready"]) / "s2" / "bundles").mkdir()
    experiment = existing_experiment(tmp_path / "experiments" / "mine")
    base = demo_config(demo={"enabled": False}, cohort=cohort, tracking_subjects=[],
                       models={"mine": {"kind": "l2t", "experiment": experiment}})
    write_config(tmp_path, base)
    jobs = planned_jobs(snakemake(tmp_path, "-n").stdout)
    assert [job for job in jobs if job.startswith("score ")] == ["score subject=s2, model=mine"]
    write_config(tmp_path, dict(base, scoring={"enabled": True}))
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0
    assert f"config scoring.enabled is true, and subjects without a bundles/ folder in {cohort['dwi_ml_ready']}: s1 " \
           "(auto scores only those with one)" in result.stdout + result.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(trackng={}), "'trackng' was unexpected"),
    (lambda c: c["models"]["l2t_demo"]["training_options"].update({"max-epochs": 3}), "'max-epochs'"),
    (lambda c: c["tracking"].update(algo="fast"), "'fast' is not one of ['det', 'prob']"),
    (lambda c: c["models"]["l2t_demo"].update(kind="gru"), "'gru' is not one of ['l2t', 'tt']"),
    (lambda c: c["tracking"].update(gpu="one"), "'one'"),
    (lambda c: c["models"].clear(), "should be non-empty"),
])
def test_schema_rejects_bad_values(edit, message):
    import jsonschema

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    config = copy.deepcopy(DEMO_CONFIG)
    jsonschema.Draft202012Validator(schema).validate(config)
    edit(config)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(message)):
        jsonschema.Draft202012Validator(schema).validate(config)


def test_schema_gives_every_key_a_description_and_default_and_closes_every_object():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())

    def visit(node, path):
        if node.get("type") == "object":
            assert node.get("additionalProperties") is False, f"{path} is not closed"
        for key, sub in node.get("properties", {}).items():
            assert "description" in sub, f"{path}.{key} has no description"
            assert "default" in sub or key in node.get("required", []), f"{path}.{key} has no default"
            visit(sub, f"{path}.{key}")
        for pattern, sub in node.get("patternProperties", {}).items():
            visit(sub, f"{path}[{pattern}]")

    visit(schema, "config")
    # and the shipped configs name every top-level section, so that users see all of them
    assert set(DEMO_CONFIG) == set(COHORT_TEMPLATE) == set(schema["properties"])


def test_conda_envs_pin_the_versions_of_constraints_txt():
    pins = dict(line.strip().lower().split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line)
    env_files = sorted((REPO / "envs").glob("*.yaml"))
    assert env_files
    used = set(re.findall(r'"\.\./\.\./envs/(\w+\.yaml)"', "".join(
        p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))))
    assert used == {p.name for p in env_files}
    for env_file in env_files:
        env = yaml.safe_load(env_file.read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        assert "python=3.11" in env["dependencies"]
        for requirement in pip:
            name, version = requirement.lower().split("==")
            assert pins.get(name) == version, f"{env_file.name}: {requirement} but constraints.txt has {pins.get(name)}"


# --------------------------------------------------------------------------------------------- profiles


def test_slurm_profile_is_found_as_users_type_it_from_the_repository_root():
    assert (REPO / "slurm").resolve() == (REPO / "profiles" / "slurm").resolve()
    for profile in ("slurm", "profiles/slurm"):
        result = subprocess.run([str(SNAKEMAKE), "-n", "--profile", profile, "--configfile", "config/demo.yaml"],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"Using profile {profile}" in result.stdout + result.stderr
        train_block = result.stdout.split("rule train_model:", 1)[1].split("\n\n", 1)[0]
        # attempt 1 of mem_mb: 16000 * attempt (set-resources), runtime from the profile
        assert re.search(r"resources:.*\bmem_mb=16000\b", train_block) and "runtime=1440" in train_block


def test_profiles_are_valid_and_the_default_profile_has_no_executor():
    assert not (REPO / "profiles" / "default" / "config.yaml").exists() or "executor" not in yaml.safe_load(
        (REPO / "profiles" / "default" / "config.yaml").read_text())
    slurm = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert slurm["executor"] == "slurm" and slurm["retries"] >= 1 and slurm["slurm-keep-successful-logs"]
    assert "attempt" in str(slurm["default-resources"]["mem_mb"])
    local = yaml.safe_load((REPO / "profiles" / "local" / "config.yaml").read_text())
    assert "executor" not in local


# ------------------------------------------------------------------------------------- real runs, reruns


def edit_and_rerun(workdir, env, edit):
    """Edit the config, then return (dry-run job counts, CLIs the real rerun called)."""
    config = yaml.safe_load((workdir / "config/config.yaml").read_text())
    edit(config)
    write_config(workdir, config)
    planned = job_counts(snakemake(workdir, "-n", env=env).stdout)
    snakemake(workdir, "--cores", "2", env=env)
    return planned, sorted(c["cli"] for c in read_calls(env))


@pytest.mark.slow  # 2-2.5 min on 2 cores: the default run stays under ~10 min; CI runs it in make test-heavy
def test_demo_runs_to_completion_and_config_edits_rerun_exactly_what_they_affect(tmp_path):
    env = write_standins(tmp_path / "bin")
    workdir = tmp_path / "run"
    write_config(workdir, DEMO_CONFIG)
    snakemake(workdir, "--profile", str(REPO / "profiles" / "local"), env=env)
    assert sorted(c["cli"] for c in read_calls(env)) == sorted(
        ["trackflow_make_demo", "dwiml_create_hdf5_dataset", "l2t_train_model", "tt_train_model",
         "l2t_track_from_model", "tt_track_from_model", "l2t_visualize_loss", "tt_visualize_loss"]
        + 2 * ["trackflow_filter_by_length", "trackflow_score", "dwiml_visualize_logs"])
    rows = summary_rows(workdir)
    assert [(r["subject"], r["model"]) for r in rows] == [("sub-04", "l2t_demo"), ("sub-04", "tt_demo")]
    # counts flow from the tracker's output (nt seeds) through the filter into the table
    assert all(int(r["n_before"]) == DEMO_CONFIG["tracking"]["nt"] for r in rows)
    assert all(float(r["F1"]) == 0.5 for r in rows)
    for step in ("tracking", "filtering", "loss", "scores"):
        for model in DEMO_CONFIG["models"]:
            assert (workdir / f"logs/{step}/sub-04/{model}.log").exists()
            assert (workdir / f"benchmarks/{step}/sub-04/{model}.tsv").exists()
    assert "Nothing to be done" in snakemake(workdir, "-n", env=env).stdout
    snakemake(workdir, "--report", "results/report.html", env=env)
    assert "Streamlines per subject and model" in (workdir / "results/report.html").read_text()

    # a tracking option: tracking and what follows, for every subject and model; never hdf5 or training
    planned, ran = edit_and_rerun(workdir, env, lambda c: c["tracking"].update(nt=500))
    assert planned == {"track": 2, "filter_by_length": 2, "score": 2, "summarize_cohort": 1,
                       "tractogram_figures": 2, "report_settings": 1, "all": 1}
    assert ran == sorted(["l2t_track_from_model", "tt_track_from_model"]
                         + 2 * ["trackflow_filter_by_length", "trackflow_score"])
    assert [(int(r["n_before"]), int(r["n_after"])) for r in summary_rows(workdir)] \
        == [(500, 250), (500, 250)]

    # the filter bounds: filtering and what follows
    planned, ran = edit_and_rerun(workdir, env, lambda c: c["filtering"].update(min_length=35))
    assert planned == {"filter_by_length": 2, "score": 2, "summarize_cohort": 1, "tractogram_figures": 2,
                       "report_settings": 1, "all": 1}
    assert ran == sorted(2 * ["trackflow_filter_by_length", "trackflow_score"])

    # one model's training options: that model only
    planned, ran = edit_and_rerun(
        workdir, env, lambda c: c["models"]["l2t_demo"]["training_options"].update(max_epochs=9))
    assert planned == {"train_model": 1, "track": 1, "visualize_loss": 1, "filter_by_length": 1, "score": 1,
                       "summarize_cohort": 1, "plot_training_logs": 1, "tractogram_figures": 1,
                       "report_settings": 1, "all": 1}
    assert ran == sorted(["l2t_train_model", "l2t_track_from_model", "l2t_visualize_loss",
                          "trackflow_filter_by_length", "trackflow_score", "dwiml_visualize_logs"])


def summary_rows(workdir):
    header, *lines = (workdir / "results/summary/cohort_summary.tsv").read_text().splitlines()
    return [dict(zip(header.split("\t"), line.split("\t"))) for line in lines]


# ------------------------------------------------------------------------------ killed run (real CLIs)


def real_clis_available():
    try:
        import trackflow.cli.track  # noqa: F401
        import trackflow.cli.train  # noqa: F401
        import trackflow.cli.make_demo  # noqa: F401
        import trackflow.cli.create_hdf5_dataset  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not real_clis_available(), reason="the real demo/hdf5/training/tracking CLIs are not there yet")
def test_run_killed_mid_tracking_leaves_no_tractogram_and_next_run_completes_it(tmp_path):
    import nibabel as nib

    models = {"l2t_demo": dict(DEMO_CONFIG["models"]["l2t_demo"])}
    models["l2t_demo"]["training_options"] = dict(models["l2t_demo"]["training_options"], max_epochs=1)
    # many seeds in small batches, so that tracking lasts long enough to be interrupted
    tracking = dict(DEMO_CONFIG["tracking"], nt=200000, simultaneous_tracking=100)
    write_config(tmp_path, demo_config(models=models, tracking=tracking))
    target = "results/tracking/sub-04/sub-04__l2t_demo.trk"
    tractogram = tmp_path / target
    snakemake(tmp_path, "--cores", "2", "results/models/l2t_demo", timeout=900)

    run = subprocess.Popen([str(SNAKEMAKE), "-s", str(SNAKEFILE), "--cores", "1", target],
                           cwd=tmp_path, env=with_venv_on_path(dict(os.environ)), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    log = tmp_path / "logs/tracking/sub-04/l2t_demo.log"
    deadline = time.time() + 300
    while not (log.exists() and log.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.5)
    assert log.exists() and log.stat().st_size > 0, "tracking never started"
    time.sleep(3)
    assert run.poll() is None, "tracking ended before it could be interrupted"
    os.killpg(run.pid, signal.SIGTERM)
    assert run.wait(timeout=60) != 0
    assert not tractogram.exists()

    tracking["nt"] = 200
    write_config(tmp_path, demo_config(models=models, tracking=tracking))
    snakemake(tmp_path, "--cores", "2", "--rerun-incomplete", target, timeout=900)
    assert len(nib.streamlines.load(str(tractogram)).streamlines) > 0
