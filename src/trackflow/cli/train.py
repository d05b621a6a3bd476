"""The train and resume command lines (dwi_ml's ``l2t_/tt_train_model`` and
``l2t_/tt_resume_training_from_checkpoint``).

Option names and defaults are dwi_ml's. The options are mapped onto the model's config (``L2TConfig``,
``TransformerConfig``/``TTSTConfig``/``TTOConfig``) and the trainer's parameter objects; the models and
those objects validate them, before anything is read or trained.
"""

import argparse

from trackflow.cli.common import (add_ignored_dwi_ml_args, add_overwrite_arg, add_verbose_arg, new_parser, run_cli,
                                  setup_logging, warn_ignored_dwi_ml_args)
from trackflow.errors import TrackflowError
from trackflow.geometry.neighborhood import NEIGHBORHOOD_TYPES
from trackflow.geometry.sh_rotation import SH_BASES
from trackflow.models.attention import ACTIVATIONS
from trackflow.models.direction_getters import DIRECTION_GETTER_KEYS, dg_args_from_options
from trackflow.models.embeddings import EMBEDDING_KEYS
from trackflow.models.l2t import PREV_DIRS_EMBEDDING_KEYS, RNN_KEYS, L2TConfig
from trackflow.models.registry import TT_MODEL_TYPES
from trackflow.models.transformers import (POSITIONAL_ENCODING_KEYS, SOS_TOKEN_TYPES, TARGET_EMBEDDING_KEYS,
                                           TransformerConfig, TTOConfig, TTSTConfig)
from trackflow.training.batch_loader import LoaderParams
from trackflow.training.batch_sampler import UNITS, SamplerParams
from trackflow.tracking.validation import make_tracking_validator
from trackflow.training.trainer import (OPTIMIZERS, DataParams, TrainerParams, parse_learning_rates,
                                        resume_experiment, train_new_experiment)

L2T_TRAIN_DESCRIPTION = """Train a Learn2track model on an hdf5 cohort (dwi_ml's ``l2t_train_model``).

Writes the experiment folder ``experiments_path/experiment_name`` (best model, checkpoint, per-epoch logs);
continue it with ``l2t_resume_training_from_checkpoint``.
"""
TT_TRAIN_DESCRIPTION = """Train a TractoTransformer (TTO, TTS or TTST) on an hdf5 cohort (dwi_ml's ``tt_train_model``).

Writes the experiment folder ``experiments_path/experiment_name`` (best model, checkpoint, per-epoch logs);
continue it with ``tt_resume_training_from_checkpoint``.
"""
L2T_RESUME_DESCRIPTION = """Continue a Learn2track training from its checkpoint (dwi_ml's ``l2t_resume_training_from_checkpoint``).

The resumed run draws the same batches and noise as an uninterrupted run would have. A run stopped by
patience or ``max_epochs`` needs a larger ``--new_patience`` or ``--new_max_epochs``.
"""
TT_RESUME_DESCRIPTION = """Continue a TractoTransformer training from its checkpoint (dwi_ml's ``tt_resume_training_from_checkpoint``).

The resumed run draws the same batches and noise as an uninterrupted run would have. A run stopped by
patience or ``max_epochs`` needs a larger ``--new_patience`` or ``--new_max_epochs``.
"""
TT_CONFIGS = {"TTO": TTOConfig, "TTS": TransformerConfig, "TTST": TTSTConfig}


# ---------------------------------------------------------------------------------------------- parser groups
def add_experiment_positionals(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiments_path", help="Existing folder that will hold the experiment folder.")
    parser.add_argument("experiment_name", help="Name of the experiment folder to create.")
    parser.add_argument("hdf5_file", help="hdf5 file made by dwiml_create_hdf5_dataset.")
    parser.add_argument("input_group_name", help="Volume group of the hdf5 used as model input.")
    parser.add_argument("streamline_group_name", help="Streamline group of the hdf5 used as training targets.")


def add_preprocessing_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Streamline preprocessing (none given: as stored in the hdf5)")
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
    group.add_argument("--rotation_augmentation", type=float, default=0.0, metavar="DEG",
                       help="Rotate each training streamline, and the input signal it sees, by a random "
                            "rotation (axis uniform on the sphere, angle uniform in [0, DEG]; 180: any). "
                            "Needs isotropic voxels; give the SH features with --sh_features. [0: off]")
    group.add_argument("--rotation_axis", type=float, nargs=3, metavar=("X", "Y", "Z"),
                       help="With --rotation_augmentation: rotate about this axis only (voxel axes), by an "
                            "angle uniform in [-DEG, DEG]. [a random axis per streamline]")
    group.add_argument("--sh_features", type=int, nargs=2, metavar=("FIRST", "COUNT"),
                       help="With --rotation_augmentation: the input group's SH coefficients are features "
                            "FIRST..FIRST+COUNT-1 of each neighbour (0-based; COUNT = (l+1)(l+2)/2, e.g. 45 "
                            "for order 8), rotated with the streamline; the other features are scalars. "
                            "The demo (T1, FA, fODF of order 6): 2 28. [none: every feature is a scalar]")
    group.add_argument("--sh_basis", choices=SH_BASES, default="descoteaux07",
                       help="Basis of --sh_features (scilpy 2.x names; non-legacy). [%(default)s]")


def add_trainer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Trainer")
    group.add_argument("--learning_rate", nargs="+", metavar="lr",
                       help="Learning rate, or a schedule such as '0.001*3 0.0001' (0.001 for 3 epochs, "
                            "then 0.0001). [0.001]")
    group.add_argument("--weight_decay", type=float, default=0.01, help="Weight decay. [%(default)s]")
    group.add_argument("--optimizer", choices=list(OPTIMIZERS), default="Adam",
                       help="Optimizer. [%(default)s]")
    group.add_argument("--max_epochs", type=int, default=100, help="Maximum number of epochs. [%(default)s]")
    group.add_argument("--patience", type=int,
                       help="Stop after this many epochs without improvement. [no early stopping]")
    group.add_argument("--patience_delta", type=float, default=1e-6,
                       help="Smallest decrease of the monitored loss counted as an improvement. [%(default)s]")
    group.add_argument("--max_batches_per_epoch_training", type=int, default=1000,
                       help="Training batches per epoch, at most. [%(default)s]")
    group.add_argument("--max_batches_per_epoch_validation", type=int, default=1000,
                       help="Validation batches per epoch, at most. [%(default)s]")
    group.add_argument("--clip_grad", type=float, help="Clip the gradient norm to this value. [no clipping]")
    group = parser.add_argument_group("Generation-validation (the best epoch chosen by tracking)")
    group.add_argument("--add_a_tracking_validation_phase", action="store_true",
                       help="Each phase tracks a fixed draw of validation streamlines from their first points "
                            "and measures how far the tracked ends fall from the true ends (mm); the best "
                            "epoch is the closest, instead of the lowest validation loss.")
    group.add_argument("--tracking_phase_frequency", type=int, default=1, metavar="N",
                       help="A phase every N epochs (the epochs between repeat the last score). [%(default)s]")
    group.add_argument("--tracking_mask", metavar="GROUP",
                       help="Volume group of the mask that stops the phase's streamlines (required with it).")
    group.add_argument("--tracking_phase_nb_segments_init", type=int, default=1, metavar="N",
                       help="True segments given before the model tracks. [%(default)s]")


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


def add_input_args(parser: argparse.ArgumentParser, default_embedding: str, cnn: bool) -> None:
    """The input options; ``cnn``: offer the CNN embedding (Learn2track only: transformers cannot use it)."""
    group = parser.add_argument_group("Model inputs")
    group.add_argument("--neighborhood_type", choices=NEIGHBORHOOD_TYPES,
                       help="Also interpolate the input at neighbours of each point.")
    group.add_argument("--neighborhood_radius", type=int, help="Neighbourhood radius (integer).")
    group.add_argument("--neighborhood_resolution", type=float,
                       help="Distance between neighbours, in voxels.")
    group.add_argument("--input_embedding_key", default=default_embedding,
                       choices=[key for key in EMBEDDING_KEYS if cnn or key != "cnn_embedding"],
                       help="Embedding of the interpolated inputs. [%(default)s]")
    group.add_argument("--input_embedded_size", type=int, help="Output size of the nn input embedding.")
    if cnn:
        group.add_argument("--nb_cnn_filters", type=int, nargs="+", help="CNN embedding: filters per layer.")
        group.add_argument("--kernel_size", type=int, nargs="+", help="CNN embedding: kernel size per layer.")
    else:
        parser.set_defaults(nb_cnn_filters=None, kernel_size=None)


def add_direction_getter_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Direction getter (output head)")
    group.add_argument("--dg_key", choices=DIRECTION_GETTER_KEYS, default="cosine-regression",
                       help="Output head (and its loss). [%(default)s]")
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
    group.add_argument("--eos_weight", type=float,
                       help="Weight of the EOS loss (classification heads: of the rows whose target is EOS, one end "
                            "per ~70 points; dwi_ml loads such a model only with 1). [10 for classification heads "
                            "with --add_eos, else 1]")


def add_l2t_model_args(parser: argparse.ArgumentParser) -> None:
    add_input_args(parser, default_embedding="no_embedding", cnn=True)
    group = parser.add_argument_group("Learn2track")
    group.add_argument("--nb_previous_dirs", type=int, default=0,
                       help="Previous directions concatenated to the input. [%(default)s]")
    group.add_argument("--prev_dirs_embedding_key", choices=PREV_DIRS_EMBEDDING_KEYS,
                       default="no_embedding", help="Embedding of the previous directions. [%(default)s]")
    group.add_argument("--prev_dirs_embedded_size", type=int, help="Output size of the nn prev-dir embedding.")
    group.add_argument("--normalize_prev_dirs", action="store_true",
                       help="Unit-normalize the previous directions.")
    group.add_argument("--rnn_key", choices=RNN_KEYS, default="lstm", help="Recurrent layer type. [%(default)s]")
    group.add_argument("--rnn_layer_sizes", type=int, nargs="+", default=[100, 100],
                       help="Hidden size of each stacked RNN layer. [100 100]")
    group.add_argument("--dropout", type=float, default=0.0,
                       help="Dropout after the embeddings and between RNN layers. [%(default)s]")
    group.add_argument("--use_skip_connection", action="store_true",
                       help="Feed the input and every RNN layer's output to the head.")
    group.add_argument("--use_layer_normalization", action="store_true",
                       help="Layer normalization after each RNN layer.")
    add_direction_getter_args(parser)


def add_tt_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TractoTransformer")
    group.add_argument("--model", choices=sorted(TT_MODEL_TYPES), default="TTO",
                       help="TTO: encoder-decoder; TTS: encoder on inputs; TTST: encoder on inputs and "
                            "previous directions. [%(default)s]")
    add_input_args(parser, default_embedding="nn_embedding", cnn=False)
    group.add_argument("--position_encoding", choices=POSITIONAL_ENCODING_KEYS, default="sinusoidal",
                       help="Positional encoding. [%(default)s]")
    group.add_argument("--SOS_token_type", choices=SOS_TOKEN_TYPES, default="as_label",
                       help="TTO/TTST target tokens. [%(default)s]")
    group.add_argument("--target_embedding_key", choices=TARGET_EMBEDDING_KEYS,
                       default="nn_embedding", help="TTO/TTST. [%(default)s]")
    group.add_argument("--target_embedded_size", type=int, help="TTST only: target embedding size.")
    group.add_argument("--max_len", type=int, default=1000, help="Longest sequence. [%(default)s]")
    group.add_argument("--nheads", type=int, default=8, help="Attention heads. [%(default)s]")
    group.add_argument("--n_layers_e", type=int, default=6, help="Encoder layers. [%(default)s]")
    group.add_argument("--n_layers_d", type=int, help="TTO only: decoder layers. [= n_layers_e]")
    group.add_argument("--dropout_rate", type=float, default=0.1,
                       help="Dropout in the attention and feed-forward blocks. [%(default)s]")
    group.add_argument("--ffnn_hidden_size", type=int, help="Feed-forward width. [d_model / 2]")
    group.add_argument("--activation", choices=list(ACTIVATIONS), default="relu",
                       help="Activation of the feed-forward blocks. [%(default)s]")
    group.add_argument("--norm_first", action="store_true", help="Layer norm before attention and FFNN.")
    add_direction_getter_args(parser)


def build_train_parser(description: str, family: str) -> argparse.ArgumentParser:
    """The full parser of ``l2t_train_model`` (family 'l2t') or ``tt_train_model`` ('tt')."""
    parser = new_parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    add_ignored_dwi_ml_args(parser, {
        "--remove_invalid": (dict(action="store_true"), "unused in dwi_ml's training too"),
        "--processes": (dict(type=int), "batches are loaded in the training process"),
        "--comet_workspace": (dict(), "no comet.ml logging (the logs/ folder has every monitor)"),
        "--comet_project": (dict(), "no comet.ml logging (the logs/ folder has every monitor)"),
    })
    add_verbose_arg(parser)
    add_overwrite_arg(parser)
    return parser


def build_resume_parser(description: str) -> argparse.ArgumentParser:
    parser = new_parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments_path", help="Folder holding the experiment folder.")
    parser.add_argument("experiment_name", help="Experiment folder to continue.")
    parser.add_argument("--hdf5_file", help="Use this hdf5 instead of the one recorded in the checkpoint.")
    parser.add_argument("--new_patience", type=int, help="Replace the patience.")
    parser.add_argument("--new_max_epochs", type=int, help="Replace the maximum number of epochs.")
    parser.add_argument("--use_gpu", action="store_true",
                        help="Continue on the GPU (falls back to the CPU with a warning when CUDA is missing); "
                             "a runtime choice, not read from the checkpoint.")
    add_ignored_dwi_ml_args(parser, {
        "-f": (dict(action="store_true"), "resuming always continues the experiment in place")})
    add_verbose_arg(parser)
    return parser


# ---------------------------------------------------------------------------------------------- options -> configs
def _common_config_fields(args) -> dict:
    """The ``ModelConfig`` fields (``nb_features`` is added from the hdf5 by the trainer)."""
    if args.input_embedding_key != "cnn_embedding" and (args.nb_cnn_filters is not None
                                                        or args.kernel_size is not None):
        raise TrackflowError("--nb_cnn_filters and --kernel_size need --input_embedding_key cnn_embedding")
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
        "dg_args": dg_args_from_options(
            args.dg_key, dropout=args.dg_dropout, add_eos=args.add_eos, eos_weight=args.eos_weight,
            normalize_targets=args.normalize_targets, normalize_outputs=args.normalize_outputs,
            entropy_weight=args.add_entropy_to_gauss, nb_gaussians=args.dg_nb_gaussians,
            n_cluster=args.dg_nb_clusters),
    }


def l2t_config(args) -> L2TConfig:
    """The Learn2TrackModel config of ``l2t_train_model``'s options."""
    return L2TConfig(**_common_config_fields(args), nb_previous_dirs=args.nb_previous_dirs,
                     prev_dirs_embedding_key=args.prev_dirs_embedding_key,
                     prev_dirs_embedded_size=args.prev_dirs_embedded_size,
                     normalize_prev_dirs=args.normalize_prev_dirs, rnn_key=args.rnn_key,
                     rnn_layer_sizes=args.rnn_layer_sizes, use_skip_connection=args.use_skip_connection,
                     use_layer_normalization=args.use_layer_normalization, dropout=args.dropout)


def tt_config(args) -> TransformerConfig:
    """The config of the transformer chosen by ``--model``; refuses the options of another variant."""
    if args.target_embedded_size is not None and args.model != "TTST":
        raise TrackflowError("--target_embedded_size is only for --model TTST (TTO uses d_model)")
    if args.n_layers_d is not None and args.model != "TTO":
        raise TrackflowError("--n_layers_d is only for --model TTO (the others have no decoder)")
    fields = dict(_common_config_fields(args), max_len=args.max_len, n_layers_e=args.n_layers_e,
                  positional_encoding_key=args.position_encoding, dropout_rate=args.dropout_rate,
                  activation=args.activation, nheads=args.nheads, ffnn_hidden_size=args.ffnn_hidden_size,
                  norm_first=args.norm_first)
    if args.model in ("TTO", "TTST"):
        fields.update(sos_token_type=args.SOS_token_type, target_embedding_key=args.target_embedding_key)
    if args.model == "TTO":
        fields["n_layers_d"] = args.n_layers_d if args.n_layers_d is not None else args.n_layers_e
    if args.model == "TTST":
        fields["target_embedded_size"] = args.target_embedded_size
    return TT_CONFIGS[args.model](**fields)


def training_arguments(args, family: str) -> dict:
    """The keyword arguments of ``train_new_experiment`` for parsed options; every option is validated here
    (model config, sampler, loader, trainer), before any file is read. The workflow checks its configs with it."""
    if family == "l2t":
        model_type, model_config = "Learn2TrackModel", l2t_config(args)
    else:
        model_type, model_config = TT_MODEL_TYPES[args.model], tt_config(args)

    def sampler(batch_size, max_batches):
        return SamplerParams(batch_size=batch_size, batch_size_units=args.batch_size_units,
                             nb_streamlines_per_chunk=args.nb_streamlines_per_chunk,
                             nb_subjects_per_batch=args.nb_subjects_per_batch, cycles=args.cycles,
                             max_batches_per_epoch=max_batches)

    return dict(
        model_type=model_type, model_config=model_config,
        training_sampler=sampler(args.batch_size_training, args.max_batches_per_epoch_training),
        validation_sampler=sampler(args.batch_size_validation, args.max_batches_per_epoch_validation),
        loader=LoaderParams(noise_gaussian_size_forward=args.noise_gaussian_size_forward,
                            noise_gaussian_size_loss=args.noise_gaussian_size_loss,
                            split_ratio=args.split_ratio, reverse_ratio=args.reverse_ratio,
                            rotation_augmentation_deg=args.rotation_augmentation, rotation_axis=args.rotation_axis,
                            sh_features=args.sh_features, sh_basis=args.sh_basis),
        trainer=TrainerParams(learning_rates=parse_learning_rates(args.learning_rate),
                              weight_decay=args.weight_decay, optimizer=args.optimizer,
                              max_epochs=args.max_epochs, patience=args.patience,
                              patience_delta=args.patience_delta, clip_grad=args.clip_grad, rng=args.rng,
                              add_a_tracking_validation_phase=args.add_a_tracking_validation_phase,
                              tracking_phase_frequency=args.tracking_phase_frequency,
                              tracking_mask=args.tracking_mask,
                              tracking_phase_nb_segments_init=args.tracking_phase_nb_segments_init),
        data=DataParams(lazy=args.lazy, cache_size=args.cache_size),
        use_gpu=args.use_gpu, overwrite=args.overwrite)


def _train(args, family: str):
    """Map the options, then train a new experiment (the one library call of the train CLIs)."""
    return train_new_experiment(args.experiments_path, args.experiment_name, args.hdf5_file,
                                args.input_group_name, args.streamline_group_name,
                                **training_arguments(args, family),
                                tracking_validator_factory=make_tracking_validator)


# ---------------------------------------------------------------------------------------------- entry points
def _train_main(argv, description: str, family: str):
    args = build_train_parser(description, family).parse_args(argv)
    setup_logging(args.verbose)
    warn_ignored_dwi_ml_args(vars(args))
    run_cli(_train, args, family)


def _resume_main(argv, description: str, family: str):
    args = build_resume_parser(description).parse_args(argv)
    setup_logging(args.verbose)
    warn_ignored_dwi_ml_args(vars(args))
    run_cli(resume_experiment, family, args.experiments_path, args.experiment_name, hdf5_file=args.hdf5_file,
            new_patience=args.new_patience, new_max_epochs=args.new_max_epochs, use_gpu=args.use_gpu,
            tracking_validator_factory=make_tracking_validator)


def l2t_main(argv=None):
    """``l2t_train_model``."""
    _train_main(argv, L2T_TRAIN_DESCRIPTION, "l2t")


def tt_main(argv=None):
    """``tt_train_model``."""
    _train_main(argv, TT_TRAIN_DESCRIPTION, "tt")


def l2t_resume_main(argv=None):
    """``l2t_resume_training_from_checkpoint``."""
    _resume_main(argv, L2T_RESUME_DESCRIPTION, "l2t")


def tt_resume_main(argv=None):
    """``tt_resume_training_from_checkpoint``."""
    _resume_main(argv, TT_RESUME_DESCRIPTION, "tt")
