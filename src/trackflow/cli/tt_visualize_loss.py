"""tt_visualize_loss: per-point loss of a trained TractoTransformer model on a subject's streamlines
(histograms, tractograms coloured by loss or EOS values, best/worst streamlines, one-step displacements).

Example::

    tt_visualize_loss my_experiment $hdf5 $subj input --out_prefix colored_tractogram \\
        --use_gpu --batch_size 400 --streamlines_group streamlines \\
        --colormap turbo --show_now --compute_histogram --save_colored_tractogram \\
        --save_colored_best_and_worst 0.5
"""

from trackflow.cli.common import run_cli, setup_logging
from trackflow.visualization.loss import build_parser, visualize_loss


def main(argv=None):
    parser = build_parser("tt_visualize_loss", __doc__)
    args = vars(parser.parse_args(argv))
    setup_logging(args.pop("verbose"))
    run_cli(visualize_loss, "tt", **args)


if __name__ == "__main__":
    main()
