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
