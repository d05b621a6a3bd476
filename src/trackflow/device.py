"""The torch device behind every ``--use_gpu`` option (training, tracking, loss visualisation), the host
memory allocator's settings for CPU runs, and the process's age (its start-up time)."""

import ctypes
import functools
import logging
import os
import platform
import time

import torch

LOGGER = logging.getLogger(__name__)


def select_device(use_gpu: bool) -> torch.device:
    """CUDA when asked for and available, else the CPU.

    dwi_ml raises when ``--use_gpu`` meets a machine without CUDA; we fall back with one warning so that
    the same command line runs on a laptop and on a GPU node.
    """
    if use_gpu and not torch.cuda.is_available():
        LOGGER.warning("--use_gpu given but CUDA is not available: running on the CPU")
        return torch.device("cpu")
    return torch.device("cuda" if use_gpu else "cpu")


# glibc's mallopt parameters, and its ceiling on the mmap threshold on 64-bit machines.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2 ** 20
_TRIM_THRESHOLD = 2 ** 30


@functools.cache
def keep_freed_host_memory() -> bool:
    """Let glibc keep freed blocks of up to 32 MB for reuse instead of giving them back to the kernel.

    Every tracking or training step allocates and frees the same MB-sized tensors. With glibc's defaults the
    larger ones are mapped and unmapped at each step (or trimmed off the heap), and each reuse faults its pages
    in again: measured a fifth of a CPU tracking run spent in the kernel (sys 3.1 s of 14.6 s), 0.7 s with
    this. The cost is that the process keeps its peak memory. Process-wide (forked workers inherit it);
    returns False, doing nothing, without glibc.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def seconds_since_process_start() -> float | None:
    """How long this process has been running (the interpreter's start-up and imports included), to 10 ms;
    None where ``/proc`` does not say (not Linux)."""
    try:
        with open("/proc/self/stat") as stat:
            # the fields after the command name, which is in parentheses and may hold spaces
            fields = stat.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: clock ticks after boot
        return max(time.clock_gettime(time.CLOCK_BOOTTIME) - started, 0.0)
    except (OSError, IndexError, ValueError, AttributeError):
        return None
