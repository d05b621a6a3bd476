"""benchmarks/gpu.py at a tiny size on the CPU: the script a GPU machine runs unattended must work before one is
lent. Figures are not timed; the test checks the counts, that every figure is finite, and the validity checks.
Also the per-bundle table of benchmarks/quality.py on real scores."""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SEEDS, MAX_STEPS, SLOTS, COMPARED = 200, 30, 50, 50
TINY = ["--l2t_size", "16", "--tt_d_model", "16", "--tt_heads", "2", "--tt_layers", "1"]


@pytest.fixture(scope="module")
def import_benchmark():
    """Imports benchmarks/<name>.py by name, with benchmarks/ on the path while this module's tests run (the
    scripts import their siblings, e.g. gpu.py imports tracking.py)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def gpu_benchmark(import_benchmark):
    return import_benchmark("gpu")


def test_gpu_benchmark_runs_at_a_tiny_size_on_the_cpu(tiny_hdf5, tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu.py"), "--device", "cpu", "--hdf5", str(tiny_hdf5), "--subject",
         "sub-01", "--seeds", str(SEEDS), "--max_steps", str(MAX_STEPS), "--slots", str(SLOTS),
         "--probe_seeds", "120", "--compare_cpu", str(COMPARED), "--json", str(out), *TINY],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["valid"] and report["finished"] and report["random_weights"] and report["device"] == "cpu"
    assert [r["model"] for r in report["models"]] == ["l2t", "tts"]
    for record in report["models"]:
        assert record["valid"] and record["problems"] == [], record
        assert record["seeds"] == record["seeds_requested"] == SEEDS and not record["scaled_down"]
        assert record["slots"] == SLOTS and not record["slots_capped"]
        # every seed's streamline has 1 .. MAX_STEPS + 1 points; the random heads take many steps
        assert SEEDS < record["points"] <= SEEDS * (MAX_STEPS + 1)
        assert 0 < record["kept"] <= SEEDS
        assert sum(record["end_reasons"].values()) == 2 * SEEDS
        for key in ("wall_s", "seeds_per_s", "points_per_s", "peak_memory_bytes", "peak_memory_per_1e5_slots_bytes"):
            assert math.isfinite(record[key]) and record[key] > 0, key
        assert math.isclose(record["points_per_s"] / record["seeds_per_s"], record["mean_points"])
        compared = record["cpu_compare"]
        # CPU against CPU, other slot and process counts: the same streamlines, bit for bit
        assert compared["seeds"] == COMPARED and compared["cpu_slots"] != SLOTS
        assert compared["identical_share"] == compared["same_length_share"] == 1.0
        assert compared["max_point_distance_mm"] == 0.0
        assert math.isfinite(compared["speedup"]) and compared["speedup"] > 0
    assert f"{SEEDS}" in done.stdout and "all tractograms valid" in done.stdout


def test_gpu_benchmark_check_finds_broken_streamlines(gpu_benchmark, tiny_hdf5, one_torch_thread):
    gpu = gpu_benchmark
    args = gpu.parse_args(["--device", "cpu", "--hdf5", str(tiny_hdf5), "--subject", "sub-01", "--models", "l2t",
                           "--max_steps", str(MAX_STEPS), *TINY])
    inputs = gpu.subject_inputs(args, None)
    max_points = gpu.max_points_for(MAX_STEPS * gpu.STEP_MM, gpu.STEP_MM)
    model, _ = gpu.build_models(args, inputs.volume.data.shape[3], max_points)["l2t"]
    tracker = gpu.build_tracker(model, inputs, gpu.tracking_options(args, SLOTS), gpu.STEP_MM, 0, torch.device("cpu"))
    result = tracker.track_range(10, 70)
    problems, kept = gpu.check_result(result, 10, 70, inputs, max_points, args)
    assert problems == [] and 0 < kept <= 60

    def problems_after(change, start=10):
        broken = type(result)(result.points.copy(), result.lengths.copy(), result.seed_indices.copy(),
                              result.seeds, result.end_reasons)
        change(broken)
        return gpu.check_result(broken, start, 70, inputs, max_points, args)[0]

    long_one = int(np.argmax(result.lengths))
    middle = int(result.offsets[long_one]) + 5
    assert "not one step apart" in " ".join(problems_after(lambda r: r.points.__setitem__((middle, 0),
                                                                                         r.points[middle, 0] + 0.1)))
    assert "non-finite" in " ".join(problems_after(lambda r: r.points.__setitem__((middle, 0), np.nan)))
    assert "outside the volume" in " ".join(problems_after(lambda r: r.points.__setitem__((middle, 2), 99.0)))
    assert "not one per seed" in " ".join(problems_after(lambda r: None, start=0))


def test_quality_bundle_table_shows_which_bundle_a_tracker_finds(import_benchmark, tiny_cohort, tmp_path):
    """benchmarks/quality.py's per-bundle table, on real scores: a tractogram of the arc's ground truth alone
    scores on the arc only, and a tracker's cell is the mean over its runs (training seeds)."""
    quality = import_benchmark("quality")
    subject_dir = tiny_cohort / "dwi_ml_ready" / "sub-01"
    arc_only = quality.score(subject_dir / "tractograms" / "sub-01__arc.trk", subject_dir / "bundles")
    nothing = quality.score(tmp_path / "not_written.trk", subject_dir / "bundles")
    table = quality.bundle_table({"arc only": [arc_only], "arc, then nothing": [arc_only, nothing]})
    assert list(table.columns) == ["tracker", *arc_only["bundles"]]
    arc = arc_only["bundles"]["arc"]
    assert arc["F1"] > 0.5
    rows = table.set_index("tracker")
    assert rows.loc["arc only", "arc"] == f"{arc['F1']:.2f} ({arc['OL']:.2f})"
    assert rows.loc["arc, then nothing", "arc"] == f"{arc['F1'] / 2:.2f} ({arc['OL'] / 2:.2f})"
    others = [bundle for bundle in arc_only["bundles"] if bundle != "arc"]
    assert others and all(rows.loc["arc only", bundle] == "0.00 (0.00)" for bundle in others)
