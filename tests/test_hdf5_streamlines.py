"""Resampling / compression / lengths of ragged streamlines, against closed-form references."""

import numpy as np
import pytest
from nibabel.streamlines import ArraySequence

from trackflow.data import streamlines as sl
from trackflow.errors import TrackflowError


def _straight_lines(rng, n):
    """Straight segments with irregularly spaced points: resampling has an exact answer."""
    lines, ends = [], []
    for _ in range(n):
        a, b = rng.normal(size=3) * 10, rng.normal(size=3) * 10
        t = np.sort(np.concatenate([[0.0, 1.0], rng.uniform(0, 1, rng.integers(0, 6))]))
        lines.append((a + t[:, None] * (b - a)).astype(np.float32))
        ends.append((a, b))
    return lines, ends


def test_euclidean_lengths_match_sum_of_segment_norms():
    rng = np.random.default_rng(0)
    lines = [rng.normal(size=(rng.integers(1, 9), 3)).astype(np.float32) for _ in range(7)]
    expected = [np.linalg.norm(np.diff(s, axis=0), axis=1).sum() for s in lines]
    np.testing.assert_allclose(sl.euclidean_lengths(lines), expected, rtol=1e-5)
    np.testing.assert_allclose(sl.euclidean_lengths(ArraySequence(lines)), expected, rtol=1e-5)
    assert sl.euclidean_lengths([]).shape == (0,)


def test_resample_nb_points_on_straight_lines_is_uniform():
    rng = np.random.default_rng(1)
    lines, ends = _straight_lines(rng, 6)
    out = sl.resample_nb_points(lines, 5)
    assert len(out) == 6
    t = np.linspace(0, 1, 5)[:, None]
    for s, (a, b) in zip(out, ends):
        np.testing.assert_allclose(s, a + t * (b - a), atol=1e-4)


def test_resample_step_size_counts_points_like_scilpy_and_keeps_order():
    rng = np.random.default_rng(2)
    lines, ends = _straight_lines(rng, 8)
    step = 1.7
    out = sl.resample_step_size(lines, step)
    assert len(out) == len(lines)
    for s, (a, b) in zip(out, ends):
        length = np.linalg.norm(b - a)
        n = max(int(np.ceil(length / step)), 2)
        t = np.linspace(0, 1, n)[:, None]
        np.testing.assert_allclose(s, a + t * (b - a), atol=1e-4)
    # the parts are a valid ArraySequence: offsets are the exclusive cumsum of lengths
    np.testing.assert_array_equal(out._offsets, np.concatenate([[0], np.cumsum(out._lengths)[:-1]]))
    assert out.get_data().shape == (out._lengths.sum(), 3)


def test_compress_removes_collinear_points_and_keeps_corners():
    straight = np.linspace([0, 0, 0], [10, 0, 0], 21).astype(np.float32)
    corner = np.vstack([np.linspace([0, 0, 0], [5, 0, 0], 11),
                        np.linspace([5, 0.5, 0], [5, 5, 0], 10)]).astype(np.float32)
    out = sl.compress([straight, corner], tol_error=0.01)
    np.testing.assert_allclose(out[0], straight[[0, -1]])
    # the corner (5, 0, 0) is kept, and every dropped point is within tolerance of the result
    assert any(np.allclose(p, [5, 0, 0]) for p in out[1])
    assert 2 < len(out[1]) < len(corner)


@pytest.mark.parametrize("func,arg", [(sl.resample_nb_points, 4), (sl.resample_step_size, 0.5)])
def test_single_point_streamline_is_rejected(func, arg):
    lines = [np.zeros((3, 3), np.float32) + np.arange(3)[:, None], np.ones((1, 3), np.float32)]
    with pytest.raises(TrackflowError, match="fewer than 2 points"):
        func(lines, arg)


def test_empty_streamline_in_a_list_is_rejected():
    with pytest.raises(TrackflowError, match="empty"):
        sl.euclidean_lengths([np.zeros((3, 3)), np.zeros((0, 3))])


@pytest.mark.parametrize("call", [lambda s: sl.resample_step_size(s, 0),
                                  lambda s: sl.resample_nb_points(s, 1),
                                  lambda s: sl.compress(s, -1.0)])
def test_invalid_parameters_are_rejected(call):
    with pytest.raises(TrackflowError):
        call([np.arange(6, dtype=np.float32).reshape(2, 3)])
