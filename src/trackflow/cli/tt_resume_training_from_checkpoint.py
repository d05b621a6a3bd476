"""Continue a TractoTransformer training from its checkpoint (dwi_ml's ``tt_resume_training_from_checkpoint``).

The resumed run draws the same batches and noise as an uninterrupted run would have. A run stopped by
patience or ``max_epochs`` needs a larger ``--new_patience`` or ``--new_max_epochs``.
"""

from trackflow.cli.common import run_cli, setup_logging
from trackflow.training.arguments import build_resume_parser
from trackflow.training.trainer import resume_experiment


def main(argv=None):
    args = build_resume_parser(__doc__).parse_args(argv)
    setup_logging(args.verbose)
    run_cli(resume_experiment, "tt", args.experiments_path, args.experiment_name, hdf5_file=args.hdf5_file,
            new_patience=args.new_patience, new_max_epochs=args.new_max_epochs)


if __name__ == "__main__":
    main()
