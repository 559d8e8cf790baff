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
    reference: dict | None = None  # set when the numbers were recorded elsewhere: compared with the run's own code here


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
    here, then = fingerprint.machine(), saved.get("machine")
    here["threads"] = threads
    last = best == len(log_rows) and recorded.get("last_epoch_test") is not None  # the selected epoch was the last
    target = Target(log_rows, protocol_rows, recorded, "recorded")
    from train.data import load_data

    data = load_data(cfg)
    t0 = time.time()
    reference = None
    try:
        worst, compared = _compare(folder, cfg, data, seed, through, epochs is None or through == best, last, threads,
                                   target, _where(then, here), on_epoch)
    except Difference as e:
        if then and _same_machine(then, here):
            raise
        # Numbers recorded on another (or an unrecorded) machine: what the run's own code computes on this
        # one is the reference; the current code must give exactly that.
        pending = reference_numbers(saved, cfg, seed, through, last, threads, cfg.protocol_check)  # runs beside
        reference = {"commit": saved.get("git_commit"), "recorded_differs": str(e).split(": ", 1)[1]}
        worst, compared = _compare(folder, cfg, data, seed, through, epochs is None or through == best, last, threads,
                                   pending, "", on_epoch)
    complete = epochs is None or through == best
    out = Replayed(run, seed, through, complete, worst, compared, reference)
    folder.record_replay({
        "code_fingerprint": fingerprint.code_fingerprint(), "seed": seed, "epochs": through, "complete": complete,
        "largest_difference": worst, "compared": compared, "machine": here, "recorded_machine": then,
        **({"reference": reference} if reference else {}),
        "seconds": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    return out


@dataclass
class Target:
    """What a replay must reproduce: the run's recorded numbers, or those the run's own code computes here."""
    log_rows: list[dict]
    protocol_rows: list[dict]
    final: dict
    what: str  # "recorded", or "the reference"


def _compare(folder: RunFolder, cfg, data, seed: int, through: int, complete: bool, last: bool, threads: int,
             target, where: str, on_epoch) -> tuple[float, dict]:
    """Train `seed` through epoch `through` with the current code and compare every number with `target`:
    a Target (compared epoch by epoch, stopping at the first difference), or a callable that gives
    the Target once the current code has trained (a reference computed beside it)."""
    run = folder.path
    worst = [0.0]
    later = [] if callable(target) else None  # epoch logs kept until the reference is there

    def check(name: str, epoch, column: str, want, got) -> None:
        if want == got:
            return
        raise Difference(f"{run}: replay of seed {seed} differs in {name}, {column}, epoch {epoch}: {target.what} "
                         f"{want}, now {got}{where}; the current code does not compute this run's numbers")

    def each(log: EpochLog) -> None:
        if later is not None:
            later.append(log)
            on_epoch(log)
            return
        compare(log)

    def compare(log: EpochLog) -> None:
        for name, rows, row in ((folder.LOG, target.log_rows, LogCsv._row(log)),
                                (folder.PROTOCOL, target.protocol_rows,
                                 ProtocolCsv._row(log) if target.protocol_rows else None)):
            if row is None:
                continue
            want = rows[log.epoch - 1]
            for column in sorted((set(want) | set(row)) - NOT_COMPARED):
                a, b = str(want.get(column, "")), str(row.get(column, ""))
                check(name, log.epoch, column, a, b)
                worst[0] = max(worst[0], _gap(a, b))
        if later is None:
            on_epoch(log)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result: SeedResult = train_seed(replace(cfg, epochs=through), data, seed, on_epoch=each)
    finally:
        torch.set_num_threads(before)
    if later is not None:
        target = target()
        for log in later:
            compare(log)
    compared = {"log_rows": through, "protocol_rows": through if target.protocol_rows else 0, "final": []}
    if complete:
        fields = list(FINAL_FIELDS) + (["last_epoch_test"] if last else [])
        now = json.loads(json.dumps({k: getattr(result, k) for k in fields}))
        for k in fields:
            for path, a, b in _leaves(target.final.get(k), now[k], k):
                check(folder.seed_file(seed), "final", path, a, b)
        compared["final"] = fields
    return worst[0], compared


def _same_machine(then: dict, here: dict) -> bool:
    return (then.get("cpu"), then.get("torch")) == (here["cpu"], here["torch"])


# What the reference process runs: the run's own code (its commit, unpacked), this machine, the run's
# cache, settings and threads; it prints the numbers a replay compares, as JSON.
REFERENCE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from core import threads
threads.policy()
import torch
torch.set_num_threads(int(sys.argv[2]))
from dataclasses import replace
from train.config import TrainConfig
from train.data import load_data
from train.run_folder import LogCsv, ProtocolCsv
from train.trainer import train_seed
job = json.loads(sys.stdin.read())
cfg = TrainConfig.from_json(job["train"])
rows = []
r = train_seed(replace(cfg, epochs=job["epochs"]), load_data(cfg), job["seed"], on_epoch=lambda log: rows.append(
    {"log": LogCsv._row(log), "protocol": ProtocolCsv._row(log) if job["protocol"] else None}))
print(json.dumps({"rows": rows, "final": {k: getattr(r, k) for k in job["fields"]}}))
"""


def reference_numbers(saved: dict, cfg, seed: int, through: int, last: bool, threads: int, protocol: bool):
    """Start computing the numbers the code that trained the run (config.json's git_commit, unpacked
    from this repository's history) gives on this machine for `seed` through epoch `through`, in a
    process of its own; returns a function that waits for them (a Target)."""
    import subprocess
    import sys
    import tempfile

    from core.paths import REPO

    commit = str(saved.get("git_commit") or "")
    src = Path(tempfile.gettempdir()) / f"spp-scl-code-{commit[:12]}"
    if not (src / "train").is_dir():
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "core", "heads", "train"],
                                 capture_output=True)
        if archive.returncode != 0:
            raise UserError(f"the run's numbers were recorded on another machine, and its code (commit {commit[:10]}) "
                            "is not in this repository's history to compute them here: replay it on a machine "
                            "like the one that trained it")
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    fields = list(FINAL_FIELDS) + (["last_epoch_test"] if last else [])
    job = {"train": {**saved["train"], "cache_dir": str(cfg.cache_dir)}, "epochs": through, "seed": seed,
           "protocol": protocol, "fields": fields}
    proc = subprocess.Popen([sys.executable, "-c", REFERENCE, str(src), str(threads)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    proc.stdin.write(json.dumps(job))
    proc.stdin.close()

    def wait() -> Target:
        out, err = proc.stdout.read(), proc.stderr.read()
        if proc.wait() != 0:
            tail = (err.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"the reference run of commit {commit[:10]} failed ({tail}): replay on a machine like the "
                            "one that trained the run")
        got = json.loads(out.strip().splitlines()[-1])
        return Target([r["log"] for r in got["rows"]], [r["protocol"] for r in got["rows"] if r["protocol"]],
                      got["final"], f"the run's own code (commit {commit[:10]}) here")

    return wait


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
