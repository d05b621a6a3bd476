"""l2t_track_from_model and tt_track_from_model: track one subject of an hdf5 cohort with a trained model.

One command line for every model; option names are dwi_ml's. No argparse abbreviations (``--rng`` is
dwi_ml's unused option, not ``--rng_seed``); the two that dwi_ml's documentation uses, ``--hdf5`` for
``--hdf5_file`` and ``--discard_last`` for ``--discard_last_point``, are aliases.
"""

import argparse
import logging

from trackflow.cli.common import (add_ignored_dwi_ml_args, add_overwrite_arg, add_verbose_arg, new_parser,
                                  positive_float, positive_int, probability, run_cli, setup_logging,
                                  warn_ignored_dwi_ml_args)
from trackflow.data.hdf5.reader import SUBSET_NAMES
from trackflow.device import seconds_since_process_start
from trackflow.tracking.decoders import ALGOS, DET_DIRECTIONS, PROB_SAMPLINGS
from trackflow.tracking.run import EOS_STOPS, TrackingOptions, track_from_experiment
from trackflow.tracking.stopping import MASK_INTERPOLATIONS

LOGGER = logging.getLogger(__name__)

_POSITIONALS = ("experiment_path", "subj_id", "input_group", "out_tractogram", "seeding_mask_group")


def eos_stop(text: str) -> float | str:
    """``--eos_stop``: a probability, or one of ``EOS_STOPS``."""
    if text in EOS_STOPS:
        return text
    try:
        return probability(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1] or one of {', '.join(EOS_STOPS)}, "
                                         f"got {text!r}") from None


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Parser of the tracking scripts; ``vars(args)`` minus ``verbose`` and the positionals are
    ``TrackingOptions``' fields."""
    defaults = TrackingOptions()
    p = new_parser(prog=prog, description=description)
    p.add_argument("experiment_path", help="Experiment folder (with best_model/).")
    p.add_argument("subj_id", help="Subject id in the hdf5 file.")
    p.add_argument("input_group", help="Volume group holding the model's input.")
    p.add_argument("out_tractogram", help="Output tractogram (.trk, .tck or .trx).")
    p.add_argument("seeding_mask_group", help="Volume group of the seeding mask (voxels > 0 are seeded); "
                                              "its grid is the output's reference.")

    data = p.add_argument_group("Data")
    data.add_argument("--hdf5_file", "--hdf5", help="hdf5 file [the 'hdf5 file' of the experiment's "
                                          "parameters_latest.json].")
    data.add_argument("--subset", default=defaults.subset, choices=SUBSET_NAMES,
                      help="Subset expected to hold the subject (a warning only: the subject is found "
                           "in any subset). [%(default)s]")
    data.add_argument("--use_latest_epoch", action="store_true",
                      help="Use checkpoint/model/ instead of best_model/.")

    tracking = p.add_argument_group("Tracking")
    tracking.add_argument("--algo", default=defaults.algo, choices=ALGOS,
                          help="Deterministic or sampled directions (the head must support sampling). "
                               "[%(default)s]")
    tracking.add_argument("--step_size", type=positive_float,
                          help="Step in mm [the model's training step size].")
    tracking.add_argument("--theta", type=float, default=defaults.theta,
                          help="Largest angle (degrees) between two consecutive steps. [%(default)s]")
    tracking.add_argument("--min_length", type=float, default=defaults.min_length,
                          help="Shortest streamline kept, in mm (measured on the output). [%(default)s]")
    tracking.add_argument("--max_length", type=positive_float, default=defaults.max_length,
                          help="Longest streamline, in mm (both halves together). [%(default)s]")
    tracking.add_argument("--tracking_mask_group",
                          help="Volume group of the tracking mask (stop where its value < 0.5); without "
                               "it only the volume bounds (and EOS, angle, length) stop.")
    tracking.add_argument("--mask_interp", default=defaults.mask_interp, choices=MASK_INTERPOLATIONS,
                          help="Interpolation of the tracking mask. [%(default)s]")
    tracking.add_argument("--eos_stop", type=eos_stop,
                          help="Stop when the EOS probability exceeds this probability; 'max': when EOS is the "
                               "head's most likely outcome (classification: the argmax of all classes, EOS "
                               "included; a separate sigmoid EOS output: p(EOS) > 0.5); 'auto': above the "
                               "threshold calibrated on the validation subjects at the end of training (stored "
                               "in the model folder; an error when there is none). [auto when the model folder holds a "
                               "calibration, else 0.5]")
    tracking.add_argument("--prob_sampling", default=defaults.prob_sampling, choices=PROB_SAMPLINGS,
                          help="--algo prob: 'cone' samples the head's distribution restricted to the directions "
                               "within --theta of the previous step and renormalised (the classical rule; "
                               "gaussian and von Mises-Fisher heads: the first of 16 draws inside the cone, "
                               "else an angle stop); 'full' samples the whole distribution, as dwi_ml, and a "
                               "draw beyond --theta ends the streamline. A seed's first step samples the whole "
                               "distribution either way. [%(default)s]")
    tracking.add_argument("--det_direction", default=defaults.det_direction, choices=DET_DIRECTIONS,
                          help="--algo det: 'cone' takes the head's most likely direction among those within "
                               "--theta of the previous step (the classical rule: dipy's and scilpy's det; "
                               "classification heads: the best vertex in the cone, mixtures: the best "
                               "component in it, one-mode heads: their mode); 'full' takes the most likely "
                               "direction overall, as dwi_ml, and one beyond --theta ends the streamline. "
                               "[%(default)s]")
    tracking.add_argument("--discard_last_point", "--discard_last", action="store_true",
                          help="Keep only points inside the tracking mask [off: the first point outside is "
                               "kept, as dipy and scilpy].")
    tracking.add_argument("--track_forward_only", action="store_true", help="Skip the backward half.")

    seeding = p.add_argument_group("Seeding")
    count = seeding.add_mutually_exclusive_group()
    count.add_argument("--npv", type=positive_int, help="Seeds per seeding-mask voxel [1].")
    count.add_argument("--nt", type=positive_int, help="Total number of seeds.")
    seeding.add_argument("--rng_seed", type=int,
                         help="Seed of seed positions and sampled directions [random, logged].")

    out = p.add_argument_group("Output")
    out.add_argument("--compress", dest="compress_th", type=positive_float, nargs="?", const=0.1,
                     help="Compress the output streamlines with this tolerance in mm [0.1 if no value].")
    out.add_argument("--save_seeds", action="store_true",
                     help="Store each streamline's seed (vox, center origin) as per-streamline data "
                          "'seeds' (.trk or .trx).")

    device = p.add_argument_group("Device")
    device.add_argument("--use_gpu", action="store_true",
                        help="Track on the GPU (CUDA); falls back to the CPU with a warning.")
    device.add_argument("--simultaneous_tracking", type=positive_int, default=defaults.simultaneous_tracking,
                        help="Streamlines tracked at once (slots of the batched tracker) [the model's: 4000 for "
                             "Learn2track, 1000 for the transformers, whose caches grow with it].")
    device.add_argument("--processes", type=positive_int,
                        help="CPU processes sharing the seeds, one torch thread each; the same streamlines "
                             "for any number [every core the job was given: CPU affinity or "
                             "SLURM_CPUS_PER_TASK]. Not with --use_gpu.")
    seeding.add_argument("--seed_range", type=int, nargs=2, metavar=("START", "END"),
                         help="Track only seeds START..END-1 of this run's seed sequence (same --rng_seed and "
                              "seed count): chunks that trackflow_merge_tractograms joins, in order, into the "
                              "whole run's tractogram [all seeds].")

    add_ignored_dwi_ml_args(p, {
        "--data_interp": (dict(choices=("nearest", "trilinear")), "inputs are always interpolated trilinearly"),
        "--skip": (dict(type=int), "unused in dwi_ml too (--seed_range tracks a part of the seeds)"),
        "--sphere": (dict(), "classification heads use the sphere they were trained with"),
        "--lazy": (dict(action="store_true"), "the subject's volumes are always read at once"),
        "--cache_size": (dict(type=int), "the subject's volumes are always read at once"),
        "--rng": (dict(type=int), "unused in dwi_ml too (the seed of tracking is --rng_seed)"),
    })
    add_overwrite_arg(p)
    add_verbose_arg(p)
    return p


def _track(model_family: str, args: dict):
    positionals = [args.pop(name) for name in _POSITIONALS]
    return track_from_experiment(model_family, *positionals, TrackingOptions(**args))


def _main(model_family: str, prog: str, description: str, argv):
    args = vars(build_parser(prog, description).parse_args(argv))
    setup_logging(args.pop("verbose"))
    started = seconds_since_process_start()
    if started is not None:
        LOGGER.info("start-up: %.2f s from the process start to the command line read (imports)", started)
    warn_ignored_dwi_ml_args(args)
    run_cli(_track, model_family, args)  # inside run_cli: a rule broken in TrackingOptions is one line


def l2t_main(argv=None):
    _main("l2t", "l2t_track_from_model",
          "Track a subject with a trained Learn2track model (batched, forward then backward from each seed).",
          argv)


def tt_main(argv=None):
    _main("tt", "tt_track_from_model",
          "Track a subject with a trained TractoTransformer model (TTO, TTS or TTST; batched, forward then "
          "backward from each seed).", argv)
