"""The ETA of a run or a grid, counted in epochs: the unit every run shares.

A seed is `epochs` epochs until `--patience` stops it early; then its remaining epochs leave
the total, so the ETA falls rather than promising epochs that never come. The time per epoch
is the wall time of the recent epochs, so parallel grid jobs (several epochs ending per
second) and the per-seed test scoring are in it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from rich.progress import ProgressColumn, Task
from rich.text import Text

RECENT = 20  # epochs the speed is averaged over


def eta_seconds(epochs_left: int, recent_seconds: Sequence[float]) -> float | None:
    """Epochs left times the mean seconds of the recent epochs; None before one was timed."""
    if epochs_left <= 0:
        return 0.0
    if not recent_seconds:
        return None
    return epochs_left * sum(recent_seconds) / len(recent_seconds)


class EpochClock:
    """Epochs done out of a total that `--patience` shrinks, timed on the wall clock."""

    def __init__(self, total: int, done: int = 0, skipped: int = 0, now: float | None = None):
        self.planned, self.done, self.skipped = total, done, skipped  # done/skipped: found already
        self.recent: deque[float] = deque(maxlen=RECENT)
        self.last = time.monotonic() if now is None else now

    @property
    def total(self) -> int:
        return self.planned - self.skipped

    def update(self, done: int, skipped: int, now: float | None = None) -> None:
        """The epochs trained and skipped so far (counts, not increments: a poll of run folders
        can report them as well as a callback); new epochs share the wall time since the last."""
        now = time.monotonic() if now is None else now
        if done > self.done:
            self.recent.extend([(now - self.last) / (done - self.done)] * (done - self.done))
            self.last = now
        self.done, self.skipped = done, skipped

    def eta(self) -> float | None:
        return eta_seconds(self.total - self.done, self.recent)

    def fields(self) -> dict:
        """`progress.update(task, **clock.fields())`: the bar's counts and the finish time EtaColumn shows."""
        eta = self.eta()
        return {"completed": self.done, "total": self.total,
                "finish": None if eta is None else time.monotonic() + eta}


class EtaColumn(ProgressColumn):
    """The time left until the task's `finish` field (set by EpochClock.fields), counting down;
    blank for a task without one (a seed's own bar under the run's)."""

    def render(self, task: Task) -> Text:
        if "finish" not in task.fields:
            return Text("")
        finish = task.fields["finish"]
        if finish is None:
            return Text("ETA -:--:--", style="progress.remaining")
        left = int(max(0.0, finish - time.monotonic()))
        return Text(f"ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}", style="progress.remaining")
