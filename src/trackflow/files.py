"""Files that appear whole or not at all: no-clobber checks and atomic writes of files and directories.

Every writer in the library goes through ``atomic_output`` / ``atomic_directory`` (temporary name beside
the final one, renamed on success), so an interrupted or failing run never leaves a partial output under
its final name.
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from trackflow.errors import TrackflowError


def check_outputs(paths, overwrite: bool) -> None:
    """Refuse to clobber existing outputs unless ``-f`` was given."""
    for p in paths:
        if p is not None and Path(p).exists() and not overwrite:
            raise TrackflowError(f"output {p} already exists (use -f to overwrite)")


def check_inputs(paths) -> None:
    for p in paths:
        if p is not None and not Path(p).exists():
            raise TrackflowError(f"input {p} does not exist")


@contextlib.contextmanager
def atomic_output(final_path, suffix=None):
    """Yield a temporary path beside ``final_path``; rename it to ``final_path`` only on success.

    An interrupted or failing writer therefore never leaves a partial file under the final name.
    The suffix of the final name is kept so that format detection by extension still works.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(final_path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=f".tmp{suffix}",
                               dir=final_path.parent)
    os.close(fd)
    os.unlink(tmp)  # writers (h5py, nibabel, torch) create the file themselves
    try:
        yield Path(tmp)
        os.replace(tmp, final_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_directory(final_dir):
    """Yield a temporary directory beside ``final_dir`` that replaces it only on success.

    The old directory (if any) is moved aside, the new one renamed into place, then the old one deleted:
    an interrupted writer leaves the previous directory untouched and no partial one under the name.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".tmp", dir=final_dir.parent))
    try:
        yield tmp_dir
        tmp_dir.chmod(0o755)  # mkdtemp makes it private
        if final_dir.exists():
            # A directory cannot be renamed over a non-empty one.
            old_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".old", dir=final_dir.parent))
            os.replace(final_dir, old_dir / final_dir.name)
            os.replace(tmp_dir, final_dir)
            shutil.rmtree(old_dir)
        else:
            os.replace(tmp_dir, final_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
