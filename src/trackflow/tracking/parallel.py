"""A seed range tracked by several CPU processes: the same streamlines as one process, bit for bit.

Seeds are independent and every random draw is keyed by the seed index (``random.py``), so the range
[start, end) is cut into consecutive pieces that worker processes track apart (``Tracker.track_range``) and
that are concatenated in seed order. The workers are forked, so they inherit the tracker (model, volume,
masks) without copying or reloading it. Every process, the single-process case included, tracks with one
torch thread: at tracking's matrix sizes threads only wait on each other, and the same thread count
everywhere keeps the arithmetic, hence the streamlines, the same whatever the number of processes.
"""

import multiprocessing
import os
import signal

import torch

from trackflow.device import keep_freed_host_memory
from trackflow.errors import TrackflowError
from trackflow.tracking.tracker import Tracker, TrackingResult, concatenate_results

# One piece per process: each piece ends with a tail of few live slots, so more pieces cost more CPU (4 per
# process took 34% more CPU than one process on 5,000 seeds; 1 per process, 5%).
PIECES_PER_PROCESS = 1

_TRACKER = None  # the tracker the forked workers inherit


def available_cpus() -> int:
    """The cores this job was given: SLURM's ``SLURM_CPUS_PER_TASK`` when set, else the CPU affinity."""
    cpus = len(os.sched_getaffinity(0))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return max(1, min(int(slurm), cpus)) if slurm.isdigit() else cpus


def seed_pieces(start: int, end: int, n_pieces: int) -> list:
    """[start, end) cut into at most ``n_pieces`` consecutive, non-empty (a, b) ranges of near-equal size."""
    n_pieces = max(1, min(n_pieces, end - start))
    cuts = [start + (end - start) * k // n_pieces for k in range(n_pieces + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _start_worker() -> None:
    # The parent owns the signals: on SIGTERM or Ctrl-C it terminates the workers (SIGTERM, default action:
    # they die quietly) instead of each one printing its own KeyboardInterrupt.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _track_piece(indexed_bounds: tuple) -> tuple:
    k, bounds = indexed_bounds
    return k, _TRACKER.track_range(*bounds)


def track_in_processes(tracker: Tracker, start: int, end: int, processes: int, progress=None) -> TrackingResult:
    """Track seeds ``start .. end-1`` with ``processes`` CPU processes (1: in this one); ``progress`` gets
    ``update(n)`` as pieces finish."""
    global _TRACKER
    if processes < 1:
        raise TrackflowError(f"--processes must be at least 1, got {processes}")
    keep_freed_host_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if processes == 1:
            return tracker.track_range(start, end, progress)
        if tracker.device.type != "cpu":
            raise TrackflowError("--processes is for CPU tracking: a GPU tracks in one process")
        pieces = seed_pieces(start, end, processes * PIECES_PER_PROCESS)
        _TRACKER = tracker
        pool = multiprocessing.get_context("fork").Pool(min(processes, len(pieces)), initializer=_start_worker)
        try:
            results = [None] * len(pieces)
            for k, result in pool.imap_unordered(_track_piece, enumerate(pieces)):
                results[k] = result
                if progress is not None:
                    progress.update(pieces[k][1] - pieces[k][0])
            pool.close()
        except BaseException:
            pool.terminate()  # interrupted, or a piece failed: stop the others now, not after their pieces
            raise
        finally:
            pool.join()
        return concatenate_results(results)
    finally:
        _TRACKER = None
        torch.set_num_threads(threads)
