"""Train a Learn2track model on an hdf5 cohort (dwi_ml's ``l2t_train_model``).

Writes the experiment folder ``experiments_path/experiment_name`` (best model, checkpoint, per-epoch logs);
continue it with ``l2t_resume_training_from_checkpoint``.
"""

from trackflow.cli.common import run_cli, setup_logging
from trackflow.training.arguments import build_train_parser, train_from_args


def main(argv=None):
    args = build_train_parser(__doc__, "l2t").parse_args(argv)
    setup_logging(args.verbose)
    run_cli(train_from_args, args, "l2t")


if __name__ == "__main__":
    main()
