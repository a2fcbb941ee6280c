"""The one exception type for mistakes a user can make (bad path, bad option, bad file).

The command line turns it into a one-line message and a non-zero exit; library callers can catch it.
In Jupyter/IPython it shows as that one line too, not a traceback, and still stops "Run All".
"""


class UserError(Exception):
    """A problem with the user's input, stated so that they know what to do."""

    def _render_traceback_(self) -> list[str]:  # IPython calls this instead of printing a traceback
        return [f"UserError: {self}"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) after the code that caught it has already said what was saved."""


QUOTE_LIMIT = 80  # characters of a bad value that a message shows


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
