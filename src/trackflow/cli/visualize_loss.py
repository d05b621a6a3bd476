"""l2t_visualize_loss / tt_visualize_loss: per-point loss of a trained model on a subject's streamlines
(histograms, tractograms coloured by loss or EOS values, best/worst streamlines, one-step displacements).

``l2t_main`` (Learn2track) and ``tt_main`` (TractoTransformer) share one parser; each names its family so
that a model of the other family is refused with the script to use.
"""

import argparse

from trackflow.cli.common import (add_overwrite_arg, add_verbose_arg, new_parser, percent, positive_int, run_cli,
                                  setup_logging)
from trackflow.data.hdf5.reader import SUBSET_NAMES
from trackflow.visualization.loss import DEFAULT_BEST_WORST_PERCENT, LossVisualizationOptions, visualize_loss

# The --help text of each script: what it does and the documented example.
_DESCRIPTION = """{prog}: per-point loss of a trained {model} model on a subject's streamlines
(histograms, tractograms coloured by loss or EOS values, best/worst streamlines, one-step displacements).

Example::

    {prog} my_experiment $hdf5 $subj input --out_prefix colored_tractogram \\
        --use_gpu --batch_size 400 --streamlines_group streamlines \\
        --colormap turbo --show_now --compute_histogram --save_colored_tractogram \\
        --save_colored_best_and_worst 0.5
"""
_POSITIONAL = ("experiment_path", "hdf5_file", "subj_id", "input_group")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Parser of ``l2t_visualize_loss`` and ``tt_visualize_loss``; apart from ``verbose`` and the four
    positional arguments, its options are the fields of ``LossVisualizationOptions``."""
    # Example command lines kept as written; defaults are in each option's help.
    p = new_parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment_path", help="Experiment folder (with best_model/).")
    p.add_argument("hdf5_file", help="Cohort hdf5 file.")
    p.add_argument("subj_id", help="Subject id in the hdf5 file.")
    p.add_argument("input_group", help="Volume group holding the model's input.")
    _add_data_args(p)
    _add_computation_args(p)
    _add_output_args(p)
    _add_figure_args(p)
    add_overwrite_arg(p)
    add_verbose_arg(p)
    return p


def _add_data_args(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("Reference streamlines (one of)")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--streamlines_group", help="Streamline group of the subject in the hdf5.")
    source.add_argument("--streamlines_file", help="Tractogram file (.trk, .trx, or .tck with --reference) on "
                                                   "the grid of the input volume.")
    data.add_argument("--reference", help="Reference image of a .tck --streamlines_file.")
    data.add_argument("--subset", default="testing", choices=list(SUBSET_NAMES),
                      help="Subset expected to hold the subject (a warning only). [%(default)s]")
    data.add_argument("--use_latest_epoch", action="store_true",
                      help="Use checkpoint/model/ instead of best_model/.")


def _add_computation_args(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("Computation")
    run.add_argument("--batch_size", type=positive_int, help="Streamlines per batch [all at once].")
    device = run.add_mutually_exclusive_group()
    device.add_argument("--use_gpu", action="store_true",
                        help="Run on the GPU (CUDA); falls back to the CPU with a warning.")
    device.add_argument("--processes", type=positive_int, help="CPU threads for torch [torch's default].")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    out = p.add_argument_group("Outputs (at least one)")
    out.add_argument("--out_dir", help="Output folder [<experiment_path>/visu_loss].")
    out.add_argument("--out_prefix", help="Prefix of every output file name [subj_id].")
    out.add_argument("--compute_histogram", action="store_true",
                     help="Histograms of the per-point and per-streamline loss (and of EOS values).")
    out.add_argument("--save_colored_tractogram", action="store_true",
                     help="Tractogram with per-point data 'losses' and 'color'.")
    out.add_argument("--save_colored_best_and_worst", type=percent, nargs="?", const=DEFAULT_BEST_WORST_PERCENT,
                     metavar="PCT", help="Tractograms of the PCT%% streamlines of lowest and of highest mean "
                                         "loss (PCT %(const)s if no value; at most half of them each).")
    out.add_argument("--save_colored_eos_probs", action="store_true",
                     help="Tractogram coloured by the EOS probability (models with EOS).")
    out.add_argument("--save_colored_eos_errors", action="store_true",
                     help="Tractogram coloured by the EOS error |p(EOS) - target| (models with EOS).")
    out.add_argument("--save_displacement", type=positive_int, nargs="?", const=1, metavar="N",
                     help="N random streamlines (blue) with the model's one-step predictions from each point "
                          "(zig-zag, green to pink) [1 if no value].")


def _add_figure_args(p: argparse.ArgumentParser) -> None:
    look = p.add_argument_group("Colours and figures")
    look.add_argument("--colormap", default="plasma", help="Matplotlib colormap of the loss. [%(default)s]")
    look.add_argument("--min_range", type=float, help="Clip losses below this value [data minimum].")
    look.add_argument("--max_range", type=float, help="Clip losses above this value [data maximum].")
    look.add_argument("--min_range_eos_probs", type=float, help="Lower clip of EOS probabilities.")
    look.add_argument("--max_range_eos_probs", type=float, help="Upper clip of EOS probabilities.")
    look.add_argument("--min_range_eos_errors", type=float, help="Lower clip of EOS errors.")
    look.add_argument("--max_range_eos_errors", type=float, help="Upper clip of EOS errors.")
    look.add_argument("--show_now", action="store_true",
                      help="Also show the figures (on a machine without display they are only saved).")
    look.add_argument("--fig_size", type=float, nargs=2, default=(10.0, 15.0), metavar=("WIDTH", "HEIGHT"),
                      help="Histogram figure size in inches. [10 15]")


def _visualize(model_family: str, args: dict) -> dict:
    positional = [args.pop(name) for name in _POSITIONAL]
    return visualize_loss(model_family, *positional, LossVisualizationOptions(**args))


def _main(prog: str, model: str, model_family: str, argv) -> None:
    parser = build_parser(prog, _DESCRIPTION.format(prog=prog, model=model))
    args = vars(parser.parse_args(argv))
    setup_logging(args.pop("verbose"))
    run_cli(_visualize, model_family, args)


def l2t_main(argv=None) -> None:
    """``l2t_visualize_loss``: a Learn2track model."""
    _main("l2t_visualize_loss", "Learn2track", "l2t", argv)


def tt_main(argv=None) -> None:
    """``tt_visualize_loss``: a TractoTransformer model."""
    _main("tt_visualize_loss", "TractoTransformer", "tt", argv)
