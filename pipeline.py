#!/usr/bin/env python
"""Command line: `extract` once (stage one), then `train`, `eval` from the cache (stage two).

Thin on purpose: each command maps its flags onto a config dataclass and calls one
library function. A `UserError` anywhere becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from core.errors import UserError
from core.paths import DEFAULT_CACHE, default_data_root

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="SPP-SCL and friends: extract frozen features once, train light heads from the cache.")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # an error is one line, however narrow the terminal

DatasetOpt = typer.Option(None, "--dataset", "-d", help="built-in data set: mvsa_s, mvsa_m or hfm")
CacheOpt = typer.Option(DEFAULT_CACHE, "--cache-dir", help="where caches live")
DataRootOpt = typer.Option(None, "--data-root", help="folder with the built-in data sets [default: $SPP_DATA_ROOT or ../shared/data]")


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
    text_encoder: str = typer.Option("minilm", help="HF name or local path; 'minilm' is the packaged offline model"),
    image_encoder: str = typer.Option("efficientnet-lite0", help="efficientnet-lite0..4, a torchvision name (resnet50), or timm:<name>"),
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
    text_views: int = typer.Option(0, min=0, help="also store K dropout views of the train texts (train --text-views)"),
):
    """Run the frozen encoders once and write the HDF5 feature cache (resumable)."""
    from extract.extractor import ExtractConfig, run

    cfg = ExtractConfig(
        dataset=dataset, manifest=manifest, name=name, data_root=data_root or default_data_root(),
        image_dir=image_dir, cache_dir=cache_dir, text_encoder=text_encoder, image_encoder=image_encoder,
        text_layers=text_layers, max_length=max_length, text_only=text_only, random_weights=random_weights,
        image_weights=image_weights, batch_size=batch_size, shard_size=shard_size, shard=shard, force=force,
        seed=seed, limit=limit, text_views=text_views,
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
    for kind, folder in s.folders.items():
        console.print(f"{kind}: {folder}")
    if not s.complete:
        console.print("[yellow]this process's shards are done; the index is written when every shard is[/]")


class Modalities(str, Enum):
    text = "text"
    image = "image"
    both = "both"


class Scope(str, Enum):
    batch = "batch"
    sample = "sample"


class Metric(str, Enum):
    accuracy = "accuracy"
    weighted_f1 = "weighted_f1"
    macro_f1 = "macro_f1"


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give seeds as 1,2,3") from None


@app.command()
def train(
    dataset: str = typer.Option("mvsa_s", "--dataset", "-d", help="data set name in the cache (built-in or --name of a manifest)"),
    cache_dir: Path = CacheOpt,
    text_encoder: str = typer.Option("minilm", help="which text cache to read"),
    image_encoder: str = typer.Option("efficientnet-lite0", help="which image cache to read"),
    head: str = typer.Option("spp_scl", help="registered head (see `pipeline.py heads`)"),
    modalities: Modalities = typer.Option(Modalities.both),
    epochs: int = typer.Option(150, min=1),
    seeds: str = typer.Option("1,2,3,4,5", help="comma-separated; results are mean/std over them"),
    batch_size: Optional[int] = typer.Option(None, min=2, help="[default: 64 MVSA-S, 128 MVSA-M, 256 HFM]"),
    lr: Optional[float] = typer.Option(None, help="[default: 1e-4, HFM 5e-5]"),
    lr_step: Optional[int] = typer.Option(None, min=1, help="StepLR step [default: 10 MVSA-S, 15 MVSA-M, 5 HFM]"),
    weight_decay: float = typer.Option(1e-6),
    lambda_ce: Optional[float] = typer.Option(None, help="weight of cross-entropy [default: 5, HFM 10]"),
    alpha: float = typer.Option(2 / 3, help="step-two gate: pull when c < alpha * c_mask"),
    temperature: float = typer.Option(0.07),
    one_step: bool = typer.Option(False, "--one-step", help="ablation: L_clm in step one every batch, no gated step"),
    no_clm: bool = typer.Option(False, "--no-clm", help="ablation: no cross-modal contrastive loss"),
    no_intra: bool = typer.Option(False, "--no-intra", help="ablation: no intra-modal SupCon (L_cli, L_clt)"),
    supcon_official: bool = typer.Option(False, "--supcon-official", help="SupCon as the official code (self logit 0)"),
    balanced: bool = typer.Option(False, "--balanced", help="weight cross-entropy by inverse class frequency (not in the paper)"),
    text_views: bool = typer.Option(False, "--text-views", help="train on the cached dropout views of the texts (extract --text-views K)"),
    text_layers: int = typer.Option(4, min=1, help="hierarchical attention over the last k cached layers"),
    no_ha: bool = typer.Option(False, "--no-ha", help="ablation: last layer only, no hierarchical attention"),
    no_cmf: bool = typer.Option(False, "--no-cmf", help="ablation: concatenate instead of cross-modal fusion"),
    cmf_scope: Scope = typer.Option(Scope.batch, help="batch: attention across the batch (paper); sample: per item"),
    select: Optional[Metric] = typer.Option(None, help="dev metric that picks the epoch [default: weighted_f1, HFM macro_f1]"),
    out: Optional[Path] = typer.Option(None, help="run folder [default: runs/<dataset>-<head>-<time>]"),
):
    """Train a head from the cache: two-step SPP-SCL update, dev-selected, mean/std over seeds."""
    from train.config import TrainConfig
    from train.runs import train as run_train

    cfg = TrainConfig(
        dataset=dataset, cache_dir=cache_dir, text_encoder=text_encoder, image_encoder=image_encoder, head=head,
        modalities=modalities.value, epochs=epochs, seeds=_seeds(seeds), batch_size=batch_size, lr=lr,
        lr_step=lr_step, weight_decay=weight_decay, lambda_ce=lambda_ce, alpha=alpha, temperature=temperature,
        two_step=not one_step, clm=not no_clm, intra=not no_intra, supcon_official=supcon_official, balanced=balanced,
        text_views=text_views,
        text_layers=text_layers, hierarchical_attention=not no_ha, cmf=not no_cmf, cmf_scope=cmf_scope.value,
        select=select.value if select else None, out=out,
    )
    run = run_train(cfg, console)
    _show(json.loads((run / "metrics.json").read_text()), f"{run}")


def _show(metrics: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("split")
    for m in ("accuracy", "weighted_f1", "macro_f1"):
        table.add_column(m)
    for split in ("dev", "test"):
        if split in metrics:
            table.add_row(split, *(f"{metrics[split][m]['mean']:.4f} ± {metrics[split][m]['std']:.4f}"
                                   for m in ("accuracy", "weighted_f1", "macro_f1")))
    console.print(table)


@app.command("eval")
def evaluate(
    run: Path = typer.Option(..., help="run folder written by train"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="[default: the one the run used]"),
):
    """Recompute test metrics from a run's checkpoints and the cache (must match metrics.json)."""
    from train.runs import evaluate as run_eval

    result = run_eval(run, cache_dir)
    _show(result, f"{run} (recomputed)")
    if result.get("matches_metrics_json") is False:
        raise UserError(f"recomputed test metrics differ from {run}/metrics.json: was the cache rebuilt?")
    if "matches_metrics_json" in result:
        console.print("matches metrics.json")


@app.command("heads")
def list_heads():
    """List the registered heads."""
    import heads

    console.print("\n".join(heads.available()))


def main() -> None:
    try:
        app()
    except UserError as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted:[/] finished work is kept (extract: whole shards; train: whole seeds, "
                  "in the run folder it printed); run the same command again, for train with --out <run folder>, "
                  "to resume", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
