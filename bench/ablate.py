#!/usr/bin/env python
"""Ablation-grid benchmark -> bench/results/ablate.json (+ .md; `--out` another file).

Runs `pipeline.py ablate` on MVSA-Single (the rows of the paper's Tables 4-7, docs/method.md
"Training", + the linear probe) as a user would, with `--jobs` and `--patience`, and times it.
Beside it, the same grid's estimated time with the frozen encoders in the loop (the official design): the
epochs the grid actually trained, times `bench/train.py`'s measured seconds per epoch of
bert-base + ResNet-50 forward (bench/results/train.json), forward only, so a lower bound.

    python bench/ablate.py                                  # the full grid: 5 seeds, 150 epochs, patience 10
    python bench/ablate.py --seeds 1,2 --epochs 10 --rows "one-step,w/o CMF"   # a slice, same method
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, cli, out_file, save  # noqa: E402
from train.run_folder import RunFolder  # noqa: E402  (a run folder is read there alone)


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--runs-dir", default="runs/bench-ablate")
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--rows", default=None)
    ap.add_argument("--head", default="spp_scl")
    ap.add_argument("--out", type=Path, default=RESULTS / "ablate.json")
    a = ap.parse_args()
    out_file(a.out)
    cmd = [sys.executable, "pipeline.py", "ablate", "--dataset", "mvsa_s", "--head", a.head, "--cache-dir", a.cache_dir,
           "--seeds", a.seeds, "--epochs", str(a.epochs), "--patience", str(a.patience), "--jobs", str(a.jobs),
           "--runs-dir", a.runs_dir, "--out", f"{a.runs_dir}/table"] + (["--rows", a.rows] if a.rows else [])
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.time() - t0
    table = list(csv.DictReader(open(ROOT / a.runs_dir / "table" / "table.csv")))
    epochs, cells = 0, set()
    for row in table:
        if row["folder"] in cells:
            continue
        cells.add(row["folder"])
        epochs += len(RunFolder(ROOT / row["folder"]).log_rows())
    per_epoch = json.loads((RESULTS / "train.json").read_text())["encoders_in_loop"]["paper"]["seconds_per_epoch"]
    result = {
        "command": " ".join(cmd[1:]), "head": a.head, "rows": [r["run"] for r in table], "cells_trained": len(cells),
        "seeds": a.seeds, "max_epochs": a.epochs, "patience": a.patience, "jobs": a.jobs,
        "epochs_trained": epochs, "wall_seconds": wall, "wall_hours": wall / 3600,
        "encoders_in_loop_seconds_per_epoch": per_epoch,
        "encoders_in_loop_estimate_seconds": epochs * per_epoch,
        "ratio": epochs * per_epoch / wall,
    }
    save(a.out, result,
         f"| grid | cells | epochs trained | wall | encoders in the loop (est.) | ratio |\n|---|---|---|---|---|---|\n"
         f"| {len(table)} rows, seeds {a.seeds}, <= {a.epochs} epochs, patience {a.patience}, jobs {a.jobs} | "
         f"{len(cells)} | {epochs} | {wall / 3600:.2f} h | {epochs * per_epoch / 3600:.0f} h | {result['ratio']:.0f}x |\n")


if __name__ == "__main__":
    main()
