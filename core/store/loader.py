"""Reading a cache into memory: whole splits as tensors (`load_text`, `load_image`) and what
is known of a cache without its features. Every shard is checked against its checksum before a
number is read from it."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np
import torch

from core.errors import UserError
from core.store.layout import (CHECKSUM, Provenance, _READ_ERRORS, _index_problem, _json_or_empty, _why,
                               shard_damage)
from core.store.repair import damage_message

def read_dataset_info(root: Path) -> dict:
    """dataset.json of a cached data set (classes, counts, how it was made); a damaged one is
    one UserError naming the command that rewrites it."""
    path = Path(root) / "dataset.json"
    info = _json_or_empty(path)
    if not isinstance(info.get("classes"), list):
        raise UserError(damage_message(path, "unreadable, or without its list of classes"))
    return info


def read_provenance(path: Path) -> Provenance:
    with h5py.File(path, "r") as f:
        a = dict(f.attrs)
    kw = {fl.name: a[fl.name] for fl in fields(Provenance) if fl.name in a}
    return Provenance(**{k: (v.item() if hasattr(v, "item") else v) for k, v in kw.items()})


def shard_problems(folder: Path) -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(Path(folder).glob("shard-*.h5")):
        with _read_shard(path) as f:
            out += [tuple(p) for p in json.loads(f.attrs.get("problems", "[]"))]
    return out


@contextmanager
def _read_shard(path: Path):
    """An open shard; any error while reading it (truncated file, a filter failing on damaged
    bytes, a dataset gone) is one UserError naming the file and the command that repairs it."""
    try:
        with h5py.File(path, "r") as f:
            yield f
    except _READ_ERRORS as e:
        raise UserError(damage_message(path, f"unreadable ({_why(e)})")) from None


def open_index(folder: Path, extract_hint: str) -> dict:
    """A cache folder's index, checked: a missing one names `extract_hint` (the cache was never
    finished); an unreadable, altered or malformed one names the command that rebuilds it."""
    path = Path(folder) / "index.json"
    if not path.is_file():
        raise UserError(f"no complete cache at {folder}: run `{extract_hint}` (it resumes if it was interrupted)")
    problem, index = _index_problem(path)
    if problem:
        raise UserError(damage_message(path, problem))
    return index


def _shards(folder: Path, index: dict):
    """(entry, path) of every shard an index lists, each checked against its checksum first."""
    required = index.get("checksums") == CHECKSUM
    for entry in index["shards"]:
        path = Path(folder) / entry["file"]
        damage = shard_damage(path, required)
        if damage:
            raise UserError(damage_message(path, damage))
        yield entry, path


@dataclass
class TextFeatures:
    ids: list[str]
    labels: torch.Tensor  # (N,) int64
    cls: torch.Tensor  # (N, L, H) float16
    tokens: torch.Tensor  # (T, L, H) float16
    offsets: torch.Tensor  # (N+1,) int64

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


@dataclass
class ImageFeatures:
    ids: list[str]
    labels: torch.Tensor
    maps: torch.Tensor  # (N, C, h, w) float16


def _strings(ds) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else s for s in ds[()]]


def _allocate(index: dict, splits, shape_of) -> dict:
    """Preallocate each split's arrays from the index counts: the cache is read straight
    into its final place, so peak memory stays near the cache's own size."""
    totals = {s: [0, 0] for s in splits}
    for entry in index["shards"]:
        for s, (n, t) in entry["splits"].items():
            if s in totals:
                totals[s][0] += n
                totals[s][1] += t
    return {s: shape_of(n, t) for s, (n, t) in totals.items() if n}


def _load(folder: Path, splits, hint: str, allocate, read, place) -> dict:
    """One pass over a cache's shards: each requested split's rows are copied straight into
    arrays preallocated from the index counts. `allocate(f)` gives `_allocate` its shape_of
    from the first non-empty shard, `read(f)` a shard's feature arrays (one read per shard;
    a shard is small), `place(feats, (items, tokens) written, rows, arrays)` copies the rows
    and returns the new counts."""
    index = open_index(folder, hint)
    out, fill = {}, {}
    for entry, path in _shards(folder, index):
        with _read_shard(path) as f:
            split = np.array(_strings(f["split"]))
            ids, labels = _strings(f["ids"]), f["labels"][()]
            if not out and len(split):
                out = _allocate(index, splits, allocate(f))
                fill = {s: (0, 0) for s in out}
            arrays = read(f) if len(split) else None
        if len(split) != entry["n"] or len(ids) != len(split) or len(labels) != len(split):
            raise UserError(damage_message(path, f"{len(split)} items where index.json lists {entry['n']}"))
        try:
            for s, feats in out.items():
                rows = np.flatnonzero(split == s)
                if not len(rows):
                    continue
                i = fill[s][0]
                feats.ids += [ids[r] for r in rows]
                feats.labels[i : i + len(rows)] = torch.from_numpy(labels[rows])
                fill[s] = place(feats, fill[s], rows, arrays)
        except (RuntimeError, IndexError, ValueError):  # more rows than the index counted
            raise UserError(damage_message(Path(folder) / "index.json", "its split counts disagree with the shards")) from None
    for s, feats in out.items():  # never a preallocated row left unread (an older index has no checksum)
        if fill[s] != (len(feats.labels), len(getattr(feats, "tokens", ()))):
            raise UserError(damage_message(Path(folder) / "index.json", "its split counts disagree with the shards"))
    return out


def load_text(folder: Path, splits=("train", "dev", "test"), hint: str = "pipeline.py extract") -> dict[str, TextFeatures]:
    """Every requested split of a text cache as in-memory tensors (one pass over the shards)."""

    def allocate(f):
        L, H = f["cls"].shape[1:]
        return lambda n, t: TextFeatures(
            [], torch.empty(n, dtype=torch.int64), torch.empty(n, L, H, dtype=torch.float16),
            torch.empty(t, L, H, dtype=torch.float16), torch.zeros(n + 1, dtype=torch.int64))

    def place(feats, at, rows, arrays):
        cls, tok, offsets = arrays
        i, t = at
        feats.cls[i : i + len(rows)] = torch.from_numpy(cls[rows])
        for r in rows:
            n = int(offsets[r + 1] - offsets[r])
            feats.tokens[t : t + n] = torch.from_numpy(tok[offsets[r] : offsets[r + 1]])
            i += 1
            t += n
            feats.offsets[i] = t
        return i, t

    out = _load(folder, splits, hint, allocate, lambda f: (f["cls"][()], f["tokens"][()], f["offsets"][()]), place)
    if not out:
        dataset = open_index(folder, hint)["provenance"]["dataset"]
        raise UserError(f"cache {folder} holds none of the splits {', '.join(splits)} ({dataset})")
    return out


def load_image(folder: Path, splits=("train", "dev", "test"), hint: str = "pipeline.py extract") -> dict[str, ImageFeatures]:
    """Every requested split of an image cache as in-memory tensors."""

    def allocate(f):
        shape = f["maps"].shape[1:]
        # channels-last in memory (NHWC strides, same NCHW shape): the heads' 1x1
        # convolution and its BatchNorm run about 1.7x faster on it on CPU
        return lambda n, t: ImageFeatures(
            [], torch.empty(n, dtype=torch.int64),
            torch.empty(n, *shape, dtype=torch.float16).contiguous(memory_format=torch.channels_last))

    def place(feats, at, rows, maps):
        feats.maps[at[0] : at[0] + len(rows)] = torch.from_numpy(maps[rows])
        return at[0] + len(rows), 0

    out = _load(folder, splits, hint, allocate, lambda f: f["maps"][()], place)
    if not out:
        raise UserError(f"image cache {folder} holds none of the splits {', '.join(splits)}")
    return out


def provenance(folder: Path, hint: str = "pipeline.py extract") -> Provenance:
    return Provenance.from_dict(open_index(folder, hint)["provenance"])


def read_meta(folder: Path, hint: str = "pipeline.py extract") -> tuple[list[str], np.ndarray, list[str]]:
    """Ids, labels and splits of every item of a cache, without its features (the audit
    needs who is where, not the tensors; reading only these keeps it fast on big caches)."""
    index = open_index(folder, hint)
    ids, labels, splits = [], [], []
    for _, path in _shards(folder, index):
        with _read_shard(path) as f:
            ids += _strings(f["ids"])
            labels.append(f["labels"][()])
            splits += _strings(f["split"])
    return ids, np.concatenate(labels) if labels else np.zeros(0, np.int64), splits


def pooled_maps(folder: Path, hint: str = "pipeline.py extract") -> tuple[list[str], np.ndarray]:
    """Ids and the spatial mean of every image feature map, (N, C) float32, read one shard at
    a time: near-duplicate search needs one vector per image, never the whole maps in memory."""
    index = open_index(folder, hint)
    ids, pooled = [], []
    for _, path in _shards(folder, index):
        with _read_shard(path) as f:
            ids += _strings(f["ids"])
            maps = f["maps"]
            for start in range(0, len(maps), 256):
                pooled.append(maps[start : start + 256].astype(np.float32).mean(axis=(2, 3)))
    return ids, np.concatenate(pooled) if pooled else np.zeros((0, 0), np.float32)


def feature_bytes(folder: Path, splits=("train", "dev", "test"), hint: str = "pipeline.py extract") -> int:
    """Bytes that `load_text` / `load_image` would hold in memory for these splits of a cache
    (features, float16, as stored uncompressed), from index.json and one non-empty shard's shapes."""
    index = open_index(folder, hint)
    n = t = 0
    for entry in index["shards"]:
        for s, (ni, ti) in entry["splits"].items():
            if s in splits:
                n, t = n + ni, t + ti
    if not n:
        return 0
    path = Path(folder) / next(e["file"] for e in index["shards"] if e["n"])
    if not path.is_file():  # named as the load names it; the load verifies every shard's bytes
        raise UserError(damage_message(path, "missing"))
    with _read_shard(path) as f:
        if "maps" in f:
            return n * int(np.prod(f["maps"].shape[1:])) * 2
        row = int(np.prod(f["cls"].shape[1:])) * 2
    return (n + t) * row + 8 * (n + 1)
