"""dwiml_create_hdf5_dataset: pack a dwi_ml_ready folder into one hdf5 file (dwi_ml's format and options)."""

import argparse

from trackflow.cli.common import add_overwrite_arg, add_verbose_arg, new_parser, run_cli, setup_logging
from trackflow.data.hdf5.creation import create_hdf5_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(description=__doc__)
    parser.add_argument("dwi_ml_ready_folder", help="Folder with one sub-folder per subject.")
    parser.add_argument("out_hdf5_file", help="Output .hdf5 file (extension added if missing).")
    parser.add_argument("config_file", help="JSON description of the hdf5 groups.")
    parser.add_argument("training_subjs", help="Text file of training subject ids (may be empty).")
    parser.add_argument("validation_subjs", help="Text file of validation subject ids.")
    parser.add_argument("testing_subjs", help="Text file of testing subject ids.")
    parser.add_argument("--skip_enforce_files_presence", action="store_true",
                        help="Only warn when a file pattern matches nothing.")
    parser.add_argument("--save_intermediate", action="store_true",
                        help="Also save each subject's final volumes and streamlines in "
                             "<out dir>/intermediate_<date>/.")
    resampling = parser.add_mutually_exclusive_group()
    resampling.add_argument("--step_size", type=float,
                            help="Resample streamlines to this step (mm).")
    resampling.add_argument("--nb_points", type=int,
                            help="Resample streamlines to this many points.")
    resampling.add_argument("--compress", dest="compress_th", type=float, nargs="?", const=0.01,
                            help="Compress streamlines with this tolerance (mm; 0.01 if no value).")
    parser.add_argument("--remove_invalid", action="store_true",
                        help="Drop streamlines leaving the bounding box after resampling.")
    add_overwrite_arg(parser)
    add_verbose_arg(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    run_cli(create_hdf5_dataset, args.dwi_ml_ready_folder, args.out_hdf5_file, args.config_file,
            args.training_subjs, args.validation_subjs, args.testing_subjs,
            enforce_files_presence=not args.skip_enforce_files_presence,
            save_intermediate=args.save_intermediate, step_size=args.step_size,
            nb_points=args.nb_points, compress=args.compress_th,
            remove_invalid=args.remove_invalid, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
