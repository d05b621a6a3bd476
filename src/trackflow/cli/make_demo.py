"""trackflow_make_demo: write the synthetic demo cohort (phantom DWI-derived inputs, masks, ground truth).

Layout of OUT_DIR: dwi_ml_ready/<subject>/..., config/hdf5_config.json,
config/{training,validation,testing}_subjs.txt and README.txt (acquisition, SH basis and order).
"""

import argparse

from trackflow.cli.common import add_overwrite_arg, add_verbose_arg, new_parser, run_cli, setup_logging
from trackflow.data.demo import DEFAULT_STREAMLINES_PER_BUNDLE, make_demo_cohort


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="Output folder (created; must not exist unless -f).")
    parser.add_argument("--subjects", type=int, default=4, help="Number of subjects. [%(default)s]")
    parser.add_argument("--seed", type=int, default=0,
                        help="Random seed; same seed, same data. [%(default)s]")
    parser.add_argument("--streamlines_per_bundle", type=int, default=DEFAULT_STREAMLINES_PER_BUNDLE,
                        help="Ground-truth streamlines per bundle. [%(default)s]")
    add_overwrite_arg(parser)
    add_verbose_arg(parser)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    run_cli(make_demo_cohort, args.out_dir, n_subjects=args.subjects, seed=args.seed,
            streamlines_per_bundle=args.streamlines_per_bundle, force=args.overwrite)


if __name__ == "__main__":
    main()
