"""train/progress.py: the ETA of a run or grid counts epochs left at the recent speed, and a
seed that --patience stops early takes its remaining epochs out of the total."""

from __future__ import annotations

import time

import pytest
from rich.progress import MofNCompleteColumn, Progress, TextColumn

from train.progress import RECENT, EpochClock, EtaColumn, eta_seconds

from conftest import quiet_console


def test_eta_is_epochs_left_times_the_recent_seconds_per_epoch():
    assert eta_seconds(10, [2.0, 4.0]) == pytest.approx(30.0)
    assert eta_seconds(10, []) is None  # nothing timed yet: no guess
    assert eta_seconds(0, []) == 0.0


def test_a_patience_stopped_seed_shrinks_the_total_and_the_eta():
    clock = EpochClock(total=2 * 10, now=0.0)  # 2 seeds x 10 epochs
    for epoch in range(1, 5):
        clock.update(epoch, 0, now=2.0 * epoch)  # 2 s an epoch
    assert (clock.done, clock.total, clock.eta()) == (4, 20, pytest.approx(32.0))
    clock.update(4, 6, now=8.5)  # --patience stopped seed 1 after its epoch 4: 6 epochs never come
    assert (clock.done, clock.total, clock.eta()) == (4, 14, pytest.approx(20.0))


def test_the_speed_is_the_recent_epochs_and_counts_several_epochs_at_once():
    clock = EpochClock(total=1000, done=100, now=0.0)  # 100 found done: not timed
    assert clock.eta() is None
    clock.update(110, 0, now=100.0)  # a poll sees 10 new epochs after 100 s: 10 s each
    assert clock.eta() == pytest.approx(890 * 10.0)
    clock.update(110 + RECENT, 0, now=100.0 + RECENT)  # then 1 s each, for a whole window
    assert clock.eta() == pytest.approx((890 - RECENT) * 1.0)


def test_the_bar_shows_epochs_and_a_countdown_only_on_the_task_with_a_clock():
    console = quiet_console()
    clock = EpochClock(total=14, now=time.monotonic() - 8.0)
    with Progress(TextColumn("{task.description}"), MofNCompleteColumn(), EtaColumn(), console=console) as progress:
        progress.add_task("waiting", **EpochClock(total=3).fields())
        run = progress.add_task("run", **clock.fields())
        progress.add_task("seed 1", total=10)
        clock.update(4, 0)  # 2 s an epoch, 10 to go
        progress.update(run, **clock.fields())
    lines = console.file.getvalue().splitlines()
    assert "ETA -:--:--" in lines[0]
    assert "4/14" in lines[1] and ("ETA 0:00:20" in lines[1] or "ETA 0:00:19" in lines[1])
    assert "ETA" not in lines[2]
