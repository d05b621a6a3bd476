"""Training against dwi_ml's trainer, side by side in one run (issue 13, item 1).

Both trainers (dwi_ml's ``l2t_train_model`` from its own virtualenv, see ``benchmarks/dwi_ml/setup.sh``, and
trackflow's) train a Learn2track model on the same demo hdf5 with the same recipe (issue 13's: GRU 2x128,
axes neighbourhood, sphere classification + EOS, 0.5 mm step, noise 0.1, reverse ratio 0.5, 30 epochs of 20
batches of 100 streamlines) over several ``--rng`` seeds each. Prints, per epoch, the training and the
validation loss of both as mean +- standard deviation over the seeds, and each run's best epoch and wall
time. Both report the same quantity (mean negative log-likelihood per point over 724 directions + EOS).
The differences between the two trainers, read from both sources, are listed in docs/training_vs_dwi_ml.md.

    python benchmarks/vs_dwi_ml_training.py --quick          # smoke run: 1 seed, 2 epochs of 3 batches
    python benchmarks/vs_dwi_ml_training.py --work /tmp/vs_dwi_ml   # 3 seeds x 30 epochs each (~hours on 2 cores)
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from vs_dwi_ml import baseline_parser, prepare_demo, run_measured

RECIPE = ["--step_size", "0.5", "--rnn_key", "gru", "--rnn_layer_sizes", "128", "128", "--nb_previous_dirs", "2",
          "--normalize_prev_dirs", "--neighborhood_type", "axes", "--neighborhood_radius", "1",
          "--neighborhood_resolution", "1", "--input_embedding_key", "nn_embedding", "--input_embedded_size", "64",
          # EOS weight 1: the only one dwi_ml accepts with a classification head (trackflow's default is 10)
          "--dg_key", "sphere-classification", "--add_eos", "--eos_weight", "1", "--reverse_ratio", "0.5",
          "--noise_gaussian_size_forward", "0.1", "--batch_size_training", "100", "--learning_rate", "0.001"]
TOOLS = ("dwi_ml", "trackflow")


def train(bin_dir: Path, tool: str, work: Path, hdf5: Path, rng: int, epochs: int, batches: int,
          valid_batches: int) -> dict:
    """Train one model (reused when its logs show it finished); return its per-epoch losses, best epoch and
    wall time."""
    experiments = work / "training_experiments"
    name = f"{tool}_rng{rng}_{epochs}x{batches}"
    experiment = experiments / name
    summary = experiments / f"{name}.json"
    if summary.exists():
        return json.loads(summary.read_text())
    shutil.rmtree(experiment, ignore_errors=True)
    experiments.mkdir(parents=True, exist_ok=True)
    command = [bin_dir / "l2t_train_model", experiments, name, hdf5, "input", "streamlines", *RECIPE,
               "--max_epochs", str(epochs), "--max_batches_per_epoch_training", str(batches),
               "--max_batches_per_epoch_validation", str(valid_batches), "--rng", str(rng)]
    print(f"  {tool:<9} --rng {rng}: training ...", flush=True)
    # One thread each: the same for both, and no OpenMP threads spinning for each other on a busy machine.
    wall, _ = run_measured(command, experiments / f"{name}.log", threads="1")
    logs = experiment / "logs"
    best = json.loads((experiment / "best_epoch_losses.json").read_text())
    result = {"train": np.load(logs / "train_loss_monitor_per_epoch.npy").tolist(),
              "valid": np.load(logs / "valid_local_loss_monitor_per_epoch.npy").tolist(),
              "best_valid": best.get("valid_loss"), "wall_s": wall}
    summary.write_text(json.dumps(result))
    return result


def mean_sd(values: list) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():7.3f} +- {values.std():5.3f}" if len(values) > 1 else f"{values[0]:7.3f}         "


def print_comparison(runs: dict, seeds: list) -> None:
    epochs = len(runs[TOOLS[0]][seeds[0]]["train"])
    print(f"\nper-epoch losses, mean +- sd over --rng {seeds}:")
    print(f"{'epoch':>5}  {'dwi_ml train':>17}  {'trackflow train':>17}  {'dwi_ml valid':>17}  "
          f"{'trackflow valid':>17}")
    for e in range(epochs):
        cells = [mean_sd([runs[tool][s][part][e] for s in seeds]) for part in ("train", "valid") for tool in TOOLS]
        print(f"{e + 1:>5}  " + "  ".join(cells))
    print("\nper run: best validation loss, wall s")
    for tool in TOOLS:
        for s in seeds:
            run = runs[tool][s]
            best_epoch = int(np.nanargmin(run["valid"])) + 1
            print(f"  {tool:<9} --rng {s}: best {min(run['valid']):.3f} at epoch {best_epoch}, "
                  f"{run['wall_s']:.0f} s")


def parse_args():
    p = baseline_parser(__doc__.split("\n\n")[0])
    p.add_argument("--rng", type=int, nargs="+", default=[1, 2, 3], help="Training seeds. [%(default)s]")
    p.add_argument("--epochs", type=int, default=30, help="[%(default)s]")
    p.add_argument("--batches", type=int, default=20, help="Training batches per epoch. [%(default)s]")
    p.add_argument("--valid_batches", type=int, default=5, help="Validation batches per epoch. [%(default)s]")
    p.add_argument("--quick", action="store_true", help="Smoke run: one seed, 2 epochs of 3 batches.")
    args = p.parse_args()
    if args.quick:
        args.rng, args.epochs, args.batches, args.valid_batches = [1], 2, 3, 1
    return args


def main():
    args = parse_args()
    bins = {"dwi_ml": args.dwi_ml_env / "bin", "trackflow": Path(sys.executable).parent}
    if not (bins["dwi_ml"] / "l2t_train_model").exists():
        raise SystemExit(f"no dwi_ml in {args.dwi_ml_env}: run benchmarks/dwi_ml/setup.sh first")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        hdf5 = prepare_demo(work)
        print(f"training {len(args.rng)} seed(s) x {TOOLS} ({args.epochs} epochs of {args.batches} batches)",
              flush=True)
        runs = {tool: {s: train(bins[tool], tool, work, hdf5, s, args.epochs, args.batches, args.valid_batches)
                       for s in args.rng} for tool in TOOLS}
        print_comparison(runs, args.rng)


if __name__ == "__main__":
    main()
