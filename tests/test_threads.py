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
