"""How many threads a command computes with, so that sharing the machine costs a fair share.

Why: torch's OpenMP workers spin while they wait for work. Alone that saves a few
microseconds per parallel region; next to another busy process the spinning threads
steal the very cores they wait for, and an epoch takes 4-13x its time alone where a
fair share is 2x (issue 19, `bench/contention.py`). So, before torch is imported:

- `OMP_WAIT_POLICY=PASSIVE`: idle workers sleep instead of spinning (a value the user
  set is kept);
- `use(n, jobs)`: each process computes with `n` threads, by default the cores this
  process may run on (`os.sched_getaffinity`) divided by the number of jobs sharing them
  (or the user's OMP_NUM_THREADS);
- `pin(k)`: worker k of a `--jobs` pool is bound to its share of those cores.

`SPP_THREADS=legacy` in the environment leaves torch's own defaults alone (for
benchmarks that measure the old behaviour).
"""

from __future__ import annotations

import os

LEGACY_ENV = "SPP_THREADS"


def legacy() -> bool:
    return os.environ.get(LEGACY_ENV, "").lower() == "legacy"


def policy() -> None:
    """Set the OpenMP wait policy; call before torch is imported (libgomp reads it once, at load)."""
    if not legacy():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cores() -> list[int]:
    """The CPUs this process may run on (a cgroup or taskset may give fewer than the machine has)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def default_threads(jobs: int = 1) -> int:
    """A user's OMP_NUM_THREADS, else this process's share of the cores."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, len(cores()) // max(1, jobs))


def use(threads: int | None = None, jobs: int = 1) -> int:
    """Give torch `threads` threads (None: this process's share of the cores); returns the number."""
    import torch

    n = threads or default_threads(jobs)
    if not legacy() or threads:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def pin(worker: int, jobs: int) -> None:
    """Bind worker `worker` of `jobs` to its own slice of the cores, when they divide evenly:
    two jobs on two cores then never trade places or land on one core together."""
    mine = cores()
    if legacy() or jobs <= 1 or len(mine) < jobs:
        return
    per = len(mine) // jobs
    os.sched_setaffinity(0, mine[worker % jobs * per:(worker % jobs + 1) * per])
