# Configuration checks, cohort paths and every input function of the workflow; rules call these by name.
import re
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")

DEMO = config["demo"]["enabled"]
MODELS = config["models"]
TRACKING = config["tracking"]

if TRACKING["npv"] is not None and TRACKING["nt"] is not None:
    raise WorkflowError("config tracking: give npv or nt, not both (set the other to null).")
if config["hdf5"]["step_size"] is not None and config["hdf5"]["compress"] is not None:
    raise WorkflowError("config hdf5: give step_size or compress, not both.")
VISU = config["loss_visualization"]
if VISU["enabled"] and not (VISU["compute_histogram"] or VISU["save_colored_tractogram"]):
    raise WorkflowError("config loss_visualization: enable compute_histogram or save_colored_tractogram "
                        "(or set enabled: false).")


def cohort_inputs():
    """Paths of the cohort's dwi_ml_ready folder, hdf5 group config and subject lists.

    The demo's live under results/demo (made by make_demo); a real cohort's come from `cohort`.
    """
    if DEMO:
        return {
            "dwi_ml_ready": "results/demo/dwi_ml_ready",
            "hdf5_config": "results/demo/config/hdf5_config.json",
            **{f"{s}_subjects": f"results/demo/config/{s}_subjs.txt"
               for s in ("training", "validation", "testing")},
        }
    missing = [key for key, value in config["cohort"].items() if value is None]
    if missing:
        raise WorkflowError(f"config cohort: {', '.join(missing)} must be set when demo.enabled is false.")
    return dict(config["cohort"])


COHORT = cohort_inputs()


def tracking_subjects():
    """Subjects to track: the config's list, else the ids of the testing list (read now, so it must exist)."""
    if config["tracking_subjects"]:
        return list(config["tracking_subjects"])
    listing = Path(COHORT["testing_subjects"])
    if not listing.exists():
        raise WorkflowError(f"config tracking_subjects is empty and {listing} does not exist yet: "
                            "list the subjects to track in the config.")
    subjects = listing.read_text().split()
    if not subjects:
        raise WorkflowError(f"no subject to track: {listing} is empty and tracking_subjects is too.")
    return subjects


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
    return as_cli_options({"step_size": config["hdf5"]["step_size"], "compress": config["hdf5"]["compress"],
                           "remove_invalid": config["hdf5"]["remove_invalid"]})


def tracking_options():
    """Every tracking option of the config as CLI options (a params: value, so edits rerun tracking)."""
    options = {name: TRACKING[name] for name in (
        "subset", "algo", "npv", "nt", "step_size", "theta", "min_length", "max_length", "eos_stop",
        "tracking_mask_group", "simultaneous_tracking", "rng_seed")}
    options["discard_last_point"] = TRACKING["discard_last"]
    return " ".join(filter(None, [as_cli_options(options), device_options(TRACKING)]))


def filtering_options(wildcards):
    options = {"minL": config["filtering"]["min_length"], "maxL": config["filtering"]["max_length"]}
    if config["filtering"]["reference"] is not None:
        options["reference"] = f"{COHORT['dwi_ml_ready']}/{wildcards.subject}/{config['filtering']['reference']}"
    return as_cli_options(options)


def loss_visualization_options():
    return as_cli_options({"subset": TRACKING["subset"], **{
        name: VISU[name] for name in ("compute_histogram", "save_colored_tractogram", "colormap",
                                      "min_range", "max_range", "batch_size")}})


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
        patterns["histogram"] = "results/loss/{subject}/{model}_histogram.png"
    if VISU["save_colored_tractogram"]:
        patterns["colored_tractogram"] = "results/loss/{subject}/{model}_colored_loss.trk"
    return patterns


def loss_visualization_outputs():
    """The same patterns, the histogram marked for the report."""
    outputs = loss_visualization_patterns()
    if "histogram" in outputs:
        outputs["histogram"] = report(
            outputs["histogram"], caption="../report/loss_histogram.rst", category="Losses",
            subcategory="{model}", labels={"subject": "{subject}", "model": "{model}"})
    return outputs


def final_outputs():
    """What `all` asks for: filtered tractograms, loss plots, scores and the cohort summary."""
    targets = expand("results/filtering/{subject}/{model}.{ext}", subject=SUBJECTS, model=MODELS, ext=EXT)
    if VISU["enabled"]:
        visualized = [m for m in MODELS if streamline_group_in_hdf5(MODELS[m]["streamline_group"])]
        for pattern in loss_visualization_patterns().values():
            targets += expand(pattern, subject=SUBJECTS, model=visualized)
    return targets + scored_outputs() + ["results/summary/cohort_summary.tsv"]


def scored_outputs():
    if not config["scoring"]["enabled"]:
        return []
    return expand("results/scores/{subject}/{model}.json", subject=SUBJECTS, model=MODELS)


def summary_outputs():
    """The cohort table and plots, for the report; the score plots only when there are scores."""
    plots = ["streamline_counts"] + (["overall_scores", "bundle_scores"] if config["scoring"]["enabled"] else [])
    outputs = {"table": report("results/summary/cohort_summary.tsv", caption="../report/summary_table.rst",
                               category="Cohort summary")}
    for plot in plots:
        outputs[plot] = report(f"results/summary/{plot}.png", caption=f"../report/{plot}.rst",
                               category="Cohort summary")
    return outputs
