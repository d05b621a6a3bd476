"""Atomic outputs (``trackflow.files``): no partial file, no silent replacement, no temporary left behind."""

import os
import subprocess
import sys

import pytest

from trackflow.errors import TrackflowError
from trackflow.files import atomic_directory, atomic_output, check_outputs, remove_stale_temporaries


def test_a_new_output_is_not_replaced_by_a_run_that_finishes_second(tmp_path):
    out = tmp_path / "out.trk"
    with pytest.raises(TrackflowError, match="already exists"):
        with atomic_output(out, overwrite=False) as tmp:
            tmp.write_text("second")
            out.write_text("first")  # the other run, started on the same absent output, finished meanwhile
    assert out.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.trk"]


def test_overwrite_replaces_and_writes_the_whole_file(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("old")
    with atomic_output(out, overwrite=True) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new"


def test_a_new_directory_is_not_replaced_by_a_run_that_finishes_second(tmp_path):
    final = tmp_path / "best_model"
    with pytest.raises(TrackflowError, match="already exists"):
        with atomic_directory(final, overwrite=False) as tmp:
            (tmp / "model_state.pkl").write_text("second")
            final.mkdir()
            (final / "model_state.pkl").write_text("first")
    assert (final / "model_state.pkl").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_killed_writers_are_removed_on_the_next_run(tmp_path):
    out = tmp_path / "sub-01__l2t.trk"
    stale_file = tmp_path / f".{out.name}.{_dead_pid()}-abc123.tmp.trk"
    stale_dir = tmp_path / f".{out.name}.{_dead_pid()}-def456.tmp"
    live = tmp_path / f".{out.name}.{os.getpid()}-ghi789.tmp.trk"  # a writer still running
    other = tmp_path / f".other.trk.{_dead_pid()}-jkl012.tmp.trk"  # another output's
    stale_file.write_text("partial")
    stale_dir.mkdir()
    (stale_dir / "part").write_text("partial")
    live.write_text("partial")
    other.write_text("partial")
    with atomic_output(out) as tmp:
        tmp.write_text("done")
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other.exists()
    assert out.read_text() == "done"


def test_stale_temporaries_of_a_directory_output_are_removed(tmp_path):
    final = tmp_path / "checkpoint"
    stale = tmp_path / f".checkpoint.{_dead_pid()}-x1.tmp"
    stale.mkdir()
    remove_stale_temporaries(final)
    assert not stale.exists()


def test_outputs_colliding_with_each_other_or_an_input_are_refused(tmp_path):
    src = tmp_path / "in.trk"
    src.write_text("input")
    with pytest.raises(TrackflowError, match="same file as output"):
        check_outputs([tmp_path / "out.trk", tmp_path / "sub" / ".." / "out.trk"], overwrite=True)
    with pytest.raises(TrackflowError, match="same file as input"):
        check_outputs([tmp_path / "out.tsv", src], overwrite=True, inputs=[src])
    check_outputs([tmp_path / "out.trk", tmp_path / "out.tsv", None], overwrite=False, inputs=[src, None])


def test_a_folder_under_a_file_output_name_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "out.trk").mkdir()
    with pytest.raises(TrackflowError, match="is a directory"):
        check_outputs([tmp_path / "out.trk"], overwrite=True)
    check_outputs([tmp_path / "out.trk"], overwrite=True, directories=True)  # a folder output: replaceable
