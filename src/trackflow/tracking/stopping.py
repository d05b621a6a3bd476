"""Stopping criteria: where a new point may go, checked for a whole batch at once (dipy's roles, batched).

A criterion answers ``check_points(points[B, 3]) -> status[B]`` with dipy's status values; it knows nothing
of models or of the tracker. Angle, EOS and length are the tracker's business (they need the directions
and the streamline), as in dipy.
"""

import enum

import torch

from trackflow.errors import TrackflowError
from trackflow.geometry.interpolation import nearest_values, outside_volume, trilinear_values

MASK_INTERPOLATIONS = ("nearest", "trilinear")


class StreamlineStatus(enum.IntEnum):
    """dipy's values (``stopping_criterion.pxd``)."""

    OUTSIDEIMAGE = -1
    INVALIDPOINT = 0
    TRACKPOINT = 1
    ENDPOINT = 2


class VolumeStoppingCriterion:
    """Only the volume bounds stop: voxel ``floor(p)`` outside ``[0, shape)`` is OUTSIDEIMAGE.

    Parameters
    ----------
    shape : tuple of 3 ints
        Volume dimensions (X, Y, Z).
    """

    def __init__(self, shape):
        self.shape = tuple(int(s) for s in shape[:3])

    def check_points(self, points: torch.Tensor) -> torch.Tensor:
        """Status of each point.

        Parameters
        ----------
        points : Tensor [B, 3], vox/corner

        Returns
        -------
        Int8 tensor [B]: OUTSIDEIMAGE or TRACKPOINT.
        """
        outside = outside_volume(points, self.shape)
        return torch.where(outside, int(StreamlineStatus.OUTSIDEIMAGE),
                           int(StreamlineStatus.TRACKPOINT)).to(torch.int8)


class MaskStoppingCriterion(VolumeStoppingCriterion):
    """Tracking mask: ENDPOINT where the interpolated mask value is below ``threshold``.

    Points outside the volume are OUTSIDEIMAGE first. ``interpolation`` is ``"nearest"`` (voxel
    ``floor(p)``, corner origin) or ``"trilinear"`` (``trackflow.geometry.interpolation``'s convention).

    Parameters
    ----------
    mask : Tensor [X, Y, Z]
        Any float values; the tracker's device.
    interpolation : str
        ``"nearest"`` or ``"trilinear"``.
    threshold : float
        Minimum value that counts as inside (0.5, as dwi_ml).
    """

    def __init__(self, mask: torch.Tensor, interpolation: str = "nearest", threshold: float = 0.5):
        if mask.dim() != 3:
            raise TrackflowError(f"the tracking mask must be a 3-D volume, got shape {tuple(mask.shape)}")
        if interpolation not in MASK_INTERPOLATIONS:
            raise TrackflowError(f"unknown mask interpolation {interpolation!r} (nearest or trilinear)")
        super().__init__(mask.shape)
        self.mask = mask.to(torch.float32)
        self.threshold = threshold
        self._values = nearest_values if interpolation == "nearest" else trilinear_values

    def check_points(self, points: torch.Tensor) -> torch.Tensor:
        """Status of each point: OUTSIDEIMAGE, ENDPOINT (mask value < threshold) or TRACKPOINT.

        Parameters
        ----------
        points : Tensor [B, 3], vox/corner

        Returns
        -------
        Int8 tensor [B].
        """
        status = super().check_points(points)
        below = self._values(self.mask, points) < self.threshold
        ending = below & (status == StreamlineStatus.TRACKPOINT)
        return torch.where(ending, torch.tensor(int(StreamlineStatus.ENDPOINT), dtype=torch.int8,
                                                device=status.device), status)
