"""The feature cache: the only module that knows HDF5 dataset and attribute names.

Layout (a public contract; README "Cache format" documents it for plain-h5py readers):

    <cache>/<dataset>/dataset.json           classes, split counts, how splits were made
    <cache>/<dataset>/problems.csv           id, stage, reason of every skipped/repaired item
    <cache>/<dataset>/text/<encoder>/        shard-00000-of-00009.h5 ... + index.json
    <cache>/<dataset>/text/<encoder>/view-01/ ... view-K/   optional dropout views (train split only)
    <cache>/<dataset>/image/<encoder>/       the same for image feature maps

Every shard holds `ids` (N,) str, `labels` (N,) int64 (-1 unknown), `split` (N,) str, and
- text:  `cls` (N, L, H) f16, `tokens` (T, L, H) f16 (real tokens of all N texts
          concatenated, CLS dropped, SEP kept), `offsets` (N+1,) int64;
- image: `maps` (N, C, h, w) f16, compressed losslessly (post-ReLU maps are mostly zeros).
Attributes carry the provenance (encoder, weights fingerprint, layers, preprocessing,
max length, data hash, view).

A text view folder is a text cache of its own (same shards, datasets and provenance but
`view` = v): the train items of each clean shard encoded again with the encoder's dropout
on, seeded per shard and view. It sits inside the clean folder so that rebuilding the
clean cache (`--force`) also drops views made from it, yet adding views never rewrites
a clean shard. Shards are written to a temp file and renamed, so a shard on
disk is always whole: that is what makes resuming after a kill safe.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import h5py
import numpy as np
import torch

from core.errors import UserError
from core.paths import make_dir, write_atomic

FORMAT_VERSION = 1
TEXT, IMAGE = "text", "image"
_SHARD = re.compile(r"shard-(\d{5})-of-(\d{5})\.h5$")
_STR = h5py.string_dtype("utf-8")
MAP_COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}


@dataclass(frozen=True)
class Provenance:
    """Everything a cache's contents depend on; two caches agree iff these agree."""

    kind: str  # TEXT or IMAGE
    encoder: str
    fingerprint: str  # hash of the encoder's weights ("random-<seed>" for random weights)
    preprocessing: str  # JSON text: tokenizer / resize+normalise settings
    dataset: str
    data_hash: str
    n_shards: int
    layers: int = 0  # text: how many last layers are kept
    max_length: int = 0  # text: tokenizer truncation
    view: int = 0  # text: 0 = eval-mode states; v >= 1 = dropout view v (train mode, seeded)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict) -> "Provenance":
        """From index.json or a run's config.json (keys this version does not know are left out)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def differences(self, other: "Provenance") -> list[str]:
        return [
            f"{f.name} {getattr(other, f.name)!r} (asked {getattr(self, f.name)!r})"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def slug(encoder: str) -> str:
    """A folder name for an encoder given by name or path."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(encoder).name if os.sep in encoder else encoder).strip("_")


def cache_folder(cache_dir: Path, dataset: str, kind: str, encoder: str) -> Path:
    return Path(cache_dir) / dataset / kind / slug(encoder)


def view_folder(text_folder: Path, view: int) -> Path:
    return Path(text_folder) / f"view-{view:02d}"


def view_folders(text_folder: Path) -> list[Path]:
    """The view folders beside a clean text cache, complete or not, in view order."""
    found = [p for p in Path(text_folder).glob("view-*") if p.is_dir() and re.fullmatch(r"view-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}.h5"


# --- writing ---------------------------------------------------------------------------

def prepare(folder: Path, prov: Provenance, force: bool) -> set[int]:
    """Check an existing cache against what is asked; return the shard numbers already done.

    A cache built differently is refused (never silently mixed): `force` wipes it.
    """
    folder = Path(folder)
    if force and folder.exists():
        shutil.rmtree(folder)
    make_dir(folder)
    for tmp in folder.glob("*.tmp*"):  # half-written shards of a killed run
        if not _writer_alive(tmp):  # another rank may be writing this one right now
            tmp.unlink(missing_ok=True)
    done = set()
    for path in sorted(folder.glob("shard-*.h5")):
        found = read_provenance(path)
        diff = prov.differences(found)
        if diff:
            raise UserError(
                f"cache {folder} was built differently: {'; '.join(diff)}. "
                "Pass --force to rebuild it, or another --cache-dir"
            )
        done.add(int(_SHARD.search(path.name).group(1)))
    return done


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that names a temp file (`<file>.tmp<pid>`) is still running here."""
    pid = tmp.name.rpartition(".tmp")[2]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def _attrs(f: h5py.File, prov: Provenance, problems: list[tuple[str, str, str]]) -> None:
    for k, v in asdict(prov).items():
        f.attrs[k] = v
    f.attrs["problems"] = json.dumps(problems)


def _common(f: h5py.File, ids, labels, splits) -> None:
    f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=_STR, track_times=False)
    f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64), track_times=False)
    f.create_dataset("split", data=np.array(splits, dtype=object), dtype=_STR, track_times=False)


def _atomic(path: Path, fill) -> None:
    """Write via a temp file and rename, so a shard on disk is never half-written.

    HDF5 builds the file in memory (the file it would write to disk, bar up to a few KB of unused
    space it trims when closing a file on disk) and Python writes it out: HDF5 itself writing to a full disk was seen to crash the process (a segfault), leaving the
    temp file behind. A failed write deletes its temp file and raises an OSError naming the shard."""
    with h5py.File(f"{path.name}.in-memory", "w", driver="core", backing_store=False, track_order=True) as f:
        fill(f)
        f.flush()
        image = f.id.get_file_image()
    write_atomic(path, image)


def write_text_shard(path, prov, ids, labels, splits, cls, tokens, offsets, problems=()) -> None:
    def fill(f):
        _attrs(f, prov, list(problems))
        _common(f, ids, labels, splits)
        f.create_dataset("cls", data=np.asarray(cls, dtype=np.float16), track_times=False)
        f.create_dataset("tokens", data=np.asarray(tokens, dtype=np.float16), track_times=False)
        f.create_dataset("offsets", data=np.asarray(offsets, dtype=np.int64), track_times=False)

    _atomic(Path(path), fill)


def write_image_shard(path, prov, ids, labels, splits, maps, problems=()) -> None:
    maps = np.asarray(maps, dtype=np.float16)

    def fill(f):
        _attrs(f, prov, list(problems))
        _common(f, ids, labels, splits)
        chunks = (1, *maps.shape[1:]) if len(maps) else None
        f.create_dataset("maps", data=maps, chunks=chunks, track_times=False, **(MAP_COMPRESSION if len(maps) else {}))

    _atomic(Path(path), fill)


def finish(folder: Path, prov: Provenance) -> bool:
    """Write index.json once every shard is on disk (any rank may call it; the result is the same)."""
    folder = Path(folder)
    shards = [folder / shard_name(k, prov.n_shards) for k in range(prov.n_shards)]
    if not all(p.exists() for p in shards):
        return False
    entries = []
    for p in shards:
        with h5py.File(p, "r") as f:
            split = np.array(_strings(f["split"]))
            lengths = np.diff(f["offsets"][()]) if "offsets" in f else np.zeros(len(split), np.int64)
        per_split = {s: [int((split == s).sum()), int(lengths[split == s].sum())] for s in np.unique(split)}
        entries.append({"file": p.name, "n": len(split), "splits": per_split})
    index = {"provenance": asdict(prov), "shards": entries, "n_items": sum(e["n"] for e in entries)}
    write_atomic(folder / "index.json", json.dumps(index, indent=1))
    return True


def write_dataset_info(root: Path, info: dict, problems: list[tuple[str, str, str]]) -> None:
    make_dir(root)
    write_atomic(root / "dataset.json", json.dumps(info, indent=1))
    rows = io.StringIO(newline="")
    w = csv.writer(rows)
    w.writerow(["id", "stage", "reason"])
    w.writerows(problems)
    write_atomic(root / "problems.csv", rows.getvalue())


# --- reading ---------------------------------------------------------------------------

def read_provenance(path: Path) -> Provenance:
    with h5py.File(path, "r") as f:
        a = dict(f.attrs)
    kw = {fl.name: a[fl.name] for fl in fields(Provenance) if fl.name in a}
    return Provenance(**{k: (v.item() if hasattr(v, "item") else v) for k, v in kw.items()})


def shard_problems(folder: Path) -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(Path(folder).glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            out += [tuple(p) for p in json.loads(f.attrs.get("problems", "[]"))]
    return out


def open_index(folder: Path, extract_hint: str) -> dict:
    index = Path(folder) / "index.json"
    if not index.is_file():
        raise UserError(f"no complete cache at {folder}: run `{extract_hint}` (it resumes if it was interrupted)")
    return json.loads(index.read_text())


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
    for entry in index["shards"]:
        with h5py.File(Path(folder) / entry["file"], "r") as f:
            split = np.array(_strings(f["split"]))
            ids, labels = _strings(f["ids"]), f["labels"][()]
            if not out and len(split):
                out = _allocate(index, splits, allocate(f))
                fill = {s: (0, 0) for s in out}
            arrays = read(f) if len(split) else None
        for s, feats in out.items():
            rows = np.flatnonzero(split == s)
            if not len(rows):
                continue
            i = fill[s][0]
            feats.ids += [ids[r] for r in rows]
            feats.labels[i : i + len(rows)] = torch.from_numpy(labels[rows])
            fill[s] = place(feats, fill[s], rows, arrays)
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
    for entry in index["shards"]:
        with h5py.File(Path(folder) / entry["file"], "r") as f:
            ids += _strings(f["ids"])
            labels.append(f["labels"][()])
            splits += _strings(f["split"])
    return ids, np.concatenate(labels) if labels else np.zeros(0, np.int64), splits


def pooled_maps(folder: Path, hint: str = "pipeline.py extract") -> tuple[list[str], np.ndarray]:
    """Ids and the spatial mean of every image feature map, (N, C) float32, read one shard at
    a time: near-duplicate search needs one vector per image, never the whole maps in memory."""
    index = open_index(folder, hint)
    ids, pooled = [], []
    for entry in index["shards"]:
        with h5py.File(Path(folder) / entry["file"], "r") as f:
            ids += _strings(f["ids"])
            maps = f["maps"]
            for start in range(0, len(maps), 256):
                pooled.append(maps[start : start + 256].astype(np.float32).mean(axis=(2, 3)))
    return ids, np.concatenate(pooled) if pooled else np.zeros((0, 0), np.float32)
