#!/usr/bin/env python
"""Command line: `extract` once (stage one), then `train`, `eval` from the cache (stage two).

Thin on purpose: each command maps its flags onto a config dataclass and calls one
library function. A `UserError` anywhere becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import sys
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
err = Console(stderr=True)

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
):
    """Run the frozen encoders once and write the HDF5 feature cache (resumable)."""
    from extract.extractor import ExtractConfig, run

    cfg = ExtractConfig(
        dataset=dataset, manifest=manifest, name=name, data_root=data_root or default_data_root(),
        image_dir=image_dir, cache_dir=cache_dir, text_encoder=text_encoder, image_encoder=image_encoder,
        text_layers=text_layers, max_length=max_length, text_only=text_only, random_weights=random_weights,
        image_weights=image_weights, batch_size=batch_size, shard_size=shard_size, shard=shard, force=force,
        seed=seed, limit=limit,
    )
    s = run(cfg, console)
    table = Table(title=f"cache {s.dataset} ({s.seconds:.0f} s)")
    for col in ("split", "items"):
        table.add_column(col)
    for split, n in s.counts.items():
        table.add_row(split, str(n))
    console.print(table)
    console.print(f"text cached: {s.text_items}   images cached from: {s.image_items}   "
                  f"problems: {s.problems} (problems.csv)   non-UTF-8 texts repaired: {s.text_fallbacks}")
    for kind, folder in s.folders.items():
        console.print(f"{kind}: {folder}")
    if not s.complete:
        console.print("[yellow]this process's shards are done; the index is written when every shard is[/]")


def main() -> None:
    try:
        app()
    except UserError as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted:[/] finished shards are kept; run the same command again to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
