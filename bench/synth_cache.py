#!/usr/bin/env python
"""A synthetic feature cache of any size, written shard by shard with the store's own writer.

Realistic shapes, not realistic values: text states of L layers x H (bert-base: 4 x 768) for
token counts drawn like tweets (mean ~30 with CLS and SEP, at most `max_length`), image maps
C x h x w (ResNet-50: 2048 x 7 x 7) after a ReLU with a chosen share of exact zeros (34% for
ResNet-50 at random weights, 88% for EfficientNet-lite0), 3 classes, an 8:1:1 split. Memory
stays near one shard whatever the size, so a cache larger than RAM can be made.

    python bench/synth_cache.py --cache-dir /tmp/big --items 20000            # ~8 GB, paper shapes
    python bench/synth_cache.py --cache-dir /tmp/s --items 500 --shapes default
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import store  # noqa: E402

CLASSES = ["positive", "neutral", "negative"]
TEXT_ENCODER, IMAGE_ENCODER = "synth-text", "synth-image"


@dataclass(frozen=True)
class Shapes:
    layers: int
    width: int
    channels: int
    side: int
    zeros: float  # share of exact zeros in the maps (post-ReLU sparsity)


SHAPES = {
    "paper": Shapes(4, 768, 2048, 7, 0.34),  # bert-base last 4 layers + ResNet-50 layer4 (random weights)
    "default": Shapes(4, 384, 1280, 7, 0.88),  # MiniLM-L6 + EfficientNet-lite0 (pretrained)
}


def item_bytes(shapes: Shapes, mean_tokens: float = 30.0) -> float:
    """Float16 bytes per item in memory: CLS + real tokens (CLS dropped) + one map."""
    return 2 * (shapes.layers * shapes.width * mean_tokens + shapes.channels * shapes.side ** 2)


def token_lengths(rng: np.random.Generator, n: int, max_length: int = 202) -> np.ndarray:
    """Real tokens per text without CLS (SEP kept): tweets have a mean of ~30 with CLS and SEP."""
    return np.clip(np.rint(rng.lognormal(np.log(26.0), 0.45, n)), 2, max_length - 1).astype(np.int64)


def write(cache_dir: Path, dataset: str, items: int, shapes: Shapes, shard_size: int = 512, seed: int = 0,
          log=print) -> dict:
    """Write the cache; returns where it is and how big (bytes in memory as float16, on disk).
    A finished cache of the same name, size, shapes and seed is kept as it is, so a benchmark can
    write its caches while the cores are busy and measure later on an idle machine."""
    kept = existing(cache_dir, dataset, items, shapes, seed)
    if kept:
        log and log(f"  kept {cache_dir}/{dataset} ({items} items)")
        return kept
    rng = np.random.default_rng(seed)
    splits = np.array(["train"] * 8 + ["dev"] + ["test"])[rng.integers(0, 10, items)]
    labels = rng.integers(0, len(CLASSES), items)
    n_shards = -(-items // shard_size)
    folders = {kind: store.cache_folder(cache_dir, dataset, kind, enc)
               for kind, enc in ((store.TEXT, TEXT_ENCODER), (store.IMAGE, IMAGE_ENCODER))}
    provs = {
        store.TEXT: store.Provenance(store.TEXT, TEXT_ENCODER, "synthetic", "{}", dataset, f"seed{seed}", n_shards,
                                     shapes.layers, 202),
        store.IMAGE: store.Provenance(store.IMAGE, IMAGE_ENCODER, "synthetic", "{}", dataset, f"seed{seed}", n_shards),
    }
    for kind, folder in folders.items():
        store.prepare(folder, provs[kind], force=True)
    t0 = time.time()
    for k in range(n_shards):
        rows = slice(k * shard_size, min(items, (k + 1) * shard_size))
        n = rows.stop - rows.start
        ids = [f"item-{i:07d}" for i in range(rows.start, rows.stop)]
        lengths = token_lengths(rng, n)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        L, H = shapes.layers, shapes.width
        cls = rng.standard_normal((n, L, H), dtype=np.float32).astype(np.float16)
        tokens = rng.standard_normal((int(offsets[-1]), L, H), dtype=np.float32).astype(np.float16)
        name = store.shard_name(k, n_shards)
        store.write_text_shard(folders[store.TEXT] / name, provs[store.TEXT], ids, labels[rows], splits[rows],
                               cls, tokens, offsets)
        maps = rng.standard_normal((n, shapes.channels, shapes.side, shapes.side), dtype=np.float32)
        maps -= np.quantile(maps[: min(n, 8)], shapes.zeros)  # that share of values falls below 0
        np.maximum(maps, 0, out=maps)
        store.write_image_shard(folders[store.IMAGE] / name, provs[store.IMAGE], ids, labels[rows], splits[rows],
                                maps.astype(np.float16))
        if log and (k + 1) % max(1, n_shards // 10) == 0:
            log(f"  shard {k + 1}/{n_shards} ({time.time() - t0:.0f} s)")
    for kind, folder in folders.items():
        assert store.finish(folder, provs[kind])
    counts = {s: int((splits == s).sum()) for s in ("train", "dev", "test")}
    store.write_dataset_info(Path(cache_dir) / dataset, {"name": dataset, "classes": CLASSES, "counts": counts,
                                                         "synth": _signature(items, shapes, seed)}, [])
    return _summary(cache_dir, dataset, counts, folders, write_seconds=time.time() - t0)


def _signature(items: int, shapes: Shapes, seed: int) -> dict:
    return {"items": items, "shapes": asdict(shapes), "seed": seed}


def _summary(cache_dir: Path, dataset: str, counts: dict, folders: dict, write_seconds: float | None) -> dict:
    return {"cache_dir": str(cache_dir), "dataset": dataset, "items": sum(counts.values()), "counts": counts,
            "memory_bytes": sum(store.feature_bytes(f) for f in folders.values()),
            "disk_bytes": sum(p.stat().st_size for f in folders.values() for p in f.glob("*.h5")),
            "write_seconds": write_seconds}


def existing(cache_dir: Path, dataset: str, items: int, shapes: Shapes, seed: int) -> dict | None:
    """The summary of a finished cache written by `write` with these arguments, else None."""
    folders = {kind: store.cache_folder(cache_dir, dataset, kind, enc)
               for kind, enc in ((store.TEXT, TEXT_ENCODER), (store.IMAGE, IMAGE_ENCODER))}
    if not all((f / "index.json").is_file() for f in folders.values()):
        return None
    try:
        info = store.read_dataset_info(Path(cache_dir) / dataset)
    except store.UserError:
        return None
    if info.get("synth") != _signature(items, shapes, seed):
        return None
    return _summary(cache_dir, dataset, info["counts"], folders, write_seconds=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, required=True)
    ap.add_argument("--dataset", default="synth")
    ap.add_argument("--items", type=int, required=True)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="paper")
    ap.add_argument("--shard-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(write(args.cache_dir, args.dataset, args.items, SHAPES[args.shapes], args.shard_size, args.seed))


if __name__ == "__main__":
    main()
