"""Plot the per-epoch logs of training experiments (losses, gradient norms, durations) as PNG files.

Example: ``dwiml_visualize_logs exps/l2t exps/tto --save_figures plots/compare_`` writes
``plots/compare_loss.png``, ``plots/compare_grad_norm.png`` and ``plots/compare_time.png``.

dwi_ml's figure-layout options (--graph, --nb_plots_per_fig, --xlim, --ylims, --fig_size, --show_now,
--allow_missing) are accepted and have no effect: the three figures above are always drawn, and monitors
missing from an experiment are skipped.
"""

import argparse

from trackflow.cli.common import (add_ignored_dwi_ml_args, add_overwrite_arg, add_verbose_arg, new_parser, run_cli,
                                  setup_logging, warn_ignored_dwi_ml_args)
from trackflow.visualization.logs import plot_logs


def main(argv=None):
    parser = new_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", help="Experiment folders.")
    parser.add_argument("--save_figures", metavar="PREFIX", nargs="?", const="./",
                        help="Prefix of the PNG files (<PREFIX>loss.png, ...); ./ if no value. "
                             "[<first experiment>/logs/]")
    parser.add_argument("--save_to_csv", metavar="FILE.csv",
                        help="Also write the logs as CSV: one row per experiment and log (experiment, log "
                             "name, one value per epoch).")
    parser.add_argument("--remove_outliers", action="store_true",
                        help="Draw values more than 3 std from a curve's mean as stars, off the line (the CSV "
                             "keeps them).")
    no_effect = "the loss, gradient-norm and time figures are always drawn"
    add_ignored_dwi_ml_args(parser, {
        "--graph": (dict(action="append", nargs="+", metavar="ARG"), no_effect),
        "--nb_plots_per_fig": (dict(type=int), no_effect),
        "--xlim": (dict(type=int), no_effect),
        "--ylims": (dict(type=float, nargs=2), no_effect),
        "--fig_size": (dict(type=int, nargs=2), no_effect),
        "--show_now": (dict(action="store_true"), "figures are only saved"),
        "--allow_missing": (dict(action="store_true"), "missing monitors are always skipped"),
    })
    add_verbose_arg(parser)
    add_overwrite_arg(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    warn_ignored_dwi_ml_args(vars(args))
    run_cli(plot_logs, args.experiments, args.save_figures, overwrite=args.overwrite, csv_file=args.save_to_csv,
            remove_outliers=args.remove_outliers)


if __name__ == "__main__":
    main()
