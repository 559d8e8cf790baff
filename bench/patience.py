#!/usr/bin/env python
"""What `--patience P` changes -> bench/results/patience.json (+ .md; `--out` another file).

Replays early stopping on the dev column of finished runs' log.csv (the dev metric of
every epoch is logged, so no training is needed): with patience P a seed stops once dev
`select` has not improved for P epochs, and the selected epoch is the best one seen until
then. Reports, per P, how often the selected epoch moves, and the epochs saved.

    python bench/patience.py runs/mvsa_s-paper-20ep runs/mvsa_s-official-20ep ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, cli, out_file, save  # noqa: E402
from train.run_folder import RunFolder  # noqa: E402  (a run folder is read there alone)


def replay(dev: list[float], patience: int | None) -> tuple[int, int]:
    """(selected epoch, epochs trained): the trainer's rule (strict improvement, first of equals)."""
    best, best_epoch = float("-inf"), 0
    for epoch, v in enumerate(dev, 1):
        if v > best:
            best, best_epoch = v, epoch
        if patience is not None and epoch - best_epoch >= patience:
            return best_epoch, epoch
    return best_epoch, len(dev)


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--patience", default="3,5,10")
    ap.add_argument("--out", type=Path, default=RESULTS / "patience.json")
    a = ap.parse_args()
    out_file(a.out)
    seeds = []
    for run in a.runs:
        folder = RunFolder(run)
        select = folder.config()["train"]["select"]
        rows = folder.log_rows()
        for s in sorted({int(r["seed"]) for r in rows}):
            seeds.append((str(run), s, [float(r[f"dev_{select}"]) for r in rows if int(r["seed"]) == s]))
    result = {"runs": [str(r) for r in a.runs], "seeds": len(seeds), "per_patience": {}}
    for p in (int(x) for x in a.patience.split(",")):
        moved, saved, total = 0, 0, 0
        for _, _, dev in seeds:
            full, _ = replay(dev, None)
            sel, trained = replay(dev, p)
            moved += sel != full
            saved += len(dev) - trained
            total += len(dev)
        result["per_patience"][p] = {"selected_epoch_moved": moved, "of_seeds": len(seeds),
                                     "epochs_saved": saved, "epochs_total": total, "share_saved": saved / total}
    lines = ["| patience | selected epoch moved | epochs saved |", "|---|---|---|"]
    for p, r in result["per_patience"].items():
        lines.append(f"| {p} | {r['selected_epoch_moved']} of {r['of_seeds']} seeds | {r['epochs_saved']} of "
                     f"{r['epochs_total']} ({r['share_saved']:.0%}) |")
    save(a.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
