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
    The 8 corners are gathered and summed one at a time, each a gather of N * M rows of F values: a single
    gather of all 8 ([N*M*8, F], then a [N*M, 8, F] product) was 2-5x slower, its temporaries too large for
    the caches. Every row is computed on its own, so a row's value does not depend on N. The corners are
    built from Python-scalar bounds (no constant tensor to copy to the device, which would make the host wait
    for the GPU at every call).
    """
    size_x, size_y, size_z, nb_features = volume.shape
    n_points = points.shape[0]
    n_neighbours = 1 if offsets is None else offsets.shape[0]
    points = points.to(volume.dtype)
    if offsets is not None:
        points = (points[:, None, :] + offsets.to(points)[None, :, :]).reshape(-1, 3)  # [N*M, 3]
    floor = torch.floor(points)
    upper_weights = points - floor  # [P, 3], P = N*M
    lower_weights = 1 - upper_weights
    floor = floor.long()
    # Per axis, the (index term, weight) of its lower and upper corner, each [P].
    corners = []
    for axis, (size, stride) in enumerate(((size_x, size_y * size_z), (size_y, size_z), (size_z, 1))):
        lower = floor[:, axis]
        corners.append(((lower.clamp(0, size - 1) * stride, lower_weights[:, axis]),
                        ((lower + 1).clamp(0, size - 1) * stride, upper_weights[:, axis])))
    flat_volume = volume.reshape(-1, nb_features)
    interpolated = None
    for index_x, weight_x in corners[0]:  # x slowest, as the corner order of the convention
        for index_y, weight_y in corners[1]:
            index_xy, weight_xy = index_x + index_y, weight_x * weight_y
            for index_z, weight_z in corners[2]:
                values = flat_volume.index_select(0, index_xy + index_z)  # [P, F]
                weight = (weight_xy * weight_z)[:, None]
                if interpolated is None:
                    interpolated = values.mul_(weight)
                else:
                    interpolated.addcmul_(values, weight)
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
    inside = (floor >= 0).all(dim=-1)
    for axis, size in enumerate(tuple(shape)[:3]):  # Python bounds: no constant tensor copied to the device
        inside &= floor[:, axis] < size
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
    index = [floor[:, axis].clamp(0, size - 1) for axis, size in enumerate(volume3d.shape)]
    values = volume3d[index[0], index[1], index[2]]
    return torch.where(outside, torch.zeros_like(values), values)
