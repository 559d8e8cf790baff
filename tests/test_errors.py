"""core/errors.py: a disk that refuses a write is one line naming the file and what to do."""

from __future__ import annotations

import errno

import pytest

from core.errors import disk_problem

H5_WRITE = ("Can't write data (file write failed: time = Sat Dec  5 06:50:40 2026\n, filename = "
            "'/c/mvsa_s/image/enc/shard-00001-of-00002.h5.tmp4242', file descriptor = 3, errno = {n}, "
            "error message = 'No space left on device', buf = 0x5644, total write size = 2048, offset = 4096)")
H5_CREATE = ("Unable to synchronously create file (unable to open file: name = '/ro/x.h5', errno = 30, "
             "error message = 'Read-only file system', flags = 13, o_flags = 242)")


@pytest.mark.parametrize("e, start, path", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/r/seed-1.state.pt"), "no space left on the device", "/runs/r/seed-1.state.pt"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/home/me/cache/x.h5"), "disk quota exceeded", "/home/me/cache/x.h5"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/runs"), "permission denied", "/data/runs"),
    (OSError(errno.EPERM, "Operation not permitted", "/data/runs/x"), "operation not permitted", "/data/runs/x"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/cache"), "read-only file system", "/ro/cache"),
    # h5py: an OSError with errno set, or a RuntimeError, the file name inside the message (the temp
    # file's: the line names the shard it was to become)
    (OSError(errno.ENOSPC, H5_WRITE.format(n=28)), "no space left on the device", "/c/mvsa_s/image/enc/shard-00001-of-00002.h5"),
    (RuntimeError(H5_WRITE.format(n=28)), "no space left on the device", "/c/mvsa_s/image/enc/shard-00001-of-00002.h5"),
    (OSError(H5_CREATE), "read-only file system", "/ro/x.h5"),
])
def test_a_refusing_disk_is_one_line_with_the_path_and_what_to_do(e, start, path):
    line = disk_problem(e)
    assert line.startswith(f"{start}: {path}: ") and "\n" not in line
    assert "--cache-dir" in line


def test_the_cause_is_found_and_other_errors_are_not_disk_problems():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/x/log.csv")
        except OSError as e:
            raise RuntimeError("could not save") from e
    except RuntimeError as e:
        assert disk_problem(e).startswith("no space left on the device: /x/log.csv: ")
    assert disk_problem(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None
    assert disk_problem(RuntimeError("CUDA out of memory")) is None
    assert disk_problem(RuntimeError(H5_WRITE.format(n=5))) is None  # EIO: not the user's to fix
    assert disk_problem(OSError(errno.ENOSPC, "No space left on device")).startswith("no space left on the device (")
