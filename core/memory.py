"""How a command uses memory: glibc keeps what it frees, and stage two has a budget.

Why glibc: by default it hands every freed block above a moving threshold (at most 32 MB)
back to the kernel, and trims the top of its heap as soon as 128 kB are free there. An
encoder's forward pass allocates and frees the same large activation buffers every batch,
so each batch they were returned to the kernel and faulted in again page by page: stage one
spent ~40% of its CPU time in the kernel (8.5 M minor faults for 150 items; PERFORMANCE.md,
"Where stage one's time goes"). `keep_freed()` sets glibc's `mallopt` knobs for the running
process (the MALLOC_*_ environment variables are read only at process start, too late for
Python): every buffer comes from the heap, and freed memory stays there for the next batch.
The mmap threshold alone is not enough: glibc caps it at 32 MB, and EfficientNet-lite0's first
maps at the extraction batch (32 x 32 x 112 x 112 floats, 51 MB) are above it, so they were still
mmapped and faulted in every batch (41% of the CPU time in the kernel, 13.8 M faults for 1,026
items, bench/results/extract.json before this); with mmap off (M_MMAP_MAX = 0) a 5-batch loop of
its forward went from 2.87 s to 0.15 s of kernel time and 4.1 s to 2.5 s of wall time. Trimming is
off too (M_TRIM_THRESHOLD -1): with a 1 GiB threshold, one extraction of 1,026 items in three still
took 3.1 M faults instead of 0.3-0.4 M, a batch's transient GiB at the heap's top being handed back
and faulted in again. The cost: resident memory stays at its peak instead of shrinking between
batches, which it would reach again in the next batch anyway.

`SPP_MALLOC=default` in the environment leaves glibc's defaults alone (benchmarks compare).

The budget: stage two holds every split it trains on in RAM when they fit `budget()`, else
it reads batches from the shards (train/data.py). By default the budget is half of the memory
this process can still get (MemAvailable, or what the cgroup limit leaves, whichever is
smaller), divided by the processes that train at once (`--jobs`): each worker holds its own
copy, and the other half is left for torch, the head, the page cache and everyone else.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import re
import sys
from pathlib import Path

from core.errors import UserError

ENV = "SPP_MALLOC"

# mallopt parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -3, -4, -8
MMAP_THRESHOLD = 32 << 20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)
MMAP_MAX = 0  # no block is mmapped, however large: the heap serves (and keeps) them all
TRIM_THRESHOLD = -1  # never trim the heap: glibc reads -1 as "trimming off" (mallopt(3))
TOP_PAD = 64 << 20  # grow the heap 64 MB beyond each request: fewer brk calls


@functools.cache
def keep_freed() -> bool:
    """Tell glibc to keep freed memory for reuse (see the module doc); True if it took effect.

    Idempotent, and a no-op outside glibc or with SPP_MALLOC=default. Call early: memory
    already mapped keeps the old rules until freed."""
    if os.environ.get(ENV, "").lower() == "default" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        arenas = max(2, len(os.sched_getaffinity(0)))  # one per core: threads beyond that share
        return all(libc.mallopt(p, v) == 1 for p, v in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_MMAP_MAX, MMAP_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD), (M_ARENA_MAX, arenas)))
    except (OSError, AttributeError):
        return False


# --- the memory budget of stage two ----------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """`3G`, `500M`, `2.5g`, `1048576` -> bytes (binary units: 1G = 2**30)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise UserError(f"--memory {text!r}: give a size like 3G, 500M or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_left() -> int | None:
    """What this process's cgroup still allows (limit minus usage), if it has a limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            lim = Path(limit).read_text().strip()
            if lim == "max" or int(lim) >= 1 << 60:  # no limit
                return None
            return max(0, int(lim) - int(Path(usage).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def available() -> int:
    """Bytes this process can still get: MemAvailable, or the cgroup's headroom when smaller."""
    found = [x for x in (_meminfo_available(), _cgroup_left()) if x is not None]
    if not found:  # not Linux: the physical memory, as a last resort
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(found)


def budget(memory: str | int | None = None, jobs: int = 1) -> int:
    """Bytes of cache one training process may hold in RAM: `--memory` if given (a size, per
    process), else half of `available()` divided by `jobs`."""
    if memory is not None:
        return memory if isinstance(memory, int) else parse_size(memory)
    return available() // 2 // max(1, jobs)


def peak_rss() -> dict[str, int]:
    """Peak resident memory in bytes of this process and of its largest finished child (a --jobs
    worker), from getrusage (Linux reports kilobytes)."""
    import resource  # Unix only

    scale = 1 if sys.platform == "darwin" else 1024
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale}
