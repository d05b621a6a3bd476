"""Tracking speed against dwi_ml and MRtrix3, side by side in one run, on the same weights (issue 14 targets).

1. The demo cohort and its hdf5 are made with trackflow's own demo tools in the work folder.
2. dwi_ml's own trainers (its CLIs, from the separate virtualenv ``--dwi_ml_env`` that
   ``benchmarks/dwi_ml/setup.sh`` installs) train its peer models on that hdf5 for a few epochs: a GRU 2x64
   Learn2track (cosine regression + EOS) and a tiny TTO (d 32, 4 heads, 2+2 layers, cosine + EOS). Only the
   speed is measured here; the weights just need to be sane (their last losses are printed).
3. Both tools track the test subject with THE SAME dwi_ml-trained weights (trackflow reads dwi_ml experiment
   folders): det, ``--nt`` interface seeds, WM mask, ``--discard_last_point``, ``--eos_stop 0.5``, lengths
   10-200 mm, the model's training step, ``--rng_seed 0`` (each tool draws its own positions from the same
   mask and count). dwi_ml at ``--simultaneous_tracking`` 500 (its documented value) and 5000, trackflow at
   its default slots and ``--processes``. Whole process (start-up included), ``OMP_NUM_THREADS=2``; peak RSS
   is the largest resident set of the process or any of its children (``/usr/bin/time``'s figure).
4. At ``--mrtrix_seeds`` (100,000) seeds and a 0.5 mm step: trackflow's l2t beside MRtrix3's ``tckgen
   -algorithm SD_Stream -nthreads 2`` (the fODF converted to tournier07 with ``scil_sh_convert``; same seeding
   and WM masks, step, angle and lengths).
5. The achieved GFLOP/s of trackflow's l2t tracking (a library run of the same tracking: analytic matrix
   FLOPs per model step x steps taken / tracking time) beside a plain ``torch.mm`` on the same 2 threads.

    python benchmarks/vs_dwi_ml.py --quick                       # smoke run (500 seeds, 1 epoch)
    python benchmarks/vs_dwi_ml.py --seeds 5000 --mrtrix_seeds 0 --work /tmp/vs_dwi_ml
    python benchmarks/vs_dwi_ml.py                               # 5,000 and 50,000 seeds, then 100,000

``--work DIR`` keeps the demo, the trained experiments and the tractograms, and reuses them on the next run.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from trackflow.data.demo import make_demo_cohort
from trackflow.data.hdf5.creation import create_hdf5_dataset
from trackflow.data.streamlines import euclidean_lengths
from trackflow.models.l2t import Learn2TrackModel
from trackflow.models.persistence import load_experiment_model
from trackflow.models.transformers import OriginalTransformerModel
from trackflow.tracking.parallel import track_in_processes
from trackflow.tracking.run import TrackingOptions, build_tracker, process_count, read_subject_inputs
from trackflow.tracking.tracker import StopReason

THREADS = "2"
GNU_TIME = "/usr/bin/time"
SUBJECT = "sub-04"  # the demo's testing subject
DEMO_SH_BASIS = "descoteaux07"  # the demo's fODF basis (its README.txt)
TRAINING_STEP_MM = 1.0
# A large learning rate: the peers get only a few dozen optimiser steps, and at 0.001 their EOS output is
# still near 0.5 after them, so that tracking would stop at once (speed is measured, not quality).
COMMON_TRAINING = ["--step_size", str(TRAINING_STEP_MM), "--batch_size_training", "100",
                   "--batch_size_validation", "100", "--dg_key", "cosine-regression", "--add_eos",
                   "--learning_rate", "0.01", "--rng", "1234"]
PEERS = {
    "l2t": ["--rnn_key", "gru", "--rnn_layer_sizes", "64", "64", "--input_embedding_key", "no_embedding"],
    "tt": ["--model", "TTO", "--input_embedding_key", "nn_embedding", "--input_embedded_size", "32",
           "--nheads", "4", "--n_layers_e", "2", "--n_layers_d", "2", "--dropout_rate", "0.1", "--max_len", "1000"],
}
DWI_ML_IN_FLIGHT = (500, 5000)
# trackflow's slots per process when none is given (each model's default_tracking_slots)
DEFAULT_SLOTS = {"l2t": Learn2TrackModel.default_tracking_slots, "tt": OriginalTransformerModel.default_tracking_slots}
# (seeds, small and large slot counts, one process) of the memory-per-slot measurement: every slot is filled
SLOT_MEMORY_RUNS = {"l2t": (20000, 1000, 20000), "tt": (5000, 1000, 5000)}


@dataclass
class Run:
    tool: str
    model: str
    seeds: int
    step_mm: float
    in_flight: str
    wall_s: float
    kept: int
    mean_length_mm: float
    peak_rss_mb: float

    @property
    def seeds_per_s(self) -> float:
        return self.seeds / self.wall_s


def thread_env(threads: str = THREADS) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env.pop("PYTHONPATH", None)  # each tool runs from its own virtualenv only
    return env


def run_measured(command: list, log: Path, threads: str = THREADS) -> tuple:
    """Run ``command`` (output to ``log``) with ``threads`` OpenMP threads; return (wall seconds, peak RSS in
    MB of it or of its largest child).

    The peak RSS comes from ``/usr/bin/time`` (GNU time), not from this process's own ``wait4``: a child forked
    from this process counts the parent's resident pages (torch: ~700 MB) in its ``ru_maxrss`` before its
    exec, whatever it runs (measured: tckgen read as 696 MB)."""
    if not Path(GNU_TIME).exists():
        raise SystemExit(f"{GNU_TIME} not found (Debian package 'time'): it measures the peak RSS")
    rss_file = log.with_suffix(".rss")
    with open(log, "w") as out:
        started = time.perf_counter()
        process = subprocess.run([GNU_TIME, "-f", "%M", "-o", rss_file, *map(str, command)], stdout=out,
                                 stderr=subprocess.STDOUT, env=thread_env(threads))
        wall = time.perf_counter() - started
    if process.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"failed (exit {process.returncode}): {' '.join(map(str, command))}\n  "
                         + "\n  ".join(tail))
    return wall, int(rss_file.read_text().split()[-1]) / 1024  # kB


def tractogram_stats(path: Path) -> tuple:
    """(streamline count, mean length in mm) of a .trk/.tck (dwi_ml writes no file when nothing is kept)."""
    if not path.exists():
        return 0, 0.0
    streamlines = nib.streamlines.load(str(path)).streamlines  # RASMM
    lengths = euclidean_lengths(streamlines)
    return len(lengths), float(lengths.mean()) if len(lengths) else 0.0


# ------------------------------------------------------------------------------------------- preparation

def prepare_demo(work: Path) -> Path:
    """The demo cohort and its hdf5 (trackflow's demo tools), reused when present."""
    demo, hdf5 = work / "demo", work / "demo.hdf5"
    if not hdf5.exists():
        print("making the demo cohort and its hdf5 ...", flush=True)
        if not (demo / "config").is_dir():
            make_demo_cohort(demo, force=True)
        config = demo / "config"
        create_hdf5_dataset(demo / "dwi_ml_ready", hdf5, config / "hdf5_config.json",
                            config / "training_subjs.txt", config / "validation_subjs.txt",
                            config / "testing_subjs.txt", overwrite=True)
    return hdf5


def train_peer(dwi_ml_bin: Path, work: Path, hdf5: Path, kind: str, epochs: int, batches: int) -> Path:
    """A dwi_ml experiment trained by dwi_ml's own trainer (reused when its best model exists)."""
    experiments = work / "experiments"
    experiment = experiments / f"{kind}_peer_{epochs}x{batches}"
    if (experiment / "best_model" / "model_state.pkl").exists():
        print(f"reusing dwi_ml's {kind} experiment {experiment}", flush=True)
        return experiment
    shutil.rmtree(experiment, ignore_errors=True)  # an interrupted training: dwi_ml refuses an existing folder
    experiments.mkdir(parents=True, exist_ok=True)
    command = [dwi_ml_bin / f"{kind}_train_model", experiments, experiment.name, hdf5, "input", "streamlines",
               *COMMON_TRAINING, *PEERS[kind], "--max_epochs", str(epochs),
               "--max_batches_per_epoch_training", str(batches),
               "--max_batches_per_epoch_validation", str(max(1, batches // 5))]
    print(f"training dwi_ml's {kind} peer ({epochs} epochs of {batches} batches) ...", flush=True)
    # One thread: training is not measured, and on a busy machine two spinning OpenMP threads wait for
    # each other.
    wall, _ = run_measured(command, work / f"{experiment.name}.log", threads="1")
    train = np.load(experiment / "logs" / "train_loss_monitor_per_epoch.npy")
    valid = np.load(experiment / "logs" / "valid_local_loss_monitor_per_epoch.npy")
    print(f"  {wall:.0f} s; losses per epoch: training {np.round(train, 3).tolist()}, "
          f"validation {np.round(valid, 3).tolist()}", flush=True)
    return experiment


def tournier_fodf(work: Path, scil_sh_convert: str) -> Path:
    """The test subject's fODF in MRtrix's basis."""
    out = work / f"{SUBJECT}__fodf_tournier07.nii.gz"
    if not out.exists():
        fodf = work / "demo" / "dwi_ml_ready" / SUBJECT / "dwi" / f"{SUBJECT}__fodf.nii.gz"
        subprocess.run([scil_sh_convert, str(fodf), str(out), DEMO_SH_BASIS, "tournier07", "-f"], check=True,
                       env=thread_env(), stdout=subprocess.DEVNULL)
    return out


# ----------------------------------------------------------------------------------------------- tracking

def tracking_options(seeds: int, step_mm: float | None) -> list:
    step = [] if step_mm is None else ["--step_size", str(step_mm)]
    return ["--subset", "testing", "--algo", "det", "--min_length", "10", "--max_length", "200",
            "--discard_last_point", "--tracking_mask_group", "wm_mask", "--eos_stop", "0.5", "--rng_seed", "0",
            "--nt", str(seeds), *step, "-f"]


def track(tool: str, bin_dir: Path, kind: str, experiment: Path, hdf5: Path, work: Path, seeds: int,
          step_mm: float | None = None, in_flight: int | None = None, processes: int | None = None) -> Run:
    slots = [] if in_flight is None else ["--simultaneous_tracking", str(in_flight)]
    slots += [] if processes is None else ["--processes", str(processes)]
    n_processes = processes or process_count(TrackingOptions(), torch.device("cpu"))
    label = (f"{in_flight}" if in_flight is not None and tool != "trackflow"
             else f"{in_flight or DEFAULT_SLOTS[kind]} x {n_processes}p")
    name = f"{tool}_{kind}_{seeds}_{in_flight or 'default'}_{processes or 'default'}_{step_mm or 'model'}"
    out = work / "tractograms" / f"{name}.trk"
    out.parent.mkdir(exist_ok=True)
    out.unlink(missing_ok=True)
    command = [bin_dir / f"{kind}_track_from_model", experiment, SUBJECT, "input", out, "interface_mask",
               "--hdf5_file", hdf5, *tracking_options(seeds, step_mm), *slots]
    wall, rss = run_measured(command, work / "tractograms" / f"{name}.log")
    kept, mean_length = tractogram_stats(out)
    run = Run(tool, kind, seeds, step_mm or TRAINING_STEP_MM, label, wall, kept, mean_length, rss)
    print(f"  {tool:<9} {kind:<3} {seeds:>7} seeds, {label:>10} in flight: {wall:7.2f} s", flush=True)
    return run


def track_mrtrix(work: Path, fodf: Path, seeds: int, step_mm: float) -> Run:
    subject = work / "demo" / "dwi_ml_ready" / SUBJECT
    out = work / "tractograms" / f"mrtrix_sd_stream_{seeds}.tck"
    out.parent.mkdir(exist_ok=True)
    # Without -select, tckgen stops after -seeds attempts: the same seed count as the learned trackers;
    # -angle 90 is their default theta. tckgen has no --discard_last_point or EOS (its FOD cutoff stops).
    command = ["tckgen", fodf, out, "-algorithm", "SD_Stream", "-seed_image",
               subject / "other_masks" / f"{SUBJECT}__interface.nii.gz", "-seeds", str(seeds),
               "-mask", subject / "masks" / f"{SUBJECT}__mask_wm.nii.gz", "-step", str(step_mm), "-angle", "90",
               "-minlength", "10", "-maxlength", "200", "-nthreads", THREADS, "-force", "-quiet"]
    wall, rss = run_measured(command, work / "tractograms" / f"mrtrix_sd_stream_{seeds}.log")
    kept, mean_length = tractogram_stats(out)
    print(f"  {'tckgen':<9} {'SD_Stream':<9} {seeds:>7} seeds: {wall:7.2f} s", flush=True)
    return Run("MRtrix3", "SD_Stream", seeds, step_mm, f"{THREADS} threads", wall, kept, mean_length, rss)


# ------------------------------------------------------------------------------------------ arithmetic rate

def matrix_flops_per_step(model) -> int:
    """Multiply-adds of one l2t tracking step, x2: every 2-D weight (input embedding, each GRU layer's input and
    recurrent matrices, the head's linear layers) is used once per step; biases, gates and interpolation are
    left out (a few per cent)."""
    return sum(2 * p.numel() for p in model.parameters() if p.dim() == 2)


def steps_taken(result, discard_last_point: bool) -> int:
    """Model steps whose proposal was decided: every appended point, plus each end refused after a step (an
    angle, EOS or no-direction stop; with ``discard_last_point`` also the refused point outside the mask)."""
    refused = [StopReason.ANGLE, StopReason.EOS, StopReason.NO_DIRECTION]
    if discard_last_point:
        refused += [StopReason.MASK, StopReason.VOLUME]
    appended = int((result.lengths - 1).sum())
    return appended + int(np.isin(result.end_reasons, [int(r) for r in refused]).sum())


def library_tracking_rate(experiment: Path, hdf5: Path, seeds: int, step_mm: float) -> tuple:
    """(GFLOP/s, seconds, steps, FLOP per step) of trackflow's tracking, timed around the tracking call only,
    with the CLI's defaults (slots, processes)."""
    options = TrackingOptions(hdf5_file=hdf5, step_size=step_mm, min_length=10, max_length=200,
                              tracking_mask_group="wm_mask", eos_stop=0.5, discard_last_point=True, nt=seeds,
                              rng_seed=0)
    cpu = torch.device("cpu")
    model = load_experiment_model(experiment, device=cpu)
    inputs = read_subject_inputs(Path(hdf5), SUBJECT, "input", "interface_mask", options, model.nb_features)
    tracker = build_tracker(model, inputs, options, step_mm, options.rng_seed, cpu)
    started = time.perf_counter()
    result = track_in_processes(tracker, 0, seeds, process_count(options, cpu))
    seconds = time.perf_counter() - started
    steps, flops = steps_taken(result, options.discard_last_point), matrix_flops_per_step(model)
    return steps * flops / seconds / 1e9, seconds, steps, flops


def matmul_peak_gflops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """Best rate of a plain float32 ``torch.mm`` of n x n matrices on ``threads`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - started)
        return 2 * n ** 3 / best / 1e9
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------ report

def slot_memory(bin_dir: Path, experiments: dict, hdf5: Path, work: Path, quick: bool) -> list:
    """Peak RSS per 10^5 slots of trackflow, per model: one process at a small and a large slot count, both
    filled (``SLOT_MEMORY_RUNS``); the difference over the extra slots. Returns (model, small run, large run,
    MB per 10^5 slots)."""
    out = []
    for kind, (seeds, small, large) in SLOT_MEMORY_RUNS.items():
        if quick:
            seeds, small, large = 1000, 100, 1000
        runs = [track("trackflow", bin_dir, kind, experiments[kind], hdf5, work, seeds, in_flight=slots,
                      processes=1) for slots in (small, large)]
        out.append((kind, *runs, (runs[1].peak_rss_mb - runs[0].peak_rss_mb) / (large - small) * 1e5))
    return out


def print_slot_memory(measured: list, runs: list) -> None:
    print("\nmemory (trackflow, one process, every slot filled):")
    for kind, small, large, per_slots in measured:
        print(f"  {kind:<3} peak RSS {small.peak_rss_mb:.0f} MB with {small.in_flight} slots x processes, "
              f"{large.peak_rss_mb:.0f} MB with {large.in_flight}: {per_slots:.0f} MB per 10^5 slots")
    for kind in PEERS:
        ours = sorted((r for r in runs if r.tool == "trackflow" and r.model == kind and r.in_flight.endswith("p")
                       and r.step_mm == TRAINING_STEP_MM), key=lambda r: r.seeds)
        if len(ours) > 1:
            print(f"  {kind:<3} at the default slots: peak RSS " + ", ".join(
                f"{r.peak_rss_mb:.0f} MB at {r.seeds} seeds" for r in ours)
                + f" ({ours[-1].peak_rss_mb / ours[0].peak_rss_mb:.2f}x for {ours[-1].seeds / ours[0].seeds:.0f}x "
                  "the seeds)")


def print_table(runs: list) -> None:
    print(f"\n{'tool':<10} {'model':<9} {'seeds':>7} {'step mm':>7} {'in flight':>10} {'wall s':>8} "
          f"{'seeds/s':>8} {'kept':>7} {'mean mm':>8} {'peak RSS MB':>11}")
    for r in runs:
        print(f"{r.tool:<10} {r.model:<9} {r.seeds:>7} {r.step_mm:>7g} {r.in_flight:>10} {r.wall_s:8.2f} "
              f"{r.seeds_per_s:8.0f} {r.kept:>7} {r.mean_length_mm:8.1f} {r.peak_rss_mb:11.0f}")


def print_ratios(runs: list) -> None:
    print("\nratios (seeds/s, whole process):")
    for ours in (r for r in runs if r.tool == "trackflow"):
        for peer in runs:
            same_run = (peer.seeds, peer.step_mm) == (ours.seeds, ours.step_mm)
            if same_run and peer.model == ours.model and peer.tool == "dwi_ml":
                print(f"  trackflow / dwi_ml  {ours.model:<3} {ours.seeds:>7} seeds, dwi_ml at {peer.in_flight:>5} "
                      f"in flight: {ours.seeds_per_s / peer.seeds_per_s:5.1f}x")
            if same_run and peer.tool == "MRtrix3":
                print(f"  trackflow {ours.model} vs MRtrix3 SD_Stream, {ours.seeds} seeds: wall "
                      f"{ours.wall_s:.2f} s against {peer.wall_s:.2f} s ({ours.wall_s / peer.wall_s:.1f}x slower)")


# -------------------------------------------------------------------------------------------------- main

def baseline_parser(description: str) -> argparse.ArgumentParser:
    """The options every dwi_ml comparison takes: dwi_ml's virtualenv and the work folder."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    p.add_argument("--dwi_ml_env", type=Path, default=Path(os.environ.get("DWI_ML_ENV", "/work/dwi_ml_env")),
                   help="dwi_ml's virtualenv (benchmarks/dwi_ml/setup.sh). [%(default)s]")
    p.add_argument("--work", type=Path, help="Work folder, kept and reused [a temporary folder].")
    return p


def parse_args():
    p = baseline_parser(__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[5000, 50000],
                   help="Seed counts of the dwi_ml comparison. [%(default)s]")
    p.add_argument("--mrtrix_seeds", type=int, default=100000,
                   help="Seed count of the MRtrix3 comparison and the GFLOP/s figure (0: skip). [%(default)s]")
    p.add_argument("--mrtrix_step", type=float, default=0.5, help="Step (mm) of that comparison. [%(default)s]")
    p.add_argument("--epochs", type=int, default=3, help="dwi_ml training epochs. [%(default)s]")
    p.add_argument("--batches", type=int, default=10, help="Training batches (of 100) per epoch. [%(default)s]")
    p.add_argument("--quick", action="store_true",
                   help="Smoke run: 500 seeds, MRtrix at 2,000, 1 epoch of 5 batches.")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.mrtrix_seeds, args.epochs, args.batches = [500], 2000, 1, 5
    return args


def main():
    args = parse_args()
    dwi_ml_bin = args.dwi_ml_env / "bin"
    ours_bin = Path(sys.executable).parent
    if not (dwi_ml_bin / "l2t_track_from_model").exists():
        raise SystemExit(f"no dwi_ml in {args.dwi_ml_env}: run benchmarks/dwi_ml/setup.sh first")
    search_path = f"{ours_bin}{os.pathsep}{os.environ.get('PATH', '')}{os.pathsep}{dwi_ml_bin}"
    scil_sh_convert = shutil.which("scil_sh_convert", path=search_path)
    mrtrix = args.mrtrix_seeds > 0 and shutil.which("tckgen") is not None and scil_sh_convert is not None
    if args.mrtrix_seeds > 0 and not mrtrix:
        print("tckgen or scil_sh_convert not found: the MRtrix3 comparison is skipped", flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        hdf5 = prepare_demo(work)
        experiments = {kind: train_peer(dwi_ml_bin, work, hdf5, kind, args.epochs, args.batches)
                       for kind in PEERS}
        # Untimed warm-up of both tools (disk cache of their imports), so that neither pays it in the table.
        for tool_bin in (dwi_ml_bin, ours_bin):
            track("warm-up", tool_bin, "l2t", experiments["l2t"], hdf5, work, 20, in_flight=20)

        print("\ntracking (same weights, det, WM mask, --discard_last_point, --eos_stop 0.5, 10-200 mm):")
        runs = []
        for kind in PEERS:
            for seeds in args.seeds:
                for in_flight in sorted({min(s, seeds) for s in DWI_ML_IN_FLIGHT}):
                    runs.append(track("dwi_ml", dwi_ml_bin, kind, experiments[kind], hdf5, work, seeds,
                                      in_flight=in_flight))
                runs.append(track("trackflow", ours_bin, kind, experiments[kind], hdf5, work, seeds))
        if mrtrix:
            fodf = tournier_fodf(work, scil_sh_convert)
            runs.append(track("trackflow", ours_bin, "l2t", experiments["l2t"], hdf5, work, args.mrtrix_seeds,
                              step_mm=args.mrtrix_step))
            runs.append(track_mrtrix(work, fodf, args.mrtrix_seeds, args.mrtrix_step))
        memory = slot_memory(ours_bin, experiments, hdf5, work, args.quick)
        print_table(runs)
        print_ratios(runs)
        print_slot_memory(memory, runs)

        rate_seeds = args.mrtrix_seeds or max(args.seeds)
        rate_step = args.mrtrix_step if args.mrtrix_seeds else TRAINING_STEP_MM
        gflops, seconds, steps, flops = library_tracking_rate(experiments["l2t"], hdf5, rate_seeds, rate_step)
        peak = matmul_peak_gflops(int(THREADS))
        print(f"\narithmetic rate, trackflow l2t tracking ({rate_seeds} seeds, {rate_step} mm step, library run, "
              f"tracking only): {steps} steps x {flops / 1e3:.1f} kFLOP in {seconds:.2f} s = {gflops:.1f} GFLOP/s; "
              f"plain torch.mm on {THREADS} threads: {peak:.0f} GFLOP/s; {100 * gflops / peak:.1f}% of it")


if __name__ == "__main__":
    main()
