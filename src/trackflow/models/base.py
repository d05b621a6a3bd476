"""``MainModel``: what every trackflow model shares (checkpoint parameters, inputs, tracking interface).

The constructor keywords are the keys of dwi_ml's ``parameters.json`` (``dwi_ml-checkpoints.md`` §1.2), so
``cls(**json.load(f))`` rebuilds a model; ``params_for_checkpoint()`` gives them back. Subclasses
(``Learn2TrackModel``, the transformers) add their own keys, build their layers, then call
``_build_direction_getter(in_size)``.

The tracking interface (``new_tracking_state``, ``tracking_window``, ``tracking_step``, ``reset_tracking_rows``)
is the only thing the tracker knows about a model; see ``docs/design.md`` ("Models") for the slot invariant.
"""

import abc
import logging
from dataclasses import dataclass

import torch
from torch import nn

from trackflow.errors import TrackflowError
from trackflow.geometry.interpolation import interpolate_trilinear
from trackflow.geometry.neighborhood import neighborhood_offsets
from trackflow.models.direction_getters import make_direction_getter
from trackflow.models.embeddings import make_embedding

INPUT_CHUNK_POINTS = 2 ** 18  # neighbour points interpolated at once by ``compute_inputs``

LOGGER = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """The ``parameters.json`` keys every model shares (checkpoints §1.2), in dwi_ml's order.

    ``dataclasses.asdict`` of a model's config is its ``parameters.json``; the fields are the model
    constructor's keywords, and the constructor is the one validator of their rules. ``nb_features`` is
    None until the trainer reads it from the hdf5.
    """

    experiment_name: str | None = None
    step_size: float | None = None
    compress_lines: float | bool | None = False
    nb_points: int | None = None
    input_embedding_key: str = "no_embedding"
    input_embedded_size: int | None = None
    kernel_size: list | None = None
    nb_cnn_filters: list | None = None
    neighborhood_type: str | None = None
    neighborhood_radius: int | None = None
    neighborhood_resolution: float | None = None
    dg_key: str = "cosine-regression"
    dg_args: dict | None = None
    nb_features: int | None = None


class MainModel(nn.Module, abc.ABC):
    """Base of every model: common ``parameters.json`` keys, input computation, tracking interface.

    Parameters
    ----------
    experiment_name : str or None
    step_size, compress_lines, nb_points : float, float|bool, int or None
        The streamline preprocessing the model was trained with; at most one is set.
    input_embedding_key : {'no_embedding', 'nn_embedding', 'cnn_embedding'}
    input_embedded_size : int or None
        As given by the user (None for no/cnn embedding), not the computed size.
    kernel_size, nb_cnn_filters : list of int or None
        CNN embedding only (one entry per Conv3d layer).
    neighborhood_type : {None, 'axes', 'grid'}
    neighborhood_radius : int or None
    neighborhood_resolution : float or None
        In voxel units.
    dg_key : str
        Direction-getter (head) name.
    dg_args : dict or None
        Head keyword arguments (``dropout``, ``add_eos``, ``eos_weight``, head extras).
    nb_features : int
        F, the number of features of the input volume.
    **unknown_params
        Keys this class does not know (e.g. dwi_ml's ``log_level``); ignored with a debug log.

    Attributes
    ----------
    input_size : int
        Fin = F * M, the width of ``compute_inputs`` rows.
    input_embedding_layer : nn.Module
        Fin -> E, with ``.out_size`` = E.
    neighborhood_offsets : Tensor[M, 3] or None
        Non-persistent buffer (not in the state dict, as in dwi_ml); follows ``.to(device)``.
    direction_getter : DirectionGetter
        Set by the subclass through ``_build_direction_getter``.
    """

    config_class = ModelConfig  # subclasses name their own

    def __init__(self, *, experiment_name=None, step_size=None, compress_lines=False, nb_points=None,
                 input_embedding_key="no_embedding", input_embedded_size=None, kernel_size=None,
                 nb_cnn_filters=None, neighborhood_type=None, neighborhood_radius=None,
                 neighborhood_resolution=None, dg_key="cosine-regression", dg_args=None,
                 nb_features=None, **unknown_params):
        super().__init__()
        if unknown_params:
            LOGGER.debug("%s: ignoring unknown parameters %s", type(self).__name__, sorted(unknown_params))
        if isinstance(nb_features, bool) or not isinstance(nb_features, int) or nb_features < 1:
            raise TrackflowError(f"nb_features must be a positive integer, got {nb_features!r}")
        self.step_size = step_size
        self.compress_lines = compress_lines
        self.nb_points = nb_points
        chosen = [k for k, v in self.preprocessing.items() if v not in (None, False)]
        if len(chosen) > 1:
            raise TrackflowError(f"only one of step_size, compress_lines, nb_points may be set, got {chosen}")
        if neighborhood_type is None and (neighborhood_radius is not None
                                          or neighborhood_resolution is not None):
            raise TrackflowError("neighborhood_radius/resolution were given without a neighborhood_type")

        self.experiment_name = experiment_name
        self.input_embedding_key = input_embedding_key
        self.input_embedded_size = input_embedded_size
        self.kernel_size = kernel_size
        self.nb_cnn_filters = nb_cnn_filters
        self.neighborhood_type = neighborhood_type
        self.neighborhood_radius = neighborhood_radius
        self.neighborhood_resolution = neighborhood_resolution
        self.dg_key = dg_key
        self.nb_features = nb_features

        if neighborhood_type is None:
            offsets = None  # origin only: interpolate without offsets
            nb_neighbors = 1
        else:
            # Validates the type, radius and resolution.
            offsets = neighborhood_offsets(neighborhood_type, neighborhood_radius, neighborhood_resolution)
            nb_neighbors = offsets.shape[0]
        # Rebuilt from the parameters, so kept out of the state dict (dwi_ml's layout has no such key).
        self.register_buffer("neighborhood_offsets", offsets, persistent=False)
        self.input_size = nb_features * nb_neighbors  # Fin

        self.input_embedding_layer = make_embedding(
            input_embedding_key, self.input_size, input_embedded_size, nb_features=nb_features,
            neighborhood_type=neighborhood_type, neighborhood_radius=neighborhood_radius,
            neighborhood_resolution=neighborhood_resolution, nb_cnn_filters=nb_cnn_filters,
            kernel_size=kernel_size)
        self._dg_args = dict(dg_args or {})
        self.direction_getter = None

    def _build_direction_getter(self, in_size: int) -> None:
        """Create ``self.direction_getter`` (prefix ``direction_getter.``) on ``in_size`` features."""
        self.direction_getter = make_direction_getter(self.dg_key, in_size, self._dg_args)

    @property
    def preprocessing(self) -> dict:
        """The streamline preprocessing the model was trained with: ``{step_size, compress_lines, nb_points}``
        (mm, mm, count; at most one set)."""
        return {"step_size": self.step_size, "compress_lines": self.compress_lines, "nb_points": self.nb_points}

    @property
    def config(self) -> ModelConfig:
        """The model's ``config_class`` instance, as resolved by the constructor (what is saved)."""
        return self.config_class(**self.params_for_checkpoint())

    def params_for_checkpoint(self) -> dict:
        """The constructor keywords as written in ``parameters.json`` (common keys; subclasses add theirs)."""
        return {
            "experiment_name": self.experiment_name,
            "step_size": self.step_size,
            "compress_lines": self.compress_lines,
            "nb_points": self.nb_points,
            "input_embedding_key": self.input_embedding_key,
            "input_embedded_size": self.input_embedded_size,
            "kernel_size": self.kernel_size,
            "nb_cnn_filters": self.nb_cnn_filters,
            "neighborhood_type": self.neighborhood_type,
            "neighborhood_radius": self.neighborhood_radius,
            "neighborhood_resolution": self.neighborhood_resolution,
            "dg_key": self.dg_key,
            "dg_args": self.direction_getter.dg_args(),
            "nb_features": self.nb_features,
        }

    @classmethod
    def convert_loaded_state_dict(cls, state_dict: dict, params: dict) -> dict:
        """Hook called by the loader before strict loading: turn a dwi_ml state dict into ours.

        The default is the identity; transformers override it (e.g. to pack separate q/k/v weights).
        """
        return state_dict

    def compute_inputs(self, volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Model inputs at points: trilinear interpolation of the volume at each neighbour.

        Parameters
        ----------
        volume : Tensor[X, Y, Z, F]
        points : Tensor[N, 3]
            vox/corner coordinates.

        Returns
        -------
        Tensor[N, M*F]
            Neighbour-major (origin first); M = 1 without a neighbourhood.
        """
        # The interpolation gathers 8 corners per neighbour: in chunks, so that rebuilding the state of many
        # turned-around rows at once (a GPU's 10^5 slots) stays within memory.
        chunk = max(1, INPUT_CHUNK_POINTS // (1 if self.neighborhood_offsets is None
                                                else len(self.neighborhood_offsets)))
        if len(points) <= chunk:
            return interpolate_trilinear(volume, points, self.neighborhood_offsets)
        return torch.cat([interpolate_trilinear(volume, part, self.neighborhood_offsets)
                          for part in points.split(chunk)])

    @abc.abstractmethod
    def forward(self, inputs: list, streamlines: list) -> torch.Tensor:
        """Whole-sequence raw head outputs.

        Parameters
        ----------
        inputs : list of Tensor[T_i, Fin]
        streamlines : list of Tensor[T_i, 3]
            Coordinates of the input rows (vox/corner).

        Returns
        -------
        Tensor[sum T_i, K]
            One row per input row, concatenated in input order.
        """

    @abc.abstractmethod
    def new_tracking_state(self, volume: torch.Tensor, n_slots: int, max_points: int):
        """A preallocated tracking state with ``n_slots`` slots on the volume's device."""

    # Whether ``reset_tracking_rows`` rebuilds a state from a whole prefix in one call. True for a model that
    # takes every position at once (a transformer's cache fill); a recurrent model sets it False, takes only
    # ``lengths == 1`` resets, and the tracker replays prefixes through ordinary steps (``tracking/tracker.py``).
    prefills_prefixes = True
    # Slots tracked at once when the user gives none (--simultaneous_tracking): where a CPU step stops getting
    # cheaper per row. A transformer's caches grow with the slots x the longest streamline.
    default_tracking_slots = 1000

    @property
    @abc.abstractmethod
    def tracking_window(self) -> int:
        """W, the most recent points of each streamline that ``tracking_step`` reads (the rest of the history
        lives in the tracking state): the tracker passes only these, so a step costs the same at any length."""

    @abc.abstractmethod
    def tracking_step(self, state, rows: torch.Tensor, points: torch.Tensor,
                      lengths: torch.Tensor) -> torch.Tensor:
        """Consume the last point of each row's streamline; return the head output there.

        Parameters
        ----------
        state : the object returned by ``new_tracking_state``
        rows : LongTensor[B]
            Slot indices.
        points : Tensor[B, T, 3]
            The end of each row's streamline (vox/corner): ``points[b, :min(lengths[b], T)]`` are its last
            ``min(lengths[b], T)`` points, in order; the rest is padding. T >= ``tracking_window``; the
            tracker passes T = ``tracking_window``, and a whole padded streamline (T >= lengths) is valid.
        lengths : LongTensor[B]
            Number of points of each row's whole streamline (>= 1), the one just consumed included.

        Returns
        -------
        Tensor[B, K]
        """

    @abc.abstractmethod
    def reset_tracking_rows(self, state, rows: torch.Tensor, points: torch.Tensor,
                            lengths: torch.Tensor) -> None:
        """Make the rows' state equal to having consumed ``points[b, :lengths[b]-1]``.

        ``lengths == 1`` is a plain reset (new seed); longer prefixes rebuild the state (backward half), only
        where ``prefills_prefixes``.
        Unlike ``tracking_step``, ``points`` [B, T, 3] holds the whole padded streamlines (T >= lengths).
        """
