"""train/progress.py and core/terminal.py: the ETA plays out the lanes' schedule on a scripted
clock, and every line fits the terminal with the bar, the count and the ETA on screen."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from rich.console import Console

from core.terminal import Screen, fit_line, hms
from train.progress import RECENT, Board, EpochClock, ItemRow

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR = re.compile("[━─]{3,}")  # done part, then the rest


def screen_lines(render, width: int) -> list[str]:
    console = Console(file=StringIO(), width=width, force_terminal=True, color_system="truecolor")
    console.print(_Render(render))
    return [ANSI.sub("", line) for line in console.file.getvalue().splitlines()]


class _Render:
    def __init__(self, render):
        self.render = render

    def __rich_console__(self, console, options):
        yield from self.render(options.max_width)


def test_one_lane_eta_is_epochs_left_at_the_recent_speed():
    clock = EpochClock({1: 10, 2: 10}, lanes=1, now=0.0)  # 2 seeds x 10 epochs, one after the other
    assert clock.eta(now=0.0) is None  # nothing timed yet: no guess
    clock.begin(1, now=0.0)
    for epoch in range(1, 5):
        clock.update(1, epoch, now=2.0 * epoch)  # 2 s an epoch
    assert (clock.count, clock.total) == (4, 20)
    assert clock.eta(now=8.0) == pytest.approx(16 * 2.0)
    assert clock.eta(now=9.0) == pytest.approx(16 * 2.0 - 1.0)  # counts down between epochs


def test_a_patience_stopped_seed_shrinks_the_total_and_the_eta():
    clock = EpochClock({1: 10, 2: 10}, now=0.0)
    clock.begin(1, now=0.0)
    for epoch in range(1, 5):
        clock.update(1, epoch, now=2.0 * epoch)
    clock.finish(1)  # --patience stopped seed 1 after its epoch 4: 6 epochs never come
    assert (clock.count, clock.total) == (4, 14)
    assert clock.eta(now=8.0) == pytest.approx(10 * 2.0)  # seed 2 at the lane's speed


def test_the_speed_is_each_lanes_recent_epochs():
    clock = EpochClock({"a": 1000}, done={"a": 100}, now=0.0)  # 100 found done: counted, not timed
    assert clock.count == 100 and clock.eta(now=0.0) is None
    clock.begin("a", now=0.0)
    clock.update("a", 110, now=100.0)  # a poll sees 10 new epochs after 100 s: 10 s each
    assert clock.eta(now=100.0) == pytest.approx(890 * 10.0)
    clock.update("a", 110 + RECENT, now=100.0 + RECENT)  # then 1 s each, for a whole window
    assert clock.eta(now=100.0 + RECENT) == pytest.approx((890 - RECENT) * 1.0)


def test_two_lanes_play_out_the_schedule_and_the_last_seed_runs_alone():
    """5 seeds x 150 epochs on 2 lanes: lane A at 1 s an epoch, lane B at 3 s (a loaded core). The
    last seed runs alone: the ETA is its epochs at its lane's speed, and says a lane idles."""
    clock = EpochClock(dict.fromkeys([1, 2, 3, 4, 5], 150), lanes=2, now=0.0)
    clock.begin(1, now=0.0)
    clock.begin(2, now=0.0)
    clock.update(1, 30, now=30.0)  # lane A: 1 s an epoch
    clock.update(2, 10, now=30.0)  # lane B: 3 s an epoch
    # A frees at 120 s, B at 420 s; seed 3 -> A (120 + 150 = 270), seed 4 -> A (420),
    # seed 5 -> B or A at 420: A is 1 s/epoch -> 570 s from now.
    assert clock.eta(now=30.0) == pytest.approx(570.0)
    assert clock.idle() == 0
    for seed in (1, 2, 3, 4):  # only seed 5 left, on lane B at 3 s an epoch
        clock.finish(seed)
    clock.begin(5, now=1000.0)
    clock.update(5, 10, now=1030.0)
    assert clock.eta(now=1030.0) == pytest.approx(140 * 3.0)  # not 140 * 3 / 2: the other lane idles
    assert clock.idle() == 1
    assert clock.figures(now=1030.0)[2].startswith("ETA up to 0:07") and clock.notes() == ["(1 of 2 lanes idle)"]
    clock.update(5, 150, now=1450.0)
    clock.finish(5)
    assert clock.eta(now=1450.0) == 0.0 and clock.idle() == 0


def test_time_left_is_up_to_every_planned_epoch_and_expected_where_finished_seeds_stopped():
    """The README's first command: 5 seeds x 150 epochs with --patience 10, one lane. Before a seed
    is over only "up to" shows; once seed 1 stops at epoch 30, the others are expected to as well."""
    clock = EpochClock(dict.fromkeys([1, 2, 3, 4, 5], 150), now=0.0)
    clock.begin(1, now=0.0)
    clock.update(1, 10, now=50.0)  # 5 s an epoch
    assert clock.figures(now=50.0)[2] == "ETA up to 1:02"  # 740 epochs (61.7 minutes), no seed over yet
    clock.update(1, 30, now=150.0)
    clock.finish(1)  # stopped early: 30 of 150 epochs
    clock.begin(2, now=150.0)
    clock.update(2, 10, now=200.0)
    assert clock.eta(now=200.0) == pytest.approx(5.0 * (140 + 3 * 150))  # up to: every planned epoch
    assert clock.eta(now=200.0, expected=True) == pytest.approx(5.0 * (20 + 3 * 30))
    assert clock.figures(now=200.0)[2] == "ETA up to 0:50, expected 0:10"
    clock.update(2, 60, now=450.0)  # past where seed 1 stopped: expected to stop now, not to run 90 more
    assert clock.expected_left(2) == 0 and clock.eta(now=450.0, expected=True) == pytest.approx(5.0 * 3 * 30)


def test_a_cell_expects_its_seeds_to_stop_where_its_finished_seeds_did():
    clock = EpochClock({"cell": 3 * 100}, now=0.0, stops=[(50, 100)])  # a seed over before: half its epochs
    assert clock.expected_left("cell") == 150
    clock.update("cell", 60, skipped=60, ended=(40, 100))  # in the cell, one seed over after 40 of 100
    # (50 + 40) / 200 of planned epochs: its two other seeds are expected to train 45 each, 20 done
    assert clock.expected_left("cell") == 45 + 45 - 20


def test_an_untimed_lane_takes_the_mean_speed_of_the_others():
    clock = EpochClock({"a": 10, "b": 10, "c": 10}, lanes=2, now=0.0)
    clock.begin("a", now=0.0)
    clock.update("a", 5, now=10.0)  # 2 s an epoch; b has not reported yet
    # a frees at 10 s; the idle lane takes b at 2 s/epoch (20 s), c goes to a at 10 -> 30 s
    assert clock.eta(now=10.0) == pytest.approx(30.0)


def _board(planned=750, done=120):
    clock = EpochClock(dict.fromkeys(range(1, 6), 150), lanes=2, done={1: 60, 2: 60}, now=0.0)
    clock.begin(1, now=0.0)
    clock.update(1, 61, now=2.0)
    rows = {s: ItemRow(f"seed {s}", 150, clock.done[s]) for s in range(1, 6)}
    rows[1].fields = ["dev wF1 0.6796 (best 0.6809 @ 14)", "2.0 s/epoch",
                      "ce 3.693  cli 4.120  clt 4.380  clm 1.234", "step two 34%"]
    rows[3].status = "waiting"
    return Board("all seeds", clock, rows)


@pytest.mark.parametrize("width", [80, 120, 200])
def test_every_line_fits_and_the_bar_count_and_eta_stay_on_screen(width):
    board = _board()
    lines = screen_lines(board.render, width)
    assert len(lines) == 6  # no line wrapped
    assert all(len(line) <= width for line in lines)
    top = lines[0]
    assert top.startswith("all seeds") and BAR.search(top) and "121/750 epochs" in top and "ETA " in top
    assert re.search(r"ETA up to \d:\d\d", top) and re.search(r"\d:\d\d:\d\d  ETA", top)  # elapsed, then ETA
    seed1 = lines[1]
    assert seed1.startswith("seed 1") and BAR.search(seed1) and "61/150" in seed1 and "dev wF1 0.6796" in seed1
    if width >= 120:
        assert "s/epoch" in seed1
    if width >= 200:
        assert "step two 34%" in seed1
    assert "waiting" in lines[3]


def test_a_very_narrow_terminal_shortens_the_label_never_the_figures():
    line = fit_line("a grid with a very long name indeed", 0.5, ["12/40 epochs", "0:01:02", "ETA 0:03:00"],
                    ["last: w/o CMF"], 60).plain
    assert len(line) <= 60 and BAR.search(line) and "12/40 epochs" in line and "ETA 0:03:00" in line
    assert "…" in line and "last" not in line


def test_hms():
    assert hms(None) == "-:--:--" and hms(3725.9) == "1:02:05" and hms(-1) == "0:00:00"


def test_off_a_terminal_the_screen_prints_one_plain_line_per_event():
    console = Console(file=StringIO(), width=80, force_terminal=False)
    with Screen(console, lambda width: [fit_line("x", 0.5, ["1/2"], [], width)]) as screen:
        screen.log("seed 1 epoch 1/2  dev wF1 0.5000")
        screen.refresh()
    assert console.file.getvalue() == "seed 1 epoch 1/2  dev wF1 0.5000\n"  # no bars, no escape codes


def test_the_screen_shows_the_best_epoch_by_the_trainers_rule(monkeypatch):
    """Equal dev scores: the first of them stays the best, on the screen as in the trainer."""
    from types import SimpleNamespace

    from train import progress as progress_module
    from train.progress import Progress

    calls = []
    rule = progress_module.improves
    monkeypatch.setattr(progress_module, "improves", lambda *a: calls.append(a) or rule(*a))
    progress = Progress("all seeds", {1: "seed 1"}, {1: 3}, select="weighted_f1")
    console = Console(file=StringIO(), width=120, force_terminal=False)
    with progress.shown(console):
        for epoch, score in [(1, 0.5), (2, 0.6), (3, 0.6)]:
            progress.epoch(SimpleNamespace(seed=1, epoch=epoch, seconds=1.0, losses={"ce": 1.0}, step_two_rate=0.0,
                                           dev={"weighted_f1": score}))
        progress.seed_done(SimpleNamespace(seed=1, dev={"weighted_f1": 0.6}, best_epoch=2, log=[0, 0, 0]))
    lines = console.file.getvalue().splitlines()
    assert len(calls) == 3 and "(best 0.6000 @ 2)" in lines[2]
    assert lines[3].startswith("seed 1 done, best 0.6000 @ 2 (3 epochs)  | all seeds  3/3 epochs")


def _grid_board():
    clock = EpochClock({"full": 750, "w/o CMF": 750, "text only": 750}, lanes=2, now=0.0)
    rows = {k: ItemRow(k, 750, 0, "waiting") for k in clock.planned}
    clock.begin("full", now=0.0)
    clock.update("full", 20, now=40.0)
    rows["full"].done, rows["full"].status, rows["full"].fields = 20, "training", ["2.0 s/epoch"]
    return Board("grid", clock, rows, note="last done: a cell with a long name")


def _extract_lines(width):
    from core.terminal import Passes

    console = Console(file=StringIO(), width=width, force_terminal=False)
    passes = Passes(console)
    text = passes.add("text  sentence-transformers/all-MiniLM-L6-v2", 4511, "texts", 9)
    passes.add("image efficientnet-lite0", 0, "images", 0, cached=9)
    passes.advance(text, 1000)
    passes.shard_written(text)
    return passes.render


@pytest.mark.parametrize("width", [80, 120, 200])
def test_grid_and_extract_lines_fit_with_bar_count_and_eta(width):
    lines = screen_lines(_grid_board().render, width)
    assert len(lines) == 4 and all(len(line) <= width for line in lines)
    assert lines[0].startswith("grid") and BAR.search(lines[0]) and "20/2250 epochs" in lines[0] and "ETA" in lines[0]
    assert "20/750" in lines[1] and "training" in lines[1]
    lines = screen_lines(_extract_lines(width), width)
    assert len(lines) == 2 and all(len(line) <= width for line in lines)
    assert BAR.search(lines[0]) and "1000/4511 texts" in lines[0] and "ETA" in lines[0]
    assert "cached (9 shard(s) on disk)" in lines[1] and not BAR.search(lines[1]) and "-:--:--" not in lines[1]


def test_extract_off_a_terminal_prints_a_line_per_shard():
    from core.terminal import Passes

    console = Console(file=StringIO(), width=80, force_terminal=False)
    with Passes(console) as passes:
        text = passes.add("text  minilm", 10, "texts", 2)
        passes.add("image lite0", 0, "images", 0, cached=2)
        for _ in range(2):
            passes.advance(text, 5)
            passes.shard_written(text)
    out = console.file.getvalue().splitlines()
    assert out[0] == "image lite0: cached (2 shard(s) on disk)"
    assert out[1].startswith("text  minilm: shard 1/2 written  5/10 texts") and "ETA" in out[1]
    assert out[2].startswith("text  minilm: shard 2/2 written  10/10 texts") and "ETA 0:00:00" in out[2]


def _synth_cfg(c, out, **kw):
    from train.config import TrainConfig

    return TrainConfig(**{**dict(dataset=c.dataset, cache_dir=c.cache_dir, text_encoder=c.text_encoder,
                                 image_encoder=c.image_encoder, epochs=2, seeds=(1,), batch_size=12, out=out), **kw})


def test_train_off_a_terminal_prints_a_line_per_epoch_and_seed(synth_cache, tmp_path, one_thread):
    from train import runs

    console = Console(file=StringIO(), width=80, force_terminal=False)
    runs.train(_synth_cfg(synth_cache, tmp_path / "run"), console)
    lines = console.file.getvalue().splitlines()
    epochs = [line for line in lines if line.startswith("seed 1 epoch ")]
    assert [line.split()[3] for line in epochs] == ["1/2", "2/2"]
    assert all("dev wF1" in line and "| all seeds" in line and "ETA" in line for line in epochs)
    assert "step two" in epochs[0]  # spp_scl has a step two
    assert any(line.startswith("seed 1 done, best") for line in lines)
    assert "\x1b[" not in console.file.getvalue()


def test_train_on_an_80_column_terminal_keeps_the_bar_count_and_eta(synth_cache, tmp_path, one_thread):
    from train import runs

    console = Console(file=StringIO(), width=80, force_terminal=True, color_system=None)
    runs.train(_synth_cfg(synth_cache, tmp_path / "run", head="probe"), console)
    frames = ANSI.sub("", console.file.getvalue()).splitlines()
    tops = [line for line in frames if line.startswith("all seeds")]
    assert tops and all(len(line) <= 80 for line in frames)
    assert BAR.search(tops[-1]) and "2/2 epochs" in tops[-1] and "ETA up to 0:00, expected 0:00" in tops[-1]
    assert not any("step two" in line for line in frames)  # the probe has no step two
