"""A run folder: what `train` writes and what `eval` reads back.

    runs/<name>/config.json    the TrainConfig as used, cache provenance, dims, classes, git commit
    runs/<name>/metrics.json   dev/test accuracy, weighted F1, macro F1 as mean/std over seeds + per seed
    runs/<name>/log.csv        one row per seed and epoch: losses, step-two firing rate, dev metrics
    runs/<name>/seed-<s>.pt    the dev-selected weights (a plain state dict: loads with weights_only)
    runs/<name>/report.txt     per-class report and confusion matrix of each seed on test
"""

from __future__ import annotations

import csv
import json
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core.device import device
from core.errors import UserError
from core.paths import DEFAULT_RUNS, REPO
from train import data as cache
from train.config import METRICS, TrainConfig
from train.metrics import mean_std, report, scores
from train.trainer import SeedResult, build_head, predict, train_seed


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_data(cfg: TrainConfig) -> cache.Data:
    return cache.load(cfg.cache_dir, cfg.dataset, cfg.modalities, cfg.text_encoder, cfg.image_encoder,
                      cfg.text_views)


def train(cfg: TrainConfig, console: Console | None = None) -> Path:
    """Train every seed, write the run folder, return its path."""
    console = console or Console()
    cfg = cfg.resolved()
    t0 = time.time()
    data = load_data(cfg)
    build_head(cfg, data)  # a bad --head or --text-layers fails here, before a run folder is written
    out = Path(cfg.out or DEFAULT_RUNS / f"{cfg.dataset}-{cfg.head}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = replace(cfg, out=out)
    done = finished_seeds(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {s: len(v) for s, v in data.splits.items()}
    console.print(f"{cfg.dataset}: {sizes} from the cache in {time.time() - t0:.1f} s"
                  + (f" ({data.dropped} items without image left out)" if data.dropped else "")
                  + (f"; resuming {out}, seeds {sorted(done)} already done" if done else ""))
    (out / "config.json").write_text(json.dumps({
        "train": cfg.to_json(), "provenance": data.provenance, "dims": asdict(data.dims),
        "classes": data.classes, "sizes": sizes, "git_commit": git_commit(), "device": str(device()),
    }, indent=1))
    kept = _log_rows(out / "log.csv", done)
    results: list[SeedResult] = []
    with open(out / "log.csv", "w", newline="") as f, Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"), console=console,
    ) as progress:
        writer = csv.writer(f)
        writer.writerow(LOG_HEADER)
        writer.writerows(kept)
        for seed in cfg.seeds:
            if seed in done:
                progress.add_task(f"seed {seed}", total=cfg.epochs, completed=cfg.epochs, status="done earlier")
                results.append(done[seed])
                continue
            task = progress.add_task(f"seed {seed}", total=cfg.epochs, status="")
            best = {"v": -1.0, "e": 0}

            def on_epoch(log, task=task, best=best):
                writer.writerow([log.seed, log.epoch, f"{log.lr:.3g}", f"{log.loss_ce:.4f}", f"{log.loss_intra:.4f}",
                                 f"{log.loss_step_two:.4f}", f"{log.step_two_rate:.3f}", f"{log.seconds:.2f}",
                                 *(f"{log.dev[m]:.4f}" for m in METRICS)])
                f.flush()
                if log.dev[cfg.select] > best["v"]:
                    best.update(v=log.dev[cfg.select], e=log.epoch)
                progress.update(task, advance=1, status=(
                    f"ce {log.loss_ce:.3f}  intra {log.loss_intra:.3f}  step two {log.step_two_rate:.0%}  "
                    f"dev {cfg.select} {log.dev[cfg.select]:.4f} (best {best['v']:.4f} @ {best['e']})  "
                    f"{log.seconds:.1f} s/epoch"))

            r = train_seed(cfg, data, seed, on_epoch)
            torch.save(r.state, out / f"seed-{seed}.pt")
            (out / f"seed-{seed}.json").write_text(json.dumps(  # written last: marks the seed as done
                {k: getattr(r, k) for k in ("seed", "best_epoch", "dev", "test", "step_two_rate", "test_pred")}))
            results.append(r)
    metrics = summarize(cfg, results)
    (out / "report.txt").write_text("".join(
        f"seed {r.seed} (best dev epoch {r.best_epoch}), test\n"
        + report(data.splits["test"].labels.numpy(), r.test_pred, data.classes) + "\n"
        for r in results
    ))
    metrics["wall_seconds"] = time.time() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return out


LOG_HEADER = ["seed", "epoch", "lr", "loss_ce", "loss_intra", "loss_step_two", "step_two_rate", "seconds",
              *(f"dev_{m}" for m in METRICS)]


def finished_seeds(out: Path, cfg: TrainConfig) -> dict[int, SeedResult]:
    """Seeds a previous, interrupted `train --out` of the same configuration completed.

    Resuming is per seed: a seed is done once its checkpoint and `seed-<s>.json` exist.
    A folder that holds another configuration is refused rather than mixed.
    """
    config = out / "config.json"
    if not config.is_file():
        return {}
    before = json.loads(config.read_text()).get("train", {})
    now = cfg.to_json()
    diff = [k for k in now if k != "out" and before.get(k) != now[k]]
    if diff:
        raise UserError(f"{out} holds a run with other settings ({', '.join(diff)}): "
                        "pass another --out, or the same options to resume it")
    done = {}
    for seed in cfg.seeds:
        js, pt = out / f"seed-{seed}.json", out / f"seed-{seed}.pt"
        if js.is_file() and pt.is_file():
            done[seed] = SeedResult(state={}, log=[], **json.loads(js.read_text()))
    return done


def _log_rows(path: Path, done: dict) -> list[list[str]]:
    """Rows of the finished seeds from an earlier log (an unfinished seed starts over)."""
    if not done or not path.is_file():
        return []
    with open(path, newline="") as f:
        return [row for row in list(csv.reader(f))[1:] if row and int(row[0]) in done]


def summarize(cfg: TrainConfig, results: list[SeedResult]) -> dict:
    out = {}
    for split in ("dev", "test"):
        out[split] = {m: mean_std([getattr(r, split)[m] for r in results]) for m in METRICS}
    out["per_seed"] = [
        {"seed": r.seed, "best_epoch": r.best_epoch, "test": {m: r.test[m] for m in METRICS},
         "dev": {m: r.dev[m] for m in METRICS}, "per_class_f1": r.test["per_class_f1"],
         "step_two_rate": r.step_two_rate}
        for r in results
    ]
    out["select"] = cfg.select
    return out


def evaluate(run: Path, cache_dir: Path | None = None) -> dict:
    """Recompute test metrics from the checkpoints and the cache; compare with metrics.json."""
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
    test = data.splits["test"]
    per_seed = []
    for seed in cfg.seeds:
        path = run / f"seed-{seed}.pt"
        if not path.is_file():
            raise UserError(f"{path} missing: the run was interrupted or files were removed; train again")
        head = build_head(cfg, data).to(device())
        head.load_state_dict(torch.load(path, map_location=device(), weights_only=True))
        pred = predict(head, test, cfg.batch_size, device())
        per_seed.append({"seed": seed, **scores(test.labels.numpy(), pred, data.dims.n_classes)})
    result = {"test": {m: mean_std([p[m] for p in per_seed]) for m in METRICS}, "per_seed": per_seed}
    if (run / "metrics.json").is_file():
        recorded = json.loads((run / "metrics.json").read_text())
        result["matches_metrics_json"] = all(
            abs(p[m] - r["test"][m]) < 1e-9 for p, r in zip(per_seed, recorded["per_seed"]) for m in METRICS
        )
    return result
