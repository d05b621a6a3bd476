"""Plot the per-epoch logs of training experiments (losses, gradient norms, durations) as PNG files.

Example: ``dwiml_visualize_logs exps/l2t exps/tto --save_figures plots/compare_`` writes
``plots/compare_loss.png``, ``plots/compare_grad_norm.png`` and ``plots/compare_time.png``.
"""

import argparse

from trackflow.cli.common import add_overwrite_arg, add_verbose_arg, run_cli, setup_logging
from trackflow.visualization.logs import plot_logs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", help="Experiment folders.")
    parser.add_argument("--save_figures", metavar="PREFIX",
                        help="Prefix of the PNG files (<PREFIX>loss.png, ...). [<first experiment>/logs/]")
    add_verbose_arg(parser)
    add_overwrite_arg(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    run_cli(plot_logs, args.experiments, args.save_figures, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
