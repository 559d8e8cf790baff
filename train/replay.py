"""`pipeline.py replay RUN...`: does the code of today still compute the numbers a run recorded?

A run's code identity is decided by what the code computes, not by what its source looks like
(ARCHITECTURE.md rule 8). Replay retrains one seed of a finished run with the current code, on
the run's cache, with its recorded settings and thread count, through the seed's selected epoch,
then scores it as `train` does. Every number the run recorded for that seed is compared:

- each `log.csv` row (lr, every loss term, step-two rate, dev metrics; not seconds) and each
  `protocol.csv` row, as the strings the run wrote (they are rounded to 4 digits there);
- the seed's `seed-<s>.json`: the selected epoch, dev and test metrics (every label-blind order),
  per-class F1, the test predictions and the leak check, as exact floats.

Tolerance: none. A refactor that keeps the numbers gives bit-identical results on the same kind
of CPU and thread count; anything else is a change. Float kernels differ between CPUs and thread
counts, so the machine is recorded with the run and in `replay.json`, and a difference found on
another kind of CPU is reported as such.

Not compared: the seconds, and what only the epochs after the selected one decide (the seed's
step-two rate over the whole run, the authors' "last epoch" numbers unless the selected epoch was
the last): those epochs are not retrained. Their rows are what `--epochs K` cannot reach either.

A complete replay of any seed is written to the run's `replay.json` and vouches for the current
code: `results`, resume and the grids then accept the run although its recorded fingerprint is
another. `--epochs K` is a quicker partial check, recorded as partial; it vouches for nothing.
A replay writes the run folder, so it holds the folder's writer lock (`RunFolder.writer`) while it
runs: never beside a `train` of the same folder, nor beside another replay of it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from core.errors import UserError
from train import fingerprint
from train.run_folder import LogCsv, ProtocolCsv, RunFolder
from train.trainer import EpochLog, SeedResult, train_seed

# the numbers of seed-<s>.json that the epochs up to the selected one decide
FINAL_FIELDS = ("best_epoch", "dev", "test", "test_pred", "leak_check")
NOT_COMPARED = {"seconds"}


class Difference(UserError):
    """The first number the current code computes differently (a user-facing, one-line error)."""


@dataclass
class Replayed:
    run: Path
    seed: int
    epochs: int  # epochs retrained
    complete: bool  # through the selected epoch and the final scoring
    largest_difference: float
    compared: dict  # what was compared: log rows, protocol rows, final fields


def replay(run: Path, seed: int | None = None, epochs: int | None = None, cache_dir: Path | None = None,
           on_epoch=lambda log: None) -> Replayed:
    """Retrain `seed` (default: the run's first) of the finished run in `run` and compare; raise
    `Difference` at the first number that differs, else record the replay in `replay.json`."""
    run = Path(run)
    folder = RunFolder(run)
    folder.read_run()  # not a run folder: refused before the lock file is made in it
    with folder.writer():  # one writer: not while a train of this folder runs, nor two replays at once
        return _replay(folder, seed, epochs, cache_dir, on_epoch)


def _replay(folder: RunFolder, seed: int | None, epochs: int | None, cache_dir: Path | None, on_epoch) -> Replayed:
    run = folder.path
    saved, cfg = folder.read_run()
    seeds = [s for s in cfg.seeds if folder.finished(s)]
    if not seeds:
        raise UserError(f"{run} has no finished seed to replay: finish it first with the command that started it")
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise UserError(f"{run}: seed {seed} is not a finished seed of this run; pick one of {seeds} with --seed")
    recorded = folder.seed_record(seed)
    log_rows = folder.log_rows(seed)
    protocol_rows = folder.protocol_rows(seed) if cfg.protocol_check else []
    best = int(recorded["best_epoch"])
    through = best if epochs is None else min(epochs, best)
    if len(log_rows) < best:
        raise UserError(f"{run}/{folder.LOG} has {len(log_rows)} rows for seed {seed}, its selected epoch is {best}: "
                        "the run folder is incomplete")
    if cache_dir is not None:
        cfg = replace(cfg, cache_dir=Path(cache_dir))
    threads = (saved.get("machine") or {}).get("threads", 1)  # runs before it was recorded: one thread (results/*.sh)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    here, then = fingerprint.machine(), saved.get("machine")
    where = _where(then, here)
    from train.data import load_data

    data = load_data(cfg)
    worst = [0.0]

    def check(name: str, epoch, column: str, want, got) -> None:
        if want == got:
            return
        raise Difference(f"{run}: replay of seed {seed} differs in {name}, {column}, epoch {epoch}: recorded {want}, "
                         f"now {got}{where}; the current code does not compute this run's numbers")

    def each(log: EpochLog) -> None:
        for name, rows, row in ((folder.LOG, log_rows, LogCsv._row(log)),
                                (folder.PROTOCOL, protocol_rows, ProtocolCsv._row(log) if protocol_rows else None)):
            if row is None:
                continue
            want = rows[log.epoch - 1]
            for column in sorted((set(want) | set(row)) - NOT_COMPARED):
                a, b = want.get(column, ""), str(row.get(column, ""))
                check(name, log.epoch, column, a, b)
                worst[0] = max(worst[0], _gap(a, b))
        on_epoch(log)

    t0 = time.time()
    try:
        result: SeedResult = train_seed(replace(cfg, epochs=through), data, seed, on_epoch=each)
    finally:
        torch.set_num_threads(before)
    complete = epochs is None or through == best
    compared = {"log_rows": through, "protocol_rows": through if protocol_rows else 0, "final": []}
    if complete:
        now = json.loads(json.dumps({k: getattr(result, k) for k in FINAL_FIELDS}))
        fields = list(FINAL_FIELDS)
        if best == len(log_rows) and recorded.get("last_epoch_test") is not None:  # the selected epoch was the last
            now["last_epoch_test"] = json.loads(json.dumps(result.last_epoch_test))
            fields.append("last_epoch_test")
        for k in fields:
            for path, a, b in _leaves(recorded.get(k), now[k], k):
                check(folder.seed_file(seed), "final", path, a, b)
        compared["final"] = fields
    out = Replayed(run, seed, through, complete, worst[0], compared)
    folder.record_replay({
        "code_fingerprint": fingerprint.code_fingerprint(), "seed": seed, "epochs": through, "complete": complete,
        "largest_difference": worst[0], "compared": compared, "machine": here, "recorded_machine": then,
        "seconds": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    return out


def _where(then: dict | None, here: dict) -> str:
    if not then:
        return " (the run did not record its machine)"
    if then.get("cpu") != here["cpu"] or then.get("torch") != here["torch"]:
        return (f" on another machine (recorded {then.get('cpu')}, torch {then.get('torch')}; here {here['cpu']}, "
                f"torch {here['torch']}): float kernels differ between CPUs, so this need not be changed code")
    return ""


def _gap(a: str, b: str) -> float:
    try:
        d = abs(float(a) - float(b))
    except ValueError:
        return 0.0 if a == b else math.inf
    return d if not math.isnan(d) else 0.0


def _leaves(a, b, path: str):
    """(path, recorded, now) for every leaf of two JSON values of the same shape."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _leaves(a.get(k), b.get(k), f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and not all(
            isinstance(x, (int, float)) for x in a + b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _leaves(x, y, f"{path}[{i}]")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is not None:
            yield f"{path}[{first}]", a[first], b[first]
    else:
        yield path, a, b
