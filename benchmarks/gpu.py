"""GPU tracking: 10^6 seeds x up to 200 steps with a GRU 2x1024 Learn2track and a TractoTransformer TTS,
seeds/s, points/s and peak memory per 10^5 slots, and checks that what the GPU tracked is valid.

On a GPU machine, unattended, one call (under 5 minutes, nothing downloaded; JSON where you want it):

    python benchmarks/gpu.py --device cuda --compare_cpu 1000 --json gpu.json

Everything is built in-process with fixed seeds:
- subject: the demo subject of ``benchmarks/tracking.py`` (``trackflow.data.demo`` default shape, 1.5 mm voxels;
  input T1 + FA + fODF SH order 6 = 30 features), or a subject of an existing cohort (``--hdf5 FILE --subject ID``,
  groups ``input``, ``interface_mask``, ``wm_mask``), read as the tracking CLIs read it;
- models: RANDOM-INITIALISED WEIGHTS (no training: figures of speed, not of quality), both with an axes
  neighbourhood of radius 1 (7 x 30 inputs) and a sphere-classification head with EOS: l2t is the demo recipe of
  ``benchmarks/tracking.py`` with 2 x ``--l2t_size`` GRU layers; TTS has d_model ``--tt_d_model``, ``--tt_heads``
  heads, ``--tt_layers`` layers and dwi_ml's other defaults (feed-forward d_model / 2, sinusoidal positions);
- tracking: the CLIs' library path (``tracking.run.build_tracker`` + ``tracking.parallel.track_in_processes``), det,
  0.5 mm steps, at most ``--max_steps`` steps (both halves), seeds in the interface mask, ``--discard_last_point``,
  theta 180 and no EOS stop (random heads turn at random). Only the volume bounds stop a streamline unless
  ``--wm_mask``: random weights do not follow the bundles, so the WM mask ends them after ~14 mm on average,
  where trained models run tens of mm; without it they run 65-100 of the 100 mm (measured at small sizes).

Per model it prints (and writes with ``--json``): seeds, slots, wall s of tracking, seeds/s, points/s (points of
the tracked streamlines per second), mean points per streamline, streamlines kept (``--min_length`` .. max mm),
peak memory (CUDA: ``torch.cuda.max_memory_allocated`` of the model's run; CPU: peak RSS of this process or of a
tracking worker, whole run so far) and that per 10^5 slots. Checks, exit status 1 when one fails: every seed has
its streamline, points finite and inside the volume, consecutive points one step apart, lengths at most the
maximum, kept lengths within the bounds, at least one streamline kept.

``--compare_cpu N``: seeds 0..N-1 are also tracked on the CPU, as the CLI tracks there (forked processes on all
cores, 1,000 slots), before any GPU work (workers forked from a process using CUDA are not safe); reports the CPU
seeds/s, the device / CPU ratio, the share of streamlines identical within 1e-4 mm, the share of the same
length and the largest distance between the points of same-length streamlines.

Time guard: ``--budget_s`` for the whole process (imports and subject included). Each model gets an equal part of
what is left; after a warm-up (``WARMUP_SEEDS``), its first ``--probe_seeds`` seeds are timed with their checks,
and when the whole count projects over the model's part the remaining seeds are cut to fit (printed, and
``scaled_down`` in the JSON). Slots: ``--slots``, capped on CUDA so that the tracking state (the TTS key/value
caches hold 2 x layers x max points x d_model floats per slot) takes at most ``--memory_fraction`` of free memory.

Small sizes run on the CPU (tests/test_benchmarks.py):
    python benchmarks/gpu.py --device cpu --seeds 200 --max_steps 30 --slots 50 --l2t_size 16 \\
        --tt_d_model 16 --tt_heads 2 --tt_layers 1 --probe_seeds 100 --compare_cpu 50
"""

import time

STARTED = time.perf_counter()  # the time guard counts the imports too

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tracking import demo_subject, l2t_model  # noqa: E402  (benchmarks/tracking.py: sys.path[0] is benchmarks/)
from trackflow.data.hdf5.reader import HDF5Cohort  # noqa: E402
from trackflow.data.streamlines import gather_ragged, offsets_from_lengths  # noqa: E402
from trackflow.files import atomic_output  # noqa: E402
from trackflow.models.transformers import TransformerSrcOnlyModel  # noqa: E402
from trackflow.tracking.filtering import ROUNDING_MM, filter_streamlines  # noqa: E402
from trackflow.tracking.parallel import available_cpus, track_in_processes  # noqa: E402
from trackflow.tracking.run import (SubjectInputs, TrackingOptions, build_tracker, max_points_for,  # noqa: E402
                                    process_count, read_subject_inputs)
from trackflow.tracking.tracker import SlotState, StopReason  # noqa: E402

MODELS = ("l2t", "tts")
STEP_MM = 0.5  # the demo recipe's step
RNG_SEED = 0
WARMUP_SEEDS = 1000  # CUDA only: first calls (kernels, cuBLAS handles, allocator) before the timed seeds
STEP_TOLERANCE = 1e-3  # relative, on the distance between consecutive float32 points
IDENTICAL_MM = 1e-4
GUARD_MARGIN = 0.9  # share of a model's remaining time the projected seeds may fill


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak since the last reset; CPU: the largest RSS of this process or of a finished
    worker (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return 1024 * max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


# ---------------------------------------------------------------------------------------------- inputs

def subject_inputs(args, work: Path) -> SubjectInputs:
    """The subject to track, as ``tracking.run`` holds it (the WM mask only with ``--wm_mask``)."""
    if args.hdf5 is not None:
        options = TrackingOptions(tracking_mask_group="wm_mask" if args.wm_mask else None)
        with HDF5Cohort(args.hdf5) as cohort:
            nb_features = cohort.volume_groups()["input"]
        return read_subject_inputs(args.hdf5, args.subject, "input", "interface_mask", options, nb_features)
    volume, wm, interface = demo_subject(work)
    return SubjectInputs(volume, interface, wm if args.wm_mask else None, None, float(volume.voxres[0]))


def build_models(args, nb_features: int, max_points: int) -> dict:
    """name -> (random-weight model on the CPU, description), seeded."""
    models = {}
    if "l2t" in args.models:
        models["l2t"] = (l2t_model(nb_features, (args.l2t_size, args.l2t_size)),
                         f"GRU 2x{args.l2t_size}, 2 prev. dirs")
    if "tts" in args.models:
        torch.manual_seed(0)
        tts = TransformerSrcOnlyModel(
            nb_features=nb_features, step_size=STEP_MM, max_len=max(1000, max_points), n_layers_e=args.tt_layers,
            nheads=args.tt_heads, dropout_rate=0.0, input_embedding_key="nn_embedding",
            input_embedded_size=args.tt_d_model, neighborhood_type="axes", neighborhood_radius=1,
            neighborhood_resolution=1.0, dg_key="sphere-classification", dg_args={"add_eos": True}).eval()
        models["tts"] = (tts, f"TTS d{args.tt_d_model} x{args.tt_heads} heads x{args.tt_layers} layers")
    return models


def tracking_options(args, n_slots: int | None) -> TrackingOptions:
    # eos_stop 1: the EOS probability is never above it (random heads would stop anywhere)
    return TrackingOptions(algo="det", theta=180.0, eos_stop=1.0, discard_last_point=True,
                           min_length=args.min_length, max_length=args.max_steps * STEP_MM,
                           tracking_mask_group="wm_mask" if args.wm_mask else None,
                           simultaneous_tracking=n_slots, rng_seed=RNG_SEED)


def fitting_slots(model, inputs: SubjectInputs, max_points: int, args, device) -> tuple:
    """(slots, capped): ``--slots``, or on CUDA fewer when their tracking state would take more than
    ``--memory_fraction`` of the free memory (measured on 1,024 slots: model state + tracker state)."""
    if device.type != "cuda":
        return args.slots, False
    volume = torch.as_tensor(inputs.volume.data, device=device)
    before = torch.cuda.memory_allocated(device)
    held = (model.new_tracking_state(volume, 1024, max_points), SlotState.allocate(1024, max_points, device))
    per_slot = (torch.cuda.memory_allocated(device) - before) / 1024
    del held, volume
    torch.cuda.empty_cache()  # what the allocator keeps is not free for mem_get_info
    free, _ = torch.cuda.mem_get_info(device)
    fitting = max(1, int(args.memory_fraction * free / per_slot))
    return min(args.slots, fitting), fitting < args.slots


# ---------------------------------------------------------------------------------------------- checks

def check_result(result, start: int, end: int, inputs: SubjectInputs, max_points: int, args) -> tuple:
    """(problems, kept): what is wrong with the streamlines of seeds start..end-1 (empty list: valid) and how
    many streamlines the length filter keeps."""
    problems = []
    if not np.array_equal(result.seed_indices, np.arange(start, end)):
        problems.append(f"seeds {start}..{end - 1}: {len(result.seed_indices)} streamlines, not one per seed")
    points, lengths = result.points, result.lengths
    if not np.isfinite(points).all():
        problems.append(f"seeds {start}..{end - 1}: non-finite points")
    shape = np.array(inputs.volume.data.shape[:3])
    if not ((points >= 0) & (points < shape)).all():
        problems.append(f"seeds {start}..{end - 1}: points outside the volume")
    if not ((lengths >= 1) & (lengths <= max_points)).all():
        problems.append(f"seeds {start}..{end - 1}: lengths outside 1..{max_points} points")
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    within = np.ones(len(steps), bool)
    within[(np.cumsum(lengths) - 1)[:-1]] = False  # from a streamline's last point to the next one's first
    step_vox = STEP_MM / inputs.voxel_mm
    n_off = int((np.abs(steps[within] - step_vox) > STEP_TOLERANCE * step_vox).sum())
    if n_off:
        problems.append(f"seeds {start}..{end - 1}: {n_off} consecutive points not one step apart")
    kept = filter_streamlines(result, inputs.voxel_mm, args.min_length, args.max_steps * STEP_MM)
    if len(kept.lengths_mm) and not (kept.lengths_mm.min() >= args.min_length - ROUNDING_MM
                                     and kept.lengths_mm.max() <= args.max_steps * STEP_MM + ROUNDING_MM):
        problems.append(f"seeds {start}..{end - 1}: kept lengths outside {args.min_length}.."
                        f"{args.max_steps * STEP_MM} mm")
    return problems, len(kept.lengths_mm)


def agreement(result, reference, voxel_mm: float) -> dict:
    """How the first seeds of ``result`` compare with ``reference`` (the same seeds tracked on the CPU)."""
    n = len(reference.lengths)
    lengths = result.lengths[:n]
    same = np.flatnonzero(lengths == reference.lengths)
    mine = result.points[gather_ragged(offsets_from_lengths(lengths), lengths, same)]
    theirs = reference.points[gather_ragged(reference.offsets, reference.lengths, same)]
    distances = np.linalg.norm(mine.astype(np.float64) - theirs, axis=1) * voxel_mm
    worst = (np.maximum.reduceat(distances, offsets_from_lengths(lengths[same])) if len(same)
             else np.zeros(0))
    return {"seeds": n, "identical_share": float((worst <= IDENTICAL_MM).sum() / n),
            "same_length_share": len(same) / n,
            "max_point_distance_mm": float(worst.max()) if len(same) else None}


# ---------------------------------------------------------------------------------------------- runs

def track_timed(make_tracker, start: int, end: int, device, processes: int) -> tuple:
    """Track seeds start..end-1 with a new tracker, as a CLI run does. A tracker reused for a second range
    would allocate its new state while still holding the previous one: twice the memory."""
    tracker = make_tracker()
    synchronize(device)
    started = time.perf_counter()
    result = track_in_processes(tracker, start, end, processes)
    synchronize(device)
    return result, time.perf_counter() - started


def cpu_reference(model, inputs: SubjectInputs, args) -> dict:
    """Seeds 0..N-1 tracked as the CLI tracks on the CPU; returns the result and its figures."""
    cpu = torch.device("cpu")
    options = tracking_options(args, None)  # the CLI's default slots (the model's)
    processes = process_count(options, cpu)
    n_seeds = min(args.compare_cpu, args.seeds, args.probe_seeds)  # seeds of the first timed range
    result, seconds = track_timed(lambda: build_tracker(model, inputs, options, STEP_MM, RNG_SEED, cpu), 0, n_seeds,
                                  cpu, processes)
    return {"result": result, "wall_s": seconds, "processes": processes,
            "slots": options.simultaneous_tracking or model.default_tracking_slots}


@dataclass
class ModelRun:
    """What one model's run measured (the JSON record, less the CPU comparison)."""

    model: str
    architecture: str
    seeds_requested: int
    slots: int
    slots_capped: bool
    seeds: int = 0
    points: int = 0
    kept: int = 0
    wall_s: float = 0.0
    check_s: float = 0.0
    scaled_down: bool = False
    end_reasons: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    def add(self, result, seconds: float, problems: list, kept: int, check_s: float) -> None:
        self.seeds += len(result.lengths)
        self.points += int(result.lengths.sum())
        self.kept += kept
        self.wall_s += seconds
        self.check_s += check_s
        self.problems += problems
        for reason in StopReason:
            self.end_reasons[reason.name] = (self.end_reasons.get(reason.name, 0)
                                             + int((result.end_reasons == reason).sum()))


def run_model(name: str, model, description: str, inputs: SubjectInputs, args, device, share_s: float,
              reference: dict | None) -> dict:
    """Track ``--seeds`` seeds (fewer if they would not fit ``share_s`` seconds) with one model on the device."""
    started = time.perf_counter()
    max_points = max_points_for(args.max_steps * STEP_MM, STEP_MM)
    model.to(device)
    slots, capped = fitting_slots(model, inputs, max_points, args, device)
    if capped:
        print(f"{name}: slots capped at {slots} by memory (--memory_fraction {args.memory_fraction})", flush=True)
    options = tracking_options(args, slots)
    processes = process_count(options, device)
    run = ModelRun(name, description, args.seeds, slots, capped)

    def make_tracker():
        return build_tracker(model, inputs, options, STEP_MM, RNG_SEED, device)

    if device.type == "cuda":
        track_timed(make_tracker, 0, min(args.seeds, WARMUP_SEEDS), device, processes)
        torch.cuda.reset_peak_memory_stats(device)

    def track_and_check(start, end):
        result, seconds = track_timed(make_tracker, start, end, device, processes)
        checked = time.perf_counter()
        problems, kept = check_result(result, start, end, inputs, max_points, args)
        run.add(result, seconds, problems, kept, time.perf_counter() - checked)
        return result

    probe_end = min(args.seeds, args.probe_seeds)
    first = track_and_check(0, probe_end)
    comparison = None if reference is None else agreement(first, reference["result"], inputs.voxel_mm)
    del first
    if probe_end < args.seeds:
        # The rest in one call (slots refilled throughout), cut to what fits in the model's time.
        left_s = share_s - (time.perf_counter() - started)
        fitting = max(0, int(GUARD_MARGIN * left_s * run.seeds / (run.wall_s + run.check_s)))
        end = min(args.seeds, probe_end + fitting)
        if end < args.seeds:
            run.scaled_down = True
            print(f"{name}: time guard: {end} of {args.seeds} seeds fit in its {share_s:.0f} s "
                  f"({run.seeds / run.wall_s:.0f} seeds/s on the first {run.seeds})", flush=True)
        if end > probe_end:
            track_and_check(probe_end, end)
    if run.kept == 0:
        run.problems.append("no streamline kept")

    peak = peak_memory_bytes(device)
    record = {**run.__dict__, "processes": processes, "seeds_per_s": run.seeds / run.wall_s,
              "points_per_s": run.points / run.wall_s, "mean_points": run.points / run.seeds,
              "peak_memory_bytes": peak, "peak_memory_per_1e5_slots_bytes": peak * 1e5 / slots,
              "valid": not run.problems}
    if comparison is not None:
        cpu_rate = comparison["seeds"] / reference["wall_s"]
        record["cpu_compare"] = {**comparison, "cpu_wall_s": reference["wall_s"], "cpu_seeds_per_s": cpu_rate,
                                 "cpu_processes": reference["processes"], "cpu_slots": reference["slots"],
                                 "speedup": record["seeds_per_s"] / cpu_rate}
    model.to("cpu")
    return record


# ---------------------------------------------------------------------------------------------- report

def print_table(records: list, device) -> None:
    memory = "peak GPU memory" if device.type == "cuda" else "peak RSS"
    print(f"\n{'model':<6} {'architecture':<34} {'seeds':>9} {'slots':>7} {'wall s':>8} {'seeds/s':>9} "
          f"{'points/s':>11} {'mean pts':>8} {'kept':>9} {memory + ' GiB':>20} {'GiB/1e5 slots':>13}  valid")
    for r in (r for r in records if "seeds_per_s" in r):
        print(f"{r['model']:<6} {r['architecture']:<34} {r['seeds']:>9} {r['slots']:>7} {r['wall_s']:>8.2f} "
              f"{r['seeds_per_s']:>9.0f} {r['points_per_s']:>11.0f} {r['mean_points']:>8.1f} {r['kept']:>9} "
              f"{r['peak_memory_bytes'] / 2**30:>20.2f} {r['peak_memory_per_1e5_slots_bytes'] / 2**30:>13.2f}  "
              f"{'yes' if r['valid'] else 'NO'}")
    for r in records:
        if "cpu_compare" in r:
            c = r["cpu_compare"]
            distance = "-" if c["max_point_distance_mm"] is None else f"{c['max_point_distance_mm']:.2e} mm"
            print(f"{r['model']}: CPU ({c['cpu_processes']} processes, {c['cpu_slots']} slots) {c['seeds']} seeds "
                  f"in {c['cpu_wall_s']:.2f} s, {c['cpu_seeds_per_s']:.0f} seeds/s; {device} / CPU "
                  f"{c['speedup']:.1f}x; identical within {IDENTICAL_MM} mm: {100 * c['identical_share']:.1f}%, "
                  f"same length {100 * c['same_length_share']:.1f}%, largest point distance {distance}")
        for problem in r["problems"]:
            print(f"{r['model']}: INVALID: {problem}")


def device_description(device) -> dict:
    if device.type != "cuda":
        return {"device": "cpu", "torch_threads": torch.get_num_threads()}
    return {"device": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
            "memory_bytes": torch.cuda.get_device_properties(device).total_memory,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", default="cuda", help="Tracking device [%(default)s].")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--seeds", type=int, default=1_000_000)
    p.add_argument("--max_steps", type=int, default=200, help="Most steps of a streamline, both halves.")
    p.add_argument("--min_length", type=float, default=10.0, help="Shortest kept streamline, mm.")
    p.add_argument("--slots", type=int, default=100_000, help="Streamlines in flight (--simultaneous_tracking).")
    p.add_argument("--memory_fraction", type=float, default=0.5,
                   help="Largest share of free CUDA memory the tracking state may take.")
    p.add_argument("--l2t_size", type=int, default=1024, help="Width of each of the 2 GRU layers.")
    p.add_argument("--tt_d_model", type=int, default=512)
    p.add_argument("--tt_heads", type=int, default=8)
    p.add_argument("--tt_layers", type=int, default=4)
    p.add_argument("--wm_mask", action="store_true", help="Stop at the WM mask, not only at the volume bounds.")
    p.add_argument("--hdf5", type=Path, help="An existing cohort instead of the demo subject (needs --subject).")
    p.add_argument("--subject", help="Subject of --hdf5.")
    p.add_argument("--compare_cpu", type=int, default=0, metavar="N", help="Also track seeds 0..N-1 on the CPU.")
    p.add_argument("--probe_seeds", type=int, default=100_000, help="Seeds timed before the time guard decides.")
    p.add_argument("--budget_s", type=float, default=270.0, help="Seconds for the whole run.")
    p.add_argument("--json", type=Path, help="Write the figures there.")
    args = p.parse_args(argv)
    for name in ("seeds", "max_steps", "slots", "l2t_size", "tt_d_model", "tt_heads", "tt_layers", "probe_seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.compare_cpu < 0 or not 0 < args.memory_fraction <= 1:
        p.error("--compare_cpu must be >= 0 and --memory_fraction in (0, 1]")
    if (args.hdf5 is None) != (args.subject is None):
        p.error("--hdf5 and --subject go together")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("CUDA is not available here: use --device cpu")
    return args


def write_report(args, device, inputs: SubjectInputs, records: list, finished: bool) -> None:
    """The JSON report, rewritten after each model so that a run cut short keeps the models done."""
    report = {**device_description(device), "cpus": available_cpus(), "torch": torch.__version__,
              "random_weights": True,
              "step_mm": STEP_MM, "max_steps": args.max_steps, "min_length_mm": args.min_length,
              "stopping": "wm_mask" if args.wm_mask else "volume", "subject_shape": inputs.volume.data.shape,
              "voxel_mm": inputs.voxel_mm, "budget_s": args.budget_s, "total_s": time.perf_counter() - STARTED,
              "finished": finished, "valid": all(r["valid"] for r in records), "models": records}
    with atomic_output(args.json) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as work:
        inputs = subject_inputs(args, Path(work))
    max_points = max_points_for(args.max_steps * STEP_MM, STEP_MM)
    models = build_models(args, inputs.volume.data.shape[3], max_points)
    print(f"subject {inputs.volume.data.shape}, {inputs.voxel_mm} mm voxels, {STEP_MM} mm steps, at most "
          f"{args.max_steps} steps, {args.seeds} seeds, {'WM mask' if args.wm_mask else 'volume bounds only'}; "
          f"random-initialised weights (speed only); ready after {time.perf_counter() - STARTED:.1f} s",
          flush=True)
    # Before any CUDA work: the CPU reference forks its workers.
    references = {name: cpu_reference(model, inputs, args) if args.compare_cpu else None
                  for name, (model, _) in models.items()}
    records = []
    for k, (name, (model, description)) in enumerate(models.items()):
        share_s = (args.budget_s - (time.perf_counter() - STARTED)) / (len(models) - k)
        try:
            records.append(run_model(name, model, description, inputs, args, device, share_s, references[name]))
            print(f"{name}: {records[-1]['seeds']} seeds in {records[-1]['wall_s']:.2f} s", flush=True)
        except Exception as error:  # unattended: one model failing (e.g. out of memory) must not lose the others
            traceback.print_exc()
            records.append({"model": name, "architecture": description, "valid": False,
                            "problems": [f"{type(error).__name__}: {error}"]})
            model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json is not None:
            write_report(args, device, inputs, records, finished=k == len(models) - 1)
    print_table(records, device)
    valid = all(r["valid"] for r in records)
    print(f"total {time.perf_counter() - STARTED:.1f} s; {'all tractograms valid' if valid else 'INVALID tractograms'}")
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
