"""Seed positions (vox/corner) drawn from a seeding mask, reproducible per seed index.

As scilpy's ``SeedGenerator``: the mask voxels are shuffled once and seed k uses voxel
``shuffled[k mod n_voxels]`` plus a uniform offset in [0, 1)^3 (so ``npv`` is "on average"). Unlike scilpy,
the offset of seed k depends only on (rng_seed, k), not on how many seeds are drawn together.
"""

import numpy as np
import torch

from trackflow.errors import TrackflowError
from trackflow.tracking.random import SEED_OFFSET_STREAM, counter_uniforms


def check_seed_counts(npv: int | None, nt: int | None) -> None:
    """The seed-count rule of every tracker: at most one of ``npv``, ``nt``, and each given one >= 1."""
    if npv is not None and nt is not None:
        raise TrackflowError("give npv or nt, not both")
    for name, value in (("nt", nt), ("npv", npv)):
        if value is not None and value < 1:
            raise TrackflowError(f"--{name} must be at least 1, got {value}")


def count_seeds(seeding_mask: np.ndarray, npv: int | None, nt: int | None) -> int:
    """Number of seeds: ``nt`` if given, else ``npv`` (default 1) per mask voxel."""
    check_seed_counts(npv, nt)
    if nt is not None:
        return nt
    return int(np.count_nonzero(seeding_mask > 0)) * (1 if npv is None else npv)


class SeedGenerator:
    """Seed k -> position, computed on the device for any batch of seed indices.

    Parameters
    ----------
    seeding_mask : ndarray [X, Y, Z]
        Voxels > 0 are seeded.
    rng_seed : int
        Fixes the voxel order and every offset.
    device : torch.device
    """

    def __init__(self, seeding_mask: np.ndarray, rng_seed: int, device: torch.device | str = "cpu"):
        voxels = np.argwhere(np.asarray(seeding_mask) > 0)  # [V, 3], C order
        if len(voxels) == 0:
            raise TrackflowError("the seeding mask is empty (no voxel > 0)")
        order = np.random.default_rng(rng_seed % (1 << 63)).permutation(len(voxels))
        self.rng_seed = rng_seed
        self.shuffled_voxels = torch.as_tensor(voxels[order], dtype=torch.float32, device=device)

    @property
    def n_voxels(self) -> int:
        return len(self.shuffled_voxels)

    def positions(self, seed_indices: torch.Tensor) -> torch.Tensor:
        """Positions of the given seeds.

        Parameters
        ----------
        seed_indices : LongTensor [B]

        Returns
        -------
        Tensor [B, 3], vox/corner, each inside its voxel [i, i+1).
        """
        voxel = self.shuffled_voxels[seed_indices % self.n_voxels]
        offset = counter_uniforms(self.rng_seed, SEED_OFFSET_STREAM, seed_indices, 0, 3)
        return voxel + offset
