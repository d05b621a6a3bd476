"""trackflow_merge_tractograms: join the chunks of one tracking run (``--seed_range`` of the tracking
scripts), in the order given, into the tractogram the whole run writes (.trk and .tck: byte for byte).

Every input must have the output's format and the first input's header (same reference grid).

Example::

    trackflow_merge_tractograms tracking/sub-04/l2t.trk chunks/l2t_0.trk chunks/l2t_1.trk chunks/l2t_2.trk
"""

import argparse

from trackflow.cli.common import add_overwrite_arg, add_verbose_arg, new_parser, run_cli, setup_logging
from trackflow.tracking.merge import merge_tractograms


def main(argv=None):
    p = new_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_tractogram", help="Merged tractogram (.trk, .tck or .trx).")
    p.add_argument("in_tractograms", nargs="+", help="Chunks, in seed order, in the output's format.")
    add_overwrite_arg(p)
    add_verbose_arg(p)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    run_cli(merge_tractograms, args.out_tractogram, args.in_tractograms, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
