"""How many threads and processes a command computes with, so sharing the machine costs a fair share.

Why: torch's OpenMP workers spin while they wait for work. Alone that saves microseconds
per parallel region; next to another busy process the spinning threads steal the very
cores they wait for, and an epoch took 7.5x its time alone where a fair share is 2x
(`bench/contention.py`). Sleeping instead (OMP_WAIT_POLICY=PASSIVE) cured the sharing
but doubled the epoch alone: a small head runs thousands of tiny parallel regions, and
each one waits for a sleeping thread to wake up. So:

- work is split across processes, not threads: `--jobs` defaults to one process per core,
  each with one thread (`default_jobs`), wherever there is more than one seed or cell to
  train; a one-thread process has no OpenMP workers to spin or sleep;
- a process that does get several threads spins only briefly before it sleeps
  (GOMP_SPINCOUNT=1000, set before torch is imported; a user's OMP_WAIT_POLICY or
  GOMP_SPINCOUNT is kept);
- `pin(k)`: worker k of a `--jobs` pool is bound to its share of the cores.

`SPP_THREADS=legacy` in the environment leaves torch's own defaults alone (one process,
torch's threads, libgomp's spinning), for benchmarks that measure the old behaviour.

How a process ends (docs/architecture.md rule 9: a process that dies leaves no worker behind):

- a pool worker dies with the main process, however that one ends (Ctrl-C, SIGTERM,
  `kill -9`, a crash), whatever multiprocessing's start method (`die_with_parent`);
- SIGTERM, what a cluster scheduler or `kill` sends, is Ctrl-C for a command
  (`sigterm_as_ctrl_c`): the same one line on what was kept, then exit code 143
  (128 + SIGTERM, where Ctrl-C exits 130). Workers ignore Ctrl-C and die at once on
  SIGTERM: the main process alone decides what was kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

from core import memory
from core.errors import Terminated

LEGACY_ENV = "SPP_THREADS"


def legacy() -> bool:
    return os.environ.get(LEGACY_ENV, "").lower() == "legacy"


SPIN = "1000"  # GOMP_SPINCOUNT: libgomp's default is 300,000 spins before a waiting thread sleeps


def policy() -> None:
    """Set how OpenMP workers wait, and that glibc keeps freed memory (`core/memory.py`); call before
    torch is imported (libgomp reads its settings once, at load; large buffers mapped before
    `keep_freed` keep glibc's old rules)."""
    memory.keep_freed()
    if not legacy() and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN)


def cores() -> list[int]:
    """The CPUs this process may run on (a cgroup or taskset may give fewer than the machine has)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def default_threads(jobs: int = 1) -> int:
    """A user's OMP_NUM_THREADS, else this process's share of the cores."""
    mine = os.environ.get("OMP_NUM_THREADS", "")
    if mine.isdigit() and int(mine) > 0:
        return int(mine)
    return max(1, len(cores()) // max(1, jobs))


def default_jobs() -> int:
    """Processes that train at once by default: one per core, each with one thread.

    Measured (`bench/contention.py`, bench/results/contention.md): N one-thread jobs finish
    a grid's cells sooner than one job with N threads, since a small head's ops scale poorly
    over threads while separate processes never wait for each other."""
    return 1 if legacy() else len(cores())


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


def _init_worker(main: int, threads: int | None, jobs: int, slot, init, initargs) -> None:
    """A pool worker computes on its own share of the cores: pinned there, with that many threads.
    It ignores Ctrl-C and dies on SIGTERM (the handler the main process installed is not its own):
    the main process decides, and ends the workers (`_Pool`); it dies with the main process."""
    die_with_parent(main)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with slot.get_lock():
        k, slot.value = slot.value, slot.value + 1
    n = threads or default_threads(jobs)  # the share, counted before pinning narrows the view
    pin(k, jobs)
    use(n)
    if init is not None:
        init(*initargs)


class _Pool(ProcessPoolExecutor):
    """A process pool that stops when the main process stops: Ctrl-C (or an error) there ends the
    workers at once, where a plain pool would let them finish every job already handed out (a
    whole seed of 150 epochs). Work is saved after every epoch, so nothing finished is lost."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._mine: list = []

    def submit(self, *args, **kwargs):
        future = super().submit(*args, **kwargs)
        self._mine.append(future)
        return future

    def _end_workers(self) -> None:
        if any(not f.done() for f in self._mine):
            for p in list((self._processes or {}).values()):
                p.terminate()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            self._end_workers()
        super().shutdown(wait=wait, cancel_futures=cancel_futures)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._end_workers()
        return super().__exit__(exc_type, exc, tb)


def worker_pool(jobs: int, threads: int | None = None, init=None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """`jobs` worker processes, each pinned to its share of the cores with `threads` threads
    (default: that share); `init(*initargs)` then runs in each (e.g. to keep a queue)."""
    ctx = multiprocessing.get_context()
    slot = ctx.Value("i", 0)  # which share of the cores the next worker takes
    return _Pool(jobs, mp_context=ctx, initializer=_init_worker,
                 initargs=(os.getpid(), threads, jobs, slot, init, initargs))


# --- how a process ends ---------------------------------------------------------------------

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(main: int, every: float = 1.0) -> str:
    """End this process as soon as the process `main` (its parent or not) ends, however that ends.

    A child of `main` ('fork' and 'spawn' workers): on Linux the kernel ends it
    (`prctl(PR_SET_PDEATHSIG, SIGKILL)`), elsewhere a daemon thread that checks every `every`
    seconds whether its parent changed (`os.getppid()`). PDEATHSIG fires when the *thread* that
    forked the child ends: a `ProcessPoolExecutor` starts its workers in the thread that calls
    `submit` (all at the first submit with 'fork', one per submit with 'spawn'; only
    `max_tasks_per_child`, unused here, makes its manager thread start more), and every caller of
    `worker_pool` submits from the main thread, which lives as long as the process.

    A 'forkserver' worker is the server's child, and the server lives on while any worker holds
    its pipe: a thread waits for `main` itself to end (a pidfd on Linux, else polling).

    If `main` is gone already (it died before this ran) the process ends now.
    Returns how: "prctl", "thread" or "watch"."""
    parent = os.getppid()
    if main == parent:
        how = "prctl" if _pdeathsig() else "thread"
        if how == "thread":
            threading.Thread(target=_watch_parent, args=(parent, every), daemon=True, name="die-with-parent").start()
        if os.getppid() != parent:  # it died before prctl took effect
            os._exit(1)
    else:
        how = "watch"
        _pdeathsig()  # the server ending ends us too
        threading.Thread(target=_watch_pid, args=(main, every), daemon=True, name="die-with-main").start()
    return how


def _pdeathsig() -> bool:
    """Ask the Linux kernel to SIGKILL this process when its parent ends; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, every: float) -> None:
    """The portable way: the parent is gone once this process has another one (init, a subreaper)."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)  # at once, from this thread: no cleanup waits on a pipe nobody reads


def _watch_pid(pid: int, every: float) -> None:
    """Wait for process `pid` (not our parent) to end, then end this process."""
    try:
        fd = os.pidfd_open(pid)  # Linux 5.3+: readable once the process has exited, whatever reuses its pid
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    else:  # PermissionError: a pid reused by another user's process, so ours is gone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            while True:
                os.kill(pid, 0)
                time.sleep(every)
    os._exit(1)


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """While inside, SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread, so a
    command ends as on Ctrl-C: work saved, one line on what was kept. A second SIGTERM during that
    is ignored (the scheduler's SIGKILL follows anyway). Yields a dict whose "signal" is set once
    one came; the previous handler is back afterwards. Outside the main thread it does nothing."""
    got: dict = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def on_sigterm(signum, frame):
        if got["signal"] is None:
            got["signal"] = signum
            raise Terminated(f"signal {signum}")

    before = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, before)
