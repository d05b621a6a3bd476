"""Tracking quality: Learn2track and a TractoTransformer beside classical tracking (scilpy's local tracking,
MRtrix3's iFOD2 and SD_STREAM), scored against the demo cohort's ground truth (Tractometer metrics of
``trackflow.evaluation.tractometer``).

Steps: make (or reuse) a demo cohort and its hdf5; train the default demo models with ``l2t_train_model``
and ``tt_train_model`` side by side (or reuse experiment folders); track the held-out (testing) subject with
``l2t_track_from_model`` and ``tt_track_from_model`` (det, and prob when the head samples) and with
``scil_tracking_local`` (prob and det on the fODF, basis ``descoteaux07``) and with MRtrix3's ``tckgen``
(iFOD2 and SD_STREAM on the fODF converted to ``tournier07``, ``-nthreads 2``). Every tracker gets the same
seeds, tracking mask (the WM mask), step size, angle and length limits: the learned trackers draw their
seeds from the interface mask with ``--nt`` and ``--rng_seed``; the baselines are given that very list
(scilpy through ``--in_custom_seeds``, tckgen as one seeder per seed: ``trackflow.tracking.classical``),
and the benchmark checks that the seeds the learned trackers saved belong to it. With several
``--training_seeds`` each learned row is the mean +- standard deviation over the models trained with them.

``--geometry varied`` asks for generalisation instead: a varied-geometry cohort (every subject its own
geometry and in-plane pose: ``trackflow_make_demo --training_poses ...``), models trained on its training
subjects, and one table per tracked subject (every testing subject, whose geometry no model saw, and the
first training subject for reference) plus the mean over the testing subjects (VB: the worst subject).

Prints one table (rows: trackers; columns: streamlines kept, VB/bundles, IB, VS %, IS %, NC %, OL, OR, F1,
tracking wall time, seeds per second), then per tracked subject each tracker's F1 and OL per bundle (mean over
the training seeds), and writes the table to ``<out>/quality.tsv`` and, with the per-bundle metrics and the
settings, ``<out>/quality.json``. Times are those of whole commands, start-up included
(imports, model and data loading: 2-3 s for scilpy, 3-8 s for the learned trackers on 2 CPU cores), all on
one CPU thread (scilpy's tracking is single-threaded); each learned tracker's own rate is in its log under
``<out>/tractograms/``.

    python benchmarks/quality.py --out quality                   # default recipe (see DEFAULT_* below)
    python benchmarks/quality.py --out quality_quick --quick     # smoke run: tiny cohort, 2 epochs
    python benchmarks/quality.py --out quality --cohort demo --l2t_experiment exps/l2t --tt_experiment exps/tt
    python benchmarks/quality.py --out quality_varied --geometry varied --training_seeds 1234 1 2
    python benchmarks/quality.py --out quality_rot --geometry varied --rotation_augmentation 15
    python benchmarks/quality.py --out quality_8 --geometry varied --training_poses 1 2 3 4 6 7 8 9  # 8 subjects
"""

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from dipy.io.streamline import load_tractogram
from scipy.spatial import cKDTree

from trackflow.data.demo import (DEFAULT_SHAPE, DEFAULT_STREAMLINES_PER_BUNDLE, SH_BASIS, TINY_SHAPE,
                                 make_demo_cohort)
from trackflow.data.hdf5.creation import create_hdf5_dataset, read_subject_list
from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.models.persistence import load_experiment_model
from trackflow.tracking.classical import (MRTRIX_ALGOS, run_mrtrix_tracking, run_scilpy_local_tracking,
                                          seeds_from_mask)
from trackflow.evaluation.tractometer import load_ground_truth, score_streamlines, score_tractogram_file

LOGGER = logging.getLogger("quality")

# hdf5 groups of the demo cohort's config (trackflow.data.demo.HDF5_CONFIG).
INPUT_GROUP, STREAMLINE_GROUP = "input", "streamlines"
SEEDING_GROUP, TRACKING_MASK_GROUP = "interface_mask", "wm_mask"

# The demo recipe (gotchas.md, "What trains well on a small simulated phantom"): one step = half a voxel
# (0.75 mm on the demo's 1.5 mm grid, as 0.5 mm on the 1 mm phantom the recipe was found on).
DEFAULT_STEP_MM = 0.75
COMMON_TRAINING = [
    "--neighborhood_type", "axes", "--neighborhood_radius", "1", "--neighborhood_resolution", "1",
    "--input_embedding_key", "nn_embedding", "--input_embedded_size", "64",
    "--dg_key", "sphere-classification", "--add_eos",
    "--noise_gaussian_size_forward", "0.1", "--reverse_ratio", "0.5",
    "--batch_size_validation", "100", "--max_batches_per_epoch_validation", "5"]
L2T_RECIPE = ["--rnn_key", "gru", "--rnn_layer_sizes", "128", "128", "--nb_previous_dirs", "2",
              "--normalize_prev_dirs", "--learning_rate", "0.001"]
# A small encoder-only transformer: one stack instead of TTO's two halves the cost on 2 CPU cores.
TT_RECIPE = ["--model", "TTS", "--nheads", "4", "--n_layers_e", "2", "--ffnn_hidden_size", "128",
             "--dropout_rate", "0.1", "--learning_rate", "0.0005"]

QUICK_DEFAULTS = dict(n_subjects=3, streamlines_per_bundle=30, shape=list(TINY_SHAPE), epochs=2,
                      batches_per_epoch=5, nt=300)
# Varied geometry as in issue 13's held-out phantom: training poses +1..+9 degrees, a test pose inside that
# range and one outside it.
VARIED_POSES = {"training": [1.0, 3.0, 7.0, 9.0], "validation": [5.0], "testing": [6.0, -11.0]}
MRTRIX_THREADS = 2

ONE_THREAD_ENV = os.environ | {"OMP_NUM_THREADS": "1"}

TABLE_COLUMNS = ["tracker", "n_streamlines", "VB", "IB", "VS_%", "IS_%", "NC_%", "OL", "OR", "F1",
                 "tracking_s", "seeds_per_s"]


def build_parser():
    # No abbreviations: parse_args looks for the literal --quick before parsing.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out", required=True, help="Output folder (cohort, hdf5, experiments, tractograms, "
                                                "scores, quality.tsv/json).")
    p.add_argument("--quick", action="store_true",
                   help=f"Smoke-test defaults: {QUICK_DEFAULTS} (explicit options still win).")
    data = p.add_argument_group("Cohort")
    data.add_argument("--cohort", help="Demo cohort folder, reused if it exists [<out>/cohort].")
    data.add_argument("--n_subjects", type=int, default=4,
                      help="Subjects of a new cohort (4: 2 training, 1 validation, 1 testing). [%(default)s]")
    data.add_argument("--streamlines_per_bundle", type=int, default=DEFAULT_STREAMLINES_PER_BUNDLE,
                      help="Ground-truth streamlines per bundle of a new cohort. [%(default)s]")
    data.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE),
                      help="Volume shape of a new cohort. [%(default)s]")
    data.add_argument("--subject", help="Subject to track [the first testing subject; with --geometry varied, "
                                        "every testing subject and the first training subject].")
    data.add_argument("--geometry", choices=("classic", "varied"), default="classic",
                      help="classic: the demo, whose subjects share one geometry; varied: every subject its "
                           "own geometry and pose (see --*_poses; --n_subjects is then unused). [%(default)s]")
    for subset, poses in VARIED_POSES.items():
        data.add_argument(f"--{subset}_poses", type=float, nargs="+", default=poses, metavar="DEG",
                          help=f"Poses (degrees) of the {subset} subjects of a varied cohort. [%(default)s]")
    train = p.add_argument_group("Training (skipped for reused experiments)")
    train.add_argument("--l2t_experiment", help="Trained Learn2track experiment folder to reuse.")
    train.add_argument("--tt_experiment", help="Trained TractoTransformer experiment folder to reuse.")
    train.add_argument("--training_seeds", type=int, nargs="+", default=[1234],
                       help="Train each model once per seed (--rng); learned rows are mean +- std over them. "
                            "[%(default)s]")
    train.add_argument("--epochs", type=int, default=30, help="[%(default)s]")
    train.add_argument("--batches_per_epoch", type=int, default=20, help="[%(default)s]")
    train.add_argument("--batch_size", type=int, default=100, help="Streamlines per batch. [%(default)s]")
    train.add_argument("--rotation_augmentation", type=float, default=0.0, metavar="DEG",
                       help="Train both models with the rotation augmentation (largest angle, degrees), the "
                            "demo's fODF coefficients (the input features after T1 and FA) rotated with each "
                            "streamline (--sh_features 2 COUNT, --sh_basis descoteaux07). [0: off]")
    train.add_argument("--l2t_options", default="", metavar="'OPTIONS'",
                       help="More l2t_train_model options, one quoted string (after the recipe's, so they "
                            "win), e.g. '--nb_previous_dirs 0'. ['']")
    train.add_argument("--tt_options", default="", metavar="'OPTIONS'",
                       help="More tt_train_model options, likewise. ['']")
    train.add_argument("--tracking_validation", action="store_true",
                       help="Both trainers pick their best epoch by tracking the validation subjects "
                            "(--add_a_tracking_validation_phase --tracking_mask wm_mask).")
    track = p.add_argument_group("Tracking (identical for every tracker)")
    track.add_argument("--nt", type=int, default=5000, help="Seeds in the interface mask. [%(default)s]")
    track.add_argument("--rng_seed", type=int, default=0, help="[%(default)s]")
    track.add_argument("--step_size", type=float, default=DEFAULT_STEP_MM, help="mm. [%(default)s]")
    track.add_argument("--theta", type=float, default=45.0,
                       help="Largest angle between steps, degrees. [%(default)s]")
    track.add_argument("--min_length", type=float, default=10.0, help="mm. [%(default)s]")
    track.add_argument("--max_length", type=float, default=200.0, help="mm. [%(default)s]")
    track.add_argument("--learned_tracking_options", default="", metavar="'OPTIONS'",
                       help="More l2t/tt_track_from_model options, one quoted string (after the benchmark's, so "
                            "they win), e.g. '--det_direction cone'. ['']")
    return p


def parse_args(argv=None):
    parser = build_parser()
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**QUICK_DEFAULTS)
    return parser.parse_args(argv)


def _fail_unless_zero(command, returncode: int, log_path: Path) -> None:
    if returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"{Path(command[0]).name} failed (exit {returncode}), see {log_path}:\n"
                         + "\n".join(tail))


def run_command(command, log_path: Path) -> float:
    """Run a console script on one torch thread, its output to ``log_path``; return its wall time.

    One thread, as scilpy's tracking: the rates compare per core, and they stay stable on a shared machine
    (measured: tt det tracking at 335 seeds/s on one thread, 84 on two, while another process ran).
    """
    command = [str(c) for c in command]
    LOGGER.info("$ %s", " ".join(command))
    started = time.perf_counter()
    with open(log_path, "w") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=ONE_THREAD_ENV)
    _fail_unless_zero(command, completed.returncode, log_path)
    return time.perf_counter() - started


def run_side_by_side(commands: dict, out: Path) -> dict:
    """Run the commands together, one torch thread each; return each one's wall time (s) by name.

    Measured on the 2 shared cores of the dev machine: both default recipes side by side, one thread each,
    took 5.5 to 9 min; one at a time with torch's 2 threads, l2t alone needed 30-70 s per epoch (over 15 min for
    30 epochs): two threads oversubscribe the cores as soon as anything else runs.
    """
    started = time.perf_counter()
    running = {}
    for name, command in commands.items():
        command = [str(c) for c in command]
        LOGGER.info("$ %s", " ".join(command))
        log_path = out / f"train_{name}.log"
        log = open(log_path, "w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=ONE_THREAD_ENV)
        running[name] = (command, process, log, log_path)
    seconds = {}
    while len(seconds) < len(running):
        time.sleep(1.0)
        for name, (command, process, log, log_path) in running.items():
            if name not in seconds and process.poll() is not None:
                seconds[name] = time.perf_counter() - started
                log.close()
                _fail_unless_zero(command, process.returncode, log_path)
    return seconds


def console_script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def prepare_cohort(args, out: Path) -> tuple[Path, Path]:
    """(cohort folder, hdf5 file), made if missing."""
    cohort = Path(args.cohort) if args.cohort else out / "cohort"
    if not (cohort / "dwi_ml_ready").is_dir():
        if args.geometry == "varied":
            poses = {subset: getattr(args, f"{subset}_poses") for subset in VARIED_POSES}
            LOGGER.info("making a varied-geometry demo cohort in %s, poses %s", cohort, poses)
            make_demo_cohort(cohort, streamlines_per_bundle=args.streamlines_per_bundle, shape=args.shape,
                             poses=poses)
        else:
            LOGGER.info("making a %d-subject demo cohort in %s", args.n_subjects, cohort)
            make_demo_cohort(cohort, n_subjects=args.n_subjects,
                             streamlines_per_bundle=args.streamlines_per_bundle, shape=args.shape)
    hdf5 = out / "cohort.hdf5"
    if not hdf5.exists():
        config = cohort / "config"
        create_hdf5_dataset(cohort / "dwi_ml_ready", hdf5, config / "hdf5_config.json",
                            config / "training_subjs.txt", config / "validation_subjs.txt",
                            config / "testing_subjs.txt")
    return cohort, hdf5


def train_missing_models(args, hdf5: Path, out: Path) -> dict:
    """Experiment folder, training wall time (None when reused) and epochs of each (family, training seed),
    training the missing ones side by side."""
    reused = {"l2t": args.l2t_experiment, "tt": args.tt_experiment}
    if len(args.training_seeds) > 1 and any(reused.values()):
        raise SystemExit("--l2t_experiment / --tt_experiment reuse one model: give one --training_seeds")
    experiments, to_train = {}, {}
    for family in ("l2t", "tt"):
        for rng in args.training_seeds:
            name = family if len(args.training_seeds) == 1 else f"{family}_rng{rng}"
            experiment = Path(reused[family]) if reused[family] else out / "experiments" / name
            experiments[(family, rng)] = experiment
            if reused[family]:
                continue
            if (experiment / "best_model").is_dir():
                LOGGER.warning("reusing %s, trained by an earlier run (delete it to retrain)", experiment)
                continue
            experiment.parent.mkdir(parents=True, exist_ok=True)
            recipe = L2T_RECIPE if family == "l2t" else TT_RECIPE
            to_train[name] = [console_script(f"{family}_train_model"), experiment.parent, name, hdf5,
                              INPUT_GROUP, STREAMLINE_GROUP, "--step_size", args.step_size,
                              "--max_epochs", args.epochs, "--max_batches_per_epoch_training",
                              args.batches_per_epoch, "--batch_size_training", args.batch_size,
                              *COMMON_TRAINING, *rotation_options(args, hdf5), "--rng", rng, *recipe,
                              *extra_training_options(args, family), "-v"]
    seconds = run_side_by_side(to_train, out) if to_train else {}
    return {key: {"experiment": str(experiment), "train_s": seconds.get(experiment.name),
                  "epochs": epochs_trained(experiment)} for key, experiment in experiments.items()}


def rotation_options(args, hdf5: Path) -> list:
    """The trainers' rotation-augmentation options: the demo's input group is T1, FA, then the fODF's SH
    coefficients (``trackflow.data.demo.HDF5_CONFIG``), so the SH block is features 2 to the last."""
    if not args.rotation_augmentation:
        return []
    with HDF5Cohort(hdf5) as cohort:
        n_sh = cohort.volume_groups()[INPUT_GROUP] - 2
    return ["--rotation_augmentation", args.rotation_augmentation, "--sh_features", 2, n_sh,
            "--sh_basis", SH_BASIS]


def extra_training_options(args, family: str) -> list[str]:
    options = shlex.split(args.l2t_options if family == "l2t" else args.tt_options)
    if args.tracking_validation:
        options += ["--add_a_tracking_validation_phase", "--tracking_mask", TRACKING_MASK_GROUP]
    return options


def epochs_trained(experiment: Path) -> int:
    log = experiment / "logs" / "train_loss_monitor_per_epoch.npy"
    return len(np.load(log)) if log.exists() else 0


def track_learned(family, algo, experiment, subject, hdf5, args, out: Path, name: str) -> tuple[Path, float]:
    tractogram = out / "tractograms" / subject / f"{name}.trk"
    tractogram.parent.mkdir(parents=True, exist_ok=True)
    command = [console_script(f"{family}_track_from_model"), experiment, subject, INPUT_GROUP, tractogram,
               SEEDING_GROUP, "--hdf5_file", hdf5, "--algo", algo, "--step_size", args.step_size,
               "--theta", args.theta, "--min_length", args.min_length, "--max_length", args.max_length,
               "--tracking_mask_group", TRACKING_MASK_GROUP, "--nt", args.nt, "--rng_seed", args.rng_seed,
               # The classical trackers' streamlines end inside the tracking mask (measured: none of
               # scilpy's or tckgen's end points lies outside it); keeping the first point outside, the
               # learned trackers' default, would add a voxel of overreach at every end (issue 13's protocol).
               "--discard_last_point", "--save_seeds", "-f", *shlex.split(args.learned_tracking_options)]
    return tractogram, run_command(command, tractogram.with_suffix(".log"))


def check_same_seeds(tractogram: Path, reference_image: Path, seeds_vox_corner: np.ndarray) -> None:
    """The seeds a learned tracker saved (vox/center) must be points of the baseline's seed list."""
    if not tractogram.exists():
        return
    sft = load_tractogram(str(tractogram), str(reference_image), bbox_valid_check=False)
    if len(sft) == 0:  # an empty file has no per-streamline data at all
        return
    saved = sft.data_per_streamline["seeds"] + 0.5
    distance_to_list, _ = cKDTree(seeds_vox_corner).query(saved)
    unknown = int(np.sum(distance_to_list > 1e-3))
    if unknown:
        raise SystemExit(f"{tractogram}: {unknown} of {len(saved)} seeds are not in the baseline's seed list")


def score(tractogram: Path, bundles_dir: Path) -> dict:
    """Metrics of a tractogram; a tracker that kept nothing (no file written) scores as empty."""
    if tractogram.exists():
        return score_tractogram_file(tractogram, bundles_dir)
    bundles, _ = load_ground_truth(bundles_dir)
    return score_streamlines([], bundles)


METRIC_KEYS = ("n_streamlines", "VS_ratio", "IS_ratio", "NC_ratio", "OL", "OR", "F1")


def mean_metrics(runs: list[dict]) -> dict:
    """Mean of the metrics of several runs (subjects); VB and IB: the worst run."""
    mean = {key: float(np.mean([run[key] for run in runs])) for key in METRIC_KEYS + ("seconds",)}
    return mean | {"VB": min(run["VB"] for run in runs), "IB": max(run["IB"] for run in runs),
                   "n_bundles": runs[0]["n_bundles"]}


def _spread(values, digits: int, scale: float = 1.0):
    """A value, or 'mean ± std' over training seeds."""
    values = scale * np.asarray(values, dtype=float)
    if len(values) == 1:
        return int(values[0]) if float(values[0]).is_integer() else round(float(values[0]), digits)
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def table_row(name: str, runs: list[dict], n_seeds: int) -> dict:
    """One tracker's row from one run per training seed (one run for a classical tracker)."""
    vb = sorted({run["VB"] for run in runs})
    seconds = float(np.mean([run["seconds"] for run in runs]))
    return {"tracker": name, "n_streamlines": _spread([r["n_streamlines"] for r in runs], 0),
            "VB": f"{'-'.join(str(v) for v in (vb[0], vb[-1])[:len(vb)])}/{runs[0]['n_bundles']}",
            "IB": _spread([r["IB"] for r in runs], 1), "VS_%": _spread([r["VS_ratio"] for r in runs], 1, 100),
            "IS_%": _spread([r["IS_ratio"] for r in runs], 1, 100),
            "NC_%": _spread([r["NC_ratio"] for r in runs], 1, 100), "OL": _spread([r["OL"] for r in runs], 3),
            "OR": _spread([r["OR"] for r in runs], 3), "F1": _spread([r["F1"] for r in runs], 3),
            "tracking_s": round(seconds, 1), "seeds_per_s": round(n_seeds / seconds, 1)}


def bundle_table(runs_by_tracker: dict) -> pd.DataFrame:
    """Per-bundle F1 (and OL) of every tracker, mean over its runs (training seeds, or subjects): which bundle
    a tracker loses, where the overall means only say how much."""
    rows = []
    for name, runs in runs_by_tracker.items():
        row = {"tracker": name}
        for bundle in runs[0]["bundles"]:
            f1 = np.mean([run["bundles"][bundle]["F1"] for run in runs])
            overlap = np.mean([run["bundles"][bundle]["OL"] for run in runs])
            row[bundle] = f"{f1:.2f} ({overlap:.2f})"
        rows.append(row)
    return pd.DataFrame(rows)


def subject_paths(cohort: Path, subject: str) -> dict:
    subject_dir = cohort / "dwi_ml_ready" / subject
    return {"fodf": subject_dir / "dwi" / f"{subject}__fodf.nii.gz",
            "interface": subject_dir / "other_masks" / f"{subject}__interface.nii.gz",
            "wm": subject_dir / "masks" / f"{subject}__mask_wm.nii.gz", "bundles": subject_dir / "bundles"}


def track_subject(subject: str, paths: dict, experiments: dict, hdf5: Path, args, out: Path) -> dict:
    """Metrics (with ``seconds``) of every tracker on one subject: {tracker: [one per training seed]}."""
    seeds = seeds_from_mask(paths["interface"], rng_seed=args.rng_seed, nt=args.nt)
    runs = {}
    for (family, rng), experiment in experiments.items():
        algos = ["det"]
        if load_experiment_model(experiment).direction_getter.supports_sampling:
            algos.append("prob")
        for algo in algos:
            name = family if len(args.training_seeds) == 1 else f"{family}_rng{rng}"
            tractogram, seconds = track_learned(family, algo, experiment, subject, hdf5, args, out,
                                                f"{name}_{algo}")
            check_same_seeds(tractogram, paths["fodf"], seeds)
            runs.setdefault(f"{family} {algo}", []).append(score(tractogram, paths["bundles"])
                                                            | {"seconds": seconds})
    folder = out / "tractograms" / subject
    common = dict(step_size=args.step_size, theta=args.theta, seeds=seeds, min_length=args.min_length,
                  max_length=args.max_length, sh_basis=SH_BASIS, overwrite=True)
    for algo in ("prob", "det"):
        run = run_scilpy_local_tracking(paths["fodf"], paths["interface"], paths["wm"],
                                        folder / f"scilpy_{algo}.trk", algo=algo, rng_seed=args.rng_seed,
                                        **common)
        runs[f"scilpy {algo}"] = [score(run.tractogram, paths["bundles"]) | {"seconds": run.seconds}]
    for algo in MRTRIX_ALGOS:
        run = run_mrtrix_tracking(paths["fodf"], paths["wm"], folder / f"mrtrix_{algo}.tck", algo=algo,
                                  nthreads=MRTRIX_THREADS, **common)
        runs[f"mrtrix {algo}"] = [score(run.tractogram, paths["bundles"]) | {"seconds": run.seconds}]
    return runs


def tracked_subjects(args, cohort: Path) -> list[str]:
    if args.subject:
        return [args.subject]
    testing = read_subject_list(cohort / "config" / "testing_subjs.txt")
    if args.geometry == "varied":
        return testing + read_subject_list(cohort / "config" / "training_subjs.txt")[:1]
    return testing[:1]


def subject_label(cohort: Path, subject: str) -> str:
    """The subject, with its subset and pose in a varied cohort."""
    poses = cohort / "config" / "poses.tsv"
    if not poses.exists():
        return subject
    row = pd.read_csv(poses, sep="\t").set_index("subject").loc[subject]
    seen = "seen geometry" if row["subset"] == "training" else "unseen geometry"
    return f"{subject} ({row['subset']}, pose {row['pose_deg']:+g} deg, {seen})"


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    (out / "tractograms").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    cohort, hdf5 = prepare_cohort(args, out)
    subjects = tracked_subjects(args, cohort)
    training = train_missing_models(args, hdf5, out)
    experiments = {key: Path(info["experiment"]) for key, info in training.items()}

    runs = {s: track_subject(s, subject_paths(cohort, s), experiments, hdf5, args, out) for s in subjects}
    tables = {subject_label(cohort, s): pd.DataFrame([table_row(name, r, args.nt) for name, r in by.items()],
                                                     columns=TABLE_COLUMNS) for s, by in runs.items()}
    testing = [s for s in subjects if s in read_subject_list(cohort / "config" / "testing_subjs.txt")]
    if len(testing) > 1:
        trackers = runs[testing[0]]
        mean_rows = [table_row(name, [mean_metrics([runs[s][name][k] for s in testing])
                                      for k in range(len(trackers[name]))], args.nt) for name in trackers]
        tables[f"mean of the testing subjects {', '.join(testing)} (VB, IB: worst subject)"] = pd.DataFrame(
            mean_rows, columns=TABLE_COLUMNS)
    main_table = list(tables.values())[-1] if len(testing) > 1 else tables[subject_label(cohort, subjects[0])]
    main_table.to_csv(out / "quality.tsv", sep="\t", index=False)
    voxel_mm = float(nib.load(subject_paths(cohort, subjects[0])["fodf"]).header.get_zooms()[0])
    settings = vars(args) | {"subjects": subjects, "cohort": str(cohort), "voxel_mm": voxel_mm,
                             "sh_basis": SH_BASIS, "seeds": "interface mask, the same list for all"}
    (out / "quality.json").write_text(json.dumps(
        {"settings": settings, "training": {f"{f} rng {r}": v for (f, r), v in training.items()},
         "tables": {label: t.to_dict(orient="records") for label, t in tables.items()}, "metrics": runs},
        indent=2, default=str))
    print(f"\n{args.nt} seeds (interface mask, same for all), step {args.step_size} mm "
          f"({args.step_size / voxel_mm:.2f} voxel), theta {args.theta} deg, length "
          f"[{args.min_length}, {args.max_length}] mm, tracking mask = WM mask (learned trackers: "
          f"--discard_last_point {args.learned_tracking_options}); geometry {args.geometry}")
    for (family, rng), info in training.items():
        how = f"trained in {info['train_s']:.0f} s" if info["train_s"] is not None else "reused"
        print(f"{family} rng {rng}: {info['epochs']} epochs, {how} ({info['experiment']})")
    for label, table in tables.items():
        print(f"\n{label}\n{table.to_string(index=False)}")
    print("\nper bundle: F1 (OL), mean over the training seeds")
    for s, by in runs.items():
        print(f"\n{subject_label(cohort, s)}\n{bundle_table(by).to_string(index=False)}")
    print(f"\nwritten {out / 'quality.tsv'} (the last table) and {out / 'quality.json'}; "
          f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
