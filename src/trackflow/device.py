"""The torch device behind every ``--use_gpu`` option (training, tracking, loss visualisation)."""

import logging

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
