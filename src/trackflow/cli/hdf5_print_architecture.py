"""dwiml_hdf5_print_architecture: print the root attributes, subject lists and groups of an hdf5."""


from trackflow.cli.common import add_verbose_arg, new_parser, run_cli, setup_logging
from trackflow.data.hdf5.reader import print_architecture


def main(argv=None):
    parser = new_parser(description=__doc__)
    parser.add_argument("hdf5_file", help="Cohort hdf5 file made by dwiml_create_hdf5_dataset.")
    add_verbose_arg(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    run_cli(print_architecture, args.hdf5_file)


if __name__ == "__main__":
    main()
