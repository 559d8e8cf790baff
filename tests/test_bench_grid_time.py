"""bench/grid_time.py: a grid's wall time read back from its cells' log.csv."""

import csv
import json
import subprocess
import sys
from pathlib import Path

from bench.grid_time import makespan

ROOT = Path(__file__).resolve().parent.parent


def test_cells_go_to_the_first_free_lane_in_order():
    assert makespan([10, 10, 10], 2) == 20
    assert makespan([30, 10, 10, 10], 2) == 30
    assert makespan([5, 7], 1) == 12


def fake_run(folder: Path, seconds: list[float]) -> None:
    """A run folder as far as grid_time reads it: config.json and log.csv."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train": {}}))
    with open(folder / "log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "epoch", "seconds"])
        w.writerows([1, i + 1, s] for i, s in enumerate(seconds))


def test_a_paused_epoch_counts_at_its_runs_median(tmp_path):
    fake_run(tmp_path / "grid" / "a", [10, 10, 10, 500])  # the last epoch ran through a SIGSTOP pause
    fake_run(tmp_path / "grid" / "b", [20, 20])
    out = tmp_path / "bench" / "t.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "grid_time.py"), str(tmp_path / "grid"), "--lanes", "2",
                    "--out", str(out)], check=True, capture_output=True)
    r = json.loads(out.read_text())
    a, b = r["cells"]
    assert (a["seconds_logged"], a["seconds"], a["disturbed"]) == (530, 40, 1)
    assert r["lane_seconds"] == 80 and r["wall_seconds"] == 40 and r["disturbed_epochs"] == 1
    assert "0.02 lane-hours" in out.with_suffix(".md").read_text()
