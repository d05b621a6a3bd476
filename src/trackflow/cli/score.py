"""trackflow_score: Tractometer metrics of a tractogram against a subject's ground-truth bundles."""

import argparse
import json
import logging

from trackflow.cli.common import add_overwrite_arg, add_verbose_arg, new_parser, run_cli, setup_logging
from trackflow.files import atomic_output, check_outputs
from trackflow.evaluation.tractometer import score_tractogram_file


def build_parser():
    p = new_parser(description=__doc__.split("\n")[0] + "\n\n" + (
        "Ground truth: <bundles_dir>/<subject>__<bundle>__{head,tail,mask}.nii.gz (the demo cohort's "
        "dwi_ml_ready/<subject>/bundles). Metrics: VB, IB, VS, IS, NC, OL, OR (ISMRM 2015 definition), "
        "F1, per bundle and overall."), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_tractogram", help="Tractogram to score (.trk, .tck or .trx).")
    p.add_argument("bundles_dir", help="Folder of the subject's ground-truth bundle masks.")
    p.add_argument("out_json", help="Output JSON of metrics.")
    p.add_argument("--dilate_endpoints", type=int, default=1,
                   help="Dilate endpoint regions by this many voxels. [%(default)s]")
    add_overwrite_arg(p)
    add_verbose_arg(p)
    return p


def score(args):
    check_outputs([args.out_json], args.overwrite, inputs=[args.in_tractogram])
    metrics = score_tractogram_file(args.in_tractogram, args.bundles_dir, args.dilate_endpoints)
    with atomic_output(args.out_json, overwrite=args.overwrite) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    logging.getLogger("trackflow").info(
        "VB %d/%d, IB %d, VS %.1f%%, IS %.1f%%, OL %.2f, OR %.2f, F1 %.2f", metrics["VB"],
        metrics["n_bundles"], metrics["IB"], 100 * metrics["VS_ratio"], 100 * metrics["IS_ratio"],
        metrics["OL"], metrics["OR"], metrics["F1"])


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    run_cli(score, args)


if __name__ == "__main__":
    main()
