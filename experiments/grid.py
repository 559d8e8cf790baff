"""Grids of runs: `ablate` (a head's ablation rows) and `sweep` (any config field, any values).

A grid is a list of cells, each one `TrainConfig` whose run folder is named from its hash
(`run_folder.default_out`): an interrupted grid resumes without redoing finished cells (or
seeds), and a cell that two grids share (the full model of `ablate` and alpha = 2/3 of a
sweep) is trained once. Cells are split across processes (`--jobs N` here, `--shard i/N`
or torchrun across machines, as `extract` does); the table is assembled from the run
folders by whichever process finds them all.

Noise: `ablate`'s table is `pipeline.py results`' table of its cells against the full model
(experiments/results.py, statistics in experiments/stats.py): a paired t-test over seeds,
Holm-corrected across the rows. With 5 seeds the test is weak, and the table says so rather
than reading tea leaves. A sweep shows no comparison: it is chosen on dev, not tested.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import as_completed
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.console import Console

import heads
from core import memory as core_memory
from core import threads as core_threads
from core.cli_fields import parse_sets
from core.errors import UserError
from core.paths import make_dir, output_dir, write_atomic, write_png
from core.shards import parse_shard
from experiments import results, results_view
from train import data as cache
from train import robustness, run_folder, runs
from train.config import METRICS, TrainConfig
from train.metrics import shown
from train.run_folder import RunFolder
from train.progress import EpochClock, Progress


@dataclass
class Cell:
    name: str  # row label, or "alpha=0.5" in a sweep
    cfg: TrainConfig  # resolved, `out` set from its hash

    @property
    def folder(self) -> RunFolder:
        """The cell's run folder (named from its config's hash), read through `RunFolder` alone."""
        return RunFolder(self.cfg.out)


def cell(name: str, base: TrainConfig, head: str, values: dict, runs_dir: Path) -> Cell:
    cfg = replace(base, head=head, head_config=heads.build_config(head, values), out=None).resolved()
    return Cell(name, replace(cfg, out=run_folder.default_out(cfg, runs_dir)))


def ablation_cells(base: TrainConfig, runs_dir: Path, rows: list[str] | None = None) -> list[Cell]:
    """The full model, then each row of the head config's ABLATIONS (`--rows` picks some: `pick_rows`)."""
    table = {"full": {}, **heads.config_class(base.head).ABLATIONS}
    if rows:
        chosen = pick_rows(base.head, rows)
        table = {k: v for k, v in table.items() if k == "full" or k in chosen}  # the full model is the reference
    cells = []
    for name, values in table.items():
        values = dict(values)
        head = values.pop("head", base.head)
        values.pop("slug", None)  # the row's folder name, not a setting
        head_values = {} if head != base.head else {**_base_values(base), **values}
        cells.append(cell(name, base, head, head_values, runs_dir))
    return cells


def pick_rows(head: str, given: list[str]) -> list[str]:
    """The ablation rows of `head` that `--rows` values name: each value a row's name ('w/o L_cli,L_clt',
    commas and all) or its folder name ('wo-intra', `results.row_slug`), or several of them joined by
    commas ('one-step,w/o CMF'). Unknown or twice: one UserError."""
    config = heads.config_class(head)
    names = ["full", *config.ABLATIONS]
    known = {**{results.row_slug(config, n): n for n in names}, **{n: n for n in names}}
    chosen = []
    for value in given:
        found = _split_rows(value.split(","), known)
        if found is None:
            raise UserError(f"--rows {value}: {head} has rows {', '.join(names)} "
                            f"(or their folder names: {', '.join(results.row_slug(config, n) for n in names)})")
        chosen += found
    twice = [r for k, r in enumerate(chosen) if r in chosen[:k]]
    if twice:
        raise UserError(f"--rows: {twice[0]!r} given twice; give each row once")
    return chosen


def _split_rows(parts: list[str], known: dict[str, str]) -> list[str] | None:
    """`parts` (a value split at its commas) as known row names, the longest name first where commas
    are part of one ('w/o L_cli', 'L_clt' -> 'w/o L_cli,L_clt'); None if they cannot all be."""
    if not parts:
        return []
    for k in range(len(parts), 0, -1):
        name = ",".join(parts[:k]).strip()
        rest = _split_rows(parts[k:], known) if name in known else None
        if rest is not None:
            return [known[name], *rest]
    return None


def sweep_cells(base: TrainConfig, vary: list[str], runs_dir: Path) -> list[Cell]:
    """`--vary alpha=0.5,0.6 --vary cmf=true,false` -> one cell per combination (a grid for two fields)."""
    axes, keys, base_values = [], [], _base_values(base)
    for item in vary:
        key, eq, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not values:
            raise UserError(f"--vary {item!r}: give key=v1,v2,... e.g. alpha=0.5,0.667")
        if key in keys:  # the second would silently win in every cell
            raise UserError(f"--vary {item!r}: {key} is varied twice; give all its values in one --vary {key}=v1,v2")
        if key in base_values:  # set for the whole grid too: --vary would silently win in every cell
            raise UserError(f"--vary {item!r}: {key} is also set for the whole grid (--set or a flag); drop one of them")
        keys.append(key)
        axis = [f"{key}={v.strip()}" for v in values.split(",") if v.strip()]
        parsed = [_parse_sets(base.head, [a])[key] for a in axis]
        twice = [a for k, a in enumerate(axis) if parsed[k] in parsed[:k]]  # 0.5 and 0.50: one cell, trained once
        if twice:
            raise UserError(f"--vary {item!r}: {twice[0]} given twice; give each value once")
        axes.append(axis)
    cells = []
    for combo in itertools.product(*axes):
        values = {**base_values, **_parse_sets(base.head, combo)}
        cells.append(cell(", ".join(combo), base, base.head, values, runs_dir))
    return cells


def _parse_sets(head: str, items) -> dict:
    """`--vary` items (key=value) as typed field values of `head`'s config."""
    return parse_sets(heads.config_class(head), items, "--vary", f"head {head!r}")


def _base_values(base: TrainConfig) -> dict:
    """Head fields the user set for the whole grid (--set cmf_scope=sample, or a head's flag)."""
    if base.head_config is None:
        return {}
    default = heads.build_config(base.head)
    return {k: v for k, v in vars(base.head_config).items() if getattr(default, k) != v}


# --- running ----------------------------------------------------------------------------

def run_cells(cells: list[Cell], jobs: int = 1, shard: str | None = None, console: Console | None = None,
              threads: int | None = None, robust: bool = False, memory: str | int | None = None,
              report_to: tuple[str, ...] = ()) -> None:
    """Train this process's share of `cells` (cell k goes to shard k % N), `jobs` at a time,
    with one progress bar counting epochs and an ETA over the grid. Finished cells are skipped. `memory`:
    each process's budget for the cache in RAM (`--memory`; beyond it the cache is streamed, with one
    reader per process for all its cells)."""
    console = console or Console()
    budget = core_memory.budget(memory, jobs)
    i, n = parse_shard(shard)
    mine = [c for k, c in enumerate(cells) if k % n == i]
    seen = set()
    unique = [c for c in mine if not (c.cfg.out in seen or seen.add(c.cfg.out))]  # a row twice (HA last 4 = full)
    _check_reusable(unique)
    todo = [c for c in unique if not c.folder.is_finished()]
    same = len(mine) - len(unique)
    console.print(f"grid: {len(cells)} cells, {len(mine)} for this process"
                  + (f" (shard {i}/{n})" if n > 1 else "") + (f", {same} the same run as another row" if same else "")
                  + f", {len(unique) - len(todo)} done earlier, {len(todo)} to train with {jobs} job(s)")
    progress = _progress(todo, jobs)
    finished: list[Cell] = []

    def cell_done(c: Cell):
        with progress.screen.lock:
            _poll(todo, progress.clock)
            finished.append(c)
            progress.finish(id(c), "done", f"({len(finished)}/{len(todo)} cells)", note=True)
        progress.polled()

    with progress.shown(console), _following(todo, progress):
        _train_cells(todo, jobs, threads, robust, budget, progress, cell_done, report_to)
    if robust:  # cells finished before `--robustness` was asked for (scored once; skipped when done)
        for c in unique:
            if c not in todo:  # found finished: scored only, its run files stay as they are
                with c.folder.writer():
                    runs.score_default_robustness(c.cfg.out, c.cfg, _data(c.cfg, budget))


def _check_reusable(cells: list[Cell]) -> None:
    """A cell, finished or not, is only ever reused by the settings and numerics version that trained it:
    a table never mixes arithmetic silently (found now, not after the other cells have trained for an hour)."""
    stale = [f"{c.cfg.out} ({'; '.join(d)})" for c in cells if (d := c.folder.mismatch(c.cfg))]
    if stale:
        raise UserError("cells were trained or started by another numerics version or other settings and cannot "
                        "be reused: " + ", ".join(stale) + ". Delete those folders to retrain them")


def _progress(todo: list[Cell], jobs: int) -> Progress:
    """What the grid shows (train/progress.py builds it, as for `train`): a row per cell to train, its
    epochs, and the epochs skipped by --patience, counted from its run folder (a resumed cell)."""
    counts = {id(c): _epochs(c) for c in todo}
    progress = Progress("grid", {id(c): c.name for c in todo}, {id(c): len(c.cfg.seeds) * c.cfg.epochs for c in todo},
                        min(jobs, len(todo)), {k: d for k, (d, _, _) in counts.items()}, noun="cell ")
    for k, (done, skipped, ended) in counts.items():
        progress.clock.update(k, done, skipped, ended=ended)
    return progress


def _train_cells(todo: list[Cell], jobs: int, threads: int | None, robust: bool, budget: int | None,
                 progress: Progress, cell_done, report_to: tuple[str, ...]) -> None:
    """Train the cells here one after another (`jobs` 1: the cache loaded once per modality set for the
    whole grid) or in `jobs` worker processes, calling `cell_done(cell)` as each finishes."""
    if jobs <= 1:
        for c in todo:
            progress.clock.begin(id(c))  # its first epoch is timed from here
            _train_cell(c.cfg, robust, budget, report_to)
            cell_done(c)
        return
    with core_threads.worker_pool(jobs, threads) as pool:
        futures = {pool.submit(_train_cell, c.cfg, robust, budget, report_to): c for c in todo}
        for f in as_completed(futures):
            f.result()
            cell_done(futures[f])


def _poll(cells: list[Cell], clock: EpochClock) -> None:
    """Bring the clock up to date with each unfinished cell's run folder (`_epochs`)."""
    for c in cells:
        if id(c) not in clock.finished:
            trained, skipped, ended = _epochs(c)
            clock.update(id(c), trained, skipped, ended=ended)


def _epochs(c: Cell) -> tuple[int, int, tuple[int, int]]:
    """Epochs trained and skipped (--patience) of a cell, from its run folder, and (epochs trained,
    epochs planned) of its seeds that are over: what the "expected" time left learns from (a seed
    over skipped what the cell skipped; the clamp: a seed may finish between the two reads)."""
    trained, skipped = c.folder.epochs_done(c.cfg)
    over = sum(c.folder.finished(seed) for seed in c.cfg.seeds) * c.cfg.epochs
    return trained, skipped, (min(over, max(0, over - skipped)), over)


@contextmanager
def _following(cells: list[Cell], progress: Progress):
    """Count the cells' epochs from their run folders every second, in a thread: the same
    for cells trained here and in worker processes, which report nothing back."""
    stop = threading.Event()

    def poll():
        while not stop.wait(1.0):
            _poll(cells, progress.clock)
            progress.polled()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        _poll(cells, progress.clock)
        progress.polled()


_DATA: dict = {}


def _train_cell(cfg: TrainConfig, robust: bool, memory: int | None, report_to: tuple[str, ...]) -> None:
    """Train one cell (and `--robustness`: score it); the cache is loaded once per process (the
    grid's, or a worker's) and modality set (streamed: one reader thread per process serves every cell)."""
    data = _data(cfg, memory)
    if robust:
        robustness.check_in_memory(data)  # before this cell trains
    runs.train_run(cfg, data, robust=robust, report_to=report_to)


def _data(cfg: TrainConfig, memory: int | None) -> cache.Data:
    """The cache, loaded once per process and modality set, within `memory` bytes (else streamed)."""
    key = (str(cfg.cache_dir), cfg.dataset, cache.modalities(cfg), cfg.text_encoder, cfg.image_encoder)
    if key not in _DATA:
        _DATA[key] = cache.load_data(cfg, memory)
    return _DATA[key]


# --- the table ----------------------------------------------------------------------------

def assemble(cells: list[Cell], out: Path, dataset: str, head: str) -> results.Table | None:
    """table.csv + table.md: `results`' table of the cells (rows named by the ablation row, against the
    full model, the paper's numbers beside them), so `ablate` and `results` print one set of statistics.
    None (nothing written) until every cell is done."""
    if not all(c.folder.is_finished() for c in cells):
        return None
    rows = [replace(results.load_row(c.cfg.out), name=c.name) for c in cells]
    table = results.compare(rows, against=cells[0].name, paper=head)
    make_dir(out)
    write_atomic(out / "table.csv", results_view.csv_frame(table).to_csv(index=False))
    c = cells[0].cfg
    title = f"{c.head} ablations on {dataset}, {_epochs_text(c)}, seeds {list(c.seeds)}"
    write_atomic(out / "table.md", f"{title}.\n\n{results_view.markdown(table)}")
    return table


def _epochs_text(c: TrainConfig) -> str:
    return f"{c.epochs} epochs" + ("" if c.patience is None else f", patience {c.patience}")


def sweep_plot(cells: list[Cell], out: Path) -> Path | None:
    """A PNG per sweep: each metric against the swept value(s), error bars = sample std over seeds."""
    if not all(c.folder.is_finished() for c in cells):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    rows = []
    for c in cells:
        m = c.folder.metrics()
        rows.append({"cell": c.name, **{f"{k}_mean": m["test"][k]["mean"] for k in METRICS},
                     **{f"{k}_std": m["test"][k]["std"] for k in METRICS},
                     **{f"dev_{k}_mean": m["dev"][k]["mean"] for k in METRICS},  # choose on these, never on test
                     **{f"dev_{k}_std": m["dev"][k]["std"] for k in METRICS}, "run": str(c.cfg.out)})
    frame = pd.DataFrame(rows)
    make_dir(out)
    write_atomic(out / "sweep.csv", frame.to_csv(index=False))
    write_atomic(out / "sweep.md", _sweep_markdown(frame, cells))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
    x = np.arange(len(frame))
    for ax, metric in zip(axes, METRICS):
        ax.errorbar(x, frame[f"{metric}_mean"], yerr=frame[f"{metric}_std"], marker="o", capsize=3, label="test")
        ax.errorbar(x + 0.05, frame[f"dev_{metric}_mean"], yerr=frame[f"dev_{metric}_std"], marker="s", capsize=3,
                    linestyle="--", alpha=0.7, label="dev (choose here)")
        ax.set_xticks(x, frame["cell"], rotation=30, ha="right", fontsize=8)
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{_sweep_title(cells)}; pick a value on dev, report its test", fontsize=9)
    fig.tight_layout()
    write_png(out / "sweep.png", fig, dpi=110)
    plt.close(fig)
    return out / "sweep.png"


def _sweep_title(cells: list[Cell]) -> str:
    c = cells[0].cfg
    return (f"{c.head} on {c.dataset}, {_epochs_text(c)}: dev-selected epoch, label-blind, "
            f"mean ± std over seeds {list(c.seeds)}")


def _sweep_markdown(frame, cells: list[Cell]) -> str:
    """The sweep as a table for the screen and sweep.md: test and dev of each cell (choose on dev)."""
    lines = [_sweep_title(cells) + ".", "", "| cell | accuracy | weighted F1 | macro F1 | dev accuracy | dev weighted F1 | dev macro F1 |",
             "|---|---|---|---|---|---|---|"]
    for r in frame.to_dict("records"):
        cols = [shown({"mean": r[f"{p}{m}_mean"], "std": r[f"{p}{m}_std"]}, len(cells[0].cfg.seeds))
                for p in ("", "dev_") for m in METRICS]
        lines.append(f"| {r['cell']} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


# the files each grid writes in its `--out` folder, and nothing else
WRITES = {"ablate": ("table.csv", "table.md"), "sweep": ("sweep.csv", "sweep.md", "sweep.png")}


def out_folder(kind: str, base: TrainConfig, runs_dir: Path, out: Path | None, vary: list[str] = ()) -> Path:
    """The grid's table folder (`--out`, else runs/<kind>-<dataset>-<head>[-<swept fields>]), made and
    checked before any cell trains: a folder holding files the grid does not write is someone's and is
    refused now (`output_dir`, as `results --out`), not after the cells have trained for an hour."""
    target = out or Path(runs_dir) / "-".join([kind, base.dataset, base.head, *(v.partition("=")[0] for v in vary)])
    folder = output_dir(target, WRITES[kind], "--out")
    cells_root = Path(runs_dir).resolve()
    if folder.resolve() in (cells_root, *cells_root.parents):  # its cells would be "other files" at the next run
        raise UserError(f"--out {target} holds the cells' --runs-dir {runs_dir}: give the table a folder of its own")
    return folder


def wait_note(cells: list[Cell]) -> str:
    missing = [c.name for c in cells if not c.folder.is_finished()]
    return f"{len(missing)} cell(s) not finished yet ({', '.join(missing[:4])}...): the table is written by the process that finds them all"

