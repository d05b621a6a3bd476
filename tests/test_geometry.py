"""Neighbourhood offsets and volume sampling in vox/corner coordinates, against scipy and by hand."""

import itertools

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from trackflow.errors import TrackflowError
from trackflow.geometry.interpolation import (interpolate_trilinear, nearest_values, outside_volume,
                                              trilinear_values)
from trackflow.geometry.neighborhood import neighborhood_offsets


@pytest.mark.parametrize("radius", [1, 2])
def test_axes_offsets_order_and_count(radius):
    offsets = neighborhood_offsets("axes", radius, 0.5)
    assert offsets.shape == (6 * radius + 1, 3) and offsets.dtype == torch.float32
    expected = [[0, 0, 0]]
    for k in range(1, radius + 1):
        for axis_sign in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0], [0, -1, 0], [0, 0, -1]):
            expected.append([0.5 * k * c for c in axis_sign])
    np.testing.assert_array_equal(offsets.numpy(), np.array(expected, dtype=np.float32))


@pytest.mark.parametrize("radius", [1, 2])
def test_grid_offsets_lexicographic_x_slowest(radius):
    offsets = neighborhood_offsets("grid", radius, 2.0)
    assert offsets.shape == ((2 * radius + 1) ** 3, 3)
    assert offsets[0].tolist() == [0, 0, 0]
    cells = [c for c in itertools.product(range(-radius, radius + 1), repeat=3) if c != (0, 0, 0)]
    np.testing.assert_array_equal(offsets[1:].numpy(), 2.0 * np.array(cells, dtype=np.float32))
    # x slowest: the first non-origin neighbour is (-r, -r, -r), the second varies z.
    assert offsets[2, 2] - offsets[1, 2] == 2.0


def test_no_neighborhood_is_origin_only():
    assert neighborhood_offsets(None).tolist() == [[0.0, 0.0, 0.0]]


@pytest.mark.parametrize("kind, radius, resolution", [("ball", 1, 1.0), ("axes", 0, 1.0), ("grid", 1, 0.0),
                                                      ("axes", 1.5, 1.0), ("grid", 1, None)])
def test_bad_neighborhood_rejected(kind, radius, resolution):
    with pytest.raises(TrackflowError):
        neighborhood_offsets(kind, radius, resolution)


def _scipy_trilinear(volume, points):
    """Reference: scipy linear interpolation with edge extension, per feature."""
    return np.stack([map_coordinates(volume[..., f], points.T, order=1, mode="nearest")
                     for f in range(volume.shape[-1])], axis=-1)


def test_trilinear_matches_scipy_inside_and_outside():
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(5, 6, 7, 4))
    # Inside, on integer coordinates, on the far faces, and well outside (edge-clamped).
    points = np.concatenate([rng.uniform(-2, 9, size=(200, 3)),
                             rng.integers(0, 5, size=(10, 3)).astype(float),
                             np.array([[4.0, 5.0, 6.0], [4.7, 5.9, 6.99], [-0.3, 0.0, 3.5]])])
    ours = interpolate_trilinear(torch.tensor(volume), torch.tensor(points))
    np.testing.assert_allclose(ours.numpy(), _scipy_trilinear(volume, points), atol=1e-12)


def test_integer_coordinate_returns_voxel_and_centre_blends():
    volume = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4, 1)
    at_voxel = interpolate_trilinear(volume, torch.tensor([[1.0, 2.0, 3.0]]))
    assert at_voxel.item() == volume[1, 2, 3, 0].item()
    # The voxel centre (0.5, 0.5, 0.5) averages voxels 0 and 1 on each axis (dwi_ml's half-voxel shift).
    centre = interpolate_trilinear(volume, torch.tensor([[0.5, 0.5, 0.5]]))
    assert centre.item() == pytest.approx(volume[:2, :2, :2, 0].mean().item())


def test_neighbourhood_features_are_neighbour_major():
    rng = np.random.default_rng(1)
    volume = torch.tensor(rng.normal(size=(6, 6, 6, 3)), dtype=torch.float32)
    points = torch.tensor(rng.uniform(0, 6, size=(20, 3)), dtype=torch.float32)
    offsets = neighborhood_offsets("axes", 1, 0.7)
    features = interpolate_trilinear(volume, points, offsets)
    assert features.shape == (20, 7 * 3)
    for m, offset in enumerate(offsets):
        expected = _scipy_trilinear(volume.double().numpy(), (points + offset).double().numpy())
        np.testing.assert_allclose(features[:, 3 * m:3 * m + 3].numpy(), expected, atol=1e-5)


def test_empty_points():
    volume = torch.zeros(3, 3, 3, 2)
    assert interpolate_trilinear(volume, torch.zeros(0, 3), neighborhood_offsets("axes", 1, 1.0)).shape == (0, 14)


def test_trilinear_values_of_mask():
    rng = np.random.default_rng(2)
    mask = rng.uniform(size=(4, 5, 6))
    points = rng.uniform(-1, 7, size=(50, 3))
    expected = map_coordinates(mask, points.T, order=1, mode="nearest")
    np.testing.assert_allclose(trilinear_values(torch.tensor(mask), torch.tensor(points)).numpy(), expected,
                               atol=1e-12)


def test_nearest_values_uses_floor_and_zero_outside():
    rng = np.random.default_rng(3)
    volume = rng.uniform(1, 2, size=(4, 5, 6))
    points = rng.uniform(-1.5, 7.5, size=(300, 3))
    index = np.floor(points).astype(int)
    inside = np.all((index >= 0) & (index < np.array(volume.shape)), axis=1)
    expected = np.zeros(len(points))
    expected[inside] = volume[tuple(index[inside].T)]
    assert inside.any() and not inside.all()
    np.testing.assert_array_equal(nearest_values(torch.tensor(volume), torch.tensor(points)).numpy(), expected)
    np.testing.assert_array_equal(outside_volume(torch.tensor(points), volume.shape).numpy(), ~inside)


def test_outside_volume_edges_and_nan():
    points = torch.tensor([[0.0, 0.0, 0.0], [3.999, 4.999, 5.999], [4.0, 0.0, 0.0], [-1e-4, 1.0, 1.0],
                           [float("nan"), 1.0, 1.0]])
    assert outside_volume(points, (4, 5, 6)).tolist() == [False, False, True, True, True]
    values = nearest_values(torch.ones(4, 5, 6), points)
    assert values.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
