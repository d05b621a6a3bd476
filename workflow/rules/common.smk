# Configuration checks, cohort paths and every input function of the workflow; rules call these by name.
import os
import re
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.sourcecache import HostingProviderFile, LocalGitFile, LocalSourceFile
from snakemake.utils import validate


def trackflow_source(rules_dir):
    """What envs/trackflow.post-deploy.sh installs into the rules' conda env: the trackflow package of this
    workflow's own repository (two folders above workflow/rules), wherever the workflow was deployed from."""
    if isinstance(rules_dir, LocalSourceFile):  # a clone, or a module given by path (snakedeploy from a folder)
        return str(Path(rules_dir.get_path_or_uri(secret_free=True)).parents[1])
    if isinstance(rules_dir, HostingProviderFile):  # module: github(...) / gitlab(...) (snakedeploy from a URL)
        return f"git+https://{rules_dir.host}/{rules_dir.repo}@{rules_dir.ref}"
    if isinstance(rules_dir, LocalGitFile):  # module: gitfile(...)
        return f"git+file://{os.path.abspath(rules_dir.repo_path)}@{rules_dir.ref}"
    return None


# Snakemake runs the post-deploy script from the working directory, which is not this repository once the
# workflow is deployed, with this process's environment: hand it the source here (a user's own value wins).
if trackflow_source(workflow.current_basedir):
    os.environ.setdefault("TRACKFLOW_SOURCE", trackflow_source(workflow.current_basedir))


if not config:
    raise WorkflowError(
        "no config: run with --configfile (config/demo.yaml for the demo) or write "
        "config/config.yaml in the working directory (see config/README.md)."
    )
validate(config, schema="../schemas/config.schema.yaml")

DEMO = config["demo"]["enabled"]
TRACTOFLOW = config["tractoflow"]
MODELS = config["models"]
TRACKING = config["tracking"]
FILTERING = config["filtering"]


def check(condition, message):
    """Stop at DAG time, before any job, with a message that names the config key."""
    if not condition:
        raise WorkflowError(f"config {message}")


check(
    (TRACKING["npv"] is None) != (TRACKING["nt"] is None),
    (
        "tracking: give npv or nt, not both (set the other to null)"
        if TRACKING["npv"] is not None
        else "tracking: give npv or nt (both are null)"
    ),
)
for section in ("tracking", "filtering"):
    check(
        config[section]["min_length"] <= config[section]["max_length"],
        f"{section}.min_length ({config[section]['min_length']}) is above {section}.max_length "
        f"({config[section]['max_length']})",
    )
check(
    config["hdf5"]["step_size"] is None or config["hdf5"]["compress"] is None,
    "hdf5: give step_size or compress, not both.",
)
VISU = config["loss_visualization"]
check(
    not VISU["enabled"] or VISU["compute_histogram"] or VISU["save_colored_tractogram"],
    "loss_visualization: enable compute_histogram or save_colored_tractogram (or set enabled: false).",
)
check(not (DEMO and TRACTOFLOW["results"]), "demo.enabled and tractoflow.results: choose one cohort.")


def check_training_options(name, model):
    """Parse a model's training_options with its train command line's own parser (prefixes refused) and
    build the model, sampler and trainer settings from them, as the command will."""
    try:
        from trackflow.cli.train import build_train_parser, training_arguments
        from trackflow.errors import TrackflowError
    except ImportError:  # Snakemake runs outside trackflow's environment (--sdm conda): the job checks them
        return
    key = f"models.{name}.training_options"

    def refuse(message):
        raise WorkflowError(f"config {key}: {message}")

    parser = build_train_parser("", model["kind"])
    parser.allow_abbrev = False
    parser.error = refuse
    args = parser.parse_args(
        [
            "experiments",
            name,
            "cohort.hdf5",
            model["input_group"],
            model["streamline_group"],
            *shlex.split(as_cli_options(model["training_options"])),
        ]
    )
    try:
        training_arguments(args, model["kind"])
    except TrackflowError as error:
        refuse(error)


def cohort_inputs():
    """Paths of the cohort's dwi_ml_ready folder, hdf5 group config and subject lists.

    The demo's live under results/demo (made by make_demo), a TractoFlow cohort's under results/cohort (made
    by prepare_tractoflow); a dwi_ml-ready cohort's come from `cohort`.
    """
    if DEMO or TRACTOFLOW["results"]:
        root = "results/demo/config" if DEMO else "results/cohort"
        return {
            "dwi_ml_ready": f"{Path(root).parent if DEMO else root}/dwi_ml_ready",
            "hdf5_config": f"{root}/hdf5_config.json",
            **{f"{s}_subjects": f"{root}/{s}_subjs.txt" for s in ("training", "validation", "testing")},
        }
    missing = [key for key, value in config["cohort"].items() if value is None]
    check(
        not missing,
        f"cohort: {', '.join(missing)} must be set (or set tractoflow.results, or run the demo: "
        "--configfile config/demo.yaml).",
    )
    return dict(config["cohort"])


COHORT = cohort_inputs()


def tractoflow_lists():
    """The subject lists prepare_tractoflow will write (the same library call), with its missing-file check."""
    from trackflow.data.tractoflow import subject_files, subject_lists, tractoflow_subjects
    from trackflow.errors import TrackflowError

    try:
        lists = subject_lists(
            tractoflow_subjects(TRACTOFLOW["results"]),
            {s: TRACTOFLOW[s] for s in ("training", "validation", "testing")},
            TRACTOFLOW["split"],
            TRACTOFLOW["seed"],
        )
        subject_files(TRACTOFLOW["results"], sorted(set().union(*lists.values())))
    except TrackflowError as error:
        raise WorkflowError(f"config tractoflow: {error}")
    return lists


def known_subject_list(subset):
    """Ids of a subject list when they are known now (from the file, or TractoFlow's split), else None."""
    if TRACTOFLOW["results"] and not DEMO:
        return TRACTOFLOW_LISTS[subset]
    listing = Path(COHORT[f"{subset}_subjects"])
    return listing.read_text().split() if listing.exists() else None


TRACTOFLOW_LISTS = tractoflow_lists() if TRACTOFLOW["results"] and not DEMO else None


def tracking_subjects():
    """Subjects to track: the config's list (checked against the tracked subset's list when it is known now),
    else the ids of the testing list."""
    subset = TRACKING["subset"]
    listed = known_subject_list(subset)
    if config["tracking_subjects"]:
        unknown = [s for s in config["tracking_subjects"] if listed is not None and s not in listed]
        check(
            not unknown,
            f"tracking_subjects: {', '.join(unknown)} not in the {subset} subject list "
            f"({COHORT[f'{subset}_subjects']}; tracking.subset: {subset})",
        )
        return list(config["tracking_subjects"])
    testing = known_subject_list("testing")
    check(
        testing is not None,
        f"tracking_subjects is empty and {COHORT['testing_subjects']} does not exist "
        "yet: list the subjects to track.",
    )
    check(testing, f"tracking_subjects: no subject to track ({COHORT['testing_subjects']} is empty).")
    return testing


SUBJECTS = tracking_subjects()
TRAINED_MODELS = [name for name, model in MODELS.items() if model["experiment"] is None]
EXT = TRACKING["output_format"]


def alternatives(names):
    """Regex matching exactly one of `names` (wildcard constraint)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


wildcard_constraints:
    subject=alternatives(SUBJECTS),
    model=alternatives(MODELS),


def as_cli_options(options):
    """Render {name: value} as command-line options: True is a bare flag, False/None are left out."""
    words = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        words.append(f"--{name}")
        if value is True:
            continue
        words.extend(str(v) for v in (value if isinstance(value, list) else [value]))
    return shlex.join(words)


def n_gpu(section):
    """GPU count of a config section; int() because values given with --config arrive as strings."""
    return int(section["gpu"])


def device_options(section):
    return "--use_gpu" if n_gpu(section) > 0 else ""


def experiment_dir(wildcards):
    """The model's experiment folder: the given one, or the one train_model writes."""
    given = MODELS[wildcards.model]["experiment"]
    return given if given is not None else f"results/models/{wildcards.model}"


def model_script(action):
    """Console script of the model's family for `action` (train_model, track_from_model, visualize_loss)."""
    return lambda wildcards: f"{MODELS[wildcards.model]['kind']}_{action}"


def training_options(wildcards):
    model = MODELS[wildcards.model]
    return " ".join(filter(None, [as_cli_options(model["training_options"]), device_options(model)]))


def hdf5_options():
    return as_cli_options(
        {
            "step_size": config["hdf5"]["step_size"],
            "compress": config["hdf5"]["compress"],
            "remove_invalid": config["hdf5"]["remove_invalid"],
        }
    )


def tracking_options():
    """Every tracking option of the config as CLI options (a params: value, so edits rerun tracking)."""
    options = {
        name: TRACKING[name]
        for name in (
            "subset",
            "algo",
            "npv",
            "nt",
            "step_size",
            "theta",
            "min_length",
            "max_length",
            "eos_stop",
            "tracking_mask_group",
            "simultaneous_tracking",
            "rng_seed",
        )
    }
    options["discard_last_point"] = TRACKING["discard_last"]
    # only prob reads it: det tracking keeps the same command (and is not rerun) whatever it says
    options["prob_sampling"] = TRACKING["prob_sampling"] if TRACKING["algo"] == "prob" else None
    options["det_direction"] = TRACKING["det_direction"] if TRACKING["algo"] == "det" else None
    return " ".join(filter(None, [as_cli_options(options), device_options(TRACKING)]))


def filtering_options():
    return as_cli_options({"minL": FILTERING["min_length"], "maxL": FILTERING["max_length"]})


def filtering_reference(wildcards):
    """The .tck reference of a subject: `filtering.reference` ({subject} replaced; relative to the subject's
    dwi_ml_ready folder unless absolute), else the grid of its seeding mask in the hdf5 (rule hdf5_reference)."""
    if EXT != "tck":
        return []
    if FILTERING["reference"] is None:
        return f"results/hdf5/references/{wildcards.subject}.nii.gz"
    return str(
        Path(COHORT["dwi_ml_ready"], wildcards.subject, FILTERING["reference"].format(subject=wildcards.subject))
    )


def output_name(step, suffix=""):
    """Per subject and model output path, named <subject>__<model> (the SCIL convention) so a copied file keeps
    its context."""
    return f"results/{step}/{{subject}}/{{subject}}__{{model}}{suffix}"


def loss_visualization_options():
    return as_cli_options(
        {
            "subset": TRACKING["subset"],
            **{
                name: VISU[name]
                for name in (
                    "compute_histogram",
                    "save_colored_tractogram",
                    "colormap",
                    "min_range",
                    "max_range",
                    "batch_size",
                )
            },
        }
    )


def streamline_group_in_hdf5(group):
    """Whether the hdf5 groups config declares `group` as streamlines (True while that config is still to be made)."""
    path = Path(COHORT["hdf5_config"])
    if not path.exists():
        return True
    from trackflow.data.hdf5.config import StreamlineGroupConfig, read_groups_config
    from trackflow.errors import TrackflowError

    try:
        _, groups = read_groups_config(path)
    except TrackflowError as error:
        raise WorkflowError(f"cohort hdf5_config: {error}")
    return any(g.name == group and isinstance(g, StreamlineGroupConfig) for g in groups)


def loss_visualization_patterns():
    """Output patterns of visualize_loss (by name), for the outputs its enabled options write."""
    patterns = {}
    if VISU["compute_histogram"]:
        patterns["histogram"] = output_name("loss", "_histogram.png")
    if VISU["save_colored_tractogram"]:
        patterns["colored_tractogram"] = output_name("loss", "_colored_loss.trk")
    return patterns


def loss_visualization_outputs():
    """The same patterns, the histogram marked for the report."""
    outputs = loss_visualization_patterns()
    if "histogram" in outputs:
        outputs["histogram"] = report(
            outputs["histogram"],
            caption="../report/loss_histogram.rst",
            category="Losses",
            subcategory="{model}",
            labels={"subject": "{subject}", "model": "{model}"},
        )
    return outputs


def final_outputs():
    """What `all` asks for: filtered tractograms, loss plots, scores and the cohort summary."""
    targets = expand(output_name("filtering", f".{EXT}"), subject=SUBJECTS, model=MODELS)
    if VISU["enabled"]:
        visualized = [m for m in MODELS if streamline_group_in_hdf5(MODELS[m]["streamline_group"])]
        for pattern in loss_visualization_patterns().values():
            targets += expand(pattern, subject=SUBJECTS, model=visualized)
    return targets + scored_outputs() + ["results/summary/cohort_summary.tsv"] + report_outputs()


def has_ground_truth(subject):
    """Whether the subject has ground-truth bundles: the demo's all do; others need dwi_ml_ready/<S>/bundles now."""
    return DEMO or Path(COHORT["dwi_ml_ready"], subject, "bundles").is_dir()


def scored_subjects():
    """Subjects to score: scoring.enabled auto = those with ground truth, true = all (which must have it)."""
    enabled = config["scoring"]["enabled"]
    if enabled is False:
        return []
    if enabled is True:
        missing = [s for s in SUBJECTS if not has_ground_truth(s)]
        check(
            not missing,
            f"scoring.enabled is true, and subjects without a bundles/ folder in "
            f"{COHORT['dwi_ml_ready']}: {', '.join(missing)} (auto scores only those with one).",
        )
        return SUBJECTS
    return [s for s in SUBJECTS if has_ground_truth(s)]


SCORED_SUBJECTS = scored_subjects()


def scored_outputs():
    return expand(output_name("scores", ".json"), subject=SCORED_SUBJECTS, model=MODELS)


def logged_models():
    """Models with training logs for the loss curves: those trained here, and given experiments with a logs/ folder."""
    return [m for m in MODELS if MODELS[m]["experiment"] is None or Path(MODELS[m]["experiment"], "logs").is_dir()]


# Figures of dwiml_visualize_logs (trackflow.visualization.logs.FIGURES), in the report's order.
TRAINING_FIGURES = ("loss", "grad_norm", "time")


def report_outputs():
    """The report's own figures: training curves per model, tractogram pictures per subject and model, settings."""
    return (
        expand("results/report/training/{model}__{figure}.png", model=logged_models(), figure=TRAINING_FIGURES)
        + expand(output_name("report", "_{figure}.png"), subject=SUBJECTS, model=MODELS, figure=["snapshot", "lengths"])
        + ["results/report/settings.html"]
    )


def settings_sections():
    """The settings page's tables: each model's, then the tracking, filtering, hdf5, scoring and loss settings."""
    sections = {}
    for name, model in MODELS.items():
        sections[f"Model {name}"] = {key: value for key, value in model.items() if key != "training_options"}
        if model["experiment"] is None:
            sections[f"Model {name}: training options"] = dict(model["training_options"])
    titles = {
        "tracking": "Tracking",
        "filtering": "Length filtering",
        "hdf5": "hdf5 creation",
        "scoring": "Scoring",
        "loss_visualization": "Loss visualization",
    }
    sections.update({title: dict(config[key]) for key, title in titles.items()})
    sections["Subjects"] = {"tracked": SUBJECTS, "scored": SCORED_SUBJECTS}
    return sections


def summary_outputs():
    """The cohort table and plots, for the report; the score plots only when there are scores."""
    plots = ["streamline_counts"] + (["tractometer", "overall_scores", "bundle_scores"] if SCORED_SUBJECTS else [])
    outputs = {
        "table": report(
            "results/summary/cohort_summary.tsv", caption="../report/summary_table.rst", category="Cohort summary"
        )
    }
    for plot in plots:
        outputs[plot] = report(
            f"results/summary/{plot}.png", caption=f"../report/{plot}.rst", category="Cohort summary"
        )
    return outputs


for name in TRAINED_MODELS:
    check_training_options(name, MODELS[name])
