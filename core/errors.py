"""The one kind of user error.

Bad input (a corrupt image, a wrong data set name, a cache built by another encoder)
raises `UserError` with a message that names the item and says what to do.
`pipeline.py` catches it once, prints the line and exits non-zero: a traceback on bad
input is a bug.
"""


class UserError(Exception):
    """A problem the user can fix; the message says how."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the message says what was kept and how to continue."""
