"""trackflow_make_demo: write the synthetic demo cohort (phantom DWI-derived inputs, masks, ground truth).

Layout of OUT_DIR: dwi_ml_ready/<subject>/..., config/hdf5_config.json,
config/{training,validation,testing}_subjs.txt and README.txt (acquisition, SH basis and order).

By default the subjects share one geometry up to a small jitter. A varied-geometry cohort, where every
subject has its own (bundles moved, turned, bent and resized, shifted, smoothly deformed) and an in-plane
pose of its own, is asked for with one angle per subject, e.g. 4 training subjects posed +1 to +9 degrees,
one validation subject and two test subjects, one of them outside the training range:

    trackflow_make_demo varied --training_poses 1 3 7 9 --validation_poses 5 --testing_poses 6 -11
"""

import argparse

from trackflow.cli.common import add_overwrite_arg, add_verbose_arg, new_parser, run_cli, setup_logging
from trackflow.data.demo import DEFAULT_STREAMLINES_PER_BUNDLE, make_demo_cohort
from trackflow.data.hdf5.reader import SUBSET_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="Output folder (created; must not exist unless -f).")
    parser.add_argument("--subjects", type=int,
                        help="Number of subjects of a classic cohort. [4; with poses, one per pose]")
    parser.add_argument("--seed", type=int, default=0,
                        help="Random seed; same seed, same data. [%(default)s]")
    parser.add_argument("--streamlines_per_bundle", type=int, default=DEFAULT_STREAMLINES_PER_BUNDLE,
                        help="Ground-truth streamlines per bundle. [%(default)s]")
    varied = parser.add_argument_group(
        "Varied geometry (give all three: one subject per angle, each with its own geometry)")
    for subset in SUBSET_NAMES:
        varied.add_argument(f"--{subset}_poses", type=float, nargs="+", metavar="DEG",
                            help=f"In-plane rotation (degrees) of each {subset} subject.")
    add_overwrite_arg(parser)
    add_verbose_arg(parser)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    poses = {subset: getattr(args, f"{subset}_poses") for subset in SUBSET_NAMES}
    poses = {k: v for k, v in poses.items() if v is not None} or None
    run_cli(make_demo_cohort, args.out_dir, n_subjects=args.subjects, seed=args.seed,
            streamlines_per_bundle=args.streamlines_per_bundle, force=args.overwrite, poses=poses)


if __name__ == "__main__":
    main()
