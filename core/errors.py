"""The one kind of user error.

Bad input (a corrupt image, a wrong data set name, a cache built by another encoder)
raises `UserError` with a message that names the item and says what to do.
`pipeline.py` catches it once, prints the line and exits non-zero: a traceback on bad
input is a bug.
"""

import errno
import re


class UserError(Exception):
    """A problem the user can fix; the message says how."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the message says what was kept and how to continue."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster scheduler's stop, `kill`), handled as Ctrl-C (`core.threads.sigterm_as_ctrl_c`)."""


# --- the disk refused ---------------------------------------------------------------------------
# A full disk, a quota or a folder we may not write is the user's to fix, like bad input: one line
# naming the path and what to do (`pipeline.py` asks `disk_problem` once, for every command).

_WHAT = {
    errno.ENOSPC: ("no space left on the device", "free some space there (or give another --cache-dir or --out) "
                   "and run the same command again; finished work is kept"),
    errno.EDQUOT: ("disk quota exceeded", "free some of your space (or give another --cache-dir or --out) and run "
                   "the same command again; finished work is kept"),
    errno.EACCES: ("permission denied", "make it readable and writable for you, or give another --cache-dir or --out"),
    errno.EPERM: ("operation not permitted", "make it yours to write, or give another --cache-dir or --out"),
    errno.EROFS: ("read-only file system", "give a --cache-dir or --out on a writable disk"),
}
# h5py says what HDF5 said: "... (file write failed: ..., filename = '/c/x.h5.tmp12', ..., errno = 28, ...)"
_HDF5_ERRNO = re.compile(r"\berrno = (\d+)")
_HDF5_NAME = re.compile(r"\b(?:file)?name = '([^']*)'")
_TEMP = re.compile(r"\.tmp\d*$")  # `<file>.tmp<pid>`: written first, renamed once whole


def disk_problem(e: BaseException) -> str | None:
    """The one line for `e` (or an exception it was raised from) if the disk refused: ENOSPC, EDQUOT,
    EACCES, EPERM or EROFS, from Python's OSError or h5py's OSError/RuntimeError; else None."""
    while e is not None:
        if isinstance(e, (OSError, RuntimeError)):
            code, path = getattr(e, "errno", None), getattr(e, "filename", None)
            found = _HDF5_ERRNO.search(str(e))
            if code not in _WHAT and found:
                code = int(found.group(1))
            if code in _WHAT:
                if path is None and (name := _HDF5_NAME.search(str(e))):
                    path = name.group(1)
                path = _TEMP.sub("", str(path)) if path is not None else None  # the file it was to become
                what, fix = _WHAT[code]
                return f"{what}: {path}: {fix}" if path else f"{what} (writing a file): {fix}"
        e = e.__cause__
    return None
