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

The time left is shown twice: "up to" counts every planned epoch, "expected" lets the seeds still
to finish stop where the finished ones did (with `--patience` most seeds stop long before their
planned epochs: of the 5 x 150 epochs the README's first command plans, most seeds train 25 to 40).

`Progress` builds all of it, once, for both `train` and the grids, and shows each seed's best
epoch by the trainer's own rule (`train.trainer.improves`), so the screen and the selection
cannot disagree.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.text import Text

from core.terminal import Screen, fit_line, hms, room_for_bar
from train.trainer import improves

RECENT = 20  # epochs a lane's speed is averaged over
LABEL = 24  # columns a board's labels are padded to, at most
SHORT = {"accuracy": "acc", "weighted_f1": "wF1", "macro_f1": "mF1"}  # dev metrics as a seed's line names them


class EpochClock:
    """Epochs done and left of work items (seeds, cells) trained on `lanes` lanes at once.

    `plan`: item -> epochs planned, in the order the items are taken; `done`: epochs of an item
    found done already (a resumed seed: counted, not timed); `stops`: (epochs trained, epochs
    planned) of seeds finished before this process started (what "expected" learns from). `earlier`,
    the epochs of those seeds, is counted in the bar and is no part of the ETA."""

    def __init__(self, plan: dict[Hashable, int], lanes: int = 1, done: dict | None = None,
                 now: float | None = None, stops: Sequence[tuple[int, int]] = ()):
        self.planned = dict(plan)
        self.done = {k: (done or {}).get(k, 0) for k in plan}
        self.skipped = dict.fromkeys(plan, 0)
        self.finished: set = set()
        self.stops = list(stops)
        self.ended: dict = {}  # item -> (epochs trained, epochs planned) of its seeds that are over
        self.lanes, self.earlier = max(1, lanes), 0
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
               seconds: float | None = None, ended: tuple[int, int] | None = None) -> None:
        """`item` has `done` epochs (a count, not an increment: a poll of run folders can report it
        as well as a callback) and `skipped` planned ones that will never come. New epochs share the
        wall time since the item's last epoch; an item's first epoch here takes `seconds` if given
        (its own timing), else it is not timed. `ended`: (epochs trained, epochs planned) of the
        item's seeds that are over (a grid's cell holds several seeds)."""
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
            if ended is not None:
                self.ended[item] = ended

    def finish(self, item) -> None:
        """`item` is over: epochs it did not train (stopped by --patience) leave the total."""
        with self.lock:
            self.skipped[item] = self.planned[item] - self.done[item]
            self.ended[item] = (self.done[item], self.planned[item])
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

    def share(self) -> float | None:
        """The share of their planned epochs that the seeds over so far trained (--patience stops
        most early); None before one is over."""
        ends = [*self.stops, *self.ended.values()]
        planned = sum(p for _, p in ends)
        return sum(r for r, _ in ends) / planned if planned else None

    def expected_left(self, item) -> int:
        """Epochs `item` is expected to train still: its seeds not over yet stop at the share of
        their planned epochs the seeds over so far trained (at most `left`; a seed already past it
        is expected to stop now, as the mean of the others says)."""
        share = self.share()
        if share is None:
            return self.left(item)
        ran, planned = self.ended.get(item, (0, 0))
        expected = round(share * (self.planned[item] - planned)) - (self.done[item] - ran)
        return max(0, min(self.left(item), expected))

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
            busy = self.busy()
            return 0 if self.waiting() or not busy else max(0, self.lanes - len(busy))

    def eta(self, now: float | None = None, expected: bool = False) -> float | None:
        """Seconds until the last busy lane is done: each busy lane finishes its item at that item's
        speed, then the waiting items go to whichever lane frees first, at that lane's speed (a lane
        that has not timed an epoch yet: the mean of the others). None before any epoch was timed.
        `expected`: items train their `expected_left` epochs, not every planned one."""
        now = time.monotonic() if now is None else now
        left = self.expected_left if expected else self.left
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
                lanes.append([max(0.0, left(k) * s - (now - self.last[k])), s])
            lanes += [[0.0, fallback] for _ in range(self.lanes - len(busy))]
            for k in waiting:
                lane = min(lanes, key=lambda lane: lane[0])
                lane[0] += left(k) * lane[1]
            return max(lane[0] for lane in lanes)

    def figures(self, now: float | None = None) -> list[str]:
        """What the overall line must show: epochs done of the total, time elapsed and the time left,
        "up to" (every planned epoch) and, once a seed is over, "expected" (`expected_left`)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            left = f"ETA up to {hm(self.eta(now))}"
            if self.share() is not None:
                left += f", expected {hm(self.eta(now, expected=True))}"
            return [f"{self.count}/{self.total} epochs", hms(now - self.start), left]

    def notes(self) -> list[str]:
        """What the overall line shows when there is room: lanes with nothing left to take."""
        idle = self.idle()
        return [f"({idle} of {self.lanes} lanes idle)"] if idle else []


def hm(seconds: float | None) -> str:
    """Time left as h:mm, rounded up (a minute still to go is not 0:00); -:-- before there is a figure."""
    if seconds is None:
        return "-:--"
    m = math.ceil(max(0.0, seconds) / 60)
    return f"{m // 60}:{m % 60:02d}"


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

    def render(self, width: int) -> list[Text]:
        """The lines at `width`: labels padded alike (at most LABEL columns) and one bar width for all,
        the one the overall line leaves room for."""
        label_width = min(LABEL, max([len(self.title), *(len(r.label) for r in self.rows.values())]))
        figures = self.clock.figures()
        bar_width = room_for_bar(label_width, figures, width)
        for row in self.rows.values():  # short enough that each line shows its first figure too
            first = ([row.status] if row.status else row.fields)[:1]
            bar_width = min(bar_width, room_for_bar(label_width, [f"{row.done}/{row.planned}", *first], width))
        frac = self.clock.count / self.clock.total if self.clock.total else 1.0
        notes = self.clock.notes() + ([self.note] if self.note else [])
        top = fit_line(self.title, frac, figures, notes, width, bar_width, label_width)
        return [top, *(row.line(width, bar_width, label_width) for row in self.rows.values())]


# --- the one builder ----------------------------------------------------------------------------

class Progress:
    """What `train` (items: seeds) and the grids (items: cells) show: one clock, a row per item and the
    board, drawn on a Screen (`shown`), and one plain line per event off a terminal. Both commands
    build it here, so their lines, ETAs and best epochs cannot drift apart.

    `labels`: item -> label, every item shown, in order; `plan`: item -> epochs planned, the items to
    train here; `done`: epochs of those found done (resumed); `lanes`: items trained at once;
    `select`: the dev metric epochs are selected on; `step_two`: the head has a step two; `noun`:
    what a log line calls an item before its label ("cell ")."""

    def __init__(self, title: str, labels: dict[Hashable, str], plan: dict[Hashable, int], lanes: int = 1,
                 done: dict | None = None, select: str = "", step_two: bool = False, noun: str = ""):
        self.title, self.select, self.step_two, self.noun = title, select, step_two, noun
        self.clock = EpochClock(plan, lanes, done)
        self.rows = {k: ItemRow(label, plan.get(k, 0), self.clock.done.get(k, 0), "waiting")
                     for k, label in labels.items()}
        self.board = Board(title, self.clock, self.rows)
        self.best: dict = {}  # item -> (dev scores, epoch): its selected epoch so far, by the trainer's rule
        self.screen: Screen | None = None

    # --- what was found before this process started ---------------------------------------------

    def found_done(self, item, epochs: int, planned: int, dev: dict, epoch: int) -> None:
        """`item` finished earlier after `epochs` of its `planned` (a resumed run's seed, selected
        epoch `epoch` with `dev`): counted in the bar, and a stop "expected" learns from."""
        self.clock.earlier += epochs
        self.clock.stops.append((epochs, planned))
        self.best[item] = (dev, epoch)
        row = self.rows[item]
        row.planned = row.done = epochs
        row.status = f"done earlier, {self.best_text(item)}"

    def found_best(self, item, dev: dict, epoch: int) -> None:
        """The selected epoch so far of a seed cut off mid-way (its saved state): its later epochs
        are weighed against it, as the trainer does on resuming."""
        self.best[item] = (dev, epoch)

    def best_text(self, item) -> str:
        dev, epoch = self.best[item]
        return f"best {dev[self.select]:.4f} @ {epoch}"

    # --- events -------------------------------------------------------------------------------

    @contextmanager
    def shown(self, console: Console) -> Iterator[Progress]:
        """Draw the board for the block (redrawn in place on a terminal)."""
        with Screen(console, self.board.render) as screen:
            self.screen = screen
            try:
                yield self
            finally:
                self.screen = None

    def log(self, event: str, fields: Sequence[str] = ()) -> None:
        """One plain line (off a terminal): the event and its fields, then the overall figures."""
        self.screen.log("  ".join([event, *fields, f"| {self.title}", *self.clock.figures(), *self.clock.notes()]))

    def epoch(self, entry) -> None:
        """`train`'s on_epoch: a seed's epoch (an EpochLog) is done; the row shows, most important
        first, dev and the best epoch so far (`improves`: the trainer's rule), the speed, the loss
        terms and the share of batches that took step two (heads that have one)."""
        with self.screen.lock:
            seed, best = entry.seed, self.best.get(entry.seed)
            if improves(entry.dev, None if best is None else best[0], self.select):
                self.best[seed] = (entry.dev, entry.epoch)
            self.clock.update(seed, entry.epoch, seconds=entry.seconds)
            row = self.rows[seed]
            row.done, row.status = entry.epoch, ""
            row.fields = [f"dev {SHORT.get(self.select, self.select)} {entry.dev[self.select]:.4f} ({self.best_text(seed)})",
                          f"{entry.seconds:.1f} s/epoch", "  ".join(f"{k} {x:.3f}" for k, x in entry.losses.items())]
            if self.step_two:
                row.fields.append(f"step two {entry.step_two_rate:.0%}")
            self.log(f"{self.noun}{row.label} epoch {entry.epoch}/{self.clock.planned[seed]}", row.fields)
        self.screen.refresh()

    def seed_done(self, result) -> None:
        """`train`'s on_seed_end: a seed (a SeedResult) is over, perhaps stopped early by --patience."""
        self.best[result.seed] = (result.dev, result.best_epoch)
        self.finish(result.seed, f"done, {self.best_text(result.seed)}", f"({len(result.log)} epochs)",
                    epochs=len(result.log))

    def finish(self, item, status: str, event: str, epochs: int | None = None, note: bool = False) -> None:
        """`item` is over after `epochs` (default: those counted): its epochs not trained leave the
        total; the row says `status`, the log `noun label status event`; `note`: the overall line
        names it as the last done."""
        with self.screen.lock:
            self.clock.finish(item)
            row = self.rows[item]
            row.planned = row.done = self.clock.done[item] if epochs is None else epochs
            row.status, row.fields = status, []
            if note:
                self.board.note = f"last done: {row.label}"
            self.log(f"{self.noun}{row.label} {status} {event}")
        self.screen.refresh()

    def polled(self) -> None:
        """The rows of the items still running, from the clock (a grid counts its cells' epochs from
        their run folders): epochs planned less those skipped, done, and the recent speed."""
        with self.screen.lock:
            for k in self.clock.planned:
                if k in self.clock.finished:
                    continue
                row = self.rows[k]
                row.planned, row.done = self.clock.planned[k] - self.clock.skipped[k], self.clock.done[k]
                if row.status == "waiting" and k in self.clock.last:
                    row.status = "training"
                if speed := self.clock.speed(k):
                    row.fields = [f"{speed:.1f} s/epoch"]
        self.screen.refresh()
