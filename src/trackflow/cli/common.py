"""Shared pieces of every command line: verbosity, overwrite, logging, clean one-line errors.

Every CLI is thin: it parses arguments, then calls one library function inside ``run_cli`` so that any
``TrackflowError`` (bad input) becomes one line on stderr and exit code 2, with no traceback.
"""

import argparse
import logging
import signal
import sys

from trackflow.errors import TrackflowError

LOGGER = logging.getLogger("trackflow")


def new_parser(**kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` without prefix matching: ``--rng`` must never silently mean ``--rng_seed``, nor
    ``--max_epoch`` (from a config) ``--max_epochs``. Abbreviations that dwi_ml's documentation uses are
    explicit aliases instead."""
    return argparse.ArgumentParser(allow_abbrev=False, **kwargs)


# dest prefix of the options accepted for dwi_ml's command lines that have no effect here
_IGNORED_PREFIX = "ignored_dwi_ml_"


def add_ignored_dwi_ml_args(parser: argparse.ArgumentParser, options: dict) -> None:
    """Accept dwi_ml options that do nothing here, so that dwi_ml command lines run unchanged.

    ``options`` maps an option string to ``(argparse keyword arguments, why it has no effect)``; when given,
    ``warn_ignored_dwi_ml_args`` names them in one warning."""
    group = parser.add_argument_group("Accepted for dwi_ml compatibility, no effect here")
    for flag, (kwargs, why) in options.items():
        if kwargs.get("action") != "store_true":
            kwargs = {"metavar": flag.lstrip("-").upper(), **kwargs}
        group.add_argument(flag, dest=_IGNORED_PREFIX + flag.lstrip("-"), default=None,
                           help=f"No effect here: {why}.", **kwargs)


def warn_ignored_dwi_ml_args(args: dict) -> None:
    """Remove the ignored dwi_ml options from ``args`` (``vars(namespace)``), with one warning naming those
    given."""
    given = []
    for dest in [d for d in args if d.startswith(_IGNORED_PREFIX)]:
        value = args.pop(dest)
        if value is not None and value is not False:  # a given 0 is named too
            flag = dest[len(_IGNORED_PREFIX):]
            given.append(f"-{flag}" if len(flag) == 1 else f"--{flag}")
    if given:
        LOGGER.warning("accepted for dwi_ml compatibility but without effect here: %s", ", ".join(given))


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    """scilpy-style ``-v [LEVEL]``: bare ``-v`` means INFO, default WARNING."""
    parser.add_argument(
        "-v", dest="verbose", nargs="?", const="INFO", default="WARNING",
        choices=["DEBUG", "INFO", "WARNING"],
        help="Log level; bare -v means INFO. [%(default)s]")


def add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", dest="overwrite", action="store_true",
                        help="Overwrite existing outputs.")


# Argument types shared by the parsers: argparse turns their ArgumentTypeError into a usage error.
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {value}")
    return value


def percent(text: str) -> float:
    value = float(text)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"expected a percentage in (0, 100], got {text}")
    return value


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(levelname)s %(name)s: %(message)s",
                        force=True)


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
