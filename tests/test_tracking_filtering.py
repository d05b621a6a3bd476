"""Length selection of what the tracking CLIs write (``tracking.filtering``)."""
import numpy as np

from trackflow.tracking.filtering import filter_streamlines
from trackflow.tracking.tracker import TrackingResult


def float32_walks(n_points, step, n_lines, seed=0):
    """Random walks of exact float64 steps, stored in float32 as the tracker stores its points."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n_lines, n_points - 1, 3))
    directions *= step / np.linalg.norm(directions, axis=-1, keepdims=True)
    points = np.concatenate([np.full((n_lines, 1, 3), 20.0), 20.0 + np.cumsum(directions, axis=1)], axis=1)
    return points.astype(np.float32)


def test_streamlines_capped_at_the_maximum_length_are_kept():
    # The tracker stops a line at (max_points - 1) steps = max_length; in float32 its measured length comes
    # out a little over or under, which must not decide whether it is kept.
    n_lines, n_points, step = 200, 401, 0.5
    walks = float32_walks(n_points, step, n_lines)
    lengths = np.full(n_lines, n_points)
    result = TrackingResult(walks.reshape(-1, 3), lengths, np.arange(n_lines), walks[:, 0],
                            np.zeros((n_lines, 2), np.int8))
    measured = np.linalg.norm(np.diff(walks.astype(np.float64), axis=1), axis=-1).sum(1)
    assert (measured > 200.0).any() and (measured < 200.0).any()  # the rounding this test is about
    kept = filter_streamlines(result, voxel_size_mm=1.0, min_length_mm=10.0, max_length_mm=200.0)
    assert kept.n_too_long == 0 and len(kept.streamlines) == n_lines
    # a streamline one step longer is still refused
    longer = float32_walks(n_points + 1, step, 1)
    result = TrackingResult(longer.reshape(-1, 3), np.array([n_points + 1]), np.arange(1), longer[:, 0],
                            np.zeros((1, 2), np.int8))
    assert filter_streamlines(result, 1.0, 10.0, 200.0).n_too_long == 1
