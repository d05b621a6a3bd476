"""Train a TractoTransformer (TTO, TTS or TTST) on an hdf5 cohort (dwi_ml's ``tt_train_model``).

Writes the experiment folder ``experiments_path/experiment_name`` (best model, checkpoint, per-epoch logs);
continue it with ``tt_resume_training_from_checkpoint``.
"""

from trackflow.cli.common import run_cli, setup_logging
from trackflow.training.arguments import build_train_parser, train_from_args


def main(argv=None):
    args = build_train_parser(__doc__, "tt").parse_args(argv)
    setup_logging(args.verbose)
    run_cli(train_from_args, args, "tt")


if __name__ == "__main__":
    main()
