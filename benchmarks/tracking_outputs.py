"""Tractograms of the tiny demo cohort for every tracking path, to compare two versions bit for bit.

``write OUT_DIR`` tracks sub-01 of a tiny cohort (built in a temporary folder) with small random-weight
models steered along +x (l2t GRU/LSTM with 0 and 2 previous directions, TTO, TTS, TTST), det and prob,
with 7 and 1000 slots, through ``track_from_experiment`` (what the CLIs call), and writes one .trk and one
.tck per run. ``compare DIR_A DIR_B`` checks that the files are byte-identical and their points equal
(``np.array_equal``). Run ``write`` with each version of the source (e.g. ``PYTHONPATH=/old/src``), then
``compare``.

    python benchmarks/tracking_outputs.py write /tmp/after
    python benchmarks/tracking_outputs.py compare /tmp/before /tmp/after
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

SUBJECT = "sub-01"
HEAD = {"dg_key": "sphere-classification", "dg_args": {"add_eos": True}}


def _steer_towards_x(model):
    """Small random weights and a head bias towards +x: streamlines of many steps (random heads turn)."""
    head = model.direction_getter
    last = head.layers[1]
    with torch.no_grad():
        last.weight.mul_(0.1)
        last.bias[:head.nb_vertices] = 8.0 * head.vertices[:, 0]
        last.bias[head.nb_vertices:] = -10.0
    return model.eval()


def models(nb_features: int) -> dict:
    from trackflow.models.l2t import Learn2TrackModel
    from trackflow.models.transformers import (OriginalTransformerModel, TransformerSrcAndTgtModel,
                                               TransformerSrcOnlyModel)
    common = dict(nb_features=nb_features, step_size=1.0, input_embedding_key="nn_embedding", **HEAD)
    tt = dict(common, max_len=400, n_layers_e=1, nheads=2, ffnn_hidden_size=8, dropout_rate=0.0)
    builders = {f"l2t_{rnn}_prev{n}": (lambda rnn=rnn, n=n: Learn2TrackModel(
        input_embedded_size=8, nb_previous_dirs=n, rnn_key=rnn, rnn_layer_sizes=[8, 6], **common))
        for rnn in ("gru", "lstm") for n in (0, 2)}
    builders["tto"] = lambda: OriginalTransformerModel(input_embedded_size=8, n_layers_d=1, **tt)
    builders["tts"] = lambda: TransformerSrcOnlyModel(input_embedded_size=8, **tt)
    builders["ttst"] = lambda: TransformerSrcAndTgtModel(input_embedded_size=6, target_embedded_size=4, **tt)
    out = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        out[name] = _steer_towards_x(build())
    return out


def write(out_dir: Path) -> None:
    from trackflow.data.demo import TINY_SHAPE, make_demo_cohort
    from trackflow.data.hdf5.creation import create_hdf5_dataset
    from trackflow.data.hdf5.reader import HDF5Cohort
    from trackflow.models.persistence import save_model_dir
    from trackflow.tracking.run import TrackingOptions, track_from_experiment

    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cohort = make_demo_cohort(tmp / "cohort", n_subjects=2, seed=0, streamlines_per_bundle=10,
                                  shape=TINY_SHAPE)
        config = cohort / "config"
        hdf5 = create_hdf5_dataset(cohort / "dwi_ml_ready", tmp / "demo.hdf5", config / "hdf5_config.json",
                                   config / "training_subjs.txt", config / "validation_subjs.txt",
                                   config / "testing_subjs.txt", step_size=1.0)
        with HDF5Cohort(hdf5) as c:
            nb_features = c.volume_groups()["input"]
        for name, model in models(nb_features).items():
            experiment = tmp / name
            save_model_dir(model, experiment / "best_model")
            (experiment / "parameters_latest.json").write_text(json.dumps({"hdf5 file": str(hdf5)}))
            family = "l2t" if name.startswith("l2t") else "tt"
            for algo in ("det", "prob"):
                for slots in (7, 1000):
                    options = TrackingOptions(algo=algo, simultaneous_tracking=slots, nt=80, rng_seed=3,
                                              min_length=0, max_length=60, theta=180,
                                              tracking_mask_group="wm_mask", save_seeds=True, overwrite=True)
                    for ext in (".trk", ".tck"):
                        opts = options if ext == ".trk" else TrackingOptions(
                            **{**options.__dict__, "save_seeds": False})
                        track_from_experiment(family, experiment, SUBJECT, "input",
                                              out_dir / f"{name}_{algo}_{slots}{ext}", "interface_mask", opts)


def compare(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        print("different file sets", file=sys.stderr)
        return False
    same = True
    for name in names:
        bytes_equal = (a / name).read_bytes() == (b / name).read_bytes()
        sa, sb = nib.streamlines.load(str(a / name)), nib.streamlines.load(str(b / name))
        points_equal = (np.array_equal(sa.streamlines.get_data(), sb.streamlines.get_data())
                        and np.array_equal(sa.streamlines._lengths, sb.streamlines._lengths))
        print(f"{name}: {len(sa.streamlines)} streamlines, {len(sa.streamlines.get_data())} points, "
              f"bytes {'equal' if bytes_equal else 'DIFFER'}, points {'equal' if points_equal else 'DIFFER'}")
        same &= bytes_equal and points_equal
    print("all identical" if same else "DIFFERENCES")
    return same


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("write").add_argument("out_dir", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args()
    if args.command == "write":
        write(args.out_dir)
    else:
        sys.exit(0 if compare(args.a, args.b) else 1)


if __name__ == "__main__":
    main()
