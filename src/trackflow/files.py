"""Files that appear whole or not at all: no-clobber checks and atomic writes of files and directories.

Every writer in the library goes through ``atomic_output`` / ``atomic_directory`` (temporary name beside
the final one, renamed on success), so an interrupted or failing run never leaves a partial output under
its final name.
"""

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import tempfile
from pathlib import Path

from trackflow.errors import TrackflowError


def check_outputs(paths, overwrite: bool, inputs=(), directories: bool = False) -> None:
    """Refuse outputs that cannot be written whole: existing ones without ``-f``, two outputs (or an output
    and one of ``inputs``) on the same file, and an existing folder under a file's name.

    ``directories=True`` says the outputs are folders (``atomic_directory``): then an existing folder is
    the previous result, replaceable with ``-f``. ``None`` entries (options not given) are skipped.
    """
    claimed = {Path(p).resolve(): f"input {p}" for p in inputs if p is not None}
    for p in paths:
        if p is None:
            continue
        resolved = Path(p).resolve()
        if resolved in claimed:
            raise TrackflowError(f"output {p} is the same file as {claimed[resolved]}")
        claimed[resolved] = f"output {p}"
        _check_parent_is_a_folder(Path(p))
        if Path(p).is_dir() and not directories:
            raise TrackflowError(f"output {p} is a directory")
        if Path(p).exists() and not overwrite:
            raise TrackflowError(f"output {p} already exists (use -f to overwrite)")


def _check_parent_is_a_folder(path: Path) -> None:
    """The output's nearest existing ancestor must be a folder (the missing ones are created)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise TrackflowError(f"cannot write {path}: {parent} is not a directory")
            return


def check_inputs(paths) -> None:
    for p in paths:
        if p is not None and not Path(p).exists():
            raise TrackflowError(f"input {p} does not exist")


# renameat2(2) flag: fail with EEXIST instead of replacing the destination.
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_no_replace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, failing with FileExistsError if ``target`` exists (atomically)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # other errors are real; these mean "not supported here"
            raise OSError(err, os.strerror(err), str(target))
    if source.is_dir():
        os.rename(source, target)  # refuses a non-empty target; an empty one is no result to lose
        return
    os.link(source, target)  # fails if target exists
    os.unlink(source)


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        _rename_no_replace(tmp, final)
    except FileExistsError:
        raise TrackflowError(f"output {final} already exists (use -f to overwrite)") from None
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise TrackflowError(f"output {final} already exists (use -f to overwrite)") from None
        raise


def _temporary_prefix(final: Path) -> str:
    # The writer's pid in the name tells a stale temporary (its writer was killed) from a live one.
    return f".{final.name}.{os.getpid()}-"


def remove_stale_temporaries(final) -> None:
    """Delete the temporaries of ``final`` left by writers that no longer run (killed with SIGKILL, say)."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    for path in final.parent.glob(f".{glob.escape(final.name)}.*-*.tmp*"):
        pid = path.name[len(final.name) + 2:].split("-", 1)[0]
        if not pid.isdigit() or _process_exists(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fsync(path: Path) -> None:
    """Flush a written file (and the folder's entry) to disk, so that a crash after the rename cannot
    leave an empty file under the final name."""
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(final_path, suffix=None, overwrite: bool = True):
    """Yield a temporary path beside ``final_path``; rename it to ``final_path`` only on success.

    An interrupted or failing writer therefore never leaves a partial file under the final name. The
    suffix of the final name is kept so that format detection by extension still works. With
    ``overwrite=False`` the rename refuses an existing ``final_path`` atomically, so that of two runs
    racing for the same new output one fails instead of silently replacing the other's result.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final_path)
    suffix = suffix if suffix is not None else "".join(final_path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(final_path), suffix=f".tmp{suffix}",
                               dir=final_path.parent)
    os.close(fd)
    os.unlink(tmp)  # writers (h5py, nibabel, torch) create the file themselves
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync(tmp)
        _publish(tmp, final_path, overwrite)
        _fsync_directory(final_path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_directory(final_dir, overwrite: bool = True):
    """Yield a temporary directory beside ``final_dir`` that replaces it only on success.

    The old directory (if any) is moved aside, the new one renamed into place, then the old one deleted:
    an interrupted writer leaves the previous directory untouched and no partial one under the name.
    With ``overwrite=False`` an existing ``final_dir`` is refused at the rename, atomically.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix=_temporary_prefix(final_dir), suffix=".tmp", dir=final_dir.parent))
    try:
        yield tmp_dir
        tmp_dir.chmod(0o755)  # mkdtemp makes it private
        for path in tmp_dir.rglob("*"):
            _fsync(path)
        if final_dir.exists() and overwrite:
            # A directory cannot be renamed over a non-empty one.
            old_dir = Path(tempfile.mkdtemp(prefix=_temporary_prefix(final_dir), suffix=".tmp.old",
                                            dir=final_dir.parent))
            os.replace(final_dir, old_dir / final_dir.name)
            os.replace(tmp_dir, final_dir)
            shutil.rmtree(old_dir)
        else:
            _publish(tmp_dir, final_dir, overwrite=False)
        _fsync_directory(final_dir.parent)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
