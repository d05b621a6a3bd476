"""Scoring against ground truth on a hand-made world whose answers are known."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from dipy.io.stateful_tractogram import Origin, Space, StatefulTractogram
from dipy.io.streamline import save_tractogram

from trackflow.cli.score import main as score_main
from trackflow.evaluation.tractometer import GroundTruthBundle, score_streamlines

SHAPE = (12, 12, 6)


def line(start, end, n=20):
    return np.linspace(start, end, n).astype(np.float32)


def make_world():
    """Bundle 'ax' runs along x at (y, z) voxel (2, 2); bundle 'ay' along y at (x, z) voxel (8, 3).

    Each bundle's mask is exactly the voxels its straight centreline crosses; head/tail are its end voxels.
    """
    ax_mask = np.zeros(SHAPE, bool)
    ax_mask[:, 2, 2] = True
    ay_mask = np.zeros(SHAPE, bool)
    ay_mask[8, :, 3] = True
    bundles = []
    for name, mask, head_idx, tail_idx in (("ax", ax_mask, (0, 2, 2), (11, 2, 2)),
                                           ("ay", ay_mask, (8, 0, 3), (8, 11, 3))):
        head = np.zeros(SHAPE, bool)
        head[head_idx] = True
        tail = np.zeros(SHAPE, bool)
        tail[tail_idx] = True
        bundles.append(GroundTruthBundle(name, head, tail, mask))
    gt = {"ax": line([0.5, 2.5, 2.5], [11.5, 2.5, 2.5]), "ay": line([8.5, 0.5, 3.5], [8.5, 11.5, 3.5])}
    return bundles, gt


def test_exact_ground_truth_scores_perfectly():
    bundles, gt = make_world()
    # Both directions of travel count as valid.
    metrics = score_streamlines([gt["ax"], gt["ay"], gt["ax"][::-1]], bundles)
    assert metrics["VB"] == 2 and metrics["IB"] == 0
    assert metrics["VS"] == 3 and metrics["IS"] == 0 and metrics["NC"] == 0
    assert metrics["OL"] == pytest.approx(1.0) and metrics["OR"] == pytest.approx(0.0)
    assert metrics["F1"] == pytest.approx(1.0)
    assert metrics["bundles"]["ax"]["VS"] == 2


def test_wrong_endpoints_is_one_invalid_and_partial_bundle_lowers_overlap():
    bundles, gt = make_world()
    wrong = line([0.5, 2.5, 2.5], [8.5, 11.5, 3.5])  # head of ax to tail of ay
    nowhere = line([5.5, 5.5, 1.5], [5.5, 9.5, 1.5])
    metrics = score_streamlines([gt["ax"], wrong, nowhere], bundles)
    assert (metrics["VS"], metrics["IS"], metrics["NC"]) == (1, 1, 1)
    assert metrics["IB"] == 1 and metrics["VB"] == 1
    assert metrics["VS_ratio"] == pytest.approx(1 / 3)
    assert metrics["bundles"]["ay"] == {"VS": 0, "OL": 0.0, "OR": 0.0, "F1": 0.0}
    # Overall means count the missed bundle as zero.
    assert metrics["OL"] == pytest.approx(0.5) and metrics["F1"] == pytest.approx(0.5)


def test_overreach_counts_voxels_outside_the_mask():
    bundles, _ = make_world()
    # Valid endpoints, but a detour through y = 3 for x in the middle: exits the 12-voxel mask.
    detour = np.array([[0.5, 2.5, 2.5], [3.5, 2.5, 2.5], [3.5, 3.5, 2.5], [7.5, 3.5, 2.5],
                       [7.5, 2.5, 2.5], [11.5, 2.5, 2.5]], np.float32)
    m = score_streamlines([detour], bundles)["bundles"]["ax"]
    outside = 5  # voxels (3..7, 3, 2)
    inside = 12 - 3  # voxels x = 4, 5, 6 of the mask are skipped
    assert m["OR"] == pytest.approx(outside / 12)
    assert m["OL"] == pytest.approx(inside / 12)
    assert m["F1"] == pytest.approx(2 * inside / ((inside + outside) + 12))


def write_world_files(folder, affine=None):
    """The world's masks as <folder>/sub-01__<bundle>__<part>.nii.gz and its two bundles' centrelines as
    <folder>/t.trk; returns the affine."""
    bundles, gt = make_world()
    if affine is None:
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        affine[:3, 3] = [-10, -12, 4]
    for b in bundles:
        for part in ("head", "tail", "mask"):
            nib.save(nib.Nifti1Image(getattr(b, part).astype(np.uint8), affine),
                     folder / f"sub-01__{b.name}__{part}.nii.gz")
    ref = nib.Nifti1Image(np.zeros(SHAPE, np.uint8), affine)
    sft = StatefulTractogram([gt["ax"], gt["ay"]], ref, Space.VOX, origin=Origin.TRACKVIS)
    save_tractogram(sft, str(folder / "t.trk"))
    return affine


def test_cli_scores_a_trk_against_mask_files(tmp_path):
    write_world_files(tmp_path)
    out = tmp_path / "scores.json"
    cmd = [sys.executable, "-m", "trackflow.cli.score", str(tmp_path / "t.trk"), str(tmp_path), str(out),
           "--dilate_endpoints", "0"]
    subprocess.run(cmd, check=True)
    metrics = json.loads(out.read_text())
    assert metrics["VB"] == 2 and metrics["F1"] == pytest.approx(1.0)
    # Existing output without -f: one-line error, non-zero exit.
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0 and "already exists" in r.stderr and r.stderr.count("\n") == 1


def test_missing_ground_truth_is_a_clean_error(tmp_path):
    (tmp_path / "t.trk").write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "trackflow.cli.score", str(tmp_path / "t.trk"),
                        str(tmp_path), str(tmp_path / "o.json")], capture_output=True, text=True)
    assert r.returncode != 0 and "no ground-truth bundles" in r.stderr
    assert not (tmp_path / "o.json").exists()


def _truncate(path):
    path.write_bytes(path.read_bytes()[:40])


def _empty_mask(path):
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), path)


def _trk_on_another_grid(path):
    ref = nib.Nifti1Image(np.zeros((20, 20, 10), np.uint8), np.eye(4))
    save_tractogram(StatefulTractogram([make_world()[1]["ax"]], ref, Space.VOX, origin=Origin.TRACKVIS),
                    str(path))


@pytest.mark.parametrize("name,change,extra,message", [
    ("sub-01__ay__mask.nii.gz", _truncate, [], "cannot read ground-truth mask"),
    ("sub-01__ay__tail.nii.gz", _empty_mask, [], "tail of ground-truth bundle ay is empty"),
    ("t.trk", _trk_on_another_grid, [], "is not on the grid"),
    (None, None, ["--dilate_endpoints", "-3"], "--dilate_endpoints must be >= 0"),
    (None, None, ["--same_output"], "is the same file as input"),
])
def test_score_refuses_bad_ground_truth_tractogram_or_options(tmp_path, capsys, name, change, extra, message):
    write_world_files(tmp_path)
    if change is not None:
        change(tmp_path / name)
    out = tmp_path / "scores.json"
    if extra == ["--same_output"]:
        out, extra = tmp_path / "t.trk", ["-f"]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        score_main([str(tmp_path / "t.trk"), str(tmp_path), str(out), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
