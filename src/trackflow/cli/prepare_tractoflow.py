"""trackflow_prepare_tractoflow: a dwi_ml-ready cohort from a TractoFlow results/ folder.

Links (symlinks) each subject's T1 (registered onto the DWI grid), FA, fODF, white-matter mask, interface
mask and, when TractoFlow ran PFT tracking for every subject, its tractograms into OUT/dwi_ml_ready/<S>/,
then writes OUT/hdf5_config.json (groups input = T1 + FA + fODF with per-file standardization, wm_mask,
interface_mask, streamlines) and OUT/{training,validation,testing}_subjs.txt. TractoFlow 2.4.4 layout:
results/<S>/DTI_Metrics/<S>__fa.nii.gz, FODF_Metrics/<S>__fodf.nii.gz, Register_T1/<S>__t1_warped.nii.gz,
Segment_Tissues/<S>__mask_wm.nii.gz, PFT_Tracking_Maps/<S>__interface.nii.gz,
PFT_Tracking/<S>__pft_tracking_*.trk.

Example::

    trackflow_prepare_tractoflow tractoflow/results cohort --split 0.7 0.15 0.15 --seed 0
    dwiml_create_hdf5_dataset cohort/dwi_ml_ready cohort.hdf5 cohort/hdf5_config.json \\
        cohort/training_subjs.txt cohort/validation_subjs.txt cohort/testing_subjs.txt
"""

import argparse

from trackflow.cli.common import add_overwrite_arg, add_verbose_arg, new_parser, run_cli, setup_logging
from trackflow.data.tractoflow import prepare_tractoflow


def main(argv=None):
    p = new_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="TractoFlow's results/ folder (one sub-folder per subject).")
    p.add_argument("out", help="Output folder (dwi_ml_ready/, hdf5_config.json, the subject lists).")
    lists = p.add_argument_group("Subject lists (give them, or leave all three out for a seeded split)")
    for subset in ("training", "validation", "testing"):
        lists.add_argument(f"--{subset}", nargs="+", default=[], metavar="ID", help=f"{subset.capitalize()} subjects.")
    lists.add_argument("--split", nargs=3, type=float, default=[0.7, 0.15, 0.15], metavar=("TRAIN", "VALID", "TEST"),
                       help="Fractions of the subjects per list. [0.7 0.15 0.15]")
    lists.add_argument("--seed", type=int, default=0, help="Random seed of the split. [0]")
    add_verbose_arg(p)
    add_overwrite_arg(p)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    run_cli(prepare_tractoflow, args.results, args.out,
            {"training": args.training, "validation": args.validation, "testing": args.testing},
            ratios=args.split, seed=args.seed, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
