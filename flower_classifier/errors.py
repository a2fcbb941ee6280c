"""The one exception type for mistakes a user can make (bad path, bad option, bad file).

The command line turns it into a one-line message and a non-zero exit; library callers can catch it.
In Jupyter/IPython it shows as that one line too, not a traceback, and still stops "Run All".
"""
import re

QUOTE_LIMIT = 80  # characters of a bad value that a message shows
LONG_RUN = 1000  # a run of non-blank characters longer than this is a value that reached a message unquoted


class UserError(Exception):
    """A problem with the user's input, stated so that they know what to do."""

    def __init__(self, *args):
        super().__init__(*(bounded(a) if isinstance(a, str) else a for a in args))

    def _render_traceback_(self) -> list[str]:  # IPython calls this instead of printing a traceback
        return [f"UserError: {self}"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) after the code that caught it has already said what was saved."""


def quoted(value, limit: int = QUOTE_LIMIT) -> str:
    """`value` as a message quotes it (its repr), cut to about `limit` characters with its full
    length said: a 10 MB string in a config file still makes a one-line message."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's 4300-digit limit for printing
        return f"an integer of about {int(value.bit_length() * 0.30103):,} digits"
    if len(text) <= limit:
        return text
    return f"{text[:limit - 1]}… ({len(text):,} characters)"


def bounded(message: str) -> str:
    """`message` with every run of over LONG_RUN non-blank characters cut as `quoted` cuts: the
    safety net for a value that reached a message without `quoted` (argparse's, a path)."""
    return re.sub(r"\S{%d,}" % (LONG_RUN + 1),
                  lambda m: f"{m.group()[:QUOTE_LIMIT - 1]}… ({len(m.group()):,} characters)", message)
