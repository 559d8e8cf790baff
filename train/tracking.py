"""Experiment trackers (`--report-to tensorboard` of train, ablate, sweep and search).

A tracker follows one run folder through the `on_epoch` / `on_seed_end` callbacks of
`train.runs.run`, so the trainer knows nothing of it; it is a process option, like `--jobs`,
not a TrainConfig field: it changes no config hash and no resume decision.

TensorBoard: `<run>/tb/seed-<s>/` holds one scalar per log.csv value (tag = its column,
step = the epoch) for seed s; `<run>/tb/` holds the run's settings as hparams with its final
dev and test metrics (`final/dev_<metric>`, `final/test_<metric>`: the means over seeds),
written once the run is finished. Each value is written once: a resumed run replays its
earlier epochs from the saved state without handing them to `on_epoch`, and whatever the event
files lack (an epoch saved just before a kill) is filled from log.csv, never written twice.
`tensorboard --logdir runs` then shows every run and seed.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from core.errors import UserError

TRACKERS = ("none", "tensorboard")


def parse(text: str | None) -> tuple[str, ...]:
    """`--report-to tensorboard` (a comma list) -> ("tensorboard",); "none" -> (). An unknown name,
    or a tracker whose package is missing, is one line."""
    names = [n.strip().lower() for n in (text or "none").split(",") if n.strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or not names:
        raise UserError(f"--report-to {text!r}: use {', '.join(TRACKERS)} (a comma list for several)")
    chosen = tuple(dict.fromkeys(n for n in names if n != "none"))
    for name in chosen:
        _require(name)
    return chosen


def _require(name: str) -> None:
    package = {"tensorboard": "tensorboard"}[name]
    try:
        importlib.import_module(package)
    except ImportError:
        raise UserError(f"--report-to {name} needs the {package} package: pip install '{package}>=2.14', "
                        "or leave --report-to out") from None


class Trackers:
    """The trackers of one run folder in this process (none: every call does nothing)."""

    def __init__(self, run: Path, report_to: tuple[str, ...] = ()):
        self.each = [{"tensorboard": TensorBoard}[name](Path(run)) for name in report_to]

    def on_epoch(self, log) -> None:
        for t in self.each:
            t.on_epoch(log)

    def on_seed_end(self, result) -> None:
        for t in self.each:
            t.on_seed_end(result)

    def finish(self, metrics: dict) -> dict:
        """The run is finished: fill what the trackers lack, record its settings and final metrics
        (`metrics`, returned)."""
        for t in self.each:
            t.finish(metrics)
        return metrics


def epoch_values(log) -> dict[str, float]:
    """An epoch's values under their log.csv column names (train/run_folder.py LogCsv), unrounded."""
    from train.config import METRICS

    return {"lr": log.lr, **{f"loss_{k}": v for k, v in log.losses.items()}, "step_two_rate": log.step_two_rate,
            "seconds": log.seconds, **{f"dev_{m}": log.dev[m] for m in METRICS}}


def hparams(train: dict) -> dict:
    """A config.json's settings as TensorBoard hparams: head_config fields as `head.<field>`, and
    only numbers, booleans and strings (None -> "none", a list -> "1,2,3")."""
    flat = {k: v for k, v in train.items() if k != "head_config"}
    flat.update({f"head.{k}": v for k, v in (train.get("head_config") or {}).items()})

    def plain(v):
        if v is None:
            return "none"
        if isinstance(v, (list, tuple)):
            return ",".join(map(str, v))
        return v if isinstance(v, (bool, int, float, str)) else str(v)

    return {k: plain(v) for k, v in flat.items()}


class TensorBoard:
    """Event files of one run folder: `tb/seed-<s>/` per seed, `tb/` for the hparams."""

    def __init__(self, run: Path):
        self.run = run
        self.root = run / "tb"
        self.writers: dict[int, object] = {}
        self.written: dict[int, set[tuple[str, int]]] = {}  # (tag, step) in the event files, per seed

    def _seed(self, seed: int):
        """The writer of seed `seed`, opened once, and what its event files already hold."""
        if seed not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            folder = self.root / f"seed-{seed}"
            self.written[seed] = scalars_written(folder)
            _next_second(folder)
            self.writers[seed] = SummaryWriter(log_dir=str(folder))
        return self.writers[seed]

    def _write(self, seed: int, step: int, values: dict[str, float]) -> None:
        writer, done = self._seed(seed), self.written[seed]
        for tag, value in values.items():
            if (tag, step) not in done:
                writer.add_scalar(tag, value, step)
                done.add((tag, step))

    def _fill(self, seed: int | None = None, before: int | None = None) -> None:
        """Write what log.csv holds of `seed` (None: every seed; `before`: epochs before it) and the
        event files lack (epochs of an earlier process that were saved but never reached them)."""
        from train.run_folder import RunFolder

        folder = RunFolder(self.run)
        if not (self.run / folder.LOG).is_file():
            return
        for row in folder.log_rows(seed):
            s, epoch = int(row["seed"]), int(row["epoch"])
            if before is None or epoch < before:
                self._write(s, epoch, {k: float(v) for k, v in row.items() if k not in ("seed", "epoch") and v != ""})

    def on_epoch(self, log) -> None:
        if log.seed not in self.writers:
            self._seed(log.seed)
            self._fill(log.seed, before=log.epoch)
        self._write(log.seed, log.epoch, epoch_values(log))
        self.writers[log.seed].flush()  # on disk each epoch: a kill loses nothing the state kept

    def on_seed_end(self, result) -> None:
        if result.seed in self.writers:
            self.writers[result.seed].flush()

    def finish(self, metrics: dict) -> None:
        from train.config import METRICS
        from train.run_folder import RunFolder

        self._fill()
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
        if list(self.root.glob("events.out.tfevents.*")):
            return  # the hparams of this run were written by an earlier process
        final = {f"final/{split}_{m}": metrics[split][m]["mean"] for split in ("dev", "test") for m in METRICS}
        write_hparams(self.root, hparams(RunFolder(self.run).config()["train"]), final)


def _next_second(folder: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the second its
    writer opened (then host, pid, a counter: no order): a resumed writer opened within the second of
    an earlier file could sort before it and its epochs read as older. Wait for the next second."""
    stamps = [int(p.name.split(".")[3]) for p in folder.glob("events.out.tfevents.*")]
    while stamps and time.time() < max(stamps) + 1:
        time.sleep(0.05)


def scalars_written(folder: Path) -> set[tuple[str, int]]:
    """(tag, step) of every scalar in the event files of `folder` (none yet: empty)."""
    if not folder.is_dir() or not list(folder.glob("events.out.tfevents.*")):
        return set()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def write_hparams(folder: Path, settings: dict, metrics: dict) -> None:
    """The run's settings and final metrics as one TensorBoard HParams session in `folder`."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    exp, ssi, sei = hparams_summary(settings, metrics)
    with SummaryWriter(log_dir=str(folder)) as w:
        for summary in (exp, ssi, sei):
            w.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            w.add_scalar(tag, value)
