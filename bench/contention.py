#!/usr/bin/env python
"""Sharing the machine -> bench/results/contention.json (+ .md), everything in one run.

  (1) s/epoch of `pipeline.py train` (SPP-SCL head, MVSA-Single cache) alone, with one
      identical `train` beside it, and with two, under torch's own defaults (the old
      behaviour, forced by `SPP_THREADS=legacy`: one process, torch's threads, OpenMP
      workers that spin while they wait) and under the project's defaults
      (`core/threads.py`: one process per core for the seeds, one thread each; a process
      with several threads spins only briefly);
  (2) the grid split: cells per hour of the same `sweep` as one job with every core's
      threads (`--jobs 1 --threads N`) and as N one-thread jobs (`--jobs N --threads 1`).

s/epoch of a `train` = wall seconds per epoch it trains: per seed, the sum of its log.csv
epoch seconds after the first (the first overlaps the cache loading of its neighbours),
the longest of its seeds (they train side by side) divided by those epochs of all seeds.
The old behaviour trains seeds one after the other, so one seed tells its s/epoch; the
new default trains two seeds at once (`--seeds 1,2`). Run it on an otherwise idle machine.

    python bench/contention.py --cache-dir cache
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, cli, out_file, save  # noqa: E402
from core import threads  # noqa: E402
from train.run_folder import RunFolder  # noqa: E402

# name -> (environment, the seeds its `train` command trains)
POLICIES = {"old (torch defaults, one process)": ({threads.LEGACY_ENV: "legacy"}, "1"),
            "new default (a process per seed and core)": ({}, "1,2"),
            "new default, a single seed (one process, 2 threads)": ({}, "1")}


def env_for(policy: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS",
                                                             threads.LEGACY_ENV)}
    return {**env, **policy}


def seconds_per_epoch(run: Path) -> tuple[float, dict]:
    """Wall seconds per epoch trained (epochs after each seed's first), and each seed's epoch times."""
    per_seed: dict[str, list[float]] = {}
    for r in RunFolder(run).log_rows():
        per_seed.setdefault(r["seed"], []).append(float(r["seconds"]))
    later = {s: v[1:] or v for s, v in per_seed.items()}
    return max(sum(v) for v in later.values()) / sum(len(v) for v in later.values()), per_seed


def together(k: int, policy: dict, seeds: str, cache_dir: Path, epochs: int, tmp: Path) -> dict:
    """k identical `train` processes started at once; s/epoch of each."""
    procs, runs = [], []
    for i in range(k):
        run = tmp / f"run-{len(list(tmp.iterdir()))}-{i}"
        runs.append(run)
        procs.append(subprocess.Popen(
            [sys.executable, "pipeline.py", "train", "--dataset", "mvsa_s", "--cache-dir", str(cache_dir),
             "--epochs", str(epochs), "--seeds", seeds, "--out", str(run)],
            cwd=ROOT, env=env_for(policy), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"train failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
    measured = [seconds_per_epoch(r) for r in runs]
    spe = [m[0] for m in measured]
    return {"trains": k, "seeds": seeds, "seconds_per_epoch": spe, "mean": statistics.mean(spe),
            "epochs": [m[1] for m in measured]}


def grid_split(jobs: int, n_threads: int, cache_dir: Path, epochs: int, tmp: Path, values: str) -> dict:
    runs_dir = tmp / f"grid-{jobs}x{n_threads}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "pipeline.py", "sweep", "--vary", f"alpha={values}", "--dataset", "mvsa_s",
                    "--cache-dir", str(cache_dir), "--epochs", str(epochs), "--seeds", "1", "--runs-dir",
                    str(runs_dir), "--out", str(runs_dir / "sweep"), "--jobs", str(jobs), "--threads", str(n_threads)],
                   cwd=ROOT, env=env_for({}), check=True, capture_output=True)
    wall = time.perf_counter() - t0
    cells = len(values.split(","))
    return {"jobs": jobs, "threads": n_threads, "cells": cells, "epochs": epochs, "wall_seconds": wall,
            "cells_per_hour": cells * 3600 / wall}


def markdown(r: dict) -> str:
    lines = [f"SPP-SCL head, MVSA-Single cache, `pipeline.py train --epochs {r['epochs']} --seeds S`; s/epoch = wall "
             f"seconds per epoch the command trains (epochs 2-{r['epochs']} of each seed), mean over the identical "
             f"commands running at once; {r['machine']['cores']} cores.", "",
             "| behaviour | seeds | alone | with 1 identical train beside it | with 2 beside it |", "|---|---|---|---|---|"]
    for name, rows in r["contention"].items():
        alone = rows[0]["mean"]
        cells = [f"{alone:.2f} s"] + [f"{x['mean']:.2f} s ({x['mean'] / alone:.2f}x)" for x in rows[1:]]
        lines.append(f"| {name} | {rows[0]['seeds']} | " + " | ".join(cells) + " |")
    old, new, single = (r["contention"][k][0]["mean"] for k in POLICIES)
    lines += ["", f"Alone, the new default trains an epoch in {new / old:.2f}x the old one's time "
              f"(a single seed, which cannot be split across processes: {single / old:.2f}x).", ""]
    lines += ["Grid split (`sweep --vary alpha=" + r["grid_values"] + f" --epochs {r['epochs']} --seeds 1`):", "",
              "| jobs x threads | wall | cells per hour |", "|---|---|---|"]
    for g in r["grid"]:
        lines.append(f"| {g['jobs']} x {g['threads']} | {g['wall_seconds']:.0f} s | {g['cells_per_hour']:.0f} |")
    return "\n".join(lines) + "\n"


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=ROOT / "cache")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--beside", type=int, default=2, help="up to this many identical jobs beside the first")
    ap.add_argument("--grid-values", default="0.5,0.6,0.75,0.9", help="alpha values of the grid-split sweep")
    ap.add_argument("--out", type=Path, default=RESULTS / "contention.json")
    args = ap.parse_args()
    out_file(args.out)
    cache_dir = args.cache_dir.resolve()
    n = len(threads.cores())
    result = {"machine": {"python": platform.python_version(), "cores": n,
                          "load_before": os.getloadavg()}, "epochs": args.epochs, "grid_values": args.grid_values}
    tmp = Path(tempfile.mkdtemp(prefix="bench-contention-"))
    try:
        result["contention"] = {name: [together(k, env, seeds, cache_dir, args.epochs, tmp)
                                       for k in range(1, args.beside + 2)] for name, (env, seeds) in POLICIES.items()}
        result["grid"] = [grid_split(1, n, cache_dir, args.epochs, tmp, args.grid_values),
                          grid_split(n, 1, cache_dir, args.epochs, tmp, args.grid_values)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["faster_grid_split"] = max(result["grid"], key=lambda g: g["cells_per_hour"])
    save(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
