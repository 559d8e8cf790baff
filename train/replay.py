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
counts, so the machine is recorded with the run and in `replay.json`. What a replay compares with:

- on the machine that trained the run: the numbers the run recorded;
- on a machine an earlier replay ran on: the numbers it computed there, stored in `replay.json`
  with that machine (cpu, torch, threads) by every replay that succeeds;
- on a machine seen nowhere: the recorded numbers, and if they differ, those the run's own code (its
  git commit, unpacked to a temp folder) computes on this machine in a process beside the replay.

So each replay pass after a code change costs one training per run, but the first one on a new
machine, which costs two. A file written before numbers were stored falls back to the reference.

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
    stored: dict | None = None  # set when compared with numbers an earlier replay computed here (its code, date)


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
    complete = epochs is None or through == best
    fields = (list(FINAL_FIELDS) + (["last_epoch_test"] if last else [])) if complete else []  # scored at the end
    target = Target(log_rows, protocol_rows, recorded, "recorded")
    # Numbers an earlier replay computed on this machine come first, even where config.json names this
    # machine: a run resumed here records this machine, while its first seeds may have been made elsewhere.
    stored = next((n for n in folder.replay_numbers()
                   if _reaches(n, seed, here, through, fields, cfg.protocol_check)), None)
    from train.data import load_data

    data = load_data(cfg)
    t0 = time.time()
    reference = None
    if stored is not None:
        # This machine's own numbers, which an earlier replay found equal to the run's code's: one training.
        target = Target(stored["log_rows"], stored.get("protocol_rows") or [], stored.get("final") or {},
                        f"this machine's numbers stored in {folder.REPLAY} by the replay of {stored.get('date')}")
        worst, compared, now = _compare(folder, cfg, data, seed, through, fields, threads, target, "", on_epoch)
    else:
        try:
            worst, compared, now = _compare(folder, cfg, data, seed, through, fields, threads, target,
                                            _where(then, here), on_epoch)
        except Difference as e:
            if then and _same_machine(then, here):
                raise
            # Numbers recorded on another (or an unrecorded) machine: what the run's own code computes on this
            # one is the reference; the current code must give exactly that.
            pending = reference_numbers(saved, cfg, seed, through, fields, threads, cfg.protocol_check)  # runs beside
            reference = {"commit": saved.get("git_commit"), "recorded_differs": str(e).split(": ", 1)[1]}
            worst, compared, now = _compare(folder, cfg, data, seed, through, fields, threads, pending, "", on_epoch)
    date, code = time.strftime("%Y-%m-%d %H:%M:%S"), fingerprint.code_fingerprint()
    against = None if stored is None else {k: stored.get(k) for k in ("code_fingerprint", "date")}
    out = Replayed(run, seed, through, complete, worst, compared, reference, against)
    # what this machine computed, for the next replay here: every number compared, as compared
    numbers = {"seed": seed, "machine": here, "epochs": through, "code_fingerprint": code, "date": date, **now}
    folder.record_replay({
        "code_fingerprint": code, "seed": seed, "epochs": through, "complete": complete,
        "largest_difference": worst, "compared": compared, "machine": here, "recorded_machine": then,
        **({"reference": reference} if reference else {}), **({"stored_numbers": against} if against else {}),
        "seconds": round(time.time() - t0, 1), "date": date,
    }, _keep(folder.replay_numbers(), numbers))
    return out


def _reaches(numbers: dict, seed: int, machine: dict, through: int, fields: list[str], protocol: bool) -> bool:
    """Whether stored `numbers` are of `seed` on `machine` and hold every number a replay through
    epoch `through` compares (the final `fields`, the protocol rows if the run has them)."""
    return (numbers.get("seed") == seed and numbers.get("machine") == machine
            and len(numbers.get("log_rows") or []) >= through
            and (not protocol or len(numbers.get("protocol_rows") or []) >= through)
            and all(k in (numbers.get("final") or {}) for k in fields))


def _keep(stored: list[dict], new: dict) -> list[dict]:
    """The stored numbers with `new` in: one set per seed and machine, the newest unless an older one
    reaches further (a partial replay after a complete one). Two sets of one machine agree where both
    reach: each replay matched its target exactly."""
    def same(n: dict) -> bool:
        return n.get("seed") == new["seed"] and n.get("machine") == new["machine"]

    if any(same(n) and not _reaches(new, new["seed"], new["machine"], len(n.get("log_rows") or []),
                                    list(n.get("final") or {}), bool(n.get("protocol_rows"))) for n in stored):
        return stored
    return [n for n in stored if not same(n)] + [new]


@dataclass
class Target:
    """What a replay must reproduce: the run's recorded numbers, those an earlier replay computed on this
    machine (stored in replay.json), or those the run's own code computes here."""
    log_rows: list[dict]
    protocol_rows: list[dict]
    final: dict
    what: str  # how a difference names it: "recorded", "this machine's numbers stored ...", "the run's own code ..."


def _compare(folder: RunFolder, cfg, data, seed: int, through: int, fields: list[str], threads: int,
             target, where: str, on_epoch) -> tuple[float, dict, dict]:
    """Train `seed` through epoch `through` with the current code and compare every number with `target`:
    a Target (compared epoch by epoch, stopping at the first difference), or a callable that gives
    the Target once the current code has trained (a reference computed beside it). The final `fields`
    are compared after the last epoch ([]: a partial replay). Returns the largest difference, what was
    compared, and the numbers compared (log and protocol rows, final fields) as the current code gave them."""
    run = folder.path
    worst = [0.0]
    later = [] if callable(target) else None  # epoch logs kept until the reference is there
    now = {"log_rows": [], "protocol_rows": [], "final": {}}

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
        protocol = ProtocolCsv._row(log) if target.protocol_rows else None
        for name, key, row in ((folder.LOG, "log_rows", LogCsv._row(log)),
                               (folder.PROTOCOL, "protocol_rows", protocol)):
            if row is None:
                continue
            rows = getattr(target, key)
            want = rows[log.epoch - 1]
            for column in sorted((set(want) | set(row)) - NOT_COMPARED):
                a, b = str(want.get(column, "")), str(row.get(column, ""))
                check(name, log.epoch, column, a, b)
                worst[0] = max(worst[0], _gap(a, b))
            now[key].append({k: v for k, v in row.items() if k not in NOT_COMPARED})
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
    final = json.loads(json.dumps({k: getattr(result, k) for k in fields}))  # as a file holds them
    for k in fields:
        for path, a, b in _leaves(target.final.get(k), final[k], k):
            check(folder.seed_file(seed), "final", path, a, b)
    now["final"] = final
    compared = {"log_rows": through, "protocol_rows": through if target.protocol_rows else 0, "final": fields}
    return worst[0], compared, now


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


def reference_numbers(saved: dict, cfg, seed: int, through: int, fields: list[str], threads: int, protocol: bool):
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
