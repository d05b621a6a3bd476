"""Tracking throughput: the batched engine against dwi_ml-style reference paths (spec §8).

CPU mode (default) tracks the demo subject with random-weight models (l2t: GRU 2x128 as in the demo recipe;
TTO, TTS, TTST: d_model 64, 3 layers) and prints, side by side in the same run:
- ``engine``: ``trackflow.tracking.Tracker`` (slots refilled, device-side bookkeeping, KV caches);
- ``reference``: streamlines stepped in small groups the way dwi_ml does (Python lists, per-step host
  syncs, no refill), same model step function;
- ``full recompute`` (transformers): the engine driving ``FullRecomputeModel``, which re-runs the model's
  whole-sequence forward over each streamline at every step (dwi_ml's tracking, no KV cache).
Random heads turn at random, so the angle test is off (theta 180) and EOS is ignored: lines stop at the
white-matter mask or at ``--max_length``.

GPU mode (``--device cuda``): ``--gpu_streamlines`` (1,000,000) streamlines of 200 steps (no mask, volume
far larger than the walk, so only the max length stops them) with a 2 x ``--gpu_layer_size`` (1024) GRU,
``--gpu_slots`` (100,000) at a time; prints the time and the peak GPU memory. Small numbers run on the CPU
too: ``--device cpu --gpu_mode --gpu_streamlines 300 --gpu_slots 100 --gpu_layer_size 32``.

    python benchmarks/tracking.py --seeds 10000
    python benchmarks/tracking.py --seeds 500 --reference_seeds 100 --recompute_seeds 20   # quick
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from trackflow.data.demo import make_demo_cohort
from trackflow.data.hdf5.creation import create_hdf5_dataset
from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.models.l2t import Learn2TrackModel
from trackflow.models.transformers import (OriginalTransformerModel, TransformerSrcAndTgtModel,
                                           TransformerSrcOnlyModel)
from trackflow.tracking.decoders import DeterministicDecoder
from trackflow.tracking.seeds import SeedGenerator
from trackflow.tracking.stopping import MaskStoppingCriterion, StreamlineStatus, VolumeStoppingCriterion
from trackflow.tracking.tracker import Tracker, TrackingParameters


class FullRecomputeModel:
    """Tracking interface over a model's whole-sequence ``forward``: every step re-runs the whole streamline
    (the reference for KV-cached tracking). As dwi_ml's transformer tracking, only the new point is
    interpolated; the inputs of earlier points are kept per slot and fed again with the whole sequence."""

    def __init__(self, model):
        self.model = model
        self.direction_getter = model.direction_getter

    tracking_window = 1  # the streamlines so far are kept in the state
    prefills_prefixes = True

    def new_tracking_state(self, volume, n_slots, max_points):
        return {"volume": volume,
                "inputs": volume.new_zeros(n_slots, max_points, self.model.input_size),  # [S, P, Fin]
                "points": volume.new_zeros(n_slots, max_points, 3)}  # [S, P, 3]

    def reset_tracking_rows(self, state, rows, points, lengths):
        """Store points[b, :lengths[b]-1] and their inputs (dwi_ml reuses the forward half's inputs)."""
        n_points = min(points.shape[1], state["points"].shape[1])
        points = points[:, :n_points]
        state["points"][rows, :n_points] = points
        is_prefix = torch.arange(n_points, device=points.device)[None] < (lengths - 1)[:, None]
        if bool(is_prefix.any()):
            inputs = state["inputs"][rows]
            inputs[:, :n_points][is_prefix] = self.model.compute_inputs(state["volume"], points[is_prefix])
            state["inputs"][rows] = inputs

    @torch.no_grad()
    def tracking_step(self, state, rows, points, lengths):
        """points [B, W, 3] (each row's last points), lengths [B] -> raw head output at each row's last
        point [B, K]."""
        batch = torch.arange(len(rows), device=rows.device)
        last = points[batch, lengths.clamp(max=points.shape[1]) - 1]
        state["points"][rows, lengths - 1] = last
        state["inputs"][rows, lengths - 1] = self.model.compute_inputs(state["volume"], last)
        n_points = int(lengths.max())
        is_real = torch.arange(n_points, device=points.device)[None] < lengths[:, None]  # [B, T]
        split = lengths.tolist()
        inputs = state["inputs"][rows][:, :n_points][is_real]  # [sum L, Fin], row-major
        lines = state["points"][rows][:, :n_points][is_real]
        raw = self.model(list(inputs.split(split)), list(lines.split(split)))  # [sum L, K]
        return raw[torch.cumsum(lengths, 0) - 1]


def rebuild_from_prefixes(model, state, rows, points, lengths):
    """The rows' state after ``points[b, :lengths[b]-1]``: one reset where the model prefills prefixes, else
    (a recurrent model) a reset and then the prefix point by point, as dwi_ml's recurrent model reruns it."""
    if model.prefills_prefixes:
        model.reset_tracking_rows(state, rows, points, lengths)
        return
    model.reset_tracking_rows(state, rows, points, torch.ones_like(lengths))
    for length in range(1, int(lengths.max())):
        feeding = (lengths > length).nonzero().squeeze(1)
        model.tracking_step(state, rows[feeding], points[feeding], torch.full_like(feeding, length))


@torch.no_grad()
def reference_track(model, volume, criterion, seeds, params: TrackingParameters, group_size: int):
    """dwi_ml's tracking loop (spec §6.3-6.4), with its bookkeeping: groups of ``group_size`` seeds, each
    tracked to the end before the next starts; streamlines as Python lists of tensors grown by ``cat``;
    boolean masks brought to the host at every step. Stops at the criterion and the max length only (the
    benchmark turns the angle and EOS tests off). Returns one [T_i, 3] streamline per seed, None for the
    seeds dwi_ml drops."""
    head = model.direction_getter
    out = []
    for start in range(0, len(seeds), group_size):
        group = seeds[start:start + group_size]
        state = model.new_tracking_state(volume, len(group), params.max_points)
        lines = [s[None] for s in group]
        model.reset_tracking_rows(state, torch.arange(len(group)), group[:, None],
                                  torch.ones(len(group), dtype=torch.long))
        lines = _reference_propagate(model, head, state, criterion, lines, list(range(len(group))), params)
        # backward: dwi_ml drops lines that are still only their seed
        keep = [i for i, line in enumerate(lines) if len(line) > 1]
        group_out = [None] * len(group)
        if keep:
            reversed_lines = [lines[i].flip(0) for i in keep]
            lengths = torch.tensor([len(line) for line in reversed_lines])
            padded = torch.nn.utils.rnn.pad_sequence(reversed_lines, batch_first=True)
            rebuild_from_prefixes(model, state, torch.tensor(keep), padded, lengths)
            for i, line in zip(keep, _reference_propagate(model, head, state, criterion, reversed_lines, keep,
                                                          params)):
                group_out[i] = line
        out.extend(group_out)
    return out


def _reference_propagate(model, head, state, criterion, lines, rows, params):
    finished = [None] * len(lines)
    active = list(range(len(lines)))
    while active:
        padded = torch.nn.utils.rnn.pad_sequence([lines[i] for i in active], batch_first=True)
        lengths = torch.tensor([len(lines[i]) for i in active])
        raw = model.tracking_step(state, torch.tensor([rows[i] for i in active]), padded, lengths)
        directions = torch.nn.functional.normalize(head.deterministic(raw).float(), dim=1)
        new_points = padded[torch.arange(len(active)), lengths - 1] + params.step_size_vox * directions
        status = criterion.check_points(new_points).cpu().numpy()  # host sync, as dwi_ml's numpy masks
        still = []
        for k, i in enumerate(active):
            lines[i] = torch.cat([lines[i], new_points[k:k + 1]])  # dwi_ml appends the last point
            if status[k] == StreamlineStatus.TRACKPOINT and len(lines[i]) < params.max_points:
                still.append(i)
            else:
                finished[i] = lines[i]
        active = still
    return finished


class NeverStop:
    """Stopping criterion that accepts every point: only the max length ends a streamline."""

    def check_points(self, points):
        return torch.full((len(points),), int(StreamlineStatus.TRACKPOINT), dtype=torch.int8,
                          device=points.device)


# ---------------------------------------------------------------------------------------------- models

def l2t_model(nb_features, layer_sizes=(128, 128)):
    torch.manual_seed(0)
    return Learn2TrackModel(nb_features=nb_features, step_size=0.5, neighborhood_type="axes",
                            neighborhood_radius=1, neighborhood_resolution=1.0, input_embedding_key="nn_embedding",
                            input_embedded_size=64, nb_previous_dirs=2, normalize_prev_dirs=True, rnn_key="gru",
                            rnn_layer_sizes=list(layer_sizes), dg_key="sphere-classification",
                            dg_args={"add_eos": True}).eval()


def transformer_models(nb_features):
    common = dict(nb_features=nb_features, step_size=0.5, max_len=1000, n_layers_e=3, nheads=4,
                  dropout_rate=0.0, input_embedding_key="nn_embedding", ffnn_hidden_size=128,
                  dg_key="sphere-classification", dg_args={"add_eos": True})
    torch.manual_seed(0)
    tto = OriginalTransformerModel(input_embedded_size=64, n_layers_d=3, **common).eval()
    tts = TransformerSrcOnlyModel(input_embedded_size=64, **common).eval()
    ttst = TransformerSrcAndTgtModel(input_embedded_size=48, target_embedded_size=16, **common).eval()
    return {"TTO": tto, "TTS": tts, "TTST": ttst}


# ---------------------------------------------------------------------------------------------- runs

def demo_subject(work: Path):
    """The default-shape demo subject: input volume, WM mask, interface mask, voxel size."""
    demo = make_demo_cohort(work / "demo", n_subjects=1, streamlines_per_bundle=5)
    config = demo / "config"
    hdf5 = create_hdf5_dataset(demo / "dwi_ml_ready", work / "demo.hdf5", config / "hdf5_config.json",
                               config / "training_subjs.txt", config / "validation_subjs.txt",
                               config / "testing_subjs.txt")
    with HDF5Cohort(hdf5) as cohort:
        subject = cohort.subjects("training")[0]
        volume = cohort.read_volume(subject, "input")
        wm = cohort.read_volume(subject, "wm_mask").data[..., 0]
        interface = cohort.read_volume(subject, "interface_mask").data[..., 0]
    return volume, wm, interface


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def report(name, n_streamlines, n_points, seconds):
    print(f"  {name:<16} {n_streamlines:>7} streamlines {seconds:8.2f} s  {n_streamlines / seconds:9.1f} "
          f"streamlines/s  {n_points / seconds:11.0f} points/s", flush=True)
    return n_streamlines / seconds


def cpu_benchmark(args):
    with tempfile.TemporaryDirectory() as work:
        volume, wm, interface = demo_subject(Path(work))
    device = torch.device(args.device)
    volume_t = torch.as_tensor(volume.data, device=device)
    criterion = MaskStoppingCriterion(torch.as_tensor(wm, device=device))
    step_vox = 0.5 / float(volume.voxres[0])
    params = TrackingParameters(step_size_vox=step_vox, max_points=int(args.max_length / 0.5) + 1,
                                theta_deg=180, eos_threshold=None, n_slots=args.slots)
    seeds = SeedGenerator(interface, rng_seed=0, device=device)
    models = {"l2t": l2t_model(volume.data.shape[3])}
    models.update(transformer_models(volume.data.shape[3]))
    print(f"demo subject {volume.data.shape}, voxel {volume.voxres[0]} mm, step 0.5 mm, max {params.max_points} "
          f"points, {args.slots} slots, device {device}, torch threads {torch.get_num_threads()}")
    for name, model in models.items():
        model.to(device)
        print(f"{name}:")
        decoder = DeterministicDecoder(model.direction_getter)
        engine = Tracker(model, volume_t, criterion, seeds, decoder, params)
        result, seconds = timed(lambda: engine.track(args.seeds))
        engine_rate = report("engine", len(result.lengths), result.lengths.sum(), seconds)
        ref_seeds = seeds.positions(torch.arange(args.reference_seeds, device=device))
        for group_size in args.group_sizes:
            lines, seconds = timed(lambda: reference_track(model, volume_t, criterion, ref_seeds, params,
                                                           group_size))
            rate = report(f"reference g={group_size}", len(ref_seeds),
                          sum(len(s) for s in lines if s is not None), seconds)
            print(f"  engine / reference g={group_size}: {engine_rate / rate:.1f}x")
        if name != "l2t":
            # 200 steps per streamline (forward only, nothing but the max length stops), same seeds
            long_params = TrackingParameters(step_size_vox=step_vox, max_points=201, theta_deg=180,
                                             eos_threshold=None, n_slots=args.recompute_seeds,
                                             track_forward_only=True)
            cached, cached_seconds = timed(lambda: Tracker(model, volume_t, NeverStop(), seeds, decoder,
                                                           long_params).track(args.recompute_seeds))
            full = Tracker(FullRecomputeModel(model), volume_t, NeverStop(), seeds, decoder, long_params)
            result, seconds = timed(lambda: full.track(args.recompute_seeds))
            report("cached, 200 st.", len(cached.lengths), cached.lengths.sum(), cached_seconds)
            report("recompute, 200", len(result.lengths), result.lengths.sum(), seconds)
            print(f"  cached / full recompute at 200 steps: {seconds / cached_seconds:.1f}x")


def gpu_benchmark(args):
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    nb_features, shape = 8, (128, 128, 128)
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand(*shape, nb_features, generator=generator).to(device)
    model = l2t_model(nb_features, (args.gpu_layer_size, args.gpu_layer_size)).to(device)
    seed_mask = np.zeros(shape, np.float32)
    seed_mask[54:74, 54:74, 54:74] = 1  # centre: a 200-step walk of 0.2 voxel cannot leave the volume
    params = TrackingParameters(step_size_vox=0.2, max_points=201, theta_deg=180, eos_threshold=None,
                                n_slots=args.gpu_slots, track_forward_only=True)
    tracker = Tracker(model, volume, VolumeStoppingCriterion(shape), SeedGenerator(seed_mask, 0, device),
                      DeterministicDecoder(model.direction_getter), params)
    result, seconds = timed(lambda: tracker.track(args.gpu_streamlines))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    at_max = float((result.lengths == params.max_points).mean())
    print(f"GRU 2x{args.gpu_layer_size}, {args.gpu_streamlines} streamlines x 200 steps, {args.gpu_slots} "
          f"slots on {device}: {seconds:.1f} s, {args.gpu_streamlines / seconds:.0f} streamlines/s, "
          f"{result.lengths.sum() / seconds:.0f} points/s, {100 * at_max:.1f}% stopped at max length")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"peak GPU memory {peak:.2f} GiB for {args.gpu_slots} simultaneous streamlines "
              f"({peak * 100000 / args.gpu_slots:.2f} GiB per 100,000)")


def start_up_seconds() -> tuple[float, bool]:
    """Seconds a fresh interpreter takes to import the tracking CLIs' module, and whether vtk came with it."""
    code = "import sys, time; t = time.perf_counter(); import trackflow.cli.track; " \
           "print(time.perf_counter() - t, 'vtk' in sys.modules)"
    seconds, vtk = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True).stdout.split()
    return float(seconds), vtk == "True"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, default=10000, help="Seeds for the engine.")
    p.add_argument("--reference_seeds", type=int, default=1000, help="Seeds for the reference path.")
    p.add_argument("--recompute_seeds", type=int, default=100, help="Seeds for full recomputation.")
    p.add_argument("--group_sizes", type=int, nargs="+", default=[10, 50],
                   help="Reference path group sizes (dwi_ml's CPU path: 1).")
    p.add_argument("--slots", type=int, default=1000, help="Engine slots (--simultaneous_tracking).")
    p.add_argument("--max_length", type=float, default=100.0, help="mm (step 0.5 mm).")
    p.add_argument("--gpu_mode", action="store_true", help="Run the GPU benchmark (implied by cuda).")
    p.add_argument("--gpu_streamlines", type=int, default=1_000_000)
    p.add_argument("--gpu_slots", type=int, default=100_000)
    p.add_argument("--gpu_layer_size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: stable figures on a shared machine).")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seconds, vtk = start_up_seconds()
    print(f"start-up: import trackflow.cli.track {seconds:.2f} s ({'with' if vtk else 'without'} vtk)")
    if args.gpu_mode or args.device.startswith("cuda"):
        gpu_benchmark(args)
    else:
        cpu_benchmark(args)


if __name__ == "__main__":
    main()
