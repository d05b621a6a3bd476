"""l2t_track_from_model: track one subject of an hdf5 cohort with a trained Learn2track model."""

from trackflow.cli.common import run_cli, setup_logging
from trackflow.tracking.cli_args import build_tracking_parser
from trackflow.tracking.run import track_from_experiment


def main(argv=None):
    parser = build_tracking_parser("l2t_track_from_model",
                                   "Track a subject with a trained Learn2track model (batched, "
                                   "forward then backward from each seed).")
    args = vars(parser.parse_args(argv))
    setup_logging(args.pop("verbose"))
    run_cli(track_from_experiment, "l2t", **args)


if __name__ == "__main__":
    main()
