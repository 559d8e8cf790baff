#!/usr/bin/env python
"""Stage two from a cache larger than memory -> bench/results/scale.json (+ .md).

In one run, on synthetic caches written with the store's own writer (bench/synth_cache.py,
bert-base + ResNet-50 shapes by default):
  (a) a big cache of at least twice the memory budget, trained with `--memory BUDGET`
      (streamed from the shards): peak RSS against the budget, s/epoch;
  (b) a cache that fits: the same training in RAM and streamed (`--memory 1`), s/epoch of
      each and their ratio (target: streamed <= 1.25x), and the same numbers both ways;
  (c) the raw read rate of the store's indexed reader (items/s, random batches of 64);
  (d) what that means for TumEmo (~195k items): bytes, and s/epoch grown linearly from (a).
Every training is `pipeline.py train` in its own process (so its peak RSS is its own),
reading cost from its metrics.json. The page cache may hold part of the big cache (reads
are then warm): the machine's memory and the cache's size are recorded beside the figures.

    python bench/scale.py                                        # 8 GiB against a 3 GiB budget (needs ~9 GB disk)
    python bench/scale.py --big-gib 0.05 --budget 20M --fits-items 120 --epochs 1   # smoke run, ~a minute
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import synth_cache  # noqa: E402
from bench.common import cli, out_file, save  # noqa: E402
from core import memory, store  # noqa: E402
from train.run_folder import RunFolder  # noqa: E402  (a run folder is read there alone)

TUMEMO_ITEMS = 195_000


def train(cache_dir: Path, dataset: str, out: Path, budget: str, epochs: int, threads: int | None,
          seeds: str = "1") -> dict:
    """`pipeline.py train` in its own process; its metrics.json cost and config."""
    cmd = [sys.executable, str(REPO / "pipeline.py"), "train", "--cache-dir", str(cache_dir), "--dataset", dataset,
           "--text-encoder", synth_cache.TEXT_ENCODER, "--image-encoder", synth_cache.IMAGE_ENCODER,
           "--epochs", str(epochs), "--patience", "0", "--seeds", seeds, "--jobs", "1", "--eval-orders", "1",
           "--memory", budget, "--out", str(out)] + (["--threads", str(threads)] if threads else [])
    t0 = time.time()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    folder = RunFolder(out)
    metrics = folder.metrics()
    shown = " ".join(cmd[1:]).replace(str(REPO) + "/", "").replace(str(cache_dir.parent), "<work-dir>")
    return {"command": shown, "wall_seconds": time.time() - t0, "cost": metrics["cost"],
            "test": {m: metrics["test"][m]["mean"] for m in ("accuracy", "weighted_f1", "macro_f1")},
            "log": _without_seconds(folder.log_rows())}


def read_rate(cache_dir: Path, dataset: str, batches: int, batch_size: int = 64, seed: int = 0) -> dict:
    """Items/s of the store's indexed readers (text and image of each item), random batches."""
    text = store.ItemReader(store.cache_folder(cache_dir, dataset, store.TEXT, synth_cache.TEXT_ENCODER))
    image = store.ItemReader(store.cache_folder(cache_dir, dataset, store.IMAGE, synth_cache.IMAGE_ENCODER))
    rng = np.random.default_rng(seed)
    idx = [rng.choice(len(text), min(batch_size, len(text)), replace=False) for _ in range(batches)]
    t0 = time.perf_counter()
    for b in idx:
        text.text(b)
    t_text = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in idx:
        image.maps(b)
    t_image = time.perf_counter() - t0
    n = sum(len(b) for b in idx)
    return {"items": n, "text_items_per_s": n / t_text, "image_items_per_s": n / t_image,
            "items_per_s": n / (t_text + t_image)}


def markdown(r: dict) -> str:
    big, fits, reads, est = r["big"], r["fits"], r["reads"], r["tumemo"]
    gib = 2 ** 30
    lines = [
        f"Synthetic caches ({r['shapes']} shapes), `pipeline.py train`, {r['epochs']} epoch(s), device "
        f"{big['train']['cost']['device']}; machine: {r['machine']['memory_gib']:.1f} GiB RAM, "
        f"{r['machine']['cores']} cores.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| big cache: features in memory (float16) / on disk | {big['cache']['memory_bytes'] / gib:.2f} / "
        f"{big['cache']['disk_bytes'] / gib:.2f} GiB ({big['cache']['items']} items) |",
        f"| memory budget (`--memory`) | {r['budget_bytes'] / gib:.2f} GiB (cache = "
        f"{big['cache']['memory_bytes'] / r['budget_bytes']:.1f}x the budget) |",
        f"| big cache, streamed: peak RSS | {big['train']['cost']['peak_rss_bytes'] / gib:.2f} GiB "
        f"({'within' if big['train']['cost']['peak_rss_bytes'] <= r['budget_bytes'] else 'OVER'} the budget) |",
        f"| big cache, streamed: s/epoch (median) | {big['train']['cost']['seconds_per_epoch_median']:.2f} |",
        f"| cache that fits ({fits['cache']['items']} items): s/epoch in RAM / streamed | "
        f"{fits['ram']['cost']['seconds_per_epoch_median']:.2f} / {fits['streamed']['cost']['seconds_per_epoch_median']:.2f}"
        f" (**{fits['ratio']:.2f}x**, target <= 1.25x) |",
        f"| same log.csv and test metrics in RAM and streamed | {'yes' if fits['identical'] else 'NO'} |",
        f"| peak RSS in RAM / streamed (cache that fits) | {fits['ram']['cost']['peak_rss_bytes'] / gib:.2f} / "
        f"{fits['streamed']['cost']['peak_rss_bytes'] / gib:.2f} GiB |",
        f"| indexed reader, random batches of 64 | {reads['items_per_s']:.0f} items/s (text {reads['text_items_per_s']:.0f}, "
        f"image {reads['image_items_per_s']:.0f}) |",
        f"| TumEmo ({TUMEMO_ITEMS:,} items): features in memory | {est['memory_bytes'] / gib:.0f} GiB |",
        f"| TumEmo: s/epoch streamed, grown linearly from the big cache | {est['seconds_per_epoch']:.0f} s "
        f"(reading alone: {est['read_seconds']:.0f} s) |",
    ]
    return "\n".join(lines) + "\n"


@cli
def main() -> None:
    args = arguments()
    out_file(args.out)
    shapes = synth_cache.SHAPES[args.shapes]
    per_item = synth_cache.item_bytes(shapes)
    big_items = max(50, int(args.big_gib * 2 ** 30 / per_item))
    if args.write_only and not args.work_dir:
        raise SystemExit("--write-only needs --work-dir (where the caches are kept for the measuring run)")
    keep = args.work_dir is not None
    work = work_folder(args.work_dir, 1.1 * (big_items + args.fits_items) * per_item)
    try:
        print(f"writing the big cache: {big_items} items (~{big_items * per_item / 2**30:.2f} GiB)")
        big_cache = synth_cache.write(work / "cache", "synth-big", big_items, shapes)
        print(f"writing the cache that fits: {args.fits_items} items")
        fits_cache = synth_cache.write(work / "cache", "synth-fits", args.fits_items, shapes, seed=1)
        for c in (big_cache, fits_cache):  # no path of this machine in the results
            c["cache_dir"] = "<work-dir>/cache"
        if args.write_only:
            return
        result = measure(args, work, big_cache, fits_cache, big_items, per_item)
        save(args.out, result, markdown(result))
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


def arguments() -> argparse.Namespace:
    """The command line (its own function: `main` reads as the benchmark's steps)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-gib", type=float, default=8.0, help="size of the big cache's features in memory")
    ap.add_argument("--budget", default="3G", help="--memory of the streamed run on the big cache")
    ap.add_argument("--fits-items", type=int, default=3000, help="items of the cache that fits (RAM vs streamed)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--shapes", choices=sorted(synth_cache.SHAPES), default="paper")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of each training [default: the CLI's]")
    ap.add_argument("--read-batches", type=int, default=50)
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where the caches and runs go, kept, and caches already there reused (write them with "
                         "--write-only while the cores are busy, measure later) [default: a temp folder, removed]")
    ap.add_argument("--write-only", action="store_true", help="write the caches into --work-dir and stop")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    return ap.parse_args()


def work_folder(work_dir: Path | None, need: float) -> Path:
    """`--work-dir` (else a temp folder), without the runs of an earlier measurement (its caches are
    reused), refused now if its disk has not `need` bytes free: before hours of cache writing."""
    work = work_dir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "runs", ignore_errors=True)  # runs of an earlier measurement; caches are reused
    if shutil.disk_usage(work).free < need:
        raise SystemExit(f"{work}: {need / 2**30:.1f} GiB of disk needed, {shutil.disk_usage(work).free / 2**30:.1f} free")
    return work


def measure(args: argparse.Namespace, work: Path, big_cache: dict, fits_cache: dict, big_items: int,
            per_item: int) -> dict:
    """(a) to (d) of the module's docstring on the caches written in `work`: what scale.json holds."""
    print("training from the big cache, streamed")
    big = train(work / "cache", "synth-big", work / "runs" / "big", args.budget, args.epochs, args.threads)
    print("training from the cache that fits, in RAM and streamed")
    ram = train(work / "cache", "synth-fits", work / "runs" / "ram", str(1 << 50), args.epochs, args.threads)
    streamed = train(work / "cache", "synth-fits", work / "runs" / "streamed", "1", args.epochs, args.threads)
    assert big["cost"]["cache_streamed"] and streamed["cost"]["cache_streamed"] and not ram["cost"]["cache_streamed"]
    identical = ram["test"] == streamed["test"] and ram["log"] == streamed["log"]
    print("reading")
    reads = read_rate(work / "cache", "synth-big", args.read_batches)
    spe = big["cost"]["seconds_per_epoch_median"]
    return {
        "shapes": args.shapes, "epochs": args.epochs, "budget_bytes": memory.parse_size(args.budget),
        "machine": {"python": platform.python_version(), "memory_gib": os.sysconf("SC_PAGE_SIZE")
                    * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, "available_gib": memory.available() / 2 ** 30,
                    "cores": len(os.sched_getaffinity(0))},
        "big": {"cache": big_cache, "train": {k: v for k, v in big.items() if k != "log"}},
        "fits": {"cache": fits_cache, "ram": {k: v for k, v in ram.items() if k != "log"},
                 "streamed": {k: v for k, v in streamed.items() if k != "log"},
                 "ratio": streamed["cost"]["seconds_per_epoch_median"] / ram["cost"]["seconds_per_epoch_median"],
                 "identical": identical},
        "reads": reads,
        "tumemo": {"items": TUMEMO_ITEMS, "memory_bytes": TUMEMO_ITEMS * per_item,
                   "seconds_per_epoch": spe * TUMEMO_ITEMS / big_items,
                   "read_seconds": TUMEMO_ITEMS * 0.9 / reads["items_per_s"],  # train + dev, the 8:1:1 split
                   "note": "linear in items: an epoch reads and trains on every train and dev item once; "
                           "streamed, the slower of the head and the reader sets the pace"},
    }


def _without_seconds(rows: list[dict]) -> list[dict]:
    """log.csv rows without the one column that differs between identical runs."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


if __name__ == "__main__":
    main()
