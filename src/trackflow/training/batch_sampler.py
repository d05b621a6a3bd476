"""Which streamlines go into each batch (spec dwi_ml.md §5.2).

An epoch walks, per subject, through a random permutation of that subject's streamline ids, without
replacement, until every streamline was used once or ``max_batches_per_epoch`` batches were produced.
The sampler owns its numpy Generator; its state goes into the checkpoint so that a resumed run draws
exactly the batches an uninterrupted run would have drawn.
"""

from dataclasses import dataclass

import numpy as np

from trackflow.errors import TrackflowError

UNITS = ("nb_streamlines", "length_mm")
# Streamlines looked at per chunk when the budget is in mm (dwi_ml default).
DEFAULT_STREAMLINES_PER_CHUNK = 256


@dataclass
class SamplerParams:
    """Batch-sampler options, as stored in ``parameters_*.json`` and the checkpoint."""

    batch_size: float = 100
    batch_size_units: str = "nb_streamlines"
    nb_streamlines_per_chunk: int | None = None
    nb_subjects_per_batch: int | None = None
    cycles: int | None = None
    max_batches_per_epoch: int = 1000

    def __post_init__(self):
        if self.batch_size_units not in UNITS:
            raise TrackflowError(f"batch size units must be one of {UNITS}, got {self.batch_size_units!r}")
        if self.batch_size <= 0:
            raise TrackflowError(f"the batch size must be positive, got {self.batch_size}")
        if self.batch_size_units == "nb_streamlines" and self.batch_size != int(self.batch_size):
            raise TrackflowError("a batch size in nb_streamlines must be an integer")
        if self.cycles is not None and self.nb_subjects_per_batch is None:
            raise TrackflowError("--cycles requires --nb_subjects_per_batch")
        if self.nb_subjects_per_batch is not None and self.nb_subjects_per_batch < 1:
            raise TrackflowError("--nb_subjects_per_batch must be at least 1")
        if self.max_batches_per_epoch < 1:
            raise TrackflowError("the maximum number of batches per epoch must be at least 1")
        if self.batch_size_units == "length_mm" and self.nb_streamlines_per_chunk is None:
            self.nb_streamlines_per_chunk = DEFAULT_STREAMLINES_PER_CHUNK


class BatchSampler:
    """Draws batches of (subject, streamline ids) for one subset.

    Parameters
    ----------
    lengths_mm : dict[str, np.ndarray]
        Per subject, the Euclidean length (mm) of every streamline [S]; its size gives the streamline count.
    params : SamplerParams
    seed : int
        Seed of the sampler's own numpy Generator.
    """

    def __init__(self, lengths_mm: dict[str, np.ndarray], params: SamplerParams, seed: int):
        self.subjects = sorted(lengths_mm)
        if not self.subjects:
            raise TrackflowError("the batch sampler needs at least one subject")
        self.lengths_mm = {s: np.asarray(lengths_mm[s], dtype=np.float64) for s in self.subjects}
        if self.nb_streamlines == 0:
            raise TrackflowError(f"subjects {self.subjects} have no streamline to sample")
        self.params = params
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_cohort(cls, cohort, subset: str, streamline_group: str, params: SamplerParams, seed: int):
        """Build the sampler of one subset of an opened ``HDF5Cohort``; None when the subset is empty."""
        subjects = cohort.subjects(subset)
        if not subjects:
            return None
        return cls({s: cohort.euclidean_lengths(s, streamline_group) for s in subjects}, params, seed)

    @property
    def nb_streamlines(self) -> int:
        return int(sum(len(v) for v in self.lengths_mm.values()))

    # ------------------------------------------------------------------ RNG state (checkpoint)
    def get_state(self) -> dict:
        """The numpy bit-generator state (plain dict of ints and strings)."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    # ------------------------------------------------------------------ sampling
    def epoch(self):
        """Yield the batches of one epoch.

        Yields
        ------
        list[tuple[str, np.ndarray]]
            Per subject of the batch, its name and the sorted int64 ids of its streamlines.
        """
        params = self.params
        unused = {s: self.rng.permutation(len(self.lengths_mm[s])) for s in self.subjects}
        subjects_of_cycle, batches_left_in_cycle = [], 0
        for _ in range(params.max_batches_per_epoch):
            available = [s for s in self.subjects if len(unused[s])]
            if not available:
                return
            if params.nb_subjects_per_batch is None:
                chosen = available
            else:
                subjects_of_cycle = [s for s in subjects_of_cycle if len(unused[s])]
                if batches_left_in_cycle == 0 or not subjects_of_cycle:
                    subjects_of_cycle = self._draw_subjects(available, unused)
                    batches_left_in_cycle = params.cycles or 1
                batches_left_in_cycle -= 1
                chosen = subjects_of_cycle
            budget = params.batch_size / len(chosen)
            batch = []
            for subject in chosen:
                n = self._nb_fitting(unused[subject], self.lengths_mm[subject], budget)
                batch.append((subject, np.sort(unused[subject][:n]).astype(np.int64)))
                unused[subject] = unused[subject][n:]
            yield batch

    def _draw_subjects(self, available, unused):
        """Subjects drawn without replacement, with probability proportional to their unused streamlines."""
        counts = np.array([len(unused[s]) for s in available], dtype=np.float64)
        n = min(self.params.nb_subjects_per_batch, len(available))
        picked = self.rng.choice(len(available), size=n, replace=False, p=counts / counts.sum())
        return [available[i] for i in sorted(picked)]

    def _nb_fitting(self, unused_ids: np.ndarray, lengths: np.ndarray, budget: float) -> int:
        """How many of the next unused ids fit in ``budget`` (a count or a length in mm).

        Always takes at least one streamline, so that a streamline longer than the budget cannot stall
        the epoch.
        """
        if self.params.batch_size_units == "nb_streamlines":
            n = int(budget)
        else:
            # Look ahead one chunk at a time (bounded work per batch); the result equals taking the
            # longest prefix of the permutation whose cumulated length stays within the budget.
            n, total, chunk = 0, 0.0, self.params.nb_streamlines_per_chunk
            while n < len(unused_ids):
                cumulated = total + np.cumsum(lengths[unused_ids[n:n + chunk]])
                fitting = int(np.searchsorted(cumulated, budget, side="right"))
                n += fitting
                if fitting < len(cumulated):
                    break
                total = cumulated[-1]
        return min(max(1, n), len(unused_ids))
