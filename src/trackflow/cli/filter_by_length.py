"""trackflow_filter_by_length: keep streamlines whose length (mm) is within [--minL, --maxL] (inclusive, as
scilpy's filter and the tracking scripts), and write a one-row TSV of counts and mean/median lengths before
and after.

Works on .trk, .trx and .tck (with --reference); scilpy's own script refuses .trx.

Example::

    trackflow_filter_by_length tracking/sub-04/l2t.trk filtering/sub-04/l2t.trk --minL 20 --maxL 200 \\
        --out_counts filtering/sub-04/l2t_counts.tsv --subject sub-04 --model l2t
"""

import argparse

from trackflow.cli.common import add_overwrite_arg, add_verbose_arg, new_parser, run_cli, setup_logging
from trackflow.evaluation.length_filter import filter_tractogram_by_length


def _length_mm(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a length >= 0 (mm), got {text}")
    return value


def main(argv=None):
    p = new_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_tractogram", help="Tractogram to filter (.trk, .trx, or .tck with --reference).")
    p.add_argument("out_tractogram", help="Filtered tractogram.")
    p.add_argument("--minL", type=_length_mm, default=0.0, help="Shortest length kept, in mm. [%(default)s]")
    p.add_argument("--maxL", type=_length_mm, default=float("inf"),
                   help="Longest length kept, in mm. [%(default)s]")
    p.add_argument("--out_counts", required=True,
                   help="Output TSV: subject, model, n_before, n_after, mean/median lengths (mm) before and after.")
    p.add_argument("--subject", help="Subject label of the TSV row [the input's folder name].")
    p.add_argument("--model", help="Model label of the TSV row [the input's file name without extension].")
    p.add_argument("--reference", help="Image of the tractogram's grid (.tck only).")
    add_verbose_arg(p)
    add_overwrite_arg(p)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    run_cli(filter_tractogram_by_length, args.in_tractogram, args.out_tractogram, args.out_counts,
            min_length=args.minL, max_length=args.maxL, subject=args.subject, model=args.model,
            reference=args.reference, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
