"""What `train` and the grids (`ablate`, `sweep`) show while they run: epochs done, an ETA that
knows the parallel lanes, and a line per seed (or cell), fitted to the terminal (core/terminal.py).

The unit of work is the epoch, which every run shares. Work comes in items (the seeds of a run,
the cells of a grid), each `planned` epochs until `--patience` stops it early; its remaining
epochs then leave the total, so the ETA falls rather than promising epochs that never come.

The ETA plays out the schedule: each busy lane (a worker process: `--jobs`) finishes its item at
that item's own recent speed (the wall time between its recent epochs, so the per-seed test
scoring and a loaded machine are in it), then takes the next waiting item at the same speed. A
lane with nothing left to take idles, and the ETA says so: when the last seed runs alone, the
time left is that seed's epochs at that lane's speed, not the run's work shared by every lane.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Hashable, Sequence

from rich.text import Text

from core.terminal import fit_line, hms, room_for_bar

RECENT = 20  # epochs a lane's speed is averaged over
LABEL = 24  # columns a board's labels are padded to, at most


class EpochClock:
    """Epochs done and left of work items (seeds, cells) trained on `lanes` lanes at once.

    `plan`: item -> epochs planned, in the order the items are taken; `done`: epochs of an item
    found done already (a resumed seed: counted, not timed); `earlier`: epochs of items finished
    before this process started (counted in the bar, no part of the ETA)."""

    def __init__(self, plan: dict[Hashable, int], lanes: int = 1, done: dict | None = None, earlier: int = 0,
                 now: float | None = None):
        self.planned = dict(plan)
        self.done = {k: (done or {}).get(k, 0) for k in plan}
        self.skipped = dict.fromkeys(plan, 0)
        self.finished: set = set()
        self.lanes, self.earlier = max(1, lanes), earlier
        self.recent = {k: deque(maxlen=RECENT) for k in plan}  # seconds per epoch, item by item
        self.last: dict = {}  # item -> wall time of its last epoch here; an item in it has started
        self.start = time.monotonic() if now is None else now
        self.lock = threading.RLock()

    # --- what happened ------------------------------------------------------------------------

    def begin(self, item, now: float | None = None) -> None:
        """`item` starts now on a lane (when known: its first epoch is then timed from here)."""
        with self.lock:
            self.last.setdefault(item, time.monotonic() if now is None else now)

    def update(self, item, done: int, skipped: int | None = None, now: float | None = None,
               seconds: float | None = None) -> None:
        """`item` has `done` epochs (a count, not an increment: a poll of run folders can report it
        as well as a callback) and `skipped` planned ones that will never come. New epochs share the
        wall time since the item's last epoch; an item's first epoch here takes `seconds` if given
        (its own timing), else it is not timed."""
        now = time.monotonic() if now is None else now
        with self.lock:
            new = done - self.done[item]
            if new > 0:
                if item in self.last:
                    self.recent[item].extend([(now - self.last[item]) / new] * new)
                elif seconds is not None and new == 1:
                    self.recent[item].append(seconds)
                self.last[item] = now
                self.done[item] = done
            if skipped is not None:
                self.skipped[item] = skipped

    def finish(self, item) -> None:
        """`item` is over: epochs it did not train (stopped by --patience) leave the total."""
        with self.lock:
            self.skipped[item] = self.planned[item] - self.done[item]
            self.finished.add(item)

    # --- what it means ------------------------------------------------------------------------

    def left(self, item) -> int:
        return 0 if item in self.finished else max(0, self.planned[item] - self.skipped[item] - self.done[item])

    @property
    def total(self) -> int:
        return self.earlier + sum(self.planned[k] - self.skipped[k] for k in self.planned)

    @property
    def count(self) -> int:
        return self.earlier + sum(self.done.values())

    def speed(self, item) -> float | None:
        """Seconds per epoch of `item`'s recent epochs; None before one was timed."""
        r = self.recent[item]
        return sum(r) / len(r) if r else None

    def busy(self) -> list:
        """Items running now: started here and not over."""
        return [k for k in self.planned if k in self.last and k not in self.finished and self.left(k) > 0]

    def waiting(self) -> list:
        return [k for k in self.planned if k not in self.last and self.left(k) > 0]

    def idle(self) -> int:
        """Lanes with nothing left to take (0 while items wait or once all is done)."""
        with self.lock:
            if self.waiting() or not self.busy():
                return 0
            return max(0, self.lanes - len(self.busy()))

    def eta(self, now: float | None = None) -> float | None:
        """Seconds until the last busy lane is done: each busy lane finishes its item at that item's
        speed, then the waiting items go to whichever lane frees first, at that lane's speed (a lane
        that has not timed an epoch yet: the mean of the others). None before any epoch was timed."""
        now = time.monotonic() if now is None else now
        with self.lock:
            busy, waiting = self.busy(), self.waiting()
            if not busy and not waiting:
                return 0.0
            speeds = [s for s in (self.speed(k) for k in self.planned) if s is not None]
            if not speeds:
                return None
            fallback = sum(speeds) / len(speeds)
            lanes = []  # [time it frees, seconds per epoch]
            for k in busy:
                s = self.speed(k) or fallback
                lanes.append([max(0.0, self.left(k) * s - (now - self.last[k])), s])
            lanes += [[0.0, fallback] for _ in range(self.lanes - len(busy))]
            for k in waiting:
                lane = min(lanes, key=lambda lane: lane[0])
                lane[0] += self.left(k) * lane[1]
            return max(lane[0] for lane in lanes)

    def figures(self, now: float | None = None) -> list[str]:
        """What the overall line must show: epochs done of the total, time elapsed, the ETA (and idle lanes)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            idle = self.idle()
            eta = f"ETA {hms(self.eta(now))}"
            if idle:
                eta += f" ({idle} of {self.lanes} lanes idle)"
            return [f"{self.count}/{self.total} epochs", hms(now - self.start), eta]


class ItemRow:
    """One seed's or cell's line: its bar and its figures, the most important first."""

    def __init__(self, label: str, planned: int, done: int = 0, status: str = ""):
        self.label, self.planned, self.done, self.status = label, planned, done, status
        self.fields: list[str] = []  # optional figures, most important first

    def line(self, width: int, bar_width: int | None = None, label_width: int = 0) -> Text:
        return fit_line(self.label, self.done / self.planned if self.planned else 1.0,
                        [f"{self.done}/{self.planned}"], ([self.status] if self.status else []) + self.fields, width,
                        bar_width, label_width)


class Board:
    """The overall line (`title`, bar, count, elapsed, ETA: always on screen) above one line per item."""

    def __init__(self, title: str, clock: EpochClock, rows: dict[Hashable, ItemRow], note: str = ""):
        self.title, self.clock, self.rows, self.note = title, clock, rows, note

    def overall(self, width: int = 10_000) -> Text:
        return self.render(width)[0]

    def render(self, width: int) -> list[Text]:
        """The lines at `width`: labels padded alike (at most LABEL columns) and one bar width for all,
        the one the overall line leaves room for."""
        label_width = min(LABEL, max(len(r.label) for r in [*self.rows.values(), ItemRow(self.title, 0)]))
        figures = self.clock.figures()
        bar_width = room_for_bar(label_width, figures, width)
        for row in self.rows.values():  # short enough that each line shows its first figure too
            first = ([row.status] if row.status else row.fields)[:1]
            bar_width = min(bar_width, room_for_bar(label_width, [f"{row.done}/{row.planned}", *first], width))
        frac = self.clock.count / self.clock.total if self.clock.total else 1.0
        top = fit_line(self.title, frac, figures, [self.note] if self.note else [], width, bar_width, label_width)
        return [top, *(row.line(width, bar_width, label_width) for row in self.rows.values())]


# --- train ------------------------------------------------------------------------------------

SHORT = {"accuracy": "acc", "weighted_f1": "wF1", "macro_f1": "mF1"}


def epoch_fields(entry, select: str, best: tuple[float, int], step_two: bool) -> list[str]:
    """A seed's figures after an epoch, most important first: dev and the best so far, the speed,
    the loss terms, and the share of batches that took step two (heads that have one)."""
    v, e = best
    out = [f"dev {SHORT.get(select, select)} {entry.dev[select]:.4f} (best {v:.4f} @ {e})",
           f"{entry.seconds:.1f} s/epoch",
           "  ".join(f"{k} {x:.3f}" for k, x in entry.losses.items())]
    if step_two:
        out.append(f"step two {entry.step_two_rate:.0%}")
    return out


def plain(*parts: str | Sequence[str]) -> str:
    """A log line from figures (a list joins with two spaces)."""
    return "  ".join(p if isinstance(p, str) else "  ".join(p) for p in parts if p)
