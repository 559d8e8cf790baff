"""Training a run: every seed of a config into its run folder (`train`, `train_run`), the
summary over seeds (`summarize`) and `eval`. What the folder holds, and every read and
write of it, is `train/run_folder.py`."""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from rich.console import Console

from core import memory as core_memory
from core.device import device
from core.errors import Interrupted, UserError
from core.paths import DEFAULT_RUNS
from train import data as cache
from train import robustness, tracking
from train.config import METRICS, TrainConfig
from train.data import load_data
from train.metrics import mean_std, report
from train.run_folder import RunFolder, default_out
from train.progress import Progress
from train.scoring import eval_orders, score_split
from train.trainer import EpochLog, SeedResult, build_head, saved_logs, train_seed


@dataclass
class RunResult:
    out: Path  # the run folder
    metrics: dict  # what metrics.json holds


@dataclass
class Plan:
    """A run as planned once, under its folder's writer lock: what `train` shows and `run` trains
    (resolving the config, finding the finished seeds and loading the saved states once)."""
    cfg: TrainConfig  # resolved, `out` set
    folder: RunFolder
    done: dict[int, SeedResult]  # finished seeds, from their seed-<s>.json
    partial: dict[int, dict]  # saved states (weights, optimizer, ...) of seeds cut off mid-way

    @property
    def todo(self) -> list[int]:
        return [seed for seed in self.cfg.seeds if seed not in self.done]

    def lanes(self, jobs: int) -> int:
        """How many seeds train at once with `--jobs jobs`: never more than are left (1: in this process)."""
        return max(1, min(jobs, len(self.todo)))


@contextmanager
def planned(cfg: TrainConfig, data: cache.Data, runs_dir: Path = DEFAULT_RUNS) -> Iterator[Plan]:
    """Plan the run of `cfg` on `data` in `cfg.out` (default: in `runs_dir`, named from the config's
    hash) and hold its folder's writer lock for the block: one writer per run folder, from the first
    read of its finished seeds to the last file written. A folder of other files, or of a run with other
    settings, cache or code, is refused before anything is written."""
    cfg = cfg.resolved()
    cfg = replace(cfg, out=Path(cfg.out or default_out(cfg, runs_dir)))
    folder = RunFolder(cfg.out)
    folder.check_out()
    with folder.writer():
        done = folder.finished_seeds(cfg, data.provenance)
        yield Plan(cfg, folder, done, folder.load_states(cfg, done))


ROBUSTNESS = {"drop": ["text", "image"], "noise": [0.5, 1.0]}  # what `train --robustness` scores


def train(cfg: TrainConfig, console: Console | None = None, jobs: int = 1, threads: int | None = None,
          robust: bool = False, memory: str | int | None = None, report_to: tuple[str, ...] = (),
          runs_dir: Path = DEFAULT_RUNS) -> Path:
    """`pipeline.py train`: load the cache, train every seed with a progress bar (`jobs` seeds at a
    time in worker processes), return the run folder (`cfg.out`, else named from the settings' hash
    in `runs_dir`). `robust`: then score each seed's selected weights without each modality and
    with noise (ROBUSTNESS, into robustness.json). `memory`: the budget of each process for the
    cache in RAM (`--memory`; None: core.memory.budget's default); beyond it batches are streamed
    from the shards. `report_to`: trackers (train/tracking.py)."""
    console = console or Console()
    cfg = cfg.resolved()
    t0 = time.time()
    data = load_data(cfg, core_memory.budget(memory, jobs))
    if robust:
        robustness.check_in_memory(data)  # before any training
    # a bad --head or --text-layers fails here, before a run folder is written; "step two" shows
    # only for heads that have one
    step_two = build_head(cfg, data).has_second_step
    with planned(cfg, data, runs_dir) as plan:
        cfg = plan.cfg
        console.print(loaded_note(plan, data, time.time() - t0))
        for seed, state in plan.partial.items():
            console.print(f"seed {seed}: resuming after epoch {state['epoch']} of {cfg.epochs}")
        with plan_progress(plan, jobs, step_two).shown(console) as progress:
            result = run(plan, data, progress.epoch, progress.seed_done, t0=t0, jobs=jobs, threads=threads,
                         report_to=report_to)
        if robust:
            score_default_robustness(result.out, cfg, data)
    return result.out


def loaded_note(plan: Plan, data: cache.Data, seconds: float) -> str:
    """`train`'s first line: the splits loaded from the cache (and items left out, streaming, a resume).
    Its own function so `train` reads as its steps."""
    sizes = {s: len(v) for s, v in data.splits.items()}
    return (f"{plan.cfg.dataset}: {sizes} from the cache in {seconds:.1f} s"
            + (f" ({data.dropped} items without image left out)" if data.dropped else "")
            + (f"; streamed from the shards ({data.needs / 2**30:.2f} GiB of features, memory budget "
               f"{data.budget / 2**30:.2f} GiB per process)" if data.streamed else "")
            + (f"; resuming {plan.cfg.out}, seeds {sorted(plan.done)} already done" if plan.done else ""))


def plan_progress(plan: Plan, jobs: int, step_two: bool) -> Progress:
    """What `train` shows for `plan` (train/progress.py builds it, as for the grids): a row per seed,
    the finished seeds done earlier, and the best epoch so far of finished and resumed seeds (a
    resumed seed's earlier epochs count, as they do for the trainer)."""
    cfg = plan.cfg
    kept = {seed: state["epoch"] for seed, state in plan.partial.items()}
    progress = Progress("all seeds", {seed: f"seed {seed}" for seed in cfg.seeds},
                        dict.fromkeys(plan.todo, cfg.epochs), plan.lanes(jobs), kept, cfg.select, step_two)
    for seed, r in plan.done.items():
        progress.found_done(seed, len(r.log), cfg.epochs, r.dev, r.best_epoch)
    for seed, state in plan.partial.items():
        if state.get("best"):
            progress.found_best(seed, state["best"]["dev"], state["best"]["epoch"])
    return progress


def score_default_robustness(out: Path, cfg: TrainConfig, data: cache.Data) -> None:
    """`--robustness`: every seed's selected weights without each modality and with noise
    (ROBUSTNESS), unless robustness.json has those conditions already (a resumed grid). The caller
    holds the folder's writer lock: robustness.json is the run's last file, and a second process
    that found the run finished but unscored would score it too."""
    cfg = cfg.resolved()
    conds = robustness.conditions(cfg.head_config.reads(), ROBUSTNESS["drop"], ROBUSTNESS["noise"])
    if set(conds) - set(RunFolder(out).robustness().get("summary", {})):
        robustness.evaluate_run(out, cfg, data, conds, device())


def train_run(cfg: TrainConfig, data: cache.Data, on_epoch=lambda log: None, on_seed_end=lambda result: None,
              t0: float | None = None, jobs: int = 1, threads: int | None = None, robust: bool = False,
              dtype: torch.dtype = torch.float32, report_to: tuple[str, ...] = ()) -> RunResult:
    """The library call under every command: plan the run of `cfg` on already loaded `data` and
    train it (`run`; `robust`: then score its robustness), holding its folder's writer lock
    throughout; no UI. A grid calls it once per cell with the same `data`, so the cache is loaded once."""
    with planned(cfg, data) as plan:
        result = run(plan, data, on_epoch, on_seed_end, t0=t0, jobs=jobs, threads=threads, dtype=dtype,
                     report_to=report_to)
        if robust:
            score_default_robustness(result.out, cfg, data)
        return result


def run(plan: Plan, data: cache.Data, on_epoch=lambda log: None, on_seed_end=lambda result: None,
        t0: float | None = None, jobs: int = 1, threads: int | None = None,
        dtype: torch.dtype = torch.float32, report_to: tuple[str, ...] = ()) -> RunResult:
    """Train every seed of a plan into its folder, finished seeds kept and the unfinished ones
    resumed after their last finished epoch. Ctrl-C raises `Interrupted` saying what was kept.
    `jobs` > 1 trains the seeds in that many worker processes (`threads` each), with the same
    numbers: a seed's training depends on its seed alone (each worker loads the cache within
    `data.budget`, else streams it, as `data` was loaded). `report_to`: trackers (train/tracking.py)."""
    t0 = t0 or time.time()
    cfg, folder, done, track = plan.cfg, plan.folder, dict(plan.done), tracking.Trackers(plan.folder.path, report_to)
    if not plan.todo and folder.is_finished():
        # finished earlier (a resumed grid, `train --robustness` on a done run): its record of the
        # code, the machine and the wall time that made it stays as it is
        return RunResult(folder.path, track.finish(folder.metrics()))
    folder.write_config(cfg, data)
    resumed = [entry for state in plan.partial.values() for entry in saved_logs(state)]
    logs = folder.logs(done, resumed, cfg.protocol_check)
    for seed in done:
        folder.drop_state(seed)  # Ctrl-C came between seed-<s>.json and this
    todo = plan.todo

    def each(entry: EpochLog) -> None:
        for log in logs:
            log.add(entry)
        track.on_epoch(entry)  # before the caller's hook, which may stop the run (a pruned trial)
        on_epoch(entry)

    def finish(r: SeedResult) -> None:
        folder.save_seed(r)
        folder.drop_state(r.seed)
        track.on_seed_end(r)
        on_seed_end(r)
        done[r.seed] = r

    try:
        if (lanes := plan.lanes(jobs)) > 1:
            _train_seeds_in_pool(plan, lanes, threads, each, finish, data.budget, dtype)
        else:
            for seed in todo:
                finish(train_seed(cfg, data, seed, on_epoch=each, resume=plan.partial.get(seed),
                                  save=functools.partial(folder.save_state, seed), dtype=dtype))
    except KeyboardInterrupt:
        finished = [s for s in cfg.seeds if s in done]
        unfinished = [s for s in todo if s not in done]
        kept = folder.kept_epochs(unfinished)  # what the state files on disk hold, wherever they were written
        cut = [s for s in unfinished if kept[s]] or unfinished[:1]  # seeds with epochs kept, else the one cut
        raise Interrupted(interrupt_note(folder.path, finished, {s: kept[s] for s in cut})) from None
    results = [done[seed] for seed in cfg.seeds]
    metrics = summarize(cfg, results, data)
    orders = "the only label-blind order" if cfg.eval_orders == 1 else (
        f"the first of {cfg.eval_orders} label-blind orders; metrics.json holds the mean over the orders")
    folder.write_report("".join(
        f"seed {r.seed} (best dev epoch {r.best_epoch}), test in {orders}\n"
        + report(data.splits["test"].labels.numpy(), r.test_pred, data.classes) + "\n"
        for r in results
    ))
    metrics["wall_seconds"] = time.time() - t0
    folder.write_metrics(metrics)
    return RunResult(folder.path, track.finish(metrics))


# --- seeds in worker processes (`train --jobs N`) ---------------------------------------------

# A worker's queue to the main process, and its copy of the cache. The main process alone writes
# log.csv and shows progress, so a worker sends it each EpochLog; its saved states go straight to
# the run folder and are read from there (`RunFolder.kept_epochs`), so no other message is needed.
_WORKER: dict = {}


def _keep_queue(queue) -> None:
    _WORKER["queue"] = queue


def _seed_job(cfg: TrainConfig, folder: RunFolder, seed: int, resume: dict | None, memory: int | None,
              dtype: torch.dtype) -> SeedResult:
    """One seed in a worker: the cache is loaded once per worker; epoch logs go back to the main
    process, the resumable state after each epoch straight to the run folder."""
    if "data" not in _WORKER:
        _WORKER["data"] = load_data(cfg, memory)
    return train_seed(cfg, _WORKER["data"], seed, on_epoch=_WORKER["queue"].put, resume=resume,
                      save=functools.partial(folder.save_state, seed), dtype=dtype)


def _train_seeds_in_pool(plan: Plan, lanes: int, threads: int | None, each, finish, memory: int | None,
                         dtype: torch.dtype) -> None:
    """Train `plan.todo` in `lanes` pinned workers; the epoch logs they send are handed to `each` here,
    in the order they arrive, and a seed is finished only after its last epoch's log."""
    import multiprocessing
    import queue as queue_lib

    from core import threads as core_threads

    q = multiprocessing.get_context().Queue()
    partial = plan.partial
    seen = {seed: len(saved_logs(partial[seed])) if seed in partial else 0 for seed in plan.todo}

    def drain(wait: float) -> None:
        """Hand on everything the workers sent, waiting up to `wait` s for the first message."""
        try:
            log: EpochLog = q.get(timeout=wait)
            while True:
                seen[log.seed] += 1
                each(log)
                log = q.get_nowait()
        except queue_lib.Empty:
            pass

    pool = core_threads.worker_pool(lanes, threads, _keep_queue, (q,))
    try:
        pending = {pool.submit(_seed_job, plan.cfg, plan.folder, seed, partial.get(seed), memory, dtype): seed
                   for seed in plan.todo}
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


def summarize(cfg: TrainConfig, results: list[SeedResult], data: cache.Data) -> dict:
    """Mean and sample std over seeds; test per seed is already the mean over label-blind orders;
    `cost`: what the run took (see `run_cost`)."""
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
    out["cost"] = run_cost(cfg, results, data)
    out["select"] = cfg.select
    out["scoring"] = (f"label-blind: dev in one seeded random order, test the mean over {cfg.eval_orders} "
                      f"seeded random orders (eval_seed {cfg.eval_seed}, batches of {cfg.eval_batch_size})")
    return out


def run_cost(cfg: TrainConfig, results: list[SeedResult], data: cache.Data) -> dict:
    """What a run cost: the median train seconds per epoch over every seed's epochs, the peak
    resident memory (this process, and the largest --jobs worker, from getrusage), the head's
    trainable parameters, the device, and whether the cache was streamed from the shards."""
    seconds = [log.seconds for r in results for log in r.log]
    rss = core_memory.peak_rss()
    with torch.random.fork_rng(devices=[]):  # building a head draws its initial weights: leave the streams alone
        head = build_head(cfg, data)
    return {"seconds_per_epoch_median": float(np.median(seconds)) if seconds else None,
            "peak_rss_bytes": max(rss.values()), "peak_rss_main_bytes": rss["self"],
            "peak_rss_workers_bytes": rss["children"], "device": str(device()),
            "trainable_parameters": sum(p.numel() for p in head.parameters() if p.requires_grad),
            "cache_streamed": data.streamed}


def summarize_protocol(per_seed: list[dict], seeds: list[int]) -> dict:
    """`--protocol-check` over seeds (mean and sample std of each seed's `scoring.protocol_check`):
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


def evaluate(run: Path, cache_dir: Path | None = None, seed: int | None = None, drop: list[str] = (),
             noise: list[float] = ()) -> dict:
    """Recompute test metrics from the checkpoints (every seed's, or `seed`'s) and the cache; compare
    with metrics.json. With `drop`/`noise`, also score the robustness conditions (train/robustness.py)
    into robustness.json."""
    folder = RunFolder(run)
    _, cfg, data = folder.open(cache_dir)
    if seed is not None and seed not in cfg.seeds:
        raise UserError(f"--seed {seed}: run {run} has seeds {', '.join(map(str, cfg.seeds))}")
    test = data.splits["test"]
    per_seed = []
    for one in cfg.seeds if seed is None else (seed,):
        head = folder.load_head(cfg, data.dims, one)
        scores, _ = score_split(head, test, cfg, data.dims.n_classes, device(), eval_orders(len(test), cfg))
        per_seed.append({"seed": one, **{m: scores[m] for m in METRICS}})
    result = {"test": {m: mean_std([p[m] for p in per_seed]) for m in METRICS}, "per_seed": per_seed}
    if folder.is_finished():
        by_seed = {r["seed"]: r for r in folder.metrics()["per_seed"]}
        result["matches_metrics_json"] = all(
            p["seed"] in by_seed and abs(p[m] - by_seed[p["seed"]]["test"][m]) < 1e-9 for p in per_seed for m in METRICS
        )
    if drop or noise:
        with folder.writer():  # robustness.json: one writer, as for training
            result["robustness"] = score_robustness(folder.path, cfg, data, list(drop), list(noise))
    return result


def score_robustness(run: Path, cfg: TrainConfig, data: cache.Data, drop: list[str], noise: list[float]) -> dict:
    """The robustness conditions asked for, scored on every seed: condition -> metric -> mean/std."""
    reads = cfg.head_config.reads()
    bad = [d for d in drop if d not in robustness.DROPS]
    if bad:
        raise UserError(f"--drop {bad[0]}: give text or image")
    if any(not 0 <= s < float("inf") for s in noise):  # NaN fails the comparison too
        raise UserError("--noise: give a finite SIGMA >= 0 (in train stds)")
    useless = [d for d in drop if d not in reads or len(reads) < 2]
    if useless:
        raise UserError(f"--drop {useless[0]}: this {cfg.head} run reads {', '.join(reads)}; a modality can be dropped "
                        "only from a head that reads both")
    conds = robustness.conditions(reads, drop, noise)
    return {k: v for k, v in robustness.evaluate_run(run, cfg, data, conds, device())["summary"].items() if k in conds}
