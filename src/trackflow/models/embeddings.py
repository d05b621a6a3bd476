"""Embedding layers (spec §2.2, checkpoints §2.1 and §3.3).

Submodule names are part of the checkpoint format: ``NNEmbedding.linear``, ``CNNEmbedding.cnn_0``,
``cnn_1``, ... so that dwi_ml state dicts load with ``strict=True``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from trackflow.errors import TrackflowError
from trackflow.geometry.neighborhood import neighborhood_offsets

EMBEDDING_KEYS = ("no_embedding", "nn_embedding", "cnn_embedding")


class NoEmbedding(nn.Module):
    """Identity; ``out_size == in_size``."""

    def __init__(self, in_size: int):
        super().__init__()
        self.in_size = in_size
        self.out_size = in_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in_size] -> the same tensor."""
        return x


class NNEmbedding(nn.Module):
    """One Linear (submodule ``linear``) followed by ReLU."""

    def __init__(self, in_size: int, out_size: int):
        super().__init__()
        self.in_size = in_size
        self.out_size = out_size
        self.linear = nn.Linear(in_size, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in_size] -> [N, out_size]."""
        return F.relu(self.linear(x))


class CNNEmbedding(nn.Module):
    """Conv3d stack over the un-flattened grid neighbourhood (dwi_ml's l2t ``cnn_embedding``).

    The flattened features [N, M * F] (neighbour-major, ``grid`` neighbourhood of radius r) are placed
    in a zero cube [N, s, s, s, F], s = 2r + 1, at cell trunc(offset / resolution) + r. Truncation
    (not rounding) is dwi_ml's: for some resolutions (e.g. r = 3, res = 0.3) two neighbours fall into the
    same cell and the later one wins, leaving a zero cell; we reproduce this for checkpoint parity.
    Each ``cnn_i`` is Conv3d(kernel k_i, stride 1, no padding) then ReLU; the output cube is permuted
    channels-last and flattened (x slowest, channel fastest), out_size = s_last^3 * nb_filters[-1].
    """

    def __init__(self, nb_features: int, neighborhood_radius: int, neighborhood_resolution: float,
                 nb_filters: list[int], kernel_sizes: list[int]):
        super().__init__()
        if not nb_filters or len(nb_filters) != len(kernel_sizes):
            raise TrackflowError("cnn_embedding needs as many kernel sizes as filter counts (at least one).")
        offsets = neighborhood_offsets("grid", neighborhood_radius, neighborhood_resolution)  # validates r, res
        side = 2 * neighborhood_radius + 1
        if kernel_sizes[0] > side:
            raise TrackflowError(f"the first CNN kernel ({kernel_sizes[0]}) exceeds the neighbourhood cube "
                                 f"side 2r+1 = {side}.")
        self.in_size = offsets.shape[0] * nb_features
        self.nb_features = nb_features
        self.side = side

        # Cell of each neighbour; float32 offsets divided in float64 (see class docstring for the trap).
        cells = torch.trunc(offsets.double() / neighborhood_resolution).long() + neighborhood_radius
        flat_cells = (cells[:, 0] * side + cells[:, 1]) * side + cells[:, 2]  # [M]
        # Neighbours are written in order, so the highest index wins.
        neighbour_of_cell = torch.full((side ** 3,), -1, dtype=torch.long)
        neighbour_of_cell.scatter_reduce_(0, flat_cells, torch.arange(offsets.shape[0]), reduce="amax")
        occupied = (neighbour_of_cell >= 0).nonzero().squeeze(1)
        self.register_buffer("_cells", occupied, persistent=False)
        self.register_buffer("_neighbours", neighbour_of_cell[occupied], persistent=False)

        in_channels = nb_features
        for i, (filters, kernel) in enumerate(zip(nb_filters, kernel_sizes)):
            side = side - kernel + 1
            if side < 1:
                raise TrackflowError(f"CNN kernel sizes {kernel_sizes} shrink the {self.side}-cube below one cell.")
            self.add_module(f"cnn_{i}", nn.Conv3d(in_channels, filters, kernel_size=kernel))
            in_channels = filters
        self.nb_layers = len(nb_filters)
        self.out_size = side ** 3 * in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, M * F] flattened neighbourhood features -> [N, out_size]."""
        n_points = x.shape[0]
        neighbours = x.reshape(n_points, -1, self.nb_features)  # [N, M, F]
        cube = x.new_zeros(n_points, self.side ** 3, self.nb_features)
        cube[:, self._cells] = neighbours[:, self._neighbours]
        cube = cube.reshape(n_points, self.side, self.side, self.side, self.nb_features)
        cube = cube.permute(0, 4, 1, 2, 3)  # [N, F, X, Y, Z]: x is the Conv3d depth axis
        for i in range(self.nb_layers):
            cube = F.relu(getattr(self, f"cnn_{i}")(cube))
        return cube.permute(0, 2, 3, 4, 1).reshape(n_points, self.out_size)


def make_embedding(key: str, in_size: int, out_size: int | None = None, *, nb_features: int | None = None,
                   neighborhood_type: str | None = None, neighborhood_radius: int | None = None,
                   neighborhood_resolution: float | None = None, nb_cnn_filters: list[int] | None = None,
                   kernel_size: list[int] | None = None) -> nn.Module:
    """Build an embedding from its ``parameters.json`` key.

    Parameters
    ----------
    key : {"no_embedding", "nn_embedding", "cnn_embedding"}
    in_size : int
        Width of the flattened input (F * M for input features, 3n for previous directions).
    out_size : int or None
        Required for nn; must be None or ``in_size`` for no_embedding; must be None for cnn (derived).
    nb_features, neighborhood_type, neighborhood_radius, neighborhood_resolution, nb_cnn_filters, kernel_size
        CNN only (names as in ``parameters.json``); the neighbourhood must be ``grid``.

    Returns
    -------
    nn.Module
        With ``.out_size``.
    """
    if key == "no_embedding":
        if out_size is not None and out_size != in_size:
            raise TrackflowError(f"no_embedding keeps the input size {in_size}; got embedded size {out_size}.")
        return NoEmbedding(in_size)
    if key == "nn_embedding":
        if out_size is None or out_size < 1:
            raise TrackflowError("nn_embedding needs a positive embedded size.")
        return NNEmbedding(in_size, out_size)
    if key == "cnn_embedding":
        if neighborhood_type != "grid":
            raise TrackflowError("cnn_embedding needs a 'grid' neighbourhood.")
        if out_size is not None:
            raise TrackflowError("cnn_embedding derives its output size; do not give an embedded size.")
        if nb_cnn_filters is None or kernel_size is None or nb_features is None:
            raise TrackflowError("cnn_embedding needs nb_cnn_filters, kernel_size and nb_features.")
        embedding = CNNEmbedding(nb_features, neighborhood_radius, neighborhood_resolution,
                                 list(nb_cnn_filters), list(kernel_size))
        if embedding.in_size != in_size:
            raise TrackflowError(f"cnn_embedding expects {embedding.in_size} input features, got {in_size}.")
        return embedding
    raise TrackflowError(f"unknown embedding key {key!r}; expected one of {EMBEDDING_KEYS}.")
