"""Shared pieces of every command line: verbosity, overwrite, clean one-line errors, atomic outputs.

Every CLI is thin: it parses arguments, then calls one library function inside ``run_cli`` so that any
``TrackflowError`` (bad input) becomes one line on stderr and exit code 2, with no traceback.
"""

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from trackflow.errors import TrackflowError

LOGGER = logging.getLogger("trackflow")


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    """scilpy-style ``-v [LEVEL]``: bare ``-v`` means INFO, default WARNING."""
    parser.add_argument(
        "-v", dest="verbose", nargs="?", const="INFO", default="WARNING",
        choices=["DEBUG", "INFO", "WARNING"],
        help="Log level; bare -v means INFO. [%(default)s]")


def add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", dest="overwrite", action="store_true",
                        help="Overwrite existing outputs.")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(levelname)s %(name)s: %(message)s",
                        force=True)


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


# Model classes (``model_type.txt`` names) read by the ``l2t_*`` scripts; every other class is a
# TractoTransformer, read by the ``tt_*`` scripts.
L2T_MODEL_TYPES = ("Learn2TrackModel",)


def check_model_family(model_type: str, expected_family: str, script: str) -> None:
    """Refuse a model of the other family, naming the script that reads it.

    Parameters
    ----------
    model_type : str
        Class name of the experiment's model (``type(model).__name__`` or ``model_type.txt``).
    expected_family : str
        ``"l2t"`` or ``"tt"``: the family of the script that was run.
    script : str
        The script's name without its family prefix, e.g. ``"track_from_model"``.
    """
    family = "l2t" if model_type in L2T_MODEL_TYPES else "tt"
    if family != expected_family:
        raise TrackflowError(f"this experiment holds a {model_type}: use {family}_{script}")


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


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def run_cli(func, *args, **kwargs):
    """Call the library function; turn bad-input errors into one line and a non-zero exit.

    SIGTERM (what Snakemake and SLURM send) is turned into KeyboardInterrupt so that ``atomic_output``
    removes its temporary file on the way out.
    """
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        return func(*args, **kwargs)
    except TrackflowError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
