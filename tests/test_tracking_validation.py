"""Generation-validation (``tracking.validation``): tracking the validation streamlines from their first
points, scored by how far the tracked ends fall from the true ends."""
import numpy as np
import torch

from trackflow.data.hdf5.reader import HDF5Cohort
from trackflow.data.streamlines import resample_step_size
from trackflow.tracking.validation import ValidationSubject, read_validation_subjects, tracking_validation_score
from test_tracking_engine import FieldModel  # noqa: E402  (tests/ is on sys.path)


def straight_world(direction):
    """A 20^3 mask (1 mm voxels, inside 1..18) and true streamlines along +x from x = 2 to x = 18; the model
    follows ``direction`` everywhere."""
    mask = np.zeros((20, 20, 20), np.float32)
    mask[1:19, 1:19, 1:19] = 1
    field = np.broadcast_to(np.asarray(direction, np.float32), (20, 20, 20, 3)).copy()
    rows = [(y, z) for y in (4.5, 8.5, 12.5) for z in (5.5, 9.5)]
    lines = [np.stack([np.arange(2.0, 18.01, 0.5), np.full(33, y), np.full(33, z)], 1) for y, z in rows]
    subject = ValidationSubject(torch.zeros(20, 20, 20, 1), torch.as_tensor(mask),
                                torch.as_tensor(np.stack([line[:3] for line in lines]), dtype=torch.float32),
                                torch.as_tensor(np.stack([line[-1] for line in lines]), dtype=torch.float32), 1.0)
    return FieldModel(field), subject


def test_a_model_that_follows_the_bundle_scores_near_zero_and_one_that_turns_away_scores_far():
    following, subject = straight_world([1.0, 0.0, 0.0])
    assert tracking_validation_score(following, [subject], step_mm=0.5) <= 1.0  # ends at the mask's edge
    turning, subject = straight_world([0.0, 1.0, 0.0])
    assert tracking_validation_score(turning, [subject], step_mm=0.5) >= 5.0


def test_the_validation_draw_is_fixed_and_starts_on_the_resampled_streamlines(tiny_hdf5):
    with HDF5Cohort(tiny_hdf5) as cohort:
        subjects = cohort.subjects("validation")
        draws = [read_validation_subjects(cohort, subjects, "input", "streamlines", "wm_mask", step_mm=0.5,
                                          nb_segments_init=2, max_streamlines=7, rng_seed=3, device="cpu")
                 for _ in range(2)]
        assert len(draws[0]) == len(subjects)
        for first, second in zip(*draws):
            assert first.starts.shape[1:] == (3, 3) and 0 < len(first.starts) <= 7
            assert torch.equal(first.starts, second.starts) and torch.equal(first.true_ends, second.true_ends)
        # each start is a resampled validation streamline's beginning, and its true end is that line's end
        lines = resample_step_size(cohort.read_streamlines(subjects[0], "streamlines"), 0.5 / draws[0][0].voxel_mm)
        beginnings = {tuple(np.round(line[0], 4)): line for line in lines}
        for start, end in zip(draws[0][0].starts.numpy(), draws[0][0].true_ends.numpy()):
            line = beginnings[tuple(np.round(start[0], 4))]
            np.testing.assert_allclose(start, line[:3], atol=1e-5)
            np.testing.assert_allclose(end, line[-1], atol=1e-5)
