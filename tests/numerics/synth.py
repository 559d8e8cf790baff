"""The numerics tests' cache: small, deterministic, synthetic, written with the store's own writer.

Synthetic, not extracted: its features come from a seeded numpy generator, never from an
encoder's float kernels, so the goldens trained on it do not depend on the CPU that made it.
3 imbalanced classes (48 train, 24 dev, 24 test items, each split stored sorted by label as the
shipped split files are), text states of 4 layers x 16 with 2 to 6 tokens, image maps 8 x 3 x 3,
features that carry the label with noise and some items that carry another class's (so a head
learns something, dev moves from epoch to epoch, and SPP-SCL's gate opens on some batches and
not on others), 2 dropout views of the train texts (`--text-views`), and a split folder that
moves items between the splits (`--splits`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from core import store

DATASET, TEXT_ENCODER, IMAGE_ENCODER = "numerics", "numerics-text", "numerics-image"
CLASSES = ["positive", "neutral", "negative"]
SIZES = {"train": 48, "dev": 24, "test": 24}
SHARE = (0.5, 0.3, 0.2)  # of each class in every split
LAYERS, WIDTH, CHANNELS, SIDE, VIEWS = 4, 16, 8, 3, 2
MISLEAD = 0.3  # share of items whose features carry another class


@dataclass(frozen=True)
class Cache:
    cache_dir: Path
    splits: Path  # a folder of {train,dev,test}.txt that moves items between the splits
    dataset: str = DATASET
    text_encoder: str = TEXT_ENCODER
    image_encoder: str = IMAGE_ENCODER


def _items(rng: np.random.Generator) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """Ids, labels, splits (each split sorted by label) and the class each item's features show."""
    ids, labels, splits = [], [], []
    for split, n in SIZES.items():
        counts = np.floor(np.array(SHARE) * n).astype(int)
        counts[0] += n - counts.sum()
        ids += [f"{split}-{i:03d}" for i in range(n)]
        labels += np.repeat(np.arange(len(CLASSES)), counts).tolist()
        splits += [split] * n
    labels = np.array(labels)
    shown = np.where(rng.random(len(ids)) < MISLEAD, rng.integers(0, len(CLASSES), len(ids)), labels)
    return ids, labels, splits, shown


def _text(rng: np.random.Generator, shown: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CLS (N, L, H) and tokens (T, L, H): noise plus the shown class, stronger in the later layers."""
    direction = rng.normal(size=(len(CLASSES), WIDTH))
    depth = np.linspace(0.3, 1.2, LAYERS)[None, :, None]
    cls = rng.normal(size=(len(shown), LAYERS, WIDTH)) + depth * direction[shown][:, None, :]
    per_token = np.repeat(shown, lengths)
    tokens = rng.normal(size=(len(per_token), LAYERS, WIDTH)) + 0.8 * depth * direction[per_token][:, None, :]
    return cls, tokens


def _maps(rng: np.random.Generator, shown: np.ndarray) -> np.ndarray:
    """Post-ReLU maps (N, C, h, w): the shown class lights up its own channels, unevenly in space."""
    pattern = np.abs(rng.normal(size=(len(CLASSES), CHANNELS, SIDE, SIDE)))
    return np.maximum(rng.normal(size=(len(shown), CHANNELS, SIDE, SIDE)) + 0.9 * pattern[shown] - 0.3, 0)


def _write(folder: Path, prov: store.Provenance, write, *args) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / store.shard_name(0, 1), prov, *args)
    assert store.finish(folder, prov), folder


def write(root: Path, seed: int = 0) -> Cache:
    """The cache under `root/cache` and its split folder `root/splits`; the same bytes every time."""
    rng = np.random.default_rng(seed)
    cache_dir = Path(root) / "cache"
    ids, labels, splits, shown = _items(rng)
    lengths = rng.integers(2, 7, len(ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    cls, tokens = _text(rng, shown, lengths)
    maps = _maps(rng, shown)
    text_dir = store.cache_folder(cache_dir, DATASET, store.TEXT, TEXT_ENCODER)
    text = store.Provenance(store.TEXT, TEXT_ENCODER, "synthetic", "{}", DATASET, f"seed{seed}", 1, LAYERS, 32)
    _write(text_dir, text, store.write_text_shard, ids, labels, splits, cls, tokens, offsets)
    image = store.Provenance(store.IMAGE, IMAGE_ENCODER, "synthetic", "{}", DATASET, f"seed{seed}", 1)
    _write(store.cache_folder(cache_dir, DATASET, store.IMAGE, IMAGE_ENCODER), image, store.write_image_shard,
           ids, labels, splits, maps)
    train = np.flatnonzero(np.array(splits) == "train")
    rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in train])
    for v in range(1, VIEWS + 1):  # a dropout view: the train texts with noise of their own
        view = replace(text, view=v)
        _write(store.view_folder(text_dir, v), view, store.write_text_shard, [ids[i] for i in train], labels[train],
               ["train"] * len(train), cls[train] + 0.3 * rng.normal(size=cls[train].shape),
               tokens[rows] + 0.3 * rng.normal(size=tokens[rows].shape),
               np.concatenate([[0], np.cumsum(lengths[train])]))
    store.write_dataset_info(cache_dir / DATASET, {"classes": CLASSES, "counts": SIZES}, [])
    return Cache(cache_dir, _write_splits(Path(root) / "splits", ids, splits))


def _write_splits(folder: Path, ids: list[str], splits: list[str]) -> Path:
    """Every third dev item to train, every fourth train item to test: other splits of the same items."""
    moved = {}
    for i, (id_, s) in enumerate(zip(ids, splits)):
        moved[id_] = "train" if s == "dev" and i % 3 == 0 else "test" if s == "train" and i % 4 == 0 else s
    folder.mkdir(parents=True, exist_ok=True)
    for s in SIZES:
        (folder / f"{s}.txt").write_text("".join(f"{id_}\n" for id_, t in moved.items() if t == s))
    return folder
