"""What a person sees while a long command runs: lines that fit the terminal, redrawn in place,
and one plain line per event when the output is not a terminal (a log file, CI, nohup).

Shared by `extract`, `train` and the grids (`ablate`, `sweep`); imports no stage. A line is a
label, a bar, the figures that must stay (count, elapsed, ETA) and optional figures in order of
importance: as the terminal narrows, the optional ones go first (least important first), then
the label is shortened, the bar never goes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.text import Text

MIN_BAR, MAX_BAR = 10, 40  # bar width in columns


def hms(seconds: float | None) -> str:
    """h:mm:ss, or -:--:-- when there is no figure yet."""
    if seconds is None:
        return "-:--:--"
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def bar(fraction: float, width: int) -> Text:
    """A bar `width` columns wide: the done part heavy, the rest light (readable without colour)."""
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    text = Text("━" * filled, style="bar.finished" if fraction >= 1 else "bar.complete")
    text.append("─" * (width - filled), style="bar.back")
    return text


def fit_line(label: str, fraction: float | None, must: Sequence[str], optional: Sequence[str] = (),
             width: int = 80, bar_width: int | None = None, label_width: int = 0) -> Text:
    """`label bar must... optional...` in at most `width` columns. `optional` is in display order and
    in order of importance (the last is dropped first); the label is cut (…) only when the bar and
    `must` alone do not fit; the bar shrinks to MIN_BAR, and below that only on a very narrow terminal.
    `bar_width`: the bar's width at most (the lines of one board share it); `label_width`: pad the
    label to it (the bars of one board line up). `fraction` None: no bar (a line of figures only)."""
    must_text = "  ".join(m for m in must if m)
    has_bar = fraction is not None
    widest = MAX_BAR if bar_width is None else bar_width
    min_bar = (MIN_BAR if bar_width is None else bar_width) if has_bar else 0  # a board's bars keep one width

    def length(label_len: int, bar_len: int, extra: list[str]) -> int:
        parts = [label_len, bar_len, len(must_text)] + [len(e) for e in extra]
        shown = [p for p in parts if p]
        return sum(shown) + 2 * max(0, len(shown) - 1)  # two spaces between parts

    if label and length(max(len(label), label_width), min_bar, []) <= width:
        label = label.ljust(label_width)
    kept: list[str] = []
    for item in optional:  # most important first
        if item and length(len(label), min_bar, kept + [item]) <= width:
            kept.append(item)
        else:
            break  # a less important field never shows when a more important one does not
    if length(len(label), min_bar, kept) > width:  # the label gives way before the bar
        min_bar = min(min_bar, MIN_BAR)
        room = max(0, width - length(0, min_bar, []) - 2)
        label = label if len(label) <= room else (label[: room - 1] + "…" if room > 1 else "")
    pieces: list[Text | str] = [label, must_text, *kept]
    if has_bar:
        pieces.insert(1, bar(fraction, max(3, min(widest, width - length(len(label), 0, kept) - 2))))
    line = Text(no_wrap=True, overflow="crop")
    for k, piece in enumerate(p for p in pieces if p):
        if k:
            line.append("  ")
        line.append(piece)
    line.truncate(width)
    line.rstrip()
    return line


def room_for_bar(label_width: int, must: Sequence[str], width: int) -> int:
    """The bar's width on a line of this label and figures: what is left, MIN_BAR..MAX_BAR."""
    used = label_width + len("  ".join(m for m in must if m)) + 4
    return max(MIN_BAR, min(MAX_BAR, width - used))


class _Lines:
    """A rich renderable that asks for its lines at the width it is drawn in."""

    def __init__(self, render: Callable[[int], list[Text]]):
        self.render = render

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Group(*self.render(options.max_width))


class Screen:
    """`with Screen(console, render) as screen:` redraws `render(width) -> lines` in place a few
    times a second on a terminal; elsewhere nothing is redrawn and `screen.log(line)` prints one
    plain line per event (a finished epoch, cell or shard), so a log file shows progress as it
    happens. `log` on a terminal prints nothing: the lines already show it."""

    def __init__(self, console: Console, render: Callable[[int], list[Text]]):
        self.console, self.render = console, render
        self.live: Live | None = None
        self.lock = threading.RLock()  # a grid's poll thread and the main thread both report

    def __enter__(self) -> Screen:
        if self.console.is_terminal:
            self.live = Live(_Lines(self._locked_render), console=self.console, refresh_per_second=4,
                             transient=False)
            self.live.start()
        return self

    def _locked_render(self, width: int) -> list[Text]:
        with self.lock:
            return self.render(width)

    def refresh(self) -> None:
        if self.live is not None:
            self.live.refresh()

    def log(self, line: str) -> None:
        if self.live is None:
            with self.lock:
                self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()  # leaves the last drawing on screen
            self.live = None


class Pass:
    """One pass of `extract` over items (the texts, a dropout view, the images), cut in shards."""

    def __init__(self, label: str, total: int, unit: str, shards: int, cached: int = 0):
        self.label, self.total, self.unit, self.shards, self.cached = label, total, unit, shards, cached
        self.done = self.shards_done = 0
        self.started: float | None = None
        self.finished: float | None = None

    def figures(self, now: float) -> tuple[list[str], list[str]]:
        """(count, elapsed, ETA), then the rate and the shards: what the line must and may show."""
        spent = 0.0 if self.started is None else (self.finished or now) - self.started
        rate = self.done / spent if spent > 0 and self.done else None
        eta = 0.0 if self.done >= self.total else (None if rate is None else (self.total - self.done) / rate)
        must = [f"{self.done}/{self.total} {self.unit}", hms(spent), f"ETA {hms(eta)}"]
        may = [f"{rate:.1f} {self.unit}/s" if rate is not None else "", f"shard {self.shards_done}/{self.shards}"]
        return must, [m for m in may if m]


class Passes:
    """`extract`'s lines, one per pass: a bar of items, the count, elapsed and ETA, the rate; a pass
    whose shards are all on disk already is one line of words, not a bar. Off a terminal: a plain
    line per shard written."""

    def __init__(self, console: Console):
        self.passes: list[Pass] = []
        self.screen = Screen(console, self.render)

    def __enter__(self) -> Passes:
        self.screen.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.screen.__exit__(*exc)

    @property
    def console(self) -> Console:
        """For notes that show on a terminal too (a damaged shard): rich prints them above the bars."""
        return self.screen.console

    def add(self, label: str, total: int, unit: str, shards: int, cached: int = 0) -> Pass:
        p = Pass(label, total, unit, shards, cached)
        with self.screen.lock:
            self.passes.append(p)
            if not shards:
                self.screen.log(f"{label}: cached ({cached} shard(s) on disk)")
        self.screen.refresh()
        return p

    def advance(self, p: Pass, n: int) -> None:
        with self.screen.lock:
            p.started = p.started or time.monotonic()
            p.done += n
        self.screen.refresh()

    def shard_written(self, p: Pass) -> None:
        with self.screen.lock:
            p.shards_done += 1
            if p.done >= p.total:
                p.finished = time.monotonic()
            must, may = p.figures(time.monotonic())
            self.screen.log(f"{p.label}: shard {p.shards_done}/{p.shards} written  " + "  ".join(must + may[:1]))
        self.screen.refresh()

    def render(self, width: int) -> list[Text]:
        now = time.monotonic()
        label_width = min(24, max((len(p.label) for p in self.passes), default=0))
        lines = []
        for p in self.passes:
            if not p.shards:
                lines.append(fit_line(p.label, None, [f"cached ({p.cached} shard(s) on disk)"], (), width,
                                      label_width=label_width))
                continue
            must, may = p.figures(now)
            bar_width = room_for_bar(label_width, must, width)
            lines.append(fit_line(p.label, p.done / p.total if p.total else 1.0, must, may, width, bar_width, label_width))
        return lines
