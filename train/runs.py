"""A run folder: what `train` writes and what `eval` reads back.

    runs/<name>/config.json    the TrainConfig as used (with the head's own config), cache provenance,
                               dims, classes, git commit and whether the working tree was dirty
    runs/<name>/metrics.json   dev/test accuracy, weighted F1, macro F1 as mean/std (sample std, ddof=1)
                               over seeds + per seed; test is label-blind (mean over eval orders);
                               leak_check: the same weights scored in file order (batch-scope heads)
                               protocol_check: --protocol-check's last and best file-order epochs
    runs/<name>/log.csv        one row per seed and epoch: lr, each loss term by name, step-two rate, dev
    runs/<name>/protocol.csv   --protocol-check: one row per seed and epoch, test scored in file order
                               (never used for selection; summed up in metrics.json protocol_check)
    runs/<name>/seed-<s>.pt    the dev-selected weights (a plain state dict: loads with weights_only)
    runs/<name>/seed-<s>.state.pt  while seed s trains: its resumable state after the last finished epoch
                               (weights, optimizer, scheduler, random streams, best epoch, logs; plain
                               tensors and numbers, loads with weights_only); deleted when the seed ends
    runs/<name>/report.txt     per-class report and confusion matrix of each seed on test
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import heads
from core.device import device
from core.errors import Interrupted, UserError
from core.paths import DEFAULT_RUNS, REPO
from train import data as cache
from train.config import METRICS, TrainConfig
from train.fingerprint import code_fingerprint
from train.metrics import mean_std, report
from train.progress import EpochClock, EtaColumn
from train.trainer import SeedResult, build_head, eval_orders, saved_logs, score_split, train_seed


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> bool:
    """Uncommitted changes to tracked code: the commit alone does not say what ran."""
    return bool(_git("status", "--porcelain", "--untracked-files=no"))


def modalities(cfg: TrainConfig) -> str:
    """Which caches the head reads: its config says, the trainer loads only those."""
    reads = (cfg.head_config or heads.build_config(cfg.head)).reads()
    return "both" if len(reads) == 2 else reads[0]


def load_data(cfg: TrainConfig) -> cache.Data:
    return cache.load(cfg.cache_dir, cfg.dataset, modalities(cfg), cfg.text_encoder, cfg.image_encoder,
                      split_files=cfg.splits, text_views=cfg.text_views)


@dataclass
class RunResult:
    out: Path  # the run folder
    metrics: dict  # what metrics.json holds


def config_hash(cfg: TrainConfig) -> str:
    """8 hex digits naming a configuration (the output folder aside): two grid cells started in
    the same second never collide, and the same configuration finds its folder again to resume."""
    body = {k: v for k, v in cfg.to_json().items() if k != "out"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]


def default_out(cfg: TrainConfig, runs_dir: Path = DEFAULT_RUNS) -> Path:
    return Path(runs_dir) / f"{cfg.dataset}-{cfg.head}-{config_hash(cfg)}"


def train(cfg: TrainConfig, console: Console | None = None) -> Path:
    """`pipeline.py train`: load the cache, train every seed with a progress bar, return the run folder."""
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

        result = train_run(cfg, data, on_epoch, on_seed_end, t0=t0)
    return result.out


def train_run(cfg: TrainConfig, data: cache.Data, on_epoch=lambda log: None, on_seed_end=lambda result: None,
              t0: float | None = None) -> RunResult:
    """The library call under every command: train every seed of `cfg` on already loaded `data`
    into `cfg.out` (default: named from the config's hash), resuming finished seeds and the
    unfinished one after its last finished epoch; no UI. Ctrl-C raises `Interrupted` saying what
    was kept. A grid calls it once per cell with the same `data`, so the cache is loaded once."""
    t0 = t0 or time.time()
    cfg = cfg.resolved()
    out = Path(cfg.out or default_out(cfg))
    cfg = replace(cfg, out=out)
    done = finished_seeds(out, cfg, data.provenance)
    partial = unfinished_seeds(out, cfg, done)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {s: len(v) for s, v in data.splits.items()}
    (out / "config.json").write_text(json.dumps({
        "train": cfg.to_json(), "official_changes": cfg.official_changes(), "provenance": data.provenance,
        "dims": asdict(data.dims), "classes": data.classes, "sizes": sizes, "git_commit": git_commit(),
        "git_dirty": git_dirty(), "code_fingerprint": code_fingerprint(), "device": str(device()),
    }, indent=1))
    resumed = [entry for state in partial.values() for entry in saved_logs(state)]
    logs = [LogCsv(out / "log.csv", done, resumed)]
    if cfg.protocol_check:
        logs.append(ProtocolCsv(out / "protocol.csv", done, resumed))
    results: list[SeedResult] = []
    kept = {seed: state["epoch"] for seed, state in partial.items()}  # the last saved epoch of each seed
    for seed in cfg.seeds:
        if seed in done:
            state_path(out, seed).unlink(missing_ok=True)  # Ctrl-C came between seed-<s>.json and this
            results.append(done[seed])
            continue

        def each(entry):
            for log in logs:
                log.add(entry)
            on_epoch(entry)

        def save(state, seed=seed):
            save_atomic(state, state_path(out, seed))
            kept[seed] = state["epoch"]

        try:
            r = train_seed(cfg, data, seed, on_epoch=each, resume=partial.get(seed), save=save)
        except KeyboardInterrupt:
            finished = [s for s in cfg.seeds if s in done or s in {r.seed for r in results}]
            raise Interrupted(interrupt_note(out, finished, seed, kept.get(seed, 0))) from None
        torch.save(r.state, out / f"seed-{seed}.pt")
        (out / f"seed-{seed}.json").write_text(json.dumps({k: getattr(r, k) for k in SEED_FIELDS}))  # last: done
        state_path(out, seed).unlink(missing_ok=True)
        on_seed_end(r)
        results.append(r)
    metrics = summarize(cfg, results)
    (out / "report.txt").write_text("".join(
        f"seed {r.seed} (best dev epoch {r.best_epoch}), test\n"
        + report(data.splits["test"].labels.numpy(), r.test_pred, data.classes) + "\n"
        for r in results
    ))
    metrics["wall_seconds"] = time.time() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return RunResult(out, metrics)


def interrupt_note(out: Path, finished: list[int], seed: int, epoch: int) -> str:
    """The one line Ctrl-C prints: what of the run in `out` is kept, and how to continue."""
    kept = [f"seed{'s' * (len(finished) > 1)} {', '.join(map(str, finished))} finished"] if finished else []
    kept.append(f"epoch {epoch} of seed {seed} kept" if epoch else f"seed {seed} starts over")
    return f"{out}: {' and '.join(kept)}; run the same command to continue"


SEED_FIELDS = ("seed", "best_epoch", "dev", "test", "step_two_rate", "test_pred", "leak_check", "last_epoch_test",
               "protocol_check")


class LogCsv:
    """log.csv: one row per seed and epoch, a `loss_<name>` column per term the head returned.

    A head's terms are known only as it trains (a gated step may first fire in epoch 7), so a
    new column rewrites the file with the wider header; otherwise a row is appended and flushed.
    """

    def __init__(self, path: Path, done: dict, resumed: list):
        """Keeps the finished seeds' rows; an unfinished seed's rows are rewritten from the
        `resumed` epoch logs of its saved state (the file may hold an epoch the state does not)."""
        self.path = path
        self.rows: list[dict] = []
        if done and path.is_file():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if r["seed"] and int(r["seed"]) in done]
        self.rows += [self._row(log) for log in resumed]
        self.header: list[str] = []
        self._rewrite()

    @staticmethod
    def _row(log) -> dict:
        return {"seed": log.seed, "epoch": log.epoch, "lr": f"{log.lr:.3g}",
                **{f"loss_{k}": f"{v:.4f}" for k, v in log.losses.items()},
                "step_two_rate": f"{log.step_two_rate:.3f}", "seconds": f"{log.seconds:.2f}",
                **{f"dev_{m}": f"{log.dev[m]:.4f}" for m in METRICS}}

    def add(self, log) -> None:
        row = self._row(log)
        self.rows.append(row)
        if set(row) - set(self.header):
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.header, restval="").writerow(row)

    @staticmethod
    def _header(keys: set[str]) -> list[str]:
        losses = sorted(k for k in keys if k.startswith("loss_"))
        return ["seed", "epoch", "lr", *losses, "step_two_rate", "seconds", *(f"dev_{m}" for m in METRICS)]

    def _rewrite(self) -> None:
        self.header = self._header({k for r in self.rows for k in r})
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.header, restval="")
            w.writeheader()
            w.writerows(self.rows)
        tmp.replace(self.path)


class ProtocolCsv(LogCsv):
    """protocol.csv (`--protocol-check`): test scored in file order after every epoch, one row per
    seed and epoch, kept and rebuilt on resume as log.csv is. Nothing reads it to select."""

    @staticmethod
    def _row(log) -> dict:
        return {"seed": log.seed, "epoch": log.epoch,
                **{f"test_file_order_{m}": f"{log.test_file_order[m]:.4f}" for m in METRICS}}

    @staticmethod
    def _header(keys: set[str]) -> list[str]:
        return ["seed", "epoch", *(f"test_file_order_{m}" for m in METRICS)]


def finished_seeds(out: Path, cfg: TrainConfig, provenance: dict) -> dict[int, SeedResult]:
    """Seeds a previous, interrupted `train --out` of the same configuration completed.

    Resuming is per seed: a seed is done once its checkpoint and `seed-<s>.json` exist.
    A folder that holds another configuration, features from a rebuilt cache or another
    commit of the code is refused rather than mixed.
    """
    diff = mismatch(out, cfg, provenance)
    if diff:
        raise UserError(f"{out} holds a run with other settings ({'; '.join(diff)}): "
                        "pass another --out, or the same options, cache and code to resume it")
    done = {}
    for seed in cfg.seeds:
        js, pt = out / f"seed-{seed}.json", out / f"seed-{seed}.pt"
        if js.is_file() and pt.is_file():
            done[seed] = SeedResult(state={}, log=[], **json.loads(js.read_text()))
    return done


def state_path(out: Path, seed: int) -> Path:
    """A seed's resumable state after its last finished epoch (deleted once the seed is done)."""
    return out / f"seed-{seed}.state.pt"


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: Ctrl-C never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def unfinished_seeds(out: Path, cfg: TrainConfig, done: dict) -> dict[int, dict]:
    """The saved states of seeds that were cut off mid-way (checked like finished seeds, by
    `finished_seeds`, whose settings check covers the whole folder)."""
    return {seed: torch.load(state_path(out, seed), map_location=device(), weights_only=True)
            for seed in cfg.seeds if seed not in done and state_path(out, seed).is_file()}


def epochs_done(out: Path, cfg: TrainConfig) -> tuple[int, int]:
    """(epochs trained, epochs `--patience` skipped) of the run in `out`, from its files alone,
    so a grid can follow runs in other processes: log.csv rows of finished seeds and of a seed
    with a saved state."""
    if not (out / "log.csv").is_file():
        return 0, 0
    with open(out / "log.csv", newline="") as f:
        rows = Counter(r["seed"] for r in csv.DictReader(f))
    trained = skipped = 0
    for seed in cfg.seeds:
        n = rows[str(seed)]
        if (out / f"seed-{seed}.json").is_file():
            trained, skipped = trained + n, skipped + cfg.epochs - n
        elif state_path(out, seed).is_file():
            trained += n
    return trained, skipped


def mismatch(out: Path, cfg: TrainConfig, provenance: dict | None = None) -> list[str]:
    """What differs between the run already in `out` and `cfg` (settings, code commit and, given
    the loaded cache's provenance, the cache): a run is only ever resumed by what started it."""
    config = out / "config.json"
    if not config.is_file():
        return []
    saved = json.loads(config.read_text())
    before, now = saved.get("train", {}), cfg.to_json()
    diff = [k for k in now if k != "out" and before.get(k) != now[k]]
    if provenance is not None:
        diff += [f"{kind} cache ({', '.join(k for k in p if p[k] != provenance.get(kind, {}).get(k))})"
                 for kind, p in saved.get("provenance", {}).items() if p != provenance.get(kind)]
    if saved.get("git_commit") not in (None, git_commit()):
        diff.append(f"code (commit {saved['git_commit'][:10]}, now {git_commit()[:10]})")
    return diff


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


def load_head(run: Path, cfg: TrainConfig, data: cache.Data, seed: int):
    """Seed `seed`'s dev-selected head of run folder `run`, in eval mode."""
    path = Path(run) / f"seed-{seed}.pt"
    if not path.is_file():
        raise UserError(f"{path} missing: the run was interrupted or files were removed; train again")
    head = build_head(cfg, data).to(device())
    head.load_state_dict(torch.load(path, map_location=device(), weights_only=True))
    return head.eval()


def open_run(run: Path, cache_dir: Path | None = None) -> tuple[dict, TrainConfig, cache.Data]:
    """config.json, the TrainConfig rebuilt from it and the cache it was trained on, refused with
    the difference spelled out if the cache was rebuilt since (eval, report and predict read runs so)."""
    run = Path(run)
    if not (run / "config.json").is_file():
        raise UserError(f"{run} is not a run folder (no config.json): pass --run runs/<name>")
    saved = json.loads((run / "config.json").read_text())
    cfg = TrainConfig.from_json(saved["train"])
    if cache_dir is not None:
        cfg.cache_dir = Path(cache_dir)
    data = load_data(replace(cfg, text_views=False))  # test is scored on the clean states only
    for kind, prov in saved["provenance"].items():
        now = data.provenance.get(kind, {})
        diff = [k for k in prov if prov[k] != now.get(k)]
        if diff:
            raise UserError(
                f"the {kind} cache in {cfg.cache_dir} differs from the one this run was trained on "
                f"({', '.join(diff)}): re-extract with `python pipeline.py extract {cache.extract_source(cfg.dataset)} "
                f"--{kind}-encoder {prov['encoder']}` or pass the right --cache-dir"
            )
    return saved, cfg, data


def evaluate(run: Path, cache_dir: Path | None = None) -> dict:
    """Recompute test metrics from the checkpoints and the cache; compare with metrics.json."""
    run = Path(run)
    saved, cfg, data = open_run(run, cache_dir)
    test = data.splits["test"]
    per_seed = []
    for seed in cfg.seeds:
        head = load_head(run, cfg, data, seed)
        s, _ = score_split(head, test, cfg, data.dims.n_classes, device(), eval_orders(len(test), cfg))
        per_seed.append({"seed": seed, **{m: s[m] for m in METRICS}})
    result = {"test": {m: mean_std([p[m] for p in per_seed]) for m in METRICS}, "per_seed": per_seed}
    if (run / "metrics.json").is_file():
        recorded = json.loads((run / "metrics.json").read_text())
        result["matches_metrics_json"] = all(
            abs(p[m] - r["test"][m]) < 1e-9 for p, r in zip(per_seed, recorded["per_seed"]) for m in METRICS
        )
    return result
