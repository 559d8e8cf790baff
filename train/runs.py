"""Training a run: every seed of a config into its run folder (`train`, `train_run`), the
summary over seeds (`summarize`) and `eval`. What the folder holds, and every read and
write of it, is `train/run_folder.py`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core.device import device
from core.errors import Interrupted
from core.paths import make_dir
from train import data as cache
from train.config import METRICS, TrainConfig
from train.data import load_data
from train.metrics import mean_std, report
from train.run_folder import (LogCsv, ProtocolCsv, default_out, epochs_done, evidence_twins, finished_seeds, load_head,
                              open_run, save_atomic,
                              save_seed, state_path, unfinished_seeds, write_config)
from train.progress import EpochClock, EtaColumn
from train.trainer import SeedResult, build_head, eval_orders, saved_logs, score_split, train_seed


@dataclass
class RunResult:
    out: Path  # the run folder
    metrics: dict  # what metrics.json holds


def train(cfg: TrainConfig, console: Console | None = None, jobs: int = 1, threads: int | None = None) -> Path:
    """`pipeline.py train`: load the cache, train every seed with a progress bar (`jobs` seeds at a
    time in worker processes), return the run folder."""
    console = console or Console()
    cfg = cfg.resolved()
    t0 = time.time()
    data = load_data(cfg)
    build_head(cfg, data)  # a bad --head or --text-layers fails here, before a run folder is written
    cfg = replace(cfg, out=Path(cfg.out or default_out(cfg)))
    done = finished_seeds(cfg.out, cfg, data.provenance)
    kept = {seed: state["epoch"] for seed, state in unfinished_seeds(cfg.out, cfg, done).items()}
    sizes = {s: len(v) for s, v in data.splits.items()}
    console.print(f"{cfg.dataset}: {sizes} from the cache in {time.time() - t0:.1f} s"
                  + (f" ({data.dropped} items without image left out)" if data.dropped else "")
                  + (f"; resuming {cfg.out}, seeds {sorted(done)} already done" if done else ""))
    for seed, epoch in kept.items():
        console.print(f"seed {seed}: resuming after epoch {epoch} of {cfg.epochs}")
    clock = EpochClock(len(cfg.seeds) * cfg.epochs, *epochs_done(cfg.out, cfg))
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        EtaColumn(), TextColumn("{task.fields[status]}"), console=console,
    ) as progress:
        overall = progress.add_task("all seeds", status="", **clock.fields())
        tasks = {seed: progress.add_task(f"seed {seed}", total=cfg.epochs,
                                         completed=cfg.epochs if seed in done else kept.get(seed, 0),
                                         status="done earlier" if seed in done else "") for seed in cfg.seeds}
        best: dict[int, tuple[float, int]] = {}

        def on_epoch(entry):
            if entry.dev[cfg.select] > best.get(entry.seed, (-1.0, 0))[0]:
                best[entry.seed] = (entry.dev[cfg.select], entry.epoch)
            v, e = best[entry.seed]
            losses = "  ".join(f"{k} {x:.3f}" for k, x in entry.losses.items())
            progress.update(tasks[entry.seed], completed=entry.epoch, status=(
                f"{losses}  step two {entry.step_two_rate:.0%}  dev {cfg.select} {entry.dev[cfg.select]:.4f} "
                f"(best {v:.4f} @ {e})  {entry.seconds:.1f} s/epoch"))
            clock.update(clock.done + 1, clock.skipped)
            progress.update(overall, **clock.fields())

        def on_seed_end(r):
            progress.update(tasks[r.seed], completed=cfg.epochs)
            clock.update(clock.done, clock.skipped + cfg.epochs - len(r.log))  # --patience stopped it early
            progress.update(overall, **clock.fields())

        result = train_run(cfg, data, on_epoch, on_seed_end, t0=t0, jobs=jobs, threads=threads)
    for line in evidence_twins(result.out):  # the same configuration as a committed evidence run
        console.print(line, highlight=False, soft_wrap=True)
    return result.out


def train_run(cfg: TrainConfig, data: cache.Data, on_epoch=lambda log: None, on_seed_end=lambda result: None,
              t0: float | None = None, jobs: int = 1, threads: int | None = None) -> RunResult:
    """The library call under every command: train every seed of `cfg` on already loaded `data`
    into `cfg.out` (default: named from the config's hash), resuming finished seeds and the
    unfinished one after its last finished epoch; no UI. Ctrl-C raises `Interrupted` saying what
    was kept. A grid calls it once per cell with the same `data`, so the cache is loaded once.
    `jobs` > 1 trains the seeds in that many worker processes (`threads` each), with the same
    numbers: a seed's training depends on its seed alone."""
    t0 = t0 or time.time()
    cfg = cfg.resolved()
    out = Path(cfg.out or default_out(cfg))
    cfg = replace(cfg, out=out)
    done = finished_seeds(out, cfg, data.provenance)
    partial = unfinished_seeds(out, cfg, done)
    make_dir(out)
    write_config(out, cfg, data)
    resumed = [entry for state in partial.values() for entry in saved_logs(state)]
    logs = [LogCsv(out / "log.csv", done, resumed)]
    if cfg.protocol_check:
        logs.append(ProtocolCsv(out / "protocol.csv", done, resumed))
    kept = {seed: state["epoch"] for seed, state in partial.items()}  # the last saved epoch of each seed
    for seed in done:
        state_path(out, seed).unlink(missing_ok=True)  # Ctrl-C came between seed-<s>.json and this
    todo = [seed for seed in cfg.seeds if seed not in done]

    def each(entry):
        for log in logs:
            log.add(entry)
        on_epoch(entry)

    def finish(r: SeedResult) -> None:
        save_seed(out, r)
        state_path(out, r.seed).unlink(missing_ok=True)
        on_seed_end(r)
        done[r.seed] = r

    try:
        if jobs > 1 and len(todo) > 1:
            _train_seeds_in_pool(cfg, todo, partial, jobs, threads, each, finish, kept)
        else:
            for seed in todo:
                def save(state, seed=seed):
                    save_atomic(state, state_path(out, seed))
                    kept[seed] = state["epoch"]

                finish(train_seed(cfg, data, seed, on_epoch=each, resume=partial.get(seed), save=save))
    except KeyboardInterrupt:
        # what is on disk: a worker's last "saved" message may not have reached this process
        kept.update({s: state["epoch"] for s, state in unfinished_seeds(out, cfg, done).items()})
        finished = [s for s in cfg.seeds if s in done]
        unfinished = [s for s in todo if s not in done]
        cut = [s for s in unfinished if kept.get(s)] or unfinished[:1]  # seeds with epochs kept, else the one cut
        raise Interrupted(interrupt_note(out, finished, {s: kept.get(s, 0) for s in cut})) from None
    results = [done[seed] for seed in cfg.seeds]
    metrics = summarize(cfg, results)
    orders = "the only label-blind order" if cfg.eval_orders == 1 else (
        f"the first of {cfg.eval_orders} label-blind orders; metrics.json holds the mean over the orders")
    (out / "report.txt").write_text("".join(
        f"seed {r.seed} (best dev epoch {r.best_epoch}), test in {orders}\n"
        + report(data.splits["test"].labels.numpy(), r.test_pred, data.classes) + "\n"
        for r in results
    ))
    metrics["wall_seconds"] = time.time() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return RunResult(out, metrics)


# --- seeds in worker processes (`train --jobs N`) ---------------------------------------------

_WORKER: dict = {}  # a worker's queue of epoch logs and its copy of the cache


def _keep_queue(queue) -> None:
    _WORKER["queue"] = queue


def _seed_job(cfg: TrainConfig, seed: int, resume: dict | None) -> SeedResult:
    """One seed in a worker: the cache is loaded once per worker; epoch logs go back to the main
    process (which alone writes log.csv), the resumable state straight to the run folder."""
    if "data" not in _WORKER:
        _WORKER["data"] = load_data(cfg)
    queue = _WORKER["queue"]
    return train_seed(cfg, _WORKER["data"], seed, on_epoch=queue.put, resume=resume,
                      save=lambda state: (save_atomic(state, state_path(cfg.out, seed)), queue.put(("saved", seed,
                                                                                                   state["epoch"]))))


def _train_seeds_in_pool(cfg, seeds, partial, jobs, threads, each, finish, kept) -> None:
    """Train `seeds` in `jobs` pinned workers; the epoch logs they send are handed to `each` here,
    in the order they arrive, and a seed is finished only after its last epoch's log."""
    import multiprocessing
    import queue as queue_lib

    from core import threads as core_threads

    q = multiprocessing.get_context().Queue()
    seen = {seed: len(saved_logs(partial[seed])) if seed in partial else 0 for seed in seeds}

    def drain(wait: float) -> None:
        """Hand on everything the workers sent, waiting up to `wait` s for the first item."""
        try:
            item = q.get(timeout=wait)
            while True:
                if isinstance(item, tuple):  # ("saved", seed, epoch): its state file is on disk
                    kept[item[1]] = item[2]
                else:
                    seen[item.seed] += 1
                    each(item)
                item = q.get_nowait()
        except queue_lib.Empty:
            pass

    pool = core_threads.worker_pool(min(jobs, len(seeds)), threads, _keep_queue, (q,))
    try:
        pending = {pool.submit(_seed_job, cfg, seed, partial.get(seed)): seed for seed in seeds}
        while pending:
            drain(0.2)
            for f in [f for f in pending if f.done()]:
                r = f.result()
                while seen[r.seed] < len(r.log):  # its last logs may still be on their way
                    drain(0.2)
                del pending[f]
                finish(r)
    finally:  # Ctrl-C: seeds not started yet must not start now
        pool.shutdown(wait=True, cancel_futures=True)


def interrupt_note(out: Path, finished: list[int], cut: dict[int, int]) -> str:
    """The one line Ctrl-C prints: what of the run in `out` is kept (finished seeds, and the last
    epoch of each seed that was cut), and how to continue."""
    kept = [f"seed{'s' * (len(finished) > 1)} {', '.join(map(str, finished))} finished"] if finished else []
    kept += [f"epoch {epoch} of seed {seed} kept" if epoch else f"seed {seed} starts over" for seed, epoch in cut.items()]
    return f"{out}: {' and '.join(kept)}; run the same command to continue"


def summarize(cfg: TrainConfig, results: list[SeedResult]) -> dict:
    """Mean and sample std over seeds; test per seed is already the mean over label-blind orders."""
    out = {}
    for split in ("dev", "test"):
        out[split] = {m: mean_std([getattr(r, split)[m] for r in results]) for m in METRICS}
    # how much a batch-scope prediction moves with the order of the test items (mean over seeds)
    out["test_order_std"] = {m: float(np.mean([r.test["order_std"][m] for r in results])) for m in METRICS}
    for key in ("leak_check", "last_epoch_test"):
        if all(getattr(r, key) is not None for r in results):
            out[key] = {m: mean_std([getattr(r, key)[m] for r in results]) for m in METRICS}
    out["per_seed"] = [
        {"seed": r.seed, "best_epoch": r.best_epoch, "test": {m: r.test[m] for m in METRICS},
         "test_orders": r.test["orders"], "dev": {m: r.dev[m] for m in METRICS},
         "per_class_f1": r.test["per_class_f1"], "step_two_rate": r.step_two_rate,
         **({"leak_check": r.leak_check} if r.leak_check else {})}
        for r in results
    ]
    if all(r.protocol_check is not None for r in results):
        out["protocol_check"] = summarize_protocol([r.protocol_check for r in results], [r.seed for r in results])
    out["select"] = cfg.select
    out["scoring"] = (f"label-blind: dev in one seeded random order, test the mean over {cfg.eval_orders} "
                      f"seeded random orders (eval_seed {cfg.eval_seed}, batches of {cfg.eval_batch_size})")
    return out


def summarize_protocol(per_seed: list[dict], seeds: list[int]) -> dict:
    """`--protocol-check` over seeds (mean and sample std of each seed's `trainer.protocol_check`):
    what the authors' protocol (test in file order after every epoch, the best or the last epoch
    reported) would have said, beside the run's label-blind dev-selected `test`. Nothing is
    selected on it; `inflation` is how far the best epoch's file-order accuracy overstates `test`."""
    out = {part: {k: mean_std([p[part][k] for p in per_seed]) for k in per_seed[0][part]}
           for part in ("last_epoch", "best_epoch", "test")}
    out["inflation"] = mean_std([p["inflation"] for p in per_seed])
    out["per_seed"] = [{"seed": seed, **p} for seed, p in zip(seeds, per_seed)]
    out["about"] = ("test scored in file order after every epoch (protocol.csv): last_epoch and best_epoch (the "
                    "max over epochs of file-order test accuracy) are what the authors' protocol would have "
                    "reported; nothing is selected on them; test is this run's label-blind dev-selected number")
    return out


def evaluate(run: Path, cache_dir: Path | None = None) -> dict:
    """Recompute test metrics from the checkpoints and the cache; compare with metrics.json."""
    run = Path(run)
    saved, cfg, data = open_run(run, cache_dir)
    test = data.splits["test"]
    per_seed = []
    for seed in cfg.seeds:
        head = load_head(run, cfg, data.dims, seed)
        s, _ = score_split(head, test, cfg, data.dims.n_classes, device(), eval_orders(len(test), cfg))
        per_seed.append({"seed": seed, **{m: s[m] for m in METRICS}})
    result = {"test": {m: mean_std([p[m] for p in per_seed]) for m in METRICS}, "per_seed": per_seed}
    if (run / "metrics.json").is_file():
        recorded = json.loads((run / "metrics.json").read_text())
        result["matches_metrics_json"] = all(
            abs(p[m] - r["test"][m]) < 1e-9 for p, r in zip(per_seed, recorded["per_seed"]) for m in METRICS
        )
    return result
