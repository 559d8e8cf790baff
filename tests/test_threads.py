"""core/threads.py: the thread policy every command applies before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from core import threads


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", threads.LEGACY_ENV)}
    return {**env, **extra}


def _run(code: str, **extra) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(**extra), capture_output=True,
                          text=True, check=True).stdout.strip()


SPIN = "import os, sys, pipeline; print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))"


def test_the_cli_sets_the_spin_count_before_torch_loads():
    assert _run(SPIN) == f"False {threads.SPIN}"


def test_a_users_wait_settings_and_the_legacy_switch_are_respected():
    assert _run(SPIN, GOMP_SPINCOUNT="5") == "False 5"
    assert _run(SPIN, OMP_WAIT_POLICY="PASSIVE") == "False None"  # the user's policy decides alone
    assert _run(SPIN, SPP_THREADS="legacy") == "False None"


def test_work_is_split_across_processes_unless_legacy(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: [0, 1])
    assert threads.default_jobs() == 2
    monkeypatch.setenv(threads.LEGACY_ENV, "legacy")
    assert threads.default_jobs() == 1


def test_threads_default_to_the_cores_shared_by_the_jobs(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: [0, 1, 2, 3])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.default_threads() == 4
    assert threads.default_threads(jobs=2) == 2
    assert threads.default_threads(jobs=8) == 1  # never zero
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads(jobs=2) == 3  # the user's own setting wins


def test_use_sets_torch_threads_and_an_explicit_number_wins():
    import torch

    before = torch.get_num_threads()
    try:
        assert threads.use(1) == 1
        assert threads.use(None, jobs=1) == threads.default_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(len(threads.cores()) < 2, reason="pinning needs two cores")
def test_workers_are_pinned_to_their_own_share_of_the_cores():
    code = ("import os; from core import threads; threads.pin({k}, 2); print(sorted(os.sched_getaffinity(0)))")
    cores = threads.cores()
    first = _run(code.format(k=0))
    second = _run(code.format(k=1))
    assert first != second
    assert len(eval(first)) == len(eval(second)) == len(cores) // 2


def _touch(path):
    path.touch()


def test_a_pool_ends_its_workers_when_the_main_process_stops(tmp_path):
    """Ctrl-C in the main process: the running job is ended and a job already handed out never
    starts (a plain pool would run both to the end: a whole seed after Ctrl-C)."""
    import time

    marker = tmp_path / "second-job-ran"
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        with threads.worker_pool(1, 1) as pool:
            pool.submit(time.sleep, 60)
            pool.submit(_touch, marker)
            time.sleep(1)
            raise KeyboardInterrupt
    assert time.time() - t0 < 30
    time.sleep(0.5)
    assert not marker.exists()


# --- how a process ends ---------------------------------------------------------------------

def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie no init has reaped yet counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pids, within: float = 10.0) -> bool:
    import time

    end = time.time() + within
    while any(_alive(p) for p in pids) and time.time() < end:
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


# a parent that starts a child, says both pids, and waits to be killed
_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=subprocess.PIPE, text=True)
print(child.stdout.readline().strip(), flush=True)
time.sleep(600)
"""
_CHILD = """
import os, time
from core import threads
{before}
how = threads.die_with_parent(os.getppid(), every=0.1)
print(os.getpid(), how, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how, before", [("prctl", ""), ("thread", "threads._pdeathsig = lambda: False")])
def test_a_process_dies_with_its_parent(how, before):
    """kill -9 of the parent: the kernel (prctl) or the watching thread (elsewhere) ends the child."""
    import signal

    code = _PARENT.format(child=_CHILD.format(before=before))
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        pid, said = parent.stdout.readline().split()
        assert said == how
        assert _alive(int(pid))
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert _gone([int(pid)]), f"child {pid} outlived its parent"
    finally:
        parent.kill()
        parent.wait()


def test_a_worker_started_after_its_main_process_died_ends_at_once():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    code = (f"import os, time; from core import threads; threads.die_with_parent({gone.pid}); time.sleep(5); "
            "print('survived')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert r.returncode == 1 and "survived" not in r.stdout


def test_sigterm_is_ctrl_c_inside_and_the_old_handler_is_back_after():
    import os
    import signal

    from core.errors import Terminated

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as cut:
        with threads.sigterm_as_ctrl_c() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs between two bytecodes of the main thread
                pass
    assert isinstance(cut.value, Terminated) and stop["signal"] == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


_POOL = """
import multiprocessing, os, sys, time
from core import threads
if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1])
    pool = threads.worker_pool(2, 1)
    futures = [pool.submit(time.sleep, 600) for _ in range(2)]
    while len(pool._processes) < 2 or not all(f.running() for f in futures):
        time.sleep(0.05)
    print(*pool._processes, flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("start", ["fork", "spawn", "forkserver"])
def test_pool_workers_end_when_the_main_process_is_killed(start, tmp_path):
    """`train --jobs`, `ablate`, `sweep`: kill -9 of the main process ends its workers too, however
    multiprocessing starts them (a forkserver's workers die with the server, which dies with us)."""
    import signal

    script = tmp_path / "pool.py"  # spawn and forkserver import the main module again: a file, not -c
    script.write_text(_POOL)
    main = subprocess.Popen([sys.executable, str(script), start], cwd=REPO, env=_env(PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        workers = [int(p) for p in main.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        main.send_signal(signal.SIGKILL)
        main.wait(timeout=30)
        assert _gone(workers), "workers outlived the main process"
    finally:
        main.kill()
        main.wait()
        for pid in [p for p in workers if _alive(p)]:  # a failed test leaves no sleeper behind
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("before", ["", "del os.pidfd_open"], ids=["pidfd", "polling"])
def test_a_process_dies_with_a_main_process_that_is_not_its_parent(before):
    """A forkserver's worker: its parent (the server) outlives the main process, so it watches that."""
    import signal

    main = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    code = (f"import os, sys, time\nfrom core import threads\n{before}\n"
            f"print(threads.die_with_parent({main.pid}, every=0.1), flush=True)\ntime.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "watch"
        assert child.poll() is None
        main.send_signal(signal.SIGKILL)
        main.wait(timeout=30)
        assert child.wait(timeout=15) == 1
    finally:
        for p in (main, child):
            p.kill()
            p.wait()
