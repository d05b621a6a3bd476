"""Training throughput: streamline points per second for one optimisation step (rows + forward + loss +
backward + optimizer step), for Learn2track and the three TractoTransformers.

Runs the trainer's own code path (``BatchLoader.rows`` then the model and its head's loss) on a synthetic
batch: a random volume and random-walk streamlines of about 1 mm steps (vox/corner). Prints one line per
model and device; the GPU is measured too when CUDA is available.

    python benchmarks/training.py [--batch 100] [--points 100] [--steps 5] [--threads N]
"""

import argparse
import time

import numpy as np
import torch

from trackflow.models.registry import model_class
from trackflow.training.batch_loader import Batch, BatchLoader, LoaderParams

VOLUME_SHAPE = (64, 64, 48)
NB_FEATURES = 45
EOS_COSINE = {"dg_key": "cosine-regression",
              "dg_args": {"dropout": 0.0, "add_eos": True, "eos_weight": 1.0}}
CONFIGS = {
    "l2t GRU 2x256, sphere+EOS": ("Learn2TrackModel", dict(
        rnn_key="gru", rnn_layer_sizes=[256, 256], input_embedding_key="nn_embedding", input_embedded_size=64,
        nb_previous_dirs=2, dg_key="sphere-classification", dg_args={"add_eos": True})),
    "l2t GRU 2x256, cosine+EOS": ("Learn2TrackModel", dict(
        rnn_key="gru", rnn_layer_sizes=[256, 256], input_embedding_key="nn_embedding", input_embedded_size=64,
        nb_previous_dirs=2, **EOS_COSINE)),
    "TTO D128 4+4 layers, cosine+EOS": ("OriginalTransformerModel", dict(
        input_embedding_key="nn_embedding", input_embedded_size=128, nheads=8, n_layers_e=4, n_layers_d=4,
        ffnn_hidden_size=256, max_len=1000, **EOS_COSINE)),
    "TTS D128 4 layers, cosine+EOS": ("TransformerSrcOnlyModel", dict(
        input_embedding_key="nn_embedding", input_embedded_size=128, nheads=8, n_layers_e=4,
        ffnn_hidden_size=256, max_len=1000, **EOS_COSINE)),
    "TTST D96+32 4 layers, cosine+EOS": ("TransformerSrcAndTgtModel", dict(
        input_embedding_key="nn_embedding", input_embedded_size=96, target_embedded_size=32, nheads=8,
        n_layers_e=4, ffnn_hidden_size=256, max_len=1000, **EOS_COSINE)),
}


class InMemoryVolume:
    """Stands in for ``SubsetData``: the one thing ``BatchLoader.rows`` asks of it is ``volume()``."""

    def __init__(self, volume: torch.Tensor):
        self._volume = volume

    def volume(self, subject):
        return self._volume, np.ones(3)


def random_batch(n_streamlines: int, mean_points: int, rng: np.random.Generator, device) -> Batch:
    """Walks of about 1 voxel per step (a fixed direction per streamline plus jitter), clipped into the
    volume; lengths uniform in [mean/2, 3 mean/2]."""
    lengths = rng.integers(mean_points // 2, 3 * mean_points // 2 + 1, size=n_streamlines)
    steps = rng.normal(size=(int(lengths.sum()), 3))
    steps /= np.linalg.norm(steps, axis=1, keepdims=True)
    starts = np.repeat(rng.uniform(20, 28, size=(n_streamlines, 3)), lengths, axis=0)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    direction = np.repeat(rng.normal(size=(n_streamlines, 3)), lengths, axis=0)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    offsets = np.cumsum(0.3 * steps + direction, axis=0)
    offsets -= np.repeat(offsets[first], lengths, axis=0)  # each streamline starts at its own start
    points = np.clip(starts + offsets, 0, np.array(VOLUME_SHAPE) - 1e-3).astype(np.float32)
    return Batch(torch.from_numpy(points).to(device), torch.from_numpy(lengths).to(device),
                 [("synthetic", 0, n_streamlines)])


def measure(name, model_type, params, device, batch, data, steps) -> float:
    torch.manual_seed(0)
    model = model_class(model_type)(nb_features=NB_FEATURES, step_size=1.0, **params).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = BatchLoader(LoaderParams(noise_gaussian_size_forward=0.1), {}, {}, 0, device)

    def step():
        rows = loader.rows(model, data, batch, training=True)
        loss = model.direction_getter.loss(model(rows.inputs, rows.coordinates), rows.target_dirs,
                                           rows.eos_target).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return rows.target_dirs.shape[0]

    step()  # warm-up (allocations, cuDNN choice)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    n_points = sum(step() for _ in range(steps))
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    rate = n_points / elapsed
    print(f"{device.type:4s}  {name:34s}  {n_points // steps:6d} points/step  {elapsed / steps * 1000:8.1f} "
          f"ms/step  {rate:10.0f} points/s", flush=True)
    return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100, help="Streamlines per batch. [%(default)s]")
    parser.add_argument("--points", type=int, default=100, help="Mean points per streamline. [%(default)s]")
    parser.add_argument("--steps", type=int, default=5, help="Timed optimisation steps. [%(default)s]")
    parser.add_argument("--threads", type=int, help="torch CPU threads. [torch default]")
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--cpu_only", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, batch {args.batch} streamlines x "
          f"~{args.points} points, volume {VOLUME_SHAPE + (NB_FEATURES,)}")
    for device in devices:
        rng = np.random.default_rng(0)
        batch = random_batch(args.batch, args.points, rng, device)
        data = InMemoryVolume(torch.from_numpy(rng.standard_normal(VOLUME_SHAPE + (NB_FEATURES,),
                                                                   dtype=np.float32)).to(device))
        for name in args.models:
            measure(name, *CONFIGS[name], device, batch, data, args.steps)


if __name__ == "__main__":
    main()
