#!/usr/bin/env python
"""Command line: `extract` once (stage one), then `train`, `eval` from the cache (stage two).

Thin on purpose: each command builds a config dataclass and calls one library function. The
options that set a config's fields are made from the fields themselves (core/cli_fields.py), so
no default or help of a config is repeated here; the options declared here are the process's own
(--jobs, --threads, --memory, --shard, --runs-dir, --config) and what is not a field (--set, --vary,
--rows). A `UserError` anywhere becomes one line on stderr and exit code 1, and so does a disk
that refused a write (full, over quota, not ours to write, read-only); Ctrl-C and SIGTERM keep
finished work and say so in one line (exit codes 130 and 143).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from core import threads as _threads

_threads.policy()  # before anything imports torch: OpenMP reads how to wait once, at load

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from core import cli_fields  # noqa: E402
from core.errors import Interrupted, UserError, disk_problem  # noqa: E402
from core.paths import DEFAULT_CACHE  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="SPP-SCL and friends: extract frozen features once, train light heads from the cache.")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # an error is one line, however narrow the terminal

JobsOpt = typer.Option(None, min=1, help="processes training at once, one seed (train) or cell (ablate, sweep) each [default: one per core available, one thread each]")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="torch threads [default: the cores this process may use]")
JobThreadsOpt = typer.Option(None, "--threads", min=1, help="torch threads per process [default: the cores this process may use, divided by --jobs]")
SetOpt = typer.Option([], "--set", callback=cli_fields.keys_once, help="head config field, key=value (repeatable; `pipeline.py heads` lists them)")
ShardOpt = typer.Option(None, help="i/N: this process's share of the cells [default: set by torchrun (RANK/WORLD_SIZE) and by a Slurm array task; else every cell]")
RobustnessOpt = typer.Option(False, "--robustness", help="then score each seed's selected weights without its text, without its image and with noise (robustness.json; `eval --drop/--noise` does it later)")
MemoryOpt = typer.Option(None, "--memory", help="RAM each training process may hold of the cache, e.g. 3G; beyond it batches are read from the shards, with the same numbers [default: half of the memory available (MemAvailable, or the cgroup's headroom), divided by --jobs]")
ConfigOpt = typer.Option(None, "--config", metavar="FILE", help="start from the settings in FILE: a run's config.json "
                         "(its train section) or a JSON/YAML file of train's fields (a head's under head_config). "
                         "Only options given here override it; --out never comes from it; a --dataset or --head "
                         "other than the file's is refused (its settings were resolved for its own)")
RunsDirOpt = typer.Option(Path("runs"), help="where run folders are made, each named <dataset>-<head>-<hash of its settings> (train: unless --out)")
RunOpt = typer.Argument(None, metavar="RUN", show_default=False, help="run folder written by train (required)")
# a command whose run folder is its argument RUN, as replay and results take theirs; `--run RUN` still works
RUN_COMMAND = cli_fields.fields_command(lambda: cli_fields.renamed("--run", "run", Path, required=True))
ReportToOpt = typer.Option("none", "--report-to", help="trackers that follow each run, a comma list: none or tensorboard (event files in <run>/tb/; `tensorboard --logdir runs`)")


def _config(module: str, name: str, skip: tuple[str, ...] = ()):
    """Options from the `option(...)` fields of config `name` in `module`, imported when a command needs them."""
    def make() -> list:
        import importlib

        return cli_fields.params(getattr(importlib.import_module(module), name), skip)
    return make


def _head_flags() -> list:
    """One option per shorthand flag a registered head declares (`option(flag=...)` on its config)."""
    from train.config import head_flags

    return cli_fields.flag_params(head_flags())


TRAIN_OPTIONS = cli_fields.fields_command(_config("train.config", "TrainConfig"), _head_flags)
# every train option but --out: the options of a grid (its cells) and of a search (its trials)
_GRID_FIELDS = _config("train.config", "TrainConfig", skip=("out",))
GRID_OPTIONS = cli_fields.fields_command(_GRID_FIELDS, _head_flags)


@app.callback()
def _group() -> None:
    """Keeps typer in sub-command mode whatever the number of commands."""


@app.command(cls=cli_fields.fields_command(_config("extract.extractor", "ExtractConfig")))
def extract(ctx: typer.Context, threads: Optional[int] = ThreadsOpt):
    """Run the frozen encoders once and write the HDF5 feature cache (resumable)."""
    _threads.use(threads)
    from extract.extractor import ExtractConfig, run

    cfg = cli_fields.build(ExtractConfig, ctx.meta["fields"])
    s = run(cfg, console)
    console.print(f"cache {s.dataset}: done in {s.seconds:.0f} s", highlight=False)
    table = Table("split", "items")
    for split, n in s.counts.items():
        table.add_row(split, str(n))
    console.print(table)
    images = f"{s.image_items} items with an image" if "image" in s.folders else "not cached (--text-only)"
    console.print(f"texts: {s.text_items}   images: {images}   problems: {s.problems} (problems.csv)   "
                  f"non-UTF-8 texts repaired: {s.text_fallbacks}", highlight=False)
    for label, n in s.rare_labels.items():
        console.print(f"[yellow]likely typo:[/] label {label!r} on {n} item(s) "
                      f"({'kept' if cfg.keep_rare_labels else 'dropped'}; see problems.csv)", highlight=False)
    for kind, folder in s.folders.items():
        console.print(f"{kind}: {folder}")
    if not s.complete:
        console.print("[yellow]this process's shards are done; the index is written when every shard is[/]")


@app.command(cls=TRAIN_OPTIONS)
def train(ctx: typer.Context, config: Optional[Path] = ConfigOpt, set_: list[str] = SetOpt, jobs: Optional[int] = JobsOpt,
          runs_dir: Path = RunsDirOpt, threads: Optional[int] = JobThreadsOpt, robust: bool = RobustnessOpt,
          memory: Optional[str] = MemoryOpt, report_to: str = ReportToOpt):
    """Train a head from the cache: dev-selected, scored label-blind, mean/std over seeds.

    Besides --set, a head's own shorthand flags (listed last, from its config) set its fields."""
    from experiments.evidence import evidence_twins
    from train.config import TrainConfig
    from train.run_folder import RunFolder
    from train import tracking
    from train.runs import train as run_train

    trackers = tracking.parse(report_to)  # a missing package: one line before any work
    cfg = TrainConfig.from_cli(ctx.meta["fields"], set_, config, ctx.meta["given"])
    jobs = min(jobs or _threads.default_jobs(), len(cfg.seeds) or 1)  # one seed: one process, every core
    _threads.use(threads, jobs)
    run = run_train(cfg, console, jobs=jobs, threads=threads, robust=robust, memory=memory, report_to=trackers,
                    runs_dir=runs_dir)
    for line in evidence_twins(run):  # the same configuration as a committed evidence run
        console.print(line, highlight=False, soft_wrap=True)
    _show(RunFolder(run).metrics(), str(run))


def _grid(ctx: typer.Context, config: Optional[Path], set_: list[str], jobs: Optional[int], threads: Optional[int],
          report_to: str):
    """The config every cell starts from (every `train` option but --out), the jobs to train them with
    and the trackers (a missing package: one line before any work)."""
    from train import tracking
    from train.config import TrainConfig

    trackers = tracking.parse(report_to)
    jobs = jobs or _threads.default_jobs()
    _threads.use(threads, jobs)
    return TrainConfig.from_cli(ctx.meta["fields"], set_, config, ctx.meta["given"]), jobs, trackers


@app.command(cls=GRID_OPTIONS)
def ablate(
    ctx: typer.Context,
    rows: list[str] = typer.Option([], help="a row to run, by name ('w/o L_cli,L_clt') or folder name (wo-intra); "
                                   "repeatable, or several in one joined by commas (the full model always runs)"),
    config: Optional[Path] = ConfigOpt, set_: list[str] = SetOpt,
    out: Optional[Path] = typer.Option(None, help="where table.csv / table.md go [default: <runs-dir>/ablate-<dataset>-<head>]"),
    jobs: Optional[int] = JobsOpt, shard: Optional[str] = ShardOpt, runs_dir: Path = RunsDirOpt,
    threads: Optional[int] = JobThreadsOpt, robust: bool = RobustnessOpt, memory: Optional[str] = MemoryOpt,
    report_to: str = ReportToOpt,
):
    """The paper's ablation rows for a head (any head with an ablation list, `pipeline.py heads`), one
    command: table.csv + table.md with seed noise. Takes every `train` option but --out."""
    from experiments import grid

    base, jobs, trackers = _grid(ctx, config, set_, jobs, threads, report_to)
    cells = grid.ablation_cells(base, runs_dir, rows or None)
    target = grid.out_folder("ablate", base, runs_dir, out)
    grid.run_cells(cells, jobs, shard, console, threads, robust, memory, trackers)
    if grid.assemble(cells, target, base.dataset, base.head) is None:
        console.print(grid.wait_note(cells))
        return
    console.print((target / "table.md").read_text(), highlight=False)
    console.print(f"written: {target / 'table.csv'}, {target / 'table.md'}")


@app.command(cls=GRID_OPTIONS)
def sweep(
    ctx: typer.Context,
    vary: list[str] = typer.Option(..., help="head field=v1,v2,... to sweep (repeat for a grid of two fields)"),
    config: Optional[Path] = ConfigOpt, set_: list[str] = SetOpt,
    out: Optional[Path] = typer.Option(None, help="where sweep.csv, sweep.md and a PNG per metric go "
                                       "[default: <runs-dir>/sweep-<dataset>-<head>-<the fields varied, joined by ->]"),
    jobs: Optional[int] = JobsOpt, shard: Optional[str] = ShardOpt, runs_dir: Path = RunsDirOpt,
    threads: Optional[int] = JobThreadsOpt, robust: bool = RobustnessOpt, memory: Optional[str] = MemoryOpt,
    report_to: str = ReportToOpt,
):
    """Any head field over any list of values: a table on screen, sweep.csv/.md + a PNG of each metric
    with seed error bars. Takes every `train` option but --out."""
    from experiments import grid

    base, jobs, trackers = _grid(ctx, config, set_, jobs, threads, report_to)
    cells = grid.sweep_cells(base, vary, runs_dir)
    target = grid.out_folder("sweep", base, runs_dir, out, vary)
    grid.run_cells(cells, jobs, shard, console, threads, robust, memory, trackers)
    png = grid.sweep_plot(cells, target)
    if png is None:
        console.print(grid.wait_note(cells))
        return
    console.print((target / "sweep.md").read_text(), highlight=False)
    console.print(f"written: {target / 'sweep.csv'}, {target / 'sweep.md'}, {png}")


def _search_options() -> list:
    """search's own options (SearchOptions' fields), then a grid's (every `train` option but --out)."""
    return [*_config("experiments.search", "SearchOptions")(), *_GRID_FIELDS()]


@app.command(cls=cli_fields.fields_command(_search_options, _head_flags))
def search(
    ctx: typer.Context,
    space: list[str] = typer.Option([], "--space", help="field=low:high, field=low:high:log or field=a,b,c: adds a field to the search space or replaces its default range (repeatable; docs/search.md lists the defaults)"),
    retrain_best: bool = typer.Option(False, "--retrain-best", help="no search: train best.json's settings into best/ with this code (after a numerics version bump)"),
    config: Optional[Path] = ConfigOpt, set_: list[str] = SetOpt,
    out: Optional[Path] = typer.Option(None, help="search folder [default: <runs-dir>/search-<dataset>-<head>-<hash>]"),
    runs_dir: Path = RunsDirOpt,
    jobs: Optional[int] = JobsOpt, threads: Optional[int] = JobThreadsOpt, memory: Optional[str] = MemoryOpt,
    report_to: str = ReportToOpt,
):
    """Hyper-parameter search (Optuna) on dev over any `train` settings: one seed a trial, pruned on
    each epoch's dev, the best re-scored on more seeds, the choice trained into <out>/best/. Resumable;
    `--jobs N` processes share the study. Takes every `train` option but --out."""
    from experiments import search as study_search
    from experiments import search_result
    from train.run_folder import RunFolder

    base, jobs, trackers = _grid(ctx, config, set_, jobs, threads, report_to)
    options = cli_fields.build(study_search.SearchOptions, ctx.meta["fields"])
    s = study_search.plan(base, space, out, runs_dir, options, jobs=jobs, threads=threads, memory=memory,
                          report_to=trackers)
    run = search_result.retrain_best(s, console) if retrain_best else search_result.search(s, console)
    _show(RunFolder(run).metrics(), f"{run} (the chosen settings)")


def _show(metrics: dict, title: str) -> None:
    from train.config import METRICS
    from train.metrics import shown

    table = Table("split", *METRICS, title=title)
    n = len(metrics.get("per_seed", [])) or 2
    protocol = metrics.get("protocol_check", {})
    rows = {"dev": metrics.get("dev"), "test (label-blind)": metrics.get("test"),
            "test in file order (leak check)": metrics.get("leak_check"),
            "test, last epoch (official protocol)": metrics.get("last_epoch_test"),
            "test, file order, best epoch (authors' protocol)": protocol.get("best_epoch"),
            "test, file order, last epoch (authors' protocol)": protocol.get("last_epoch")}
    for label, values in rows.items():
        if values is not None:
            table.add_row(label, *(shown(values[m], n) for m in METRICS))
    if protocol:
        table.caption = (f"inflation (best epoch in file order minus label-blind test accuracy): "
                         f"{shown(protocol['inflation'], n)}; nothing is selected on test")
    console.print(table)


@app.command("eval", cls=RUN_COMMAND)
def evaluate(
    run: Optional[Path] = RunOpt,
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="[default: the one the run used]"),
    drop: list[str] = typer.Option([], callback=cli_fields.each_once, help="also score test with this modality replaced by its train mean: text or image (repeatable); written to robustness.json"),
    noise: list[float] = typer.Option([], callback=cli_fields.each_once, help="also score test with Gaussian noise of SIGMA train stds on every feature (repeatable); written to robustness.json"),
    seed: Optional[int] = typer.Option(None, help="one seed's weights [default: every seed of the run]"),
    threads: Optional[int] = ThreadsOpt,
):
    """Recompute test metrics from a run's checkpoints and the cache (must match metrics.json); with
    --drop/--noise, also how the heads fare without a modality or with noisy features."""
    _threads.use(threads)
    from train.runs import evaluate as run_eval

    result = run_eval(run, cache_dir, seed, drop, noise)
    _show(result, f"{run} (recomputed)")
    if result.get("matches_metrics_json") is False:
        raise UserError(f"recomputed test metrics differ from {run}/metrics.json: was the cache rebuilt?")
    if "matches_metrics_json" in result:
        console.print("matches metrics.json")
    for name, m in result.get("robustness", {}).items():
        console.print(f"{name}: test accuracy {m['accuracy']['mean']:.4f} ± {m['accuracy']['std']:.4f}, "
                      f"macro F1 {m['macro_f1']['mean']:.4f} (robustness.json)", highlight=False)


@app.command()
def replay(
    runs: list[str] = typer.Argument(..., help="run folders, folders of them, or glob patterns"),
    seed: Optional[int] = typer.Option(None, help="the seed to retrain [default: the run's first finished seed]"),
    epochs: Optional[int] = typer.Option(None, min=1, help="a quicker partial check of the first K epochs"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="[default: the one the run used]"),
):
    """An audit: retrain one seed of each run with the current code and compare every number it
    recorded (log.csv, protocol.csv, the seed's scores): identical, or the first that differs.
    Writes nothing; what `results` and resume accept is the numerics version."""
    from experiments.results import find_runs
    from train.replay import replay as run_replay

    folders = find_runs(runs)
    differ = []
    for k, folder in enumerate(folders, 1):
        with console.status(f"replay {k}/{len(folders)}: {folder}") as status:
            r = run_replay(folder, seed, epochs, cache_dir,
                           on_epoch=lambda log: status.update(f"replay {k}/{len(folders)}: {folder}, seed {log.seed}, "
                                                             f"epoch {log.epoch} identical"))
        span = f"seed {r.seed}, {r.epochs} epoch(s){'' if r.complete else ' (partial)'}"
        console.print(f"{folder}: {span}: " + ("identical" if r.identical else f"differs in {r.difference}"),
                      highlight=False, soft_wrap=True)
        if r.machine:
            console.print(f"  note: {r.machine}", highlight=False, soft_wrap=True)
        if not r.identical:
            differ.append(str(folder))
    if differ:
        raise UserError(f"{len(differ)} of {len(folders)} run(s) replayed differently: {', '.join(differ)}")


@app.command(cls=cli_fields.fields_command(_config("extract.audit", "AuditConfig")))
def audit(ctx: typer.Context, threads: Optional[int] = ThreadsOpt):
    """Leaks across splits (same text, near-duplicate image) and label conflicts, from the cache."""
    _threads.use(threads)
    from extract import audit as au

    cfg = cli_fields.build(au.AuditConfig, ctx.meta["fields"])
    r = au.run(cfg)
    table = Table("pair", *au.TABLE_HEADERS,
                  title=f"{r.dataset}: items of the first split with a match in the second (pairs)")
    for row in au.table_rows(r.summary):
        table.add_row(*row)
    console.print(table)
    for note in r.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"written: {r.out / 'leaks.csv'}, {r.out / 'summary.json'}", highlight=False)
    if r.clean is not None:
        console.print(f"clean split in {cfg.write_clean}: kept {r.clean['kept']}; dropped per class "
                      f"{r.clean['dropped_per_class']}", highlight=False)


@app.command("report", cls=RUN_COMMAND)
def report_cmd(
    run: Optional[Path] = RunOpt,
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="[default: the one the run used]"),
    threads: Optional[int] = ThreadsOpt,
):
    """Write report.md with PNGs into the run folder: losses, embedding distances, t-SNE, confusion."""
    _threads.use(threads)
    from inspection.report import write_report

    console.print(f"wrote {write_report(run, cache_dir)}")


@app.command("predict", cls=RUN_COMMAND)
def predict_cmd(
    run: Optional[Path] = RunOpt,
    image: Optional[Path] = typer.Option(None, help="image file of one item"),
    text: Optional[str] = typer.Option(None, help="text of one item"),
    id_: Optional[str] = typer.Option(None, "--id", help="id of the one item"),
    manifest: Optional[Path] = typer.Option(None, help="CSV/JSONL manifest as for extract: id, text or text_file, image (paths relative to it)"),
    seed: Optional[int] = typer.Option(None, help="one seed's head [default: mean probabilities over the run's seeds]"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object a line: id, label, probabilities"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="batch-scope runs draw context items from it [default: the run's]"),
    threads: Optional[int] = ThreadsOpt,
):
    """Label and class probabilities for new items, with the run's own encoders."""
    _threads.use(threads)
    from inference.predict import Predictor, items_from_args

    items = items_from_args(image, text, manifest, id_)
    predictor = Predictor(run, seed, cache_dir)
    preds = predictor.predict(items)
    if as_json:
        for p in preds:
            print(json.dumps(p.to_json()))
        return
    seeds = predictor.seeds
    which = (f"seed {seed}" if seed is not None else f"seed {seeds[0]}, the run's only seed" if len(seeds) == 1
             else f"mean over seeds {', '.join(map(str, seeds))}")
    table = Table("id", "label", *predictor.classes, title=f"{run} ({which})")
    for p in preds:
        table.add_row(p.id, p.label, *(f"{p.probabilities[c]:.4f}" for c in predictor.classes))
    console.print(table)


@app.command("results")
def results_cmd(
    runs: list[str] = typer.Argument(None, help="run folders, folders of them, or glob patterns (with --markdown: "
                                     "more markdown files)"),
    against: Optional[str] = typer.Option(None, help="reference row (run folder name or head): Δ accuracy and p-value"),
    out: Optional[Path] = typer.Option(None, help="write results.md, results.csv and results.png here"),
    allow_mixed: bool = typer.Option(False, "--allow-mixed", help="compare runs of other caches, splits or protocols (a column says which); never of other numerics versions"),
    markdown: Optional[list[Path]] = typer.Option(None, "--markdown", "--readme", help="regenerate the results tables "
                                                  "between the markers of this markdown file (repeatable; e.g. README.md "
                                                  "docs/results.md)"),
    check: bool = typer.Option(False, "--check", help="with --markdown: change nothing, exit 1 naming the tables that differ"),
    columns: Optional[str] = typer.Option(None, "--columns", help="only these columns, in this order, by key, e.g. "
                                          "run,accuracy,macro_f1,delta,beyond_noise (docs/results.md lists the keys)"),
    baseline: Optional[list[str]] = typer.Option(None, help="runs to set each row against, by run name (the same heads "
                                                 "on other encoders): the gain, and the gain minus --against's gain"),
    paper: Optional[str] = typer.Option(None, help="the head whose ablation rows these runs are (e.g. spp_scl, for the "
                                        "folders of results/mvsa_s-ablate-spp_scl): the paper's accuracy / F1 of each row beside it"),
):
    """One table from finished runs: mean ± std over seeds, selected epochs, paired or Welch t-test, Holm-corrected."""
    from experiments import results, results_pages, results_view

    if markdown:
        stale_pages, verb = [], "differ" if check else "regenerated"
        for page in [*markdown, *map(Path, runs or [])]:
            if stale := results_pages.refresh_markdown(page, check=check):
                stale_pages.append(str(page))
            console.print(f"{page}: {len(stale)} table(s) {verb}" + (f" ({'; '.join(stale)})" if stale else ""))
        if check and stale_pages:
            raise UserError(f"{', '.join(stale_pages)}: tables differ from results/; "
                            f"`python pipeline.py results --markdown {' '.join(stale_pages)}` regenerates them")
        return
    if check:
        raise UserError("--check goes with --markdown FILE: it checks the tables of a markdown file")
    if not runs:
        raise UserError("give run folders (or a folder of them), e.g. `pipeline.py results results/mvsa_s-heads --against probe`")
    cols = results_view.parse_columns(columns)
    table = results.build(runs, against, allow_mixed, baseline, paper)
    console.print(results_view.screen_table(table, console.width, cols), highlight=False)
    if out is not None:
        console.print("written: " + ", ".join(str(p) for p in results_view.write(table, out, cols)))


@app.command("verify")
def verify_cmd(
    cache_dir: Path = typer.Option(DEFAULT_CACHE, "--cache-dir", help="the cache to check"),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="data set name in the cache [default: every "
                                          "data set in it; the one command whose --dataset is not mvsa_s by default]"),
):
    """Check a cache's shards and indexes against their checksums; name each damaged file and the
    `extract` command that repairs it (exit 1 if any)."""
    from core import store

    checks = store.verify(cache_dir, dataset)
    for d in checks:
        for line in d.lines():
            console.print(line, highlight=False, soft_wrap=True)
    if problem := store.damage_summary(checks):
        raise UserError(problem)


@app.command("heads")
def list_heads():
    """List the registered heads with their config fields (set any with `train --set key=value`, or its flag)."""
    import heads

    for name in heads.available():
        table = Table("field (train flag)", "type", "default", "help",
                      title=f"{name}  (reads {', '.join(heads.config_class(name)().reads())})", title_justify="left")
        for field, kind, default, help, flag in heads.describe(name):
            table.add_row(f"{field}\n{flag}" if flag else field, kind, default, help)
        console.print(table)


@app.command("cli-reference", hidden=True)
def cli_reference():
    """docs/cli.md, written from the commands: `python pipeline.py cli-reference > docs/cli.md`."""
    from core.cli_reference import reference

    print(reference(app), end="")


def main() -> None:
    """Every command: a `UserError` or a disk that refused (full, quota, permissions, read-only) is
    one line and exit code 1; Ctrl-C (exit 130) and SIGTERM (exit 143) keep finished work and say so."""
    with _threads.sigterm_as_ctrl_c() as stop:
        try:
            app()
        except UserError as e:
            err.print(f"[red]error:[/] {e}", highlight=False)
            sys.exit(1)
        except (KeyboardInterrupt, SystemExit) as e:
            cut = _ctrl_c(e)
            if cut is None:
                raise
            note = str(cut) if isinstance(cut, Interrupted) else (  # a run says what it kept
                "finished work is kept (extract: whole shards; train: every finished epoch, in the run folder it "
                "printed); run the same command again to resume")
            err.print(f"[yellow]{'terminated' if stop['signal'] else 'interrupted'}:[/] {note}", highlight=False)
            sys.exit(143 if stop["signal"] else 130)
        except (OSError, RuntimeError) as e:
            line = disk_problem(e)
            if line is None:
                raise
            err.print(f"[red]error:[/] {line}", highlight=False)
            sys.exit(1)


def _ctrl_c(e: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C behind `e`: typer turns it into a silent exit 130, with it as the cause."""
    while e is not None and not isinstance(e, KeyboardInterrupt):
        e = e.__cause__ or e.__context__
    return e


if __name__ == "__main__":
    main()
