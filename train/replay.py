"""`pipeline.py replay RUN...`: an audit of whether today's code still computes a run's numbers.

Not a gate: whether `results`, resume and the grids take a run is its numerics version
(train/numerics.py). Replay is what a user runs to look closer: it retrains one seed of a finished
run with the current code, on the run's cache, with its recorded settings and thread count,
through the seed's selected epoch, then scores it as `train` does, and compares every number the
run recorded for that seed:

- each `log.csv` row (lr, every loss term, step-two rate, dev metrics; not seconds) and each
  `protocol.csv` row, as the strings the run wrote (they are rounded to 4 digits there);
- the seed's `seed-<s>.json`: the selected epoch, dev and test metrics (every label-blind order),
  per-class F1, the test predictions and the leak check, as exact floats.

It reports `identical`, or the first number that differs (file, column, epoch). Tolerance: none.
Float kernels differ between kinds of CPU: float32's last bits are not the same, so a selected
epoch or a gate can flip. When the run's recorded machine (config.json `machine.cpu`) is not this
one, the report says so: a difference then need not be changed code.

Not compared: the seconds, and what only the epochs after the selected one decide (the seed's
step-two rate over the whole run, the authors' "last epoch" numbers unless the selected epoch was
the last): those epochs are not retrained. `--epochs K` is a quicker partial check.

A replay writes nothing into the run folder. It holds the folder's writer lock (`RunFolder.writer`)
while it runs, so that no `train` of the same folder changes the files it compares with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from core.errors import UserError
from train import fingerprint
from train.config import TrainConfig
from train.data import load_data
from train.run_folder import LogCsv, ProtocolCsv, RunFolder
from train.trainer import EpochLog, SeedResult, train_seed

# the numbers of seed-<s>.json that the epochs up to the selected one decide
FINAL_FIELDS = ("best_epoch", "dev", "test", "test_pred", "leak_check")
NOT_COMPARED = {"seconds"}


class Difference(Exception):
    """The first number the current code computes differently (it ends the retraining)."""


@dataclass
class Replayed:
    run: Path
    seed: int
    epochs: int  # epochs retrained
    complete: bool  # through the selected epoch and the final scoring
    compared: dict  # what was compared: log rows, protocol rows, final fields
    difference: str | None = None  # the first number that differs ("log.csv, loss_ce, epoch 3: recorded ..."), or None
    machine: str | None = None  # set when the run was not recorded on this kind of CPU: what that means

    @property
    def identical(self) -> bool:
        return self.difference is None


@dataclass
class Target:
    """What the replay of one seed must reproduce: the numbers the run recorded for it."""
    seed: int
    through: int  # the epochs retrained: the selected one, or fewer (--epochs)
    log_rows: list[dict]
    protocol_rows: list[dict]  # [] when the run has no protocol check
    final: dict  # seed-<s>.json
    fields: list[str]  # its fields compared after the last epoch ([]: a partial replay)


def replay(run: Path, seed: int | None = None, epochs: int | None = None, cache_dir: Path | None = None,
           on_epoch=lambda log: None) -> Replayed:
    """Retrain `seed` (default: the run's first finished one) of the finished run in `run` with the
    current code and compare; the first number that differs is reported, not raised."""
    folder = RunFolder(run)
    saved, cfg = folder.read_run()  # not a run folder: refused before the lock file is made in it
    with folder.writer():  # no train of this folder changes what is compared while it runs
        target = _target(folder, cfg, seed, epochs)
        if cache_dir is not None:
            cfg = replace(cfg, cache_dir=Path(cache_dir))
        recorded = saved.get("machine") or {}
        data = load_data(cfg)

        def each(log: EpochLog) -> None:
            _compare_epoch(target, log)
            on_epoch(log)

        difference = None
        try:
            _compare_final(target, _retrain(cfg, data, target, recorded.get("threads", 1), each))
        except Difference as e:
            difference = str(e)
        compared = {"log_rows": target.through, "protocol_rows": target.through if target.protocol_rows else 0,
                    "final": target.fields}
        return Replayed(folder.path, target.seed, target.through, bool(target.fields), compared, difference,
                        machine_note(recorded.get("cpu"), fingerprint.machine()["cpu"]))


def _target(folder: RunFolder, cfg: TrainConfig, seed: int | None, epochs: int | None) -> Target:
    """The recorded numbers of `seed` (default: the first finished one) through its selected epoch or `epochs`."""
    run = folder.path
    seeds = [s for s in cfg.seeds if folder.finished(s)]
    if not seeds:
        raise UserError(f"{run} has no finished seed to replay: finish it first with the command that started it")
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise UserError(f"{run}: seed {seed} is not a finished seed of this run; pick one of {seeds} with --seed")
    recorded = folder.seed_record(seed)
    log_rows = folder.log_rows(seed)
    best = int(recorded["best_epoch"])
    if len(log_rows) < best:
        raise UserError(f"{run}/{folder.LOG} has {len(log_rows)} rows for seed {seed}, its selected epoch is {best}: "
                        "the run folder is incomplete")
    through = best if epochs is None else min(epochs, best)
    last = best == len(log_rows) and recorded.get("last_epoch_test") is not None  # the selected epoch was the last
    fields = (list(FINAL_FIELDS) + (["last_epoch_test"] if last else [])) if through == best else []
    protocol_rows = folder.protocol_rows(seed) if cfg.protocol_check else []
    return Target(seed, through, log_rows, protocol_rows, recorded, fields)


def _retrain(cfg: TrainConfig, data, target: Target, threads: int, on_epoch) -> SeedResult:
    """Train the target's seed through its epochs with the current code, on the run's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return train_seed(replace(cfg, epochs=target.through), data, target.seed, on_epoch=on_epoch)
    finally:
        torch.set_num_threads(before)


def _check(where: str, want, got) -> None:
    if want != got:
        raise Difference(f"{where}: recorded {want}, now {got}")


def _compare_epoch(target: Target, log: EpochLog) -> None:
    """A retrained epoch's log.csv (and protocol.csv) row against the recorded one, as the strings written."""
    rows = [(RunFolder.LOG, target.log_rows, LogCsv._row(log))]
    if target.protocol_rows:
        rows.append((RunFolder.PROTOCOL, target.protocol_rows, ProtocolCsv._row(log)))
    for name, recorded, row in rows:
        want = recorded[log.epoch - 1]
        for column in sorted((set(want) | set(row)) - NOT_COMPARED):
            _check(f"{name}, {column}, epoch {log.epoch}", str(want.get(column, "")), str(row.get(column, "")))


def _compare_final(target: Target, result: SeedResult) -> None:
    """The seed's scores after its last epoch, as exact floats (as seed-<s>.json holds them)."""
    final = json.loads(json.dumps({k: getattr(result, k) for k in target.fields}))
    for k in target.fields:
        for path, a, b in _leaves(target.final.get(k), final[k], k):
            _check(f"{RunFolder.seed_file(target.seed)}, {path}, epoch final", a, b)


def machine_note(recorded: str | None, here: str) -> str | None:
    """What a replay on this CPU kind says of a run recorded on `recorded` (None: nothing to say)."""
    why = ("float32's last bits differ between kinds of CPU, so a selected epoch or a gate can flip: a difference "
           "here need not be changed code")
    if not recorded:
        return f"the run did not record its machine (replayed on {here}); {why}"
    if recorded != here:
        return f"the run was trained on another kind of CPU ({recorded}; replayed on {here}); {why}"
    return None


def _leaves(a, b, path: str):
    """(path, recorded, now) for every leaf of two JSON values of the same shape."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _leaves(a.get(k), b.get(k), f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _leaves(x, y, f"{path}[{i}]")
    else:
        yield path, a, b
