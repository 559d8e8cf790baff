#!/usr/bin/env python
"""The wall time of a grid, from the seconds its cells logged -> bench/results/grid_time.json (+ .md).

Every epoch's wall seconds are in log.csv, so a grid's time is read back from its run folders
rather than clocked again. One lane of the evidence scripts (results/queue.sh) trains one cell at
a time with one thread; the grid's wall time on L lanes is simulated by handing the cells, in the
order given, to whichever lane is free first, as `xargs -P L` does.

An epoch that ran while the lanes were paused (SIGSTOP, so that a test suite or a benchmark had the
cores) logged the pause too. Such an epoch is taken at its run's median epoch time instead: an
epoch over `--outlier` times its run's median is counted as disturbed, and the table says how many
were. Not in log.csv, so not counted: loading the cache (a few seconds per cell), each seed's final
test scoring, and `--robustness` scoring.

    python bench/grid_time.py results/mvsa_s-ablate-spp_scl --lanes 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cli, out_file, save  # noqa: E402
from experiments.results import find_runs  # noqa: E402
from train.run_folder import RunFolder  # noqa: E402  (a run folder is read there alone)


def cell_seconds(folder: RunFolder, outlier: float) -> dict:
    """Logged seconds of one run, with epochs over `outlier` x its median taken at the median."""
    secs = [float(r["seconds"]) for r in folder.log_rows()]
    if not secs:
        return {"run": str(folder.path), "epochs": 0, "seconds_logged": 0.0, "seconds": 0.0, "disturbed": 0}
    median = statistics.median(secs)
    kept = [s if s <= outlier * median else median for s in secs]
    return {"run": str(folder.path), "epochs": len(secs), "median_epoch_s": median,
            "seconds_logged": sum(secs), "seconds": sum(kept), "disturbed": sum(s > outlier * median for s in secs)}


def makespan(durations: list[float], lanes: int) -> float:
    """Wall time of running `durations` in order on `lanes` lanes, each cell on the first free lane."""
    free = [0.0] * lanes
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free)


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grids", nargs="+", type=Path, help="run folders, folders of them or glob patterns, in run order (as `results` takes them)")
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--outlier", type=float, default=3.0, help="an epoch over this x its run's median was disturbed")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "grid_time.json")
    a = ap.parse_args()
    if a.lanes < 1 or not a.outlier > 1:
        ap.error("--lanes must be >= 1 and --outlier > 1")
    out_file(a.out)  # refused before reading anything
    cells = [cell_seconds(RunFolder(p), a.outlier) for p in find_runs(a.grids)]  # a bad path: one line
    total = sum(c["seconds"] for c in cells)
    result = {"grids": [str(g) for g in a.grids], "lanes": a.lanes, "outlier": a.outlier, "cells": cells,
              "epochs": sum(c["epochs"] for c in cells), "lane_seconds": total,
              "wall_seconds": makespan([c["seconds"] for c in cells], a.lanes),
              "disturbed_epochs": sum(c["disturbed"] for c in cells)}
    rows = ["| cell | epochs | median s/epoch | minutes (logged) | disturbed epochs |", "|---|---|---|---|---|"]
    rows += [f"| {Path(c['run']).name} | {c['epochs']} | {c.get('median_epoch_s', 0):.2f} | "
             f"{c['seconds'] / 60:.1f} ({c['seconds_logged'] / 60:.1f}) | {c['disturbed']} |" for c in cells]
    rows += ["", f"{len(cells)} cells, {result['epochs']} epochs, {total / 3600:.2f} lane-hours; on {a.lanes} "
             f"one-thread lanes: **{result['wall_seconds'] / 3600:.2f} h** wall "
             f"({result['disturbed_epochs']} disturbed epochs taken at their run's median)"]
    save(a.out, result, "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
