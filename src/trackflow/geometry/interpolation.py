"""Sampling volumes at streamline points given in vox/corner coordinates (voxel i spans [i, i+1)).

Trilinear convention (dwi_ml's, kept for checkpoint parity, spec §2.1 QUIRK): the sample of voxel i sits
at coordinate i, so an integer coordinate i returns voxel i exactly and a voxel centre i + 0.5 returns the
50/50 blend of voxels i and i + 1. The 8 corners are floor(p) + {0, 1}^3, each index clamped into
[0, dim - 1], so points outside the volume get edge values (equal to scipy's
``map_coordinates(order=1, mode="nearest")``). Masks use the nearest voxel floor(p) instead, which is
consistent with the corner origin; masks and data therefore differ by half a voxel, as in dwi_ml.

Everything runs on the device of its inputs.
"""

import torch

# The 8 corner shifts {0, 1}^3, x slowest.
_CORNER_SHIFTS = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])


def interpolate_trilinear(volume: torch.Tensor, points: torch.Tensor,
                          offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Trilinear interpolation of a 4D volume at points and their neighbourhood (dwi_ml convention).

    Parameters
    ----------
    volume : torch.Tensor
        [X, Y, Z, F] features, channels last.
    points : torch.Tensor
        [N, 3] vox/corner coordinates.
    offsets : torch.Tensor or None
        [M, 3] neighbourhood offsets in voxels, origin first (``neighborhood_offsets``); None = origin only.

    Returns
    -------
    torch.Tensor
        [N, M * F], neighbour-major: [n0 f0..f(F-1), n1 f0..f(F-1), ...], dtype of ``volume``.

    Notes
    -----
    One gather of N * M * 8 rows of F values: memory is about 8x the output; callers with huge N chunk.
    """
    size_x, size_y, size_z, nb_features = volume.shape
    n_points = points.shape[0]
    n_neighbours = 1 if offsets is None else offsets.shape[0]
    points = points.to(volume.dtype)
    if offsets is not None:
        points = (points[:, None, :] + offsets.to(points)[None, :, :]).reshape(-1, 3)  # [N*M, 3]
    floor = torch.floor(points)
    frac = points - floor  # [P, 3], P = N*M
    corners = floor.long()[:, None, :] + _CORNER_SHIFTS.to(points.device)[None]  # [P, 8, 3]
    upper = torch.tensor([size_x - 1, size_y - 1, size_z - 1], device=points.device)
    corners = torch.minimum(corners.clamp_min(0), upper)
    flat_index = (corners[..., 0] * size_y + corners[..., 1]) * size_z + corners[..., 2]  # [P, 8]

    # Weight of a corner = prod over axes of (frac if its shift is 1 else 1 - frac).
    shifts = _CORNER_SHIFTS.to(points)[None]  # [1, 8, 3]
    frac = frac[:, None, :]
    weights = (shifts * frac + (1 - shifts) * (1 - frac)).prod(dim=-1)  # [P, 8]

    values = volume.reshape(-1, nb_features)[flat_index.reshape(-1)]  # [P*8, F]
    values = values.reshape(-1, 8, nb_features)
    interpolated = torch.einsum("pc,pcf->pf", weights, values)  # [P, F]
    return interpolated.reshape(n_points, n_neighbours * nb_features)


def trilinear_values(volume3d: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear value of a 3D volume (e.g. a mask) at points, same convention as the features.

    Parameters
    ----------
    volume3d : torch.Tensor
        [X, Y, Z].
    points : torch.Tensor
        [N, 3] vox/corner coordinates.

    Returns
    -------
    torch.Tensor
        [N] values, edge-clamped outside the volume.
    """
    return interpolate_trilinear(volume3d[..., None], points)[:, 0]


def outside_volume(points: torch.Tensor, shape) -> torch.Tensor:
    """Whether the voxel floor(p) of each point lies outside [0, dim) on any axis.

    Parameters
    ----------
    points : torch.Tensor
        [N, 3] vox/corner coordinates.
    shape : sequence of int
        (X, Y, Z) (extra trailing dimensions are ignored).

    Returns
    -------
    torch.Tensor
        [N] bool. Non-finite points count as outside.
    """
    floor = torch.floor(points)
    dims = torch.tensor(tuple(shape)[:3], device=points.device, dtype=points.dtype)
    inside = ((floor >= 0) & (floor < dims)).all(dim=-1)
    return ~inside


def nearest_values(volume3d: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Value of the voxel floor(p) of each point (what masks use in tracking); 0 outside the volume.

    Parameters
    ----------
    volume3d : torch.Tensor
        [X, Y, Z].
    points : torch.Tensor
        [N, 3] vox/corner coordinates.

    Returns
    -------
    torch.Tensor
        [N] values, dtype of ``volume3d``.
    """
    outside = outside_volume(points, volume3d.shape)
    # Non-finite floors are outside anyway; zero them so the long cast is defined, then clamp to stay valid.
    floor = torch.floor(torch.nan_to_num(points, nan=0.0, posinf=0.0, neginf=0.0)).long()
    upper = torch.tensor(volume3d.shape, device=points.device) - 1
    index = torch.minimum(floor.clamp_min(0), upper)
    values = volume3d[index[:, 0], index[:, 1], index[:, 2]]
    return torch.where(outside, torch.zeros_like(values), values)
