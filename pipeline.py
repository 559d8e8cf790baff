#!/usr/bin/env python
"""Command line: `extract` once (stage one), then `train`, `eval` from the cache (stage two).

Thin on purpose: each command maps its flags onto a config dataclass and calls one
library function. A `UserError` anywhere becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Literal, Optional

from core import threads as _threads

_threads.policy()  # before anything imports torch: OpenMP reads how to wait once, at load

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from typer.core import TyperCommand  # noqa: E402

from core.defaults import IMAGE_ENCODER, TEXT_ENCODER  # noqa: E402
from core.errors import Interrupted, UserError  # noqa: E402
from core.paths import DEFAULT_CACHE, default_data_root  # noqa: E402
from train.defaults import default_help  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="SPP-SCL and friends: extract frozen features once, train light heads from the cache.")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # an error is one line, however narrow the terminal

DatasetOpt = typer.Option(None, "--dataset", "-d", help="built-in data set: mvsa_s, mvsa_m or hfm")
CacheOpt = typer.Option(DEFAULT_CACHE, "--cache-dir", help="where caches live")
JobsOpt = typer.Option(None, min=1, help="processes training at once, one seed (train) or cell (ablate, sweep) each [default: one per core available, one thread each]")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="torch threads per process [default: the cores this process may use, divided by --jobs]")
DataRootOpt = typer.Option(None, "--data-root", help="folder with the built-in data sets [default: $SPP_DATA_ROOT or ../shared/data]")
PatienceOpt = typer.Option(10, min=0, help="stop a seed once dev has not improved for P epochs; 0: train every epoch")


@app.callback()
def _group() -> None:
    """Keeps typer in sub-command mode whatever the number of commands."""


@app.command()
def extract(
    dataset: Optional[str] = DatasetOpt,
    manifest: Optional[Path] = typer.Option(None, help="CSV/JSONL manifest or raw MVSA release folder"),
    name: Optional[str] = typer.Option(None, help="name of the data set a manifest makes"),
    data_root: Optional[Path] = DataRootOpt,
    image_dir: Optional[Path] = typer.Option(None, help="folder of {id}.jpg images"),
    cache_dir: Path = CacheOpt,
    text_encoder: str = typer.Option(TEXT_ENCODER, help="HF name or local path; 'minilm' is the packaged offline model"),
    image_encoder: str = typer.Option(IMAGE_ENCODER, help="efficientnet-lite0..4, a torchvision name (resnet50), or timm:<name>"),
    text_layers: int = typer.Option(4, min=1, help="keep the CLS and tokens of this many last layers"),
    max_length: int = typer.Option(202, min=2, help="tokenizer truncation"),
    text_only: bool = typer.Option(False, "--text-only", help="cache text alone (no images at hand)"),
    random_weights: bool = typer.Option(False, "--random-weights", help="untrained encoders of the same shape (tests, benchmarks)"),
    image_weights: Optional[Path] = typer.Option(None, help="state dict file for the image encoder"),
    batch_size: int = typer.Option(64, min=1),
    shard_size: int = typer.Option(512, min=1, help="items per shard (the unit of resuming)"),
    shard: Optional[str] = typer.Option(None, help="i/N: do only this process's share of the shards"),
    force: bool = typer.Option(False, "--force", help="rebuild a cache that was built differently"),
    seed: int = typer.Option(0, help="seed of the 8:1:1 split for manifests without one"),
    limit: Optional[int] = typer.Option(None, min=1, help="only the first N items of each split"),
    classes: Optional[str] = typer.Option(None, help="a manifest's label set, e.g. positive,neutral,negative (other labels are problems)"),
    keep_rare_labels: bool = typer.Option(False, "--keep-rare-labels", help="keep a manifest label seen only a few times (else dropped as a likely typo)"),
    text_views: int = typer.Option(0, min=0, help="also store K dropout views of the train texts (train --text-views)"),
    threads: Optional[int] = ThreadsOpt,
):
    """Run the frozen encoders once and write the HDF5 feature cache (resumable)."""
    _threads.use(threads)
    from extract.extractor import ExtractConfig, run

    cfg = ExtractConfig(
        dataset=dataset, manifest=manifest, name=name, data_root=data_root or default_data_root(),
        image_dir=image_dir, cache_dir=cache_dir, text_encoder=text_encoder, image_encoder=image_encoder,
        text_layers=text_layers, max_length=max_length, text_only=text_only, random_weights=random_weights,
        image_weights=image_weights, batch_size=batch_size, shard_size=shard_size, shard=shard, force=force,
        seed=seed, limit=limit, text_views=text_views, keep_rare_labels=keep_rare_labels,
        classes=tuple(c.strip() for c in classes.split(",") if c.strip()) if classes else None,
    )
    s = run(cfg, console)
    console.print(f"cache {s.dataset}: done in {s.seconds:.0f} s", highlight=False)
    table = Table()
    for col in ("split", "items"):
        table.add_column(col)
    for split, n in s.counts.items():
        table.add_row(split, str(n))
    console.print(table)
    images = f"{s.image_items} items with an image" if "image" in s.folders else "not cached (--text-only)"
    console.print(f"texts: {s.text_items}   images: {images}   problems: {s.problems} (problems.csv)   "
                  f"non-UTF-8 texts repaired: {s.text_fallbacks}", highlight=False)
    for label, n in s.rare_labels.items():
        console.print(f"[yellow]likely typo:[/] label {label!r} on {n} item(s) "
                      f"({'kept' if keep_rare_labels else 'dropped'}; see problems.csv)", highlight=False)
    for kind, folder in s.folders.items():
        console.print(f"{kind}: {folder}")
    if not s.complete:
        console.print("[yellow]this process's shards are done; the index is written when every shard is[/]")


class Metric(str, Enum):
    accuracy = "accuracy"
    weighted_f1 = "weighted_f1"
    macro_f1 = "macro_f1"


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give seeds as 1,2,3") from None


class HeadFlagsCommand(TyperCommand):
    """`train`, plus one option per shorthand flag a registered head declares (`heads.base.opt(flag=...)`).

    The options are made when `train` parses its arguments or prints its help, not at start-up:
    other commands need not import the heads, and a head registered before `main()` brings its
    flags. Their values reach the command in `ctx.meta["head_flags"]`."""

    def _head_params(self) -> list:
        if not hasattr(self, "_made"):
            import heads

            def options(**_): ...

            options.__signature__ = inspect.Signature([
                inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                  annotation=bool if f.kind is bool else Optional[Literal[f.choices] if f.choices else f.kind],
                                  default=typer.Option(False if f.kind is bool else None, f.flag, help=f.summary))
                for f in heads.flags()])
            one = typer.Typer(add_completion=False, rich_markup_mode=None)
            one.command()(options)
            self._made = typer.main.get_command(one).params
            clash = {p.name for p in self.params} & {p.name for p in self._made}
            if clash:
                raise ValueError(f"a head declares a flag that `train` has already: {', '.join(sorted(clash))}")
        return self._made

    def get_params(self, ctx):
        params = super().get_params(ctx)
        return [*self.params, *self._head_params(), *params[len(self.params):]]

    def invoke(self, ctx):
        ctx.meta["head_flags"] = {p.name: ctx.params.pop(p.name, None) for p in self._head_params()}
        return super().invoke(ctx)


@app.command(cls=HeadFlagsCommand)
def train(
    ctx: typer.Context,
    dataset: str = typer.Option("mvsa_s", "--dataset", "-d", help="data set name in the cache (built-in or --name of a manifest)"),
    cache_dir: Path = CacheOpt,
    text_encoder: str = typer.Option(TEXT_ENCODER, help="which text cache to read"),
    image_encoder: str = typer.Option(IMAGE_ENCODER, help="which image cache to read"),
    head: str = typer.Option("spp_scl", help="registered head (see `pipeline.py heads`)"),
    set_: list[str] = typer.Option([], "--set", help="head config field, key=value (repeatable; `pipeline.py heads` lists them)"),
    epochs: int = typer.Option(150, min=1),
    patience: int = PatienceOpt,
    seeds: str = typer.Option("1,2,3,4,5", help="comma-separated; results are mean/std over them"),
    batch_size: Optional[int] = typer.Option(None, min=2, help=default_help("batch_size")),
    lr: Optional[float] = typer.Option(None, help=default_help("lr")),
    lr_step: Optional[int] = typer.Option(None, min=1, help=f"StepLR step {default_help('lr_step')}"),
    weight_decay: float = typer.Option(1e-6),
    balanced: bool = typer.Option(False, "--balanced", help="weight cross-entropy by inverse class frequency (not in the paper)"),
    official: bool = typer.Option(False, "--official", help="the authors' training step exactly (SPEC.md; listed in config.json)"),
    protocol_check: bool = typer.Option(False, "--protocol-check", help="also score test in file order after every epoch (protocol.csv): what the authors' protocol would report; never selects"),
    eval_orders: int = typer.Option(5, min=1, help="test is the mean over this many seeded random orders (label-blind)"),
    text_views: bool = typer.Option(False, "--text-views", help="train on the cached dropout views of the texts (extract --text-views K)"),
    select: Optional[Metric] = typer.Option(None, help=f"dev metric that picks the epoch {default_help('select')}"),
    out: Optional[Path] = typer.Option(None, help="run folder [default: runs/<dataset>-<head>-<time>]"),
    splits: Optional[Path] = typer.Option(None, help="folder of split files {train,dev,test}.txt (ids) from `audit --write-clean`"),
    jobs: Optional[int] = JobsOpt,
    threads: Optional[int] = ThreadsOpt,
):
    """Train a head from the cache: dev-selected, scored label-blind, mean/std over seeds.

    Besides --set, a head's own shorthand flags (listed last, from its config) set its fields."""
    jobs = min(jobs or _threads.default_jobs(), len(_seeds(seeds)) or 1)  # one seed: one process, every core
    _threads.use(threads, jobs)
    import heads
    from train.config import TrainConfig
    from train.runs import train as run_train

    values = {**heads.flag_values(head, ctx.meta["head_flags"]), **heads.parse_sets(head, set_)}
    cfg = TrainConfig(
        dataset=dataset, cache_dir=cache_dir, text_encoder=text_encoder, image_encoder=image_encoder, head=head,
        head_config=heads.build_config(head, values), epochs=epochs, seeds=_seeds(seeds), batch_size=batch_size,
        lr=lr, lr_step=lr_step, weight_decay=weight_decay, balanced=balanced, official=official,
        protocol_check=protocol_check, eval_orders=eval_orders, text_views=text_views,
        select=select.value if select else None, out=out,
        splits=splits.resolve() if splits else None, patience=patience,
    )
    run = run_train(cfg, console, jobs=jobs, threads=threads)
    _show(json.loads((run / "metrics.json").read_text()), f"{run}")


GRID_DATASET = typer.Option("mvsa_s", "--dataset", "-d", help="data set name in the cache")
GRID_JOBS = JobsOpt
GRID_SHARD = typer.Option(None, help="i/N: this process's share of the cells (else torchrun's RANK/WORLD_SIZE)")
GRID_TEXT = typer.Option(TEXT_ENCODER, help="which text cache to read")
GRID_IMAGE = typer.Option(IMAGE_ENCODER, help="which image cache to read")
GRID_EPOCHS = typer.Option(150, min=1)
GRID_SEEDS = typer.Option("1,2,3,4,5", help="the same seeds in every cell (the paired test needs them)")
GRID_BATCH = typer.Option(None, min=2, help="[default: per data set]")
GRID_LR = typer.Option(None, help="[default: per data set]")
RUNS_DIR = typer.Option(Path("runs"), help="where the cells' run folders live (named from each config's hash)")

# the options every grid command takes, declared once: name -> (type, option)
GRID_OPTIONS = {
    "dataset": (str, GRID_DATASET), "cache_dir": (Path, CacheOpt), "text_encoder": (str, GRID_TEXT),
    "image_encoder": (str, GRID_IMAGE), "epochs": (int, GRID_EPOCHS), "seeds": (str, GRID_SEEDS),
    "batch_size": (Optional[int], GRID_BATCH), "lr": (Optional[float], GRID_LR),
    "patience": (int, PatienceOpt), "jobs": (Optional[int], GRID_JOBS), "shard": (Optional[str], GRID_SHARD),
    "runs_dir": (Path, RUNS_DIR), "threads": (Optional[int], ThreadsOpt),
}


def grid_command(command):
    """Give a grid command its own options plus GRID_OPTIONS (typer reads the signature made
    here); the shared ones reach it as one dict, `shared`."""
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "shared"]
    common = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=t)
              for k, (t, opt) in GRID_OPTIONS.items()]

    @functools.wraps(command)
    def run(**kw):
        shared = {k: kw.pop(k) for k in GRID_OPTIONS}
        shared["jobs"] = shared["jobs"] or _threads.default_jobs()
        return command(shared=shared, **kw)

    run.__signature__ = inspect.Signature(own + common)
    hints = typing.get_type_hints(command)
    run.__annotations__ = {**{k: v for k, v in hints.items() if k != "shared"}, **{k: t for k, (t, _) in GRID_OPTIONS.items()}}
    return run


def _grid_base(shared: dict, head: str, set_: list[str]):
    import heads
    from train.config import TrainConfig

    kw = {k: shared[k] for k in ("dataset", "cache_dir", "text_encoder", "image_encoder", "epochs", "batch_size",
                                 "lr", "patience")}
    return TrainConfig(**kw, head=head, head_config=heads.build_config(head, heads.parse_sets(head, set_)),
                       seeds=_seeds(shared["seeds"]))


def _run_grid(shared: dict, cells) -> None:
    from experiments import grid

    grid.run_cells(cells, shared["jobs"], shared["shard"], console, shared["threads"])


@app.command()
@grid_command
def ablate(
    head: str = typer.Option("spp_scl", help="any head with an ablation list (`pipeline.py heads`)"),
    rows: Optional[str] = typer.Option(None, help="comma-separated rows to run (the full model always runs)"),
    set_: list[str] = typer.Option([], "--set", help="head field for every row, key=value"),
    out: Optional[Path] = typer.Option(None, help="where table.csv / table.md go [default: runs/ablate-<dataset>-<head>]"),
    shared: Optional[dict] = None,
):
    """The paper's ablation rows for a head, one command: table.csv + table.md with seed noise."""
    _threads.use(shared["threads"], shared["jobs"])
    from experiments import grid

    base = _grid_base(shared, head, set_)
    cells = grid.ablation_cells(base, shared["runs_dir"], [r.strip() for r in rows.split(",")] if rows else None)
    _run_grid(shared, cells)
    target = out or grid.grid_out("ablate", base, shared["runs_dir"])
    if grid.assemble(cells, target, base.dataset, head) is None:
        console.print(grid.wait_note(cells))
        return
    console.print((target / "table.md").read_text(), highlight=False)
    console.print(f"written: {target / 'table.csv'}, {target / 'table.md'}")


@app.command()
@grid_command
def sweep(
    set_: list[str] = typer.Option(..., "--set", help="field=v1,v2,... (repeat for a grid of two fields)"),
    head: str = typer.Option("spp_scl"),
    fixed: list[str] = typer.Option([], "--fix", help="head field for every cell, key=value"),
    out: Optional[Path] = typer.Option(None, help="where sweep.csv / sweep.png go [default: runs/sweep-<dataset>-<head>-<fields>]"),
    shared: Optional[dict] = None,
):
    """Any head field over any list of values: a table on screen, sweep.csv/.md + a PNG of each metric with seed error bars."""
    _threads.use(shared["threads"], shared["jobs"])
    from experiments import grid

    base = _grid_base(shared, head, fixed)
    cells = grid.sweep_cells(base, set_, shared["runs_dir"])
    _run_grid(shared, cells)
    fields = "-".join(s.partition("=")[0] for s in set_)
    target = out or Path(f"{grid.grid_out('sweep', base, shared['runs_dir'])}-{fields}")
    png = grid.sweep_plot(cells, target)
    if png is None:
        console.print(grid.wait_note(cells))
        return
    console.print((target / "sweep.md").read_text(), highlight=False)
    console.print(f"written: {target / 'sweep.csv'}, {target / 'sweep.md'}, {png}")


def _show(metrics: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("split")
    for m in ("accuracy", "weighted_f1", "macro_f1"):
        table.add_column(m)
    protocol = metrics.get("protocol_check", {})
    rows = {"dev": metrics.get("dev"), "test (label-blind)": metrics.get("test"),
            "test in file order (leak check)": metrics.get("leak_check"),
            "test, last epoch (official protocol)": metrics.get("last_epoch_test"),
            "test, file order, best epoch (authors' protocol)": protocol.get("best_epoch"),
            "test, file order, last epoch (authors' protocol)": protocol.get("last_epoch")}
    for label, values in rows.items():
        if values is not None:
            table.add_row(label, *(f"{values[m]['mean']:.4f} ± {values[m]['std']:.4f}"
                                   for m in ("accuracy", "weighted_f1", "macro_f1")))
    if protocol:
        inflation = protocol["inflation"]
        table.caption = (f"inflation (best epoch in file order minus label-blind test accuracy): "
                         f"{inflation['mean']:.4f} ± {inflation['std']:.4f}; nothing is selected on test")
    console.print(table)


@app.command("eval")
def evaluate(
    run: Path = typer.Option(..., help="run folder written by train"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="[default: the one the run used]"),
    threads: Optional[int] = ThreadsOpt,
):
    """Recompute test metrics from a run's checkpoints and the cache (must match metrics.json)."""
    _threads.use(threads)
    from train.runs import evaluate as run_eval

    result = run_eval(run, cache_dir)
    _show(result, f"{run} (recomputed)")
    if result.get("matches_metrics_json") is False:
        raise UserError(f"recomputed test metrics differ from {run}/metrics.json: was the cache rebuilt?")
    if "matches_metrics_json" in result:
        console.print("matches metrics.json")


@app.command()
def replay(
    runs: list[str] = typer.Argument(..., help="run folders, folders of them, or glob patterns"),
    seed: Optional[int] = typer.Option(None, help="the seed to retrain [default: the run's first finished seed]"),
    epochs: Optional[int] = typer.Option(None, min=1, help="a quicker partial check of the first K epochs (vouches for nothing)"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="[default: the one the run used]"),
):
    """Retrain one seed of each run with the current code and compare every number it recorded
    (log.csv, protocol.csv, the seed's scores); a complete match is written to replay.json and
    vouches for the current code."""
    from experiments.results import find_runs
    from train.replay import replay as run_replay

    folders = find_runs(runs)
    for k, folder in enumerate(folders, 1):
        with console.status(f"replay {k}/{len(folders)}: {folder}") as status:
            r = run_replay(folder, seed, epochs, cache_dir,
                           on_epoch=lambda log: status.update(f"replay {k}/{len(folders)}: {folder}, seed {log.seed}, "
                                                             f"epoch {log.epoch} identical"))
        what = "complete: vouches for the current code" if r.complete else "partial: vouches for nothing"
        console.print(f"{folder}: seed {r.seed}, {r.epochs} epoch(s) identical, largest difference "
                      f"{r.largest_difference:g} ({what}; replay.json)", highlight=False, soft_wrap=True)


@app.command()
def audit(
    dataset: str = typer.Option("mvsa_s", "--dataset", "-d", help="data set name in the cache"),
    cache_dir: Path = CacheOpt,
    data_root: Optional[Path] = DataRootOpt,
    text_encoder: str = typer.Option(TEXT_ENCODER, help="which text cache gives ids, labels and splits"),
    image_encoder: str = typer.Option(IMAGE_ENCODER, help="which image cache to search for near-duplicates"),
    image_threshold: Optional[float] = typer.Option(None, help="cosine of pooled maps for an image candidate [default: 0.88, calibrated on MVSA-Single]"),
    hash_distance: Optional[int] = typer.Option(None, help="max pHash Hamming distance that confirms an image pair [default: 8]"),
    write_clean: Optional[Path] = typer.Option(None, help="write split files without the dev/test items leaking from train here"),
    out: Optional[Path] = typer.Option(None, help="[default: <cache>/<dataset>/audit]"),
    threads: Optional[int] = ThreadsOpt,
):
    """Leaks across splits (same text, near-duplicate image) and label conflicts, from the cache."""
    _threads.use(threads)
    from extract import audit as au

    tuned = {k: v for k, v in (("image_threshold", image_threshold), ("hash_distance", hash_distance)) if v is not None}
    cfg = au.AuditConfig(dataset=dataset, cache_dir=cache_dir, data_root=data_root or default_data_root(),
                         text_encoder=text_encoder, image_encoder=image_encoder, write_clean=write_clean, out=out,
                         **tuned)  # unset: the config's own defaults
    r = au.run(cfg)
    table = Table(title=f"{r.dataset}: items of the first split with a match in the second (pairs)")
    for col in ("pair",) + au.TABLE_HEADERS:
        table.add_column(col)
    for row in au.table_rows(r.summary):
        table.add_row(*row)
    console.print(table)
    for note in r.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"written: {r.out / 'leaks.csv'}, {r.out / 'summary.json'}", highlight=False)
    if r.clean is not None:
        console.print(f"clean split in {write_clean}: kept {r.clean['kept']}; dropped per class "
                      f"{r.clean['dropped_per_class']}", highlight=False)


@app.command("report")
def report_cmd(
    run: Path = typer.Option(..., help="run folder written by train"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="[default: the one the run used]"),
    threads: Optional[int] = ThreadsOpt,
):
    """Write report.md with PNGs into the run folder: losses, embedding distances, t-SNE, confusion."""
    _threads.use(threads)
    from inspection.report import write_report

    console.print(f"wrote {write_report(run, cache_dir)}")


@app.command("predict")
def predict_cmd(
    run: Path = typer.Option(..., help="run folder written by train"),
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
    table = Table(title=f"{run}" + (f" (seed {seed})" if seed is not None else " (mean over seeds)"))
    for col in ("id", "label", *predictor.classes):
        table.add_column(col)
    for p in preds:
        table.add_row(p.id, p.label, *(f"{p.probabilities[c]:.4f}" for c in predictor.classes))
    console.print(table)


@app.command("results")
def results_cmd(
    runs: list[str] = typer.Argument(None, help="run folders, folders of them, or glob patterns"),
    against: Optional[str] = typer.Option(None, help="reference row (run folder name or head): Δ accuracy and p-value"),
    out: Optional[Path] = typer.Option(None, help="write results.md, results.csv and results.png here"),
    allow_mixed: bool = typer.Option(False, "--allow-mixed", help="compare runs of other caches, splits, protocols or code (a column says which)"),
    readme: Optional[Path] = typer.Option(None, help="regenerate the results tables between the markers of this README"),
    baseline: Optional[list[str]] = typer.Option(None, help="runs to set each row against, by run name (the same heads "
                                                 "on other encoders): the gain, and the gain minus --against's gain"),
):
    """One table from finished runs: mean ± std over seeds, selected epochs, paired or Welch t-test, Holm-corrected."""
    from experiments import results

    if readme is not None:
        stale = results.refresh_readme(readme)
        console.print(f"{readme}: {len(stale)} table(s) regenerated" + (f" ({'; '.join(stale)})" if stale else ""))
        return
    if not runs:
        raise UserError("give run folders (or a folder of them), e.g. `pipeline.py results results/mvsa_s-heads --against probe`")
    table = results.build(runs, against, allow_mixed, baseline)
    console.print(results.markdown(table), highlight=False, markup=False, soft_wrap=True)
    if out is not None:
        console.print("written: " + ", ".join(str(p) for p in results.write(table, out)))


@app.command("verify")
def verify_cmd(
    cache_dir: Path = CacheOpt,
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="data set name in the cache [default: every one]"),
):
    """Check a cache's shards and indexes against their checksums; name each damaged file and the
    `extract` command that repairs it (exit 1 if any)."""
    from core import store

    checks = store.verify(cache_dir, dataset)
    for line in (line for d in checks for line in d.lines()):
        console.print(line, highlight=False, soft_wrap=True)
    if problem := store.damage_summary(checks):
        raise UserError(problem)


@app.command("heads")
def list_heads():
    """List the registered heads with their config fields (set any with `train --set key=value`, or its flag)."""
    import heads

    for name in heads.available():
        table = Table(title=f"{name}  (reads {', '.join(heads.config_class(name)().reads())})", title_justify="left")
        for col in ("field (train flag)", "type", "default", "help"):
            table.add_column(col)
        for field, kind, default, help, flag in heads.describe(name):
            table.add_row(f"{field}\n{flag}" if flag else field, kind, default, help)
        console.print(table)


def main() -> None:
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
        err.print(f"[yellow]interrupted:[/] {note}", highlight=False)
        sys.exit(130)


def _ctrl_c(e: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C behind `e`: typer turns it into a silent exit 130, with it as the cause."""
    while e is not None and not isinstance(e, KeyboardInterrupt):
        e = e.__cause__ or e.__context__
    return e


if __name__ == "__main__":
    main()
