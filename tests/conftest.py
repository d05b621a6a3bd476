"""Fixtures shared by the test modules: one tiny demo cohort and its hdf5, built once per session.

The session fixtures are read-only by contract: a test that needs to change a file copies it into its own
``tmp_path`` first.
"""

import json
from pathlib import Path

import pytest
import torch

from trackflow.data.demo import TINY_SHAPE, make_demo_cohort
from trackflow.data.hdf5.creation import create_hdf5_dataset
from trackflow.models.persistence import save_model_dir


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """Demo cohort folder (``trackflow_make_demo`` layout): sub-01 (training) and sub-02 (validation),
    10 ground-truth streamlines per bundle, ``TINY_SHAPE`` volumes, seed 0."""
    return make_demo_cohort(tmp_path_factory.mktemp("tiny_cohort") / "cohort", n_subjects=2, seed=0,
                            streamlines_per_bundle=10, shape=TINY_SHAPE)


@pytest.fixture(scope="session")
def tiny_hdf5(tiny_cohort, tmp_path_factory) -> Path:
    """``tiny_cohort`` packed by ``create_hdf5_dataset`` with its own config and subject lists, streamlines
    resampled to a 1 mm step."""
    config = tiny_cohort / "config"
    return create_hdf5_dataset(tiny_cohort / "dwi_ml_ready", tmp_path_factory.mktemp("tiny_hdf5") / "demo.hdf5",
                               config / "hdf5_config.json", config / "training_subjs.txt",
                               config / "validation_subjs.txt", config / "testing_subjs.txt", step_size=1.0)


@pytest.fixture(scope="session")
def make_experiment(tiny_hdf5):
    """``make_experiment(folder, model) -> folder``: an experiment folder whose best model is ``model`` and
    whose latest parameters name ``tiny_hdf5`` (what the tracking and loss scripts read)."""
    def make(folder: Path, model) -> Path:
        save_model_dir(model, folder / "best_model")
        (folder / "parameters_latest.json").write_text(json.dumps({"hdf5 file": str(tiny_hdf5)}))
        return folder
    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run several times faster on one torch thread on the shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
