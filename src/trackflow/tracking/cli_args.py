"""The command line shared by ``l2t_track_from_model`` and ``tt_track_from_model`` (spec §6.1).

Option names are dwi_ml's; argparse abbreviations stay on because the documented command lines use them
(``--hdf5`` for ``--hdf5_file``, ``--discard_last`` for ``--discard_last_point``).
"""

import argparse

from trackflow.cli.common import add_overwrite_arg, add_verbose_arg


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r} "
                                         "('max' is not supported)") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_tracking_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Parser of the tracking scripts; ``vars(args)`` minus ``verbose`` are ``track_from_experiment``'s
    keyword arguments."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("experiment_path", help="Experiment folder (with best_model/).")
    p.add_argument("subj_id", help="Subject id in the hdf5 file.")
    p.add_argument("input_group", help="Volume group holding the model's input.")
    p.add_argument("out_tractogram", help="Output tractogram (.trk, .tck or .trx).")
    p.add_argument("seeding_mask_group", help="Volume group of the seeding mask (voxels > 0 are seeded); "
                                              "its grid is the output's reference.")

    data = p.add_argument_group("Data")
    data.add_argument("--hdf5_file", help="hdf5 file [the 'hdf5 file' of the experiment's "
                                          "parameters_latest.json].")
    data.add_argument("--subset", default="testing", choices=["training", "validation", "testing"],
                      help="Subset expected to hold the subject (a warning only: the subject is found "
                           "in any subset).")
    data.add_argument("--use_latest_epoch", action="store_true",
                      help="Use checkpoint/model/ instead of best_model/.")

    tracking = p.add_argument_group("Tracking")
    tracking.add_argument("--algo", default="det", choices=["det", "prob"],
                          help="Deterministic or sampled directions (the head must support sampling).")
    tracking.add_argument("--step_size", type=_positive_float,
                          help="Step in mm [the model's training step size].")
    tracking.add_argument("--theta", type=float, default=90.0,
                          help="Largest angle (degrees) between two consecutive steps.")
    tracking.add_argument("--min_length", type=float, default=10.0,
                          help="Shortest streamline kept, in mm (measured on the output).")
    tracking.add_argument("--max_length", type=_positive_float, default=300.0,
                          help="Longest streamline, in mm (both halves together).")
    tracking.add_argument("--tracking_mask_group",
                          help="Volume group of the tracking mask (stop where its value < 0.5); without "
                               "it only the volume bounds (and EOS, angle, length) stop.")
    tracking.add_argument("--mask_interp", default="nearest", choices=["nearest", "trilinear"],
                          help="Interpolation of the tracking mask.")
    tracking.add_argument("--eos_stop", type=_probability,
                          help="Stop when the EOS probability exceeds this [0.5 when the model has EOS].")
    tracking.add_argument("--discard_last_point", action="store_true",
                          help="Keep only points inside the tracking mask (default: the first point "
                               "outside is kept, as dipy and scilpy).")
    tracking.add_argument("--track_forward_only", action="store_true", help="Skip the backward half.")

    seeding = p.add_argument_group("Seeding")
    count = seeding.add_mutually_exclusive_group()
    count.add_argument("--npv", type=_positive_int, help="Seeds per seeding-mask voxel [1].")
    count.add_argument("--nt", type=_positive_int, help="Total number of seeds.")
    seeding.add_argument("--rng_seed", type=int,
                         help="Seed of seed positions and sampled directions [random, logged].")

    out = p.add_argument_group("Output")
    out.add_argument("--compress", dest="compress_th", type=_positive_float, nargs="?", const=0.1,
                     help="Compress the output streamlines with this tolerance in mm [0.1 if no value].")
    out.add_argument("--save_seeds", action="store_true",
                     help="Store each streamline's seed (vox, center origin) as per-streamline data "
                          "'seeds' (.trk or .trx).")

    device = p.add_argument_group("Device")
    device.add_argument("--use_gpu", action="store_true",
                        help="Track on the GPU (CUDA); falls back to the CPU with a warning.")
    device.add_argument("--simultaneous_tracking", type=_positive_int, default=1000,
                        help="Streamlines tracked at once (slots of the batched tracker).")

    add_overwrite_arg(p)
    add_verbose_arg(p)
    return p
