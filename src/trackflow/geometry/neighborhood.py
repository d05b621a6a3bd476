"""Neighbourhood offsets around a streamline point, in voxel units (dwi_ml layout, spec §2.1).

The input features of a point are the volume interpolated at the point plus at each offset; the order of
the offsets is the order of the features (neighbour-major), so it is part of the checkpoint format.
"""

import itertools

import torch

from trackflow.errors import TrackflowError

NEIGHBORHOOD_TYPES = ("axes", "grid")

# Order of the six axis directions for each distance k (dwi_ml order): +x, +y, +z, -x, -y, -z.
_AXIS_DIRECTIONS = ((1, 0, 0), (0, 1, 0), (0, 0, 1), (-1, 0, 0), (0, -1, 0), (0, 0, -1))


def neighborhood_offsets(kind: str | None, radius: int | None = None,
                         resolution: float | None = None) -> torch.Tensor:
    """Offsets of the neighbourhood points, origin first, in voxel units.

    Parameters
    ----------
    kind : {"axes", "grid"} or None
        None gives the origin alone (no neighbourhood).
        ``axes``: for k = 1..radius, the six vectors +x, +y, +z, -x, -y, -z scaled by k * resolution
        (6 * radius + 1 points). ``grid``: every integer triplet of [-radius, radius]^3 except the origin,
        lexicographic with x slowest and z fastest, scaled by resolution ((2 * radius + 1)^3 points).
    radius : int
        Number of rings (axes) or half-width of the cube (grid), at least 1.
    resolution : float
        Spacing in voxels, > 0. Only isotropic voxels are meaningful since offsets are in voxel units.

    Returns
    -------
    torch.Tensor
        [M, 3] float32, row 0 is (0, 0, 0).
    """
    if kind is None:
        return torch.zeros(1, 3)
    if kind not in NEIGHBORHOOD_TYPES:
        raise TrackflowError(f"neighborhood type must be one of {NEIGHBORHOOD_TYPES}, got {kind!r}.")
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise TrackflowError(f"neighborhood radius must be an integer >= 1, got {radius!r}.")
    if resolution is None or not resolution > 0:
        raise TrackflowError(f"neighborhood resolution must be > 0 (voxels), got {resolution!r}.")

    if kind == "axes":
        scaled = [(k, direction) for k in range(1, radius + 1) for direction in _AXIS_DIRECTIONS]
        # float64 products then one cast, so k * resolution is rounded once, as in dwi_ml.
        offsets = [[k * resolution * c for c in direction] for k, direction in scaled]
    else:
        cells = itertools.product(range(-radius, radius + 1), repeat=3)
        offsets = [[c * resolution for c in cell] for cell in cells if cell != (0, 0, 0)]
    origin = [[0.0, 0.0, 0.0]]
    return torch.tensor(origin + offsets, dtype=torch.float64).to(torch.float32)

