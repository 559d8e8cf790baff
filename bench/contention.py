#!/usr/bin/env python
"""Sharing the machine -> bench/results/contention.json (+ .md), everything in one run.

  (1) s/epoch of the SPP-SCL head on the MVSA-Single cache (`pipeline.py train`, one seed)
      alone, with one identical `train` beside it, and with two, under torch's own
      thread defaults (`SPP_THREADS=legacy`: OpenMP workers spin while they wait) and
      under the project's policy (`core/threads.py`: OMP_WAIT_POLICY=PASSIVE, threads =
      the cores available divided by the jobs);
  (2) the grid split: cells per hour of the same `sweep` as one job with every core's
      threads (`--jobs 1 --threads N`) and as N one-thread jobs (`--jobs N --threads 1`).

A process's s/epoch is the median of its `log.csv` epochs after the first (the first
overlaps the other processes' cache loading). Run it on an otherwise idle machine:
anything else running is one more neighbour and the figures mean nothing.

    python bench/contention.py --cache-dir cache
"""

from __future__ import annotations

import argparse
import csv
import json
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

from core import threads  # noqa: E402

POLICIES = {"old (torch defaults)": {threads.LEGACY_ENV: "legacy"}, "new default": {}}


def env_for(policy: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS",
                                                             threads.LEGACY_ENV)}
    return {**env, **policy}


def epoch_seconds(run: Path) -> list[float]:
    with open(run / "log.csv", newline="") as f:
        return [float(r["seconds"]) for r in csv.DictReader(f)]


def together(k: int, policy: dict, cache_dir: Path, epochs: int, tmp: Path) -> dict:
    """k identical `train` processes started at once; s/epoch of each."""
    procs, runs = [], []
    for i in range(k):
        run = tmp / f"run-{len(list(tmp.iterdir()))}-{i}"
        runs.append(run)
        procs.append(subprocess.Popen(
            [sys.executable, "pipeline.py", "train", "--dataset", "mvsa_s", "--cache-dir", str(cache_dir),
             "--epochs", str(epochs), "--seeds", "1", "--out", str(run)],
            cwd=ROOT, env=env_for(policy), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"train failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
    per = [epoch_seconds(r) for r in runs]
    medians = [statistics.median(s[1:] or s) for s in per]
    return {"processes": k, "seconds_per_epoch": medians, "mean": statistics.mean(medians), "epochs": per}


def grid_split(jobs: int, n_threads: int, cache_dir: Path, epochs: int, tmp: Path, values: str) -> dict:
    runs_dir = tmp / f"grid-{jobs}x{n_threads}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "pipeline.py", "sweep", "--set", f"alpha={values}", "--dataset", "mvsa_s",
                    "--cache-dir", str(cache_dir), "--epochs", str(epochs), "--seeds", "1", "--runs-dir",
                    str(runs_dir), "--out", str(runs_dir / "sweep"), "--jobs", str(jobs), "--threads", str(n_threads)],
                   cwd=ROOT, env=env_for({}), check=True, capture_output=True)
    wall = time.perf_counter() - t0
    cells = len(values.split(","))
    return {"jobs": jobs, "threads": n_threads, "cells": cells, "epochs": epochs, "wall_seconds": wall,
            "cells_per_hour": cells * 3600 / wall}


def markdown(r: dict) -> str:
    lines = [f"SPP-SCL head, MVSA-Single cache, `pipeline.py train --epochs {r['epochs']} --seeds 1` per process; "
             f"s/epoch = median over epochs 2-{r['epochs']} of each process's log.csv, mean over the processes; "
             f"{r['machine']['cores']} cores.", "",
             "| policy | alone | with 1 identical job beside it | with 2 beside it |", "|---|---|---|---|"]
    for name, rows in r["contention"].items():
        alone = rows[0]["mean"]
        cells = [f"{alone:.2f} s"] + [f"{x['mean']:.2f} s ({x['mean'] / alone:.2f}x)" for x in rows[1:]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    old, new = (r["contention"][k][0]["mean"] for k in POLICIES)
    lines += ["", f"Alone, the new default takes {new / old:.2f}x the old one's epoch.", ""]
    lines += ["Grid split (`sweep --set alpha=" + r["grid_values"] + f" --epochs {r['epochs']} --seeds 1`):", "",
              "| jobs x threads | wall | cells per hour |", "|---|---|---|"]
    for g in r["grid"]:
        lines.append(f"| {g['jobs']} x {g['threads']} | {g['wall_seconds']:.0f} s | {g['cells_per_hour']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=ROOT / "cache")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--beside", type=int, default=2, help="up to this many identical jobs beside the first")
    ap.add_argument("--grid-values", default="0.5,0.6,0.75,0.9", help="alpha values of the grid-split sweep")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "contention.json")
    args = ap.parse_args()
    cache_dir = args.cache_dir.resolve()
    n = len(threads.cores())
    result = {"machine": {"python": platform.python_version(), "cores": n,
                          "load_before": os.getloadavg()}, "epochs": args.epochs, "grid_values": args.grid_values}
    tmp = Path(tempfile.mkdtemp(prefix="bench-contention-"))
    try:
        result["contention"] = {name: [together(k, policy, cache_dir, args.epochs, tmp)
                                       for k in range(1, args.beside + 2)] for name, policy in POLICIES.items()}
        result["grid"] = [grid_split(1, n, cache_dir, args.epochs, tmp, args.grid_values),
                          grid_split(n, 1, cache_dir, args.epochs, tmp, args.grid_values)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["faster_grid_split"] = max(result["grid"], key=lambda g: g["cells_per_hour"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
