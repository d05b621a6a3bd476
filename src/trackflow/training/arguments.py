"""Command-line options shared by ``l2t_train_model`` and ``tt_train_model`` (spec dwi_ml.md §5.1, §2.3, §3, §4).

Option names and defaults are dwi_ml's. The ``*_from_args`` functions turn parsed options into the
library's parameter objects and the model's ``parameters.json`` keys, refusing inconsistent combinations
with one ``TrackflowError`` before anything is read or trained.
"""

import argparse

from trackflow.errors import TrackflowError
from trackflow.models.direction_getters import (CLASSIFICATION_HEADS, DIRECTION_GETTER_KEYS, GAUSSIAN_HEADS,
                                                REGRESSION_HEADS)
from trackflow.models.registry import TT_MODEL_TYPES
from trackflow.models.transformers import SOS_TOKEN_TYPES
from trackflow.training.batch_loader import LoaderParams
from trackflow.training.batch_sampler import UNITS, SamplerParams
from trackflow.training.trainer import DataParams, TrainerParams, parse_learning_rates, train_new_experiment

# ---------------------------------------------------------------------------------------------- parser groups
def add_experiment_positionals(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiments_path", help="Existing folder that will hold the experiment folder.")
    parser.add_argument("experiment_name", help="Name of the experiment folder to create.")
    parser.add_argument("hdf5_file", help="hdf5 file made by dwiml_create_hdf5_dataset.")
    parser.add_argument("input_group_name", help="Volume group of the hdf5 used as model input.")
    parser.add_argument("streamline_group_name", help="Streamline group of the hdf5 used as training targets.")


def add_preprocessing_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Streamline preprocessing (default: as stored in the hdf5)")
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument("--step_size", type=float, metavar="s",
                           help="Resample streamlines to this step size (mm).")
    exclusive.add_argument("--nb_points", type=int, metavar="n",
                           help="Resample streamlines to this number of points.")
    exclusive.add_argument("--compress", type=float, nargs="?", const=0.01, metavar="r",
                           help="Compress streamlines with this tolerance (mm). [%(const)s when given alone]")


def add_batch_sampler_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Batch sampler")
    group.add_argument("--batch_size_training", type=float, default=100, metavar="s",
                       help="Training batch size, in --batch_size_units. [%(default)s]")
    group.add_argument("--batch_size_validation", type=float, default=100, metavar="s",
                       help="Validation batch size, in --batch_size_units. [%(default)s]")
    group.add_argument("--batch_size_units", choices=UNITS, default="nb_streamlines",
                       help="Unit of the batch sizes: streamline count or summed length in mm. [%(default)s]")
    group.add_argument("--nb_streamlines_per_chunk", type=int, metavar="n",
                       help="With length_mm: streamlines looked at per chunk while filling the budget "
                            "(does not change which streamlines are drawn). [256]")
    group.add_argument("--nb_subjects_per_batch", type=int, metavar="n",
                       help="Maximum number of subjects per batch. [all]")
    group.add_argument("--cycles", type=int, metavar="n",
                       help="Batches drawn from the same subjects before drawing new ones "
                            "(requires --nb_subjects_per_batch).")


def add_batch_loader_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Data augmentation (training batches only)")
    group.add_argument("--noise_gaussian_size_forward", type=float, default=0.0, metavar="s",
                       help="Std (voxels) of the noise added to the coordinates the model sees (previous "
                            "directions, target tokens), after input interpolation; truncated at 2 std. "
                            "[%(default)s]")
    group.add_argument("--noise_gaussian_size_loss", type=float, default=0.0, metavar="s",
                       help="Std (voxels) of the noise added to the coordinates of the loss targets; "
                            "truncated at 2 std. [%(default)s]")
    group.add_argument("--split_ratio", type=float, default=0.0, metavar="r",
                       help="Fraction of streamlines (among those with >= 13 points) cut in two at a random "
                            "point. [%(default)s]")
    group.add_argument("--reverse_ratio", type=float, default=0.0, metavar="r",
                       help="Fraction of streamlines reversed. [%(default)s]")


def add_trainer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Trainer")
    group.add_argument("--learning_rate", nargs="+", metavar="lr",
                       help="Learning rate, or a schedule such as '0.001*3 0.0001' (0.001 for 3 epochs, "
                            "then 0.0001). [0.001]")
    group.add_argument("--weight_decay", type=float, default=0.01, help="Weight decay. [%(default)s]")
    group.add_argument("--optimizer", choices=["Adam", "RAdam", "SGD"], default="Adam",
                       help="[%(default)s]")
    group.add_argument("--max_epochs", type=int, default=100, help="[%(default)s]")
    group.add_argument("--patience", type=int,
                       help="Stop after this many epochs without improvement. [no early stopping]")
    group.add_argument("--patience_delta", type=float, default=1e-6,
                       help="Smallest decrease of the monitored loss counted as an improvement. [%(default)s]")
    group.add_argument("--max_batches_per_epoch_training", type=int, default=1000, help="[%(default)s]")
    group.add_argument("--max_batches_per_epoch_validation", type=int, default=1000, help="[%(default)s]")
    group.add_argument("--clip_grad", type=float, help="Clip the gradient norm to this value. [no clipping]")


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Memory and randomness")
    group.add_argument("--use_gpu", action="store_true",
                       help="Train on the GPU (falls back to the CPU with a warning when CUDA is missing).")
    group.add_argument("--rng", type=int, default=1234,
                       help="Seed of every random generator (model init, sampling, augmentation). [%(default)s]")
    group.add_argument("--lazy", action="store_true",
                       help="Read volumes and streamlines from the hdf5 when needed instead of all at start.")
    group.add_argument("--cache_size", type=int, default=1,
                       help="With --lazy: volumes kept in memory per subset. [%(default)s]")


def add_input_args(parser: argparse.ArgumentParser, default_embedding: str) -> None:
    group = parser.add_argument_group("Model inputs")
    group.add_argument("--neighborhood_type", choices=["axes", "grid"],
                       help="Also interpolate the input at neighbours of each point.")
    group.add_argument("--neighborhood_radius", type=int, help="Neighbourhood radius (integer).")
    group.add_argument("--neighborhood_resolution", type=float,
                       help="Distance between neighbours, in voxels.")
    group.add_argument("--input_embedding_key", choices=["no_embedding", "nn_embedding", "cnn_embedding"],
                       default=default_embedding, help="[%(default)s]")
    group.add_argument("--input_embedded_size", type=int, help="Output size of the nn input embedding.")
    group.add_argument("--nb_cnn_filters", type=int, nargs="+", help="CNN embedding: filters per layer.")
    group.add_argument("--kernel_size", type=int, nargs="+", help="CNN embedding: kernel size per layer.")


def add_direction_getter_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Direction getter (output head)")
    group.add_argument("--dg_key", choices=DIRECTION_GETTER_KEYS, default="cosine-regression", help="[%(default)s]")
    group.add_argument("--dg_dropout", type=float, default=0.0, help="Dropout in the head. [%(default)s]")
    group.add_argument("--add_entropy_to_gauss", type=float, nargs="?", const=1.0, metavar="w",
                       help="gaussian head: subtract w * entropy from the loss. [%(const)s when given alone]")
    group.add_argument("--dg_nb_gaussians", type=int, help="gaussian-mixture: number of gaussians. [3]")
    group.add_argument("--dg_nb_clusters", type=int, help="fisher-von-mises-mixture: number of clusters.")
    group.add_argument("--normalize_targets", type=float, nargs="?", const=1.0, metavar="norm",
                       help="Regression/gaussian heads: rescale target directions to this norm.")
    group.add_argument("--normalize_outputs", type=float, nargs="?", const=1.0, metavar="norm",
                       help="Regression heads: rescale output directions to this norm.")
    group.add_argument("--add_eos", action="store_true", help="Learn an end-of-streamline output.")
    group.add_argument("--eos_weight", type=float, default=1.0,
                       help="Weight of the EOS loss (classification heads: must stay 1). [%(default)s]")


def add_l2t_model_args(parser: argparse.ArgumentParser) -> None:
    add_input_args(parser, default_embedding="no_embedding")
    group = parser.add_argument_group("Learn2track")
    group.add_argument("--nb_previous_dirs", type=int, default=0,
                       help="Previous directions concatenated to the input. [%(default)s]")
    group.add_argument("--prev_dirs_embedding_key", choices=["no_embedding", "nn_embedding"],
                       default="no_embedding", help="[%(default)s]")
    group.add_argument("--prev_dirs_embedded_size", type=int, help="Output size of the nn prev-dir embedding.")
    group.add_argument("--normalize_prev_dirs", action="store_true",
                       help="Unit-normalize the previous directions.")
    group.add_argument("--rnn_key", choices=["lstm", "gru"], default="lstm", help="[%(default)s]")
    group.add_argument("--rnn_layer_sizes", type=int, nargs="+", default=[100, 100], help="[100 100]")
    group.add_argument("--dropout", type=float, default=0.0,
                       help="Dropout after the embeddings and between RNN layers. [%(default)s]")
    group.add_argument("--use_skip_connection", action="store_true")
    group.add_argument("--use_layer_normalization", action="store_true")
    add_direction_getter_args(parser)


def add_tt_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TractoTransformer")
    group.add_argument("--model", choices=sorted(TT_MODEL_TYPES), default="TTO",
                       help="TTO: encoder-decoder; TTS: encoder on inputs; TTST: encoder on inputs and "
                            "previous directions. [%(default)s]")
    add_input_args(parser, default_embedding="nn_embedding")
    group.add_argument("--position_encoding", choices=["sinusoidal"], default="sinusoidal",
                       help="[%(default)s]")
    group.add_argument("--SOS_token_type", choices=SOS_TOKEN_TYPES, default="as_label",
                       help="TTO/TTST target tokens. [%(default)s]")
    group.add_argument("--target_embedding_key", choices=["no_embedding", "nn_embedding"],
                       default="nn_embedding", help="TTO/TTST. [%(default)s]")
    group.add_argument("--target_embedded_size", type=int, help="TTST only: target embedding size.")
    group.add_argument("--max_len", type=int, default=1000, help="Longest sequence. [%(default)s]")
    group.add_argument("--nheads", type=int, default=8, help="[%(default)s]")
    group.add_argument("--n_layers_e", type=int, default=6, help="Encoder layers. [%(default)s]")
    group.add_argument("--n_layers_d", type=int, help="TTO only: decoder layers. [= n_layers_e]")
    group.add_argument("--dropout_rate", type=float, default=0.1, help="[%(default)s]")
    group.add_argument("--ffnn_hidden_size", type=int, help="Feed-forward width. [d_model / 2]")
    group.add_argument("--activation", choices=["relu", "gelu"], default="relu", help="[%(default)s]")
    group.add_argument("--norm_first", action="store_true", help="Layer norm before attention and FFNN.")
    add_direction_getter_args(parser)


def build_train_parser(description: str, family: str) -> argparse.ArgumentParser:
    """The full parser of ``l2t_train_model`` (family 'l2t') or ``tt_train_model`` ('tt')."""
    from trackflow.cli.common import add_overwrite_arg, add_verbose_arg

    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_positionals(parser)
    add_preprocessing_args(parser)
    if family == "l2t":
        add_l2t_model_args(parser)
    else:
        add_tt_model_args(parser)
    add_batch_sampler_args(parser)
    add_batch_loader_args(parser)
    add_trainer_args(parser)
    add_memory_args(parser)
    add_verbose_arg(parser)
    add_overwrite_arg(parser)
    return parser


def build_resume_parser(description: str) -> argparse.ArgumentParser:
    from trackflow.cli.common import add_verbose_arg

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("experiments_path", help="Folder holding the experiment folder.")
    parser.add_argument("experiment_name", help="Experiment folder to continue.")
    parser.add_argument("--hdf5_file", help="Use this hdf5 instead of the one recorded in the checkpoint.")
    parser.add_argument("--new_patience", type=int, help="Replace the patience.")
    parser.add_argument("--new_max_epochs", type=int, help="Replace the maximum number of epochs.")
    add_verbose_arg(parser)
    return parser


# ---------------------------------------------------------------------------------------------- conversions
def _dg_args_from_args(args) -> dict:
    """``dg_args`` as dwi_ml's CLIs write them (checkpoints §1.5), after refusing options the head ignores."""
    key = args.dg_key

    def refuse(option: str, allowed) -> None:
        if getattr(args, option) is not None and key not in allowed:
            raise TrackflowError(f"--{option} does not apply to --dg_key {key} (only to {', '.join(allowed)})")

    refuse("normalize_outputs", REGRESSION_HEADS)
    refuse("normalize_targets", REGRESSION_HEADS + GAUSSIAN_HEADS)
    refuse("add_entropy_to_gauss", ("gaussian",))
    refuse("dg_nb_gaussians", ("gaussian-mixture",))
    refuse("dg_nb_clusters", ("fisher-von-mises-mixture",))
    if key in CLASSIFICATION_HEADS and args.add_eos and args.eos_weight != 1.0:
        raise TrackflowError(f"--eos_weight must be 1 with {key}: EOS is one more class of the softmax")
    if not 0.0 <= args.dg_dropout <= 1.0:
        raise TrackflowError(f"--dg_dropout must be in [0, 1], got {args.dg_dropout}")

    dg_args = {"dropout": args.dg_dropout, "add_eos": args.add_eos, "eos_weight": args.eos_weight}
    if key in REGRESSION_HEADS:
        dg_args.update(normalize_targets=args.normalize_targets, normalize_outputs=args.normalize_outputs)
    elif key in GAUSSIAN_HEADS:
        dg_args["normalize_targets"] = args.normalize_targets
        if args.add_entropy_to_gauss is not None:
            dg_args["entropy_weight"] = args.add_entropy_to_gauss
        if args.dg_nb_gaussians is not None:
            dg_args["nb_gaussians"] = args.dg_nb_gaussians
    elif key == "fisher-von-mises-mixture" and args.dg_nb_clusters is not None:
        dg_args["n_cluster"] = args.dg_nb_clusters
    return dg_args


def _common_model_params(args) -> dict:
    """Keys of checkpoints §1.2 (``nb_features`` is added from the hdf5 by the trainer)."""
    if args.neighborhood_type is not None and (args.neighborhood_radius is None
                                               or args.neighborhood_resolution is None):
        raise TrackflowError("--neighborhood_type needs --neighborhood_radius and --neighborhood_resolution")
    if args.neighborhood_type is None and (args.neighborhood_radius is not None
                                           or args.neighborhood_resolution is not None):
        raise TrackflowError("--neighborhood_radius/--neighborhood_resolution need --neighborhood_type")
    cnn = args.input_embedding_key == "cnn_embedding"
    if cnn:
        if args.neighborhood_type != "grid":
            raise TrackflowError("--input_embedding_key cnn_embedding needs --neighborhood_type grid")
        if not args.nb_cnn_filters or not args.kernel_size:
            raise TrackflowError("cnn_embedding needs --nb_cnn_filters and --kernel_size")
        if len(args.nb_cnn_filters) != len(args.kernel_size):
            raise TrackflowError("--nb_cnn_filters and --kernel_size must have the same number of values")
        if args.input_embedded_size is not None:
            raise TrackflowError("--input_embedded_size cannot be used with cnn_embedding")
    elif args.nb_cnn_filters is not None or args.kernel_size is not None:
        raise TrackflowError("--nb_cnn_filters and --kernel_size need --input_embedding_key cnn_embedding")
    if args.input_embedding_key == "nn_embedding" and args.input_embedded_size is None:
        raise TrackflowError("--input_embedding_key nn_embedding needs --input_embedded_size")
    if args.input_embedding_key == "no_embedding" and args.input_embedded_size is not None:
        raise TrackflowError("--input_embedded_size needs --input_embedding_key nn_embedding")
    return {
        "experiment_name": args.experiment_name,
        "step_size": args.step_size,
        "compress_lines": args.compress,
        "nb_points": args.nb_points,
        "input_embedding_key": args.input_embedding_key,
        "input_embedded_size": args.input_embedded_size,
        "kernel_size": args.kernel_size,
        "nb_cnn_filters": args.nb_cnn_filters,
        "neighborhood_type": args.neighborhood_type,
        "neighborhood_radius": args.neighborhood_radius,
        "neighborhood_resolution": args.neighborhood_resolution,
        "dg_key": args.dg_key,
        "dg_args": _dg_args_from_args(args),
    }


def l2t_model_params(args) -> dict:
    """``parameters.json`` keys of a Learn2TrackModel (checkpoints §1.2, §1.3), minus ``nb_features``."""
    if args.nb_previous_dirs < 0:
        raise TrackflowError("--nb_previous_dirs must be >= 0")
    if args.prev_dirs_embedding_key == "nn_embedding" and args.prev_dirs_embedded_size is None:
        raise TrackflowError("--prev_dirs_embedding_key nn_embedding needs --prev_dirs_embedded_size")
    if (args.prev_dirs_embedding_key == "no_embedding" and args.prev_dirs_embedded_size is not None
            and args.prev_dirs_embedded_size != 3 * args.nb_previous_dirs):
        raise TrackflowError("without a prev-dir embedding, --prev_dirs_embedded_size must be 3 x "
                             "--nb_previous_dirs")
    if not 0.0 <= args.dropout <= 1.0:
        raise TrackflowError(f"--dropout must be in [0, 1], got {args.dropout}")
    return {
        **_common_model_params(args),
        "nb_previous_dirs": args.nb_previous_dirs,
        "prev_dirs_embedding_key": args.prev_dirs_embedding_key,
        "prev_dirs_embedded_size": args.prev_dirs_embedded_size,
        "normalize_prev_dirs": args.normalize_prev_dirs,
        "rnn_key": args.rnn_key,
        "rnn_layer_sizes": args.rnn_layer_sizes,
        "use_skip_connection": args.use_skip_connection,
        "use_layer_normalization": args.use_layer_normalization,
        "dropout": args.dropout,
    }


def tt_model_params(args) -> dict:
    """``parameters.json`` keys of the transformer chosen by ``--model`` (checkpoints §1.4), minus ``nb_features``."""
    if args.input_embedding_key == "cnn_embedding":
        raise TrackflowError("cnn_embedding is not available for transformers")
    if args.target_embedded_size is not None and args.model != "TTST":
        raise TrackflowError("--target_embedded_size is only for --model TTST (TTO uses d_model)")
    if args.model == "TTST" and args.target_embedding_key == "nn_embedding" and args.target_embedded_size is None:
        raise TrackflowError("--model TTST with nn target embedding needs --target_embedded_size")
    if args.n_layers_d is not None and args.model != "TTO":
        raise TrackflowError("--n_layers_d is only for --model TTO (the others have no decoder)")
    if not 0.0 <= args.dropout_rate <= 1.0:
        raise TrackflowError(f"--dropout_rate must be in [0, 1], got {args.dropout_rate}")
    params = {
        **_common_model_params(args),
        "max_len": args.max_len,
        "n_layers_e": args.n_layers_e,
        "positional_encoding_key": args.position_encoding,
        "dropout_rate": args.dropout_rate,
        "activation": args.activation,
        "nheads": args.nheads,
        "ffnn_hidden_size": args.ffnn_hidden_size,
        "norm_first": args.norm_first,
    }
    if args.model in ("TTO", "TTST"):
        params.update(sos_token_type=args.SOS_token_type, target_embedding_key=args.target_embedding_key)
    if args.model == "TTO":
        params["n_layers_d"] = args.n_layers_d if args.n_layers_d is not None else args.n_layers_e
    if args.model == "TTST":
        params["target_embedded_size"] = args.target_embedded_size
    return params


def train_from_args(args, family: str):
    """Check every option, then train a new experiment (the one library call of the train CLIs).

    Parameters
    ----------
    args : argparse.Namespace
        From ``build_train_parser(..., family)``.
    family : {'l2t', 'tt'}

    Returns
    -------
    ExperimentFolder
    """
    if family == "l2t":
        model_type, model_params = "Learn2TrackModel", l2t_model_params(args)
    else:
        model_type, model_params = TT_MODEL_TYPES[args.model], tt_model_params(args)

    def sampler(batch_size, max_batches):
        return SamplerParams(batch_size=batch_size, batch_size_units=args.batch_size_units,
                             nb_streamlines_per_chunk=args.nb_streamlines_per_chunk,
                             nb_subjects_per_batch=args.nb_subjects_per_batch, cycles=args.cycles,
                             max_batches_per_epoch=max_batches)

    return train_new_experiment(
        args.experiments_path, args.experiment_name, args.hdf5_file, args.input_group_name,
        args.streamline_group_name, model_type=model_type, model_params=model_params,
        training_sampler=sampler(args.batch_size_training, args.max_batches_per_epoch_training),
        validation_sampler=sampler(args.batch_size_validation, args.max_batches_per_epoch_validation),
        loader=LoaderParams(noise_gaussian_size_forward=args.noise_gaussian_size_forward,
                            noise_gaussian_size_loss=args.noise_gaussian_size_loss,
                            split_ratio=args.split_ratio, reverse_ratio=args.reverse_ratio),
        trainer=TrainerParams(learning_rates=parse_learning_rates(args.learning_rate),
                              weight_decay=args.weight_decay, optimizer=args.optimizer,
                              max_epochs=args.max_epochs, patience=args.patience,
                              patience_delta=args.patience_delta, clip_grad=args.clip_grad,
                              use_gpu=args.use_gpu, rng=args.rng),
        data=DataParams(lazy=args.lazy, cache_size=args.cache_size),
        overwrite=args.overwrite)
