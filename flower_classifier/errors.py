"""The one exception type for mistakes a user can make (bad path, bad option, bad file).

The command line turns it into a one-line message and a non-zero exit; library callers can catch it.
"""


class UserError(Exception):
    """A problem with the user's input, stated so that they know what to do."""
