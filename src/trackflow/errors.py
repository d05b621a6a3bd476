"""The one exception type for bad user input (files, configs, options).

CLIs print its message on one line and exit non-zero; anything else is a bug and keeps its traceback.
"""


class TrackflowError(Exception):
    """Bad input: the message names the problem in one sentence."""
