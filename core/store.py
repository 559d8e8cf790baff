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

What we write, we can check: beside each shard, `<shard>.sha256` (sha256sum's format) holds
the SHA-256 of the shard's bytes, written before the shard is renamed into place; index.json
carries `"checksums": "sha256"` and the SHA-256 of its own content. Every load hashes each
shard before a number is read from it, so flipped, lost or truncated bytes anywhere in a
shard are one UserError naming the file and the `extract` command that re-encodes it
(`extract` redoes exactly the shards that fail). A cache made before checksums (no
`"checksums"` in its index) loads unverified; `verify` says so.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shlex
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import h5py
import numpy as np
import torch

from core.defaults import IMAGE_ENCODER, TEXT_ENCODER
from core.errors import UserError
from core.paths import DEFAULT_CACHE, make_dir, write_atomic

FORMAT_VERSION = 1
TEXT, IMAGE = "text", "image"
_SHARD = re.compile(r"shard-(\d{5})-of-(\d{5})\.h5$")
_STR = h5py.string_dtype("utf-8")
# the one layout of `maps`, one map per chunk: HDF5 records these filters, write_image_shard encodes as they would
MAP_FILTERS = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
try:  # ISA-L inflates deflate streams about twice as fast as zlib and deflates about four times as fast
    from isal.isal_zlib import compress as _deflate, decompress as _inflate, error as _InflateError
except ImportError:  # optional (requirements.txt): zlib reads and writes the same format; all release the GIL
    from zlib import compress as _deflate, decompress as _inflate, error as _InflateError
CHECKSUM = "sha256"  # index.json "checksums": every shard has a `<shard>.sha256` beside it
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError, UnicodeError)  # h5py on bad bytes


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


def check_name(name: str, flag: str = "--name") -> str:
    """A data set's name is one folder inside the cache: never a path that leaves it."""
    seps = {"/", os.sep, os.altsep or "/", "\x00"}
    if not name.strip() or name in (".", "..") or any(c in name for c in seps):
        raise UserError(f"{flag} {name!r}: give a plain folder name for the data set (no '/', not '.' or '..', "
                        "not empty), e.g. my_tweets")
    return name


def id_problem(id_: str) -> str | None:
    """Why an item id cannot be stored in a shard (HDF5 UTF-8 strings), or None."""
    if "\x00" in id_:
        return "id holds a NUL character, which HDF5 strings cannot store: fix the id"
    try:
        id_.encode("utf-8")
    except UnicodeEncodeError:
        return "id is not valid Unicode (a lone surrogate), which HDF5 strings cannot store: fix the id"
    return None


def shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}.h5"


# --- writing ---------------------------------------------------------------------------

def prepare(folder: Path, prov: Provenance, force: bool, on_damage=lambda path, reason: None) -> set[int]:
    """Check an existing cache against what is asked; return the shard numbers already done.

    A cache built differently is refused (never silently mixed): `force` wipes it. A shard
    that fails its checksum or cannot be read is not done: `on_damage(path, reason)` hears of
    it and the caller re-encodes it (the new shard replaces it by rename; nothing is deleted
    here, so a rank never removes a shard another rank has just rewritten).
    """
    folder = Path(folder)
    if force and folder.exists():
        shutil.rmtree(folder)
    make_dir(folder)
    for tmp in folder.glob("*.tmp*"):  # half-written shards of a killed run
        if not _writer_alive(tmp):  # another rank may be writing this one right now
            tmp.unlink(missing_ok=True)
    required = _promises_checksums(folder)
    if (folder / "index.json").is_file() and (problem := _index_problem(folder / "index.json")[0]):
        on_damage(folder / "index.json", problem)  # rewritten once every shard is whole
    done = set()
    for path in sorted(folder.glob("shard-*.h5")):
        damage = shard_damage(path, required)
        if damage is None:
            try:
                found = read_provenance(path)
            except _READ_ERRORS as e:
                damage = f"unreadable ({_why(e)})"
        if damage is not None:
            on_damage(path, damage)
            continue
        diff = prov.differences(found)
        if diff:
            raise UserError(
                f"cache {folder} was built differently: {'; '.join(diff)}. "
                "Pass --force to rebuild it, or another --cache-dir"
            )
        done.add(int(_SHARD.search(path.name).group(1)))
    return done


def _promises_checksums(folder: Path) -> bool:
    """Whether every shard of this folder must have a checksum: its index says so, or (no
    readable index yet: a build in progress) the writer that makes them has been at work. An
    index of the older format keeps its shards unverified, even beside a re-encoded one."""
    index = _json_or_empty(Path(folder) / "index.json")
    if index:
        return index.get("checksums") == CHECKSUM
    return any(Path(folder).glob("shard-*.h5.sha256"))


def unverified(folder: Path) -> bool:
    """A finished cache folder of the older format: its shards carry no checksums."""
    return (Path(folder) / "index.json").is_file() and not _promises_checksums(folder)


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
    """Write via a temp file and rename, so a shard on disk is never half-written. Its checksum
    file is written first: a shard under its real name always has one beside it.

    HDF5 builds the file in memory (the file it would write to disk, bar up to a few KB of unused
    space it trims when closing a file on disk) and Python writes it out: HDF5 itself writing to a
    full disk was seen to crash the process (a segfault), leaving the temp file behind. A failed
    write deletes its temp file and raises an OSError naming the shard."""
    with h5py.File(f"{path.name}.in-memory", "w", driver="core", backing_store=False, track_order=True) as f:
        fill(f)
        f.flush()
        image = f.id.get_file_image()
    write_atomic(sidecar(path), f"{hashlib.sha256(image).hexdigest()}  {path.name}\n")
    write_atomic(path, image)


# --- checksums -------------------------------------------------------------------------

def sidecar(shard: Path) -> Path:
    """`shard-00000-of-00009.h5.sha256`: the shard's SHA-256, in sha256sum's format."""
    return Path(shard).with_name(Path(shard).name + ".sha256")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def shard_damage(path: Path, required: bool) -> str | None:
    """Why the shard at `path` cannot be trusted, or None. `required`: its folder promises a
    checksum for every shard (a shard of the older format has none and passes unverified)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    side = sidecar(path)
    if not side.is_file():
        return f"its checksum file {side.name} is missing" if required else None
    try:
        want = side.read_text().split()[0]
        got = sha256_file(path)
    except (OSError, UnicodeError, IndexError) as e:
        return f"unreadable ({_why(e)})"
    if got != want:
        return f"its bytes differ from the SHA-256 in {side.name} (flipped, lost or truncated bytes)"
    return None


def index_digest(index: dict) -> str:
    """SHA-256 of an index's content (all but its own `sha256`), independent of layout."""
    body = {k: v for k, v in index.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _why(e: BaseException) -> str:
    """An exception as a short, one-line reason."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


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
        if not len(maps):  # every image of the shard failed: no map, no chunk
            f.create_dataset("maps", data=maps, track_times=False)
            return
        ds = f.create_dataset("maps", maps.shape, maps.dtype, chunks=(1, *maps.shape[1:]), track_times=False,
                              **MAP_FILTERS)
        # each map's chunk as MAP_FILTERS store it, made here rather than by HDF5
        raw = np.ascontiguousarray(maps).view(np.uint8).reshape(len(maps), -1, 2)
        shuffled = np.ascontiguousarray(raw.transpose(0, 2, 1))  # every value's low bytes, then its high bytes
        with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="deflate") as pool:
            for i, blob in enumerate(pool.map(_deflate_1, shuffled)):
                ds.id.write_direct_chunk((i,) + (0,) * (maps.ndim - 1), blob)

    _atomic(Path(path), fill)


def _deflate_1(chunk: np.ndarray) -> bytes:
    """Deflate at level 1, by ISA-L where installed. Why not HDF5's own filter: HDF5 runs zlib on
    one thread under h5py's lock; ISA-L's level 1 writes a standard deflate stream (zlib and HDF5
    read it) in about a quarter of zlib's time, and the maps of a shard deflate on every core."""
    return _deflate(chunk, 1)


def finish(folder: Path, prov: Provenance, flags: list[str] | None = None, written: set[int] = frozenset()) -> bool:
    """Write index.json once every shard is on disk and passes its checksum (any rank may call
    it; the result is the same). The shards numbered in `written`, which this process has just
    written with checksums of the bytes it wrote, are not read back to check them again (that
    read would cost as much as the write). With a checksum beside every shard, the index says so, keeps
    `flags` (the data-set and batching flags of the `extract` that made it, for the command
    that repairs it) and carries its own SHA-256; over shards of the older format it is the
    older index."""
    folder = Path(folder)
    shards = [folder / shard_name(k, prov.n_shards) for k in range(prov.n_shards)]
    checked = all(sidecar(p).is_file() for p in shards)
    if any(not p.is_file() if k in written else shard_damage(p, checked) for k, p in enumerate(shards)):
        return False  # missing, or another rank has yet to re-encode a damaged one
    entries = []
    for p in shards:
        with _read_shard(p) as f:
            split = np.array(_strings(f["split"]))
            lengths = np.diff(f["offsets"][()]) if "offsets" in f else np.zeros(len(split), np.int64)
        per_split = {s: [int((split == s).sum()), int(lengths[split == s].sum())] for s in np.unique(split)}
        entries.append({"file": p.name, "n": len(split), "splits": per_split})
    index = {"provenance": asdict(prov), "shards": entries, "n_items": sum(e["n"] for e in entries)}
    if checked:
        if flags:
            index["extract_flags"] = list(flags)
        index["checksums"] = CHECKSUM
        index["sha256"] = index_digest(index)
    write_atomic(folder / "index.json", json.dumps(index, indent=1))
    return True


def read_dataset_info(root: Path) -> dict:
    """dataset.json of a cached data set (classes, counts, how it was made); a damaged one is
    one UserError naming the command that rewrites it."""
    path = Path(root) / "dataset.json"
    info = _json_or_empty(path)
    if not isinstance(info.get("classes"), list):
        raise UserError(damage_message(path, "unreadable, or without its list of classes"))
    return info


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


def damage_message(path: Path, reason: str) -> str:
    """One line: which cache file is damaged, why, and the `extract` that repairs it."""
    path = Path(path)
    redo = "re-encode it (only damaged shards are redone)" if _SHARD.search(path.name) else "rewrite it"
    return f"cache file {path} is damaged: {reason}. Run `{repair_command(path.parent)}` to {redo}"


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


def _index_problem(path: Path) -> tuple[str | None, dict]:
    """(why index.json at `path` cannot be used or None, its content)."""
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeError, ValueError) as e:
        return f"unreadable ({_why(e)})", {}
    if not isinstance(index, dict):
        return "not a JSON object", {}
    if "checksums" in index or "sha256" in index:
        if index.get("checksums") != CHECKSUM or index.get("sha256") != index_digest(index):
            return "its content does not match its SHA-256 (altered bytes)", index
    try:  # the older format has no checksum: check its shape at least
        entries = index["shards"]
        assert isinstance(index["provenance"], dict) and isinstance(entries, list) and entries
        for e in entries:
            assert _SHARD.fullmatch(e["file"]) and isinstance(e["n"], int) and e["n"] >= 0
            assert all(isinstance(n, int) and isinstance(t, int) and 0 <= n <= e["n"] and t >= 0
                       for n, t in e["splits"].values())
        assert index["n_items"] == sum(e["n"] for e in entries)
    except (KeyError, TypeError, ValueError, AttributeError, AssertionError):
        return "malformed (fields missing or inconsistent)", index
    return None, index


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


# --- reading items by index (caches larger than memory) --------------------------------------

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


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Rows starts[i] .. starts[i] + lengths[i] - 1 of every i, back to back."""
    first = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return first + np.arange(int(lengths.sum()), dtype=np.int64)


def _runs(rows: np.ndarray, at: np.ndarray):
    """(rows, at) cut where either stops going up by one: each piece is one read of consecutive
    rows into consecutive places."""
    cut = np.flatnonzero((np.diff(rows) != 1) | (np.diff(at) != 1)) + 1
    return zip(np.split(rows, cut), np.split(at, cut))


_F16 = np.dtype("<f2")  # how every feature dataset is stored
_DEFLATE, _SHUFFLE = h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE


class _Feature:
    """One feature dataset (`cls`, `tokens` or `maps`) of one shard, read by rows bit for bit as
    stored, with as little of HDF5 as its layout allows. Why: a streamed epoch reads every item,
    and h5py, one call per row, paid its own overhead and the shuffle filter's byte loop on top
    of inflating each map, all under h5py's global lock.

    - contiguous and uncompressed (the text states): one `os.preadv` per run of consecutive rows,
      straight into the output (a memory map, as before, left every page it touched in the
      process's resident set: 4 GiB of text states of an 8 GiB synthetic cache, over a 3 GiB budget);
    - one item per chunk, deflate and shuffle or either (the maps, as `write_image_shard` stores
      them): where each chunk's bytes lie is read once; a row is then one `os.pread` and one
      inflate (ISA-L's, else zlib's; both release the GIL) and an unshuffle of two numpy operations;
    - stored any other way (another filter, several items per chunk): h5py, one read per run of
      consecutive rows.
    """

    def __init__(self, path: Path, f: h5py.File, name: str):
        ds = f[name]
        self.path, self.name, self.shape = Path(path), name, ds.shape
        self.width = int(np.prod(ds.shape[1:]))  # values per row
        self.offset = self.chunks = None
        plain = ds.dtype == _F16 and f.userblock_size == 0 and np.little_endian and ds.external is None
        plist = ds.id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        if plain and ds.chunks is None and not filters:
            self.offset = ds.id.get_offset()  # None while empty
        elif plain and ds.chunks == (1, *ds.shape[1:]) and filters in ([], [_DEFLATE], [_SHUFFLE], [_SHUFFLE, _DEFLATE]):
            table = np.full((len(ds), 3), -1, dtype=np.int64)  # byte offset, size, filter mask

            def note(chunk):
                table[chunk.chunk_offset[0]] = chunk.byte_offset, chunk.size, chunk.filter_mask

            try:
                ds.id.chunk_iter(note)
            except (AttributeError, NotImplementedError, RuntimeError):  # an HDF5 before 1.12.3: h5py reads
                table[:] = -1
            if (table[:, 0] >= 0).all():  # else a chunk never written (fill values): h5py knows what to give
                self.chunks, self.filters = table, filters
        self._open: dict = {}  # file descriptor (a forked child reads through it too), h5py's per process

    def _handle(self, kind: str):
        key = ("h5", os.getpid()) if kind == "h5" else kind  # an h5py handle serves the process that opened it
        if key not in self._open:
            if kind == "fd":
                self._open[key] = os.open(self.path, os.O_RDONLY)
            else:
                self._open[key] = h5py.File(self.path, "r")[self.name]
        return self._open[key]

    def read(self, rows: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:
        """out[at[i]] = this dataset's row rows[i], for every i."""
        if not len(rows):
            return
        if self.offset is not None:
            flat = out.reshape(len(out), -1)
            fd, row_bytes = self._handle("fd"), 2 * self.width
            for r, a in _runs(rows, at):
                buf = memoryview(flat[int(a[0]) : int(a[-1]) + 1]).cast("B")
                if os.preadv(fd, [buf], self.offset + int(r[0]) * row_bytes) != len(buf):
                    raise UserError(damage_message(self.path, f"shorter than its {self.name} rows need"))
        elif self.chunks is not None:
            flat = out.reshape(len(out), -1).view(np.uint16)
            fd = self._handle("fd")
            for r, a in zip(rows.tolist(), at.tolist()):
                self._inflate(r, os.pread(fd, int(self.chunks[r, 1]), int(self.chunks[r, 0])), flat[a])
        else:
            order = np.argsort(rows, kind="stable")
            ds = self._handle("h5")
            for r, a in _runs(rows[order], at[order]):
                ds.read_direct(out, np.s_[int(r[0]) : int(r[-1]) + 1], np.s_[int(a[0]) : int(a[-1]) + 1])

    def _inflate(self, r: int, raw: bytes, out: np.ndarray) -> None:
        """Row `r`'s chunk bytes `raw` decoded into `out` (its float16 values as uint16)."""
        skipped = int(self.chunks[r, 2])  # bit i: filter i was not applied to this chunk
        applied = [code for i, code in enumerate(self.filters) if not skipped >> i & 1]
        try:
            data = _inflate(raw) if _DEFLATE in applied else raw
        except _InflateError as e:
            raise UserError(damage_message(self.path, f"map {r} does not inflate ({e})")) from None
        if len(data) != 2 * self.width:
            raise UserError(damage_message(self.path, f"map {r} has {len(data)} bytes, not {2 * self.width}"))
        b = np.frombuffer(data, np.uint8)
        if _SHUFFLE in applied:  # the shuffle filter stores every value's low bytes, then its high bytes
            np.left_shift(b[self.width :], 8, out=out, dtype=np.uint16)
            np.bitwise_or(out, b[: self.width], out=out)
        else:
            out[:] = b.view(np.uint16)

    def close(self) -> None:
        for key, handle in self._open.items():
            if key == "fd":
                os.close(handle)
            elif key == ("h5", os.getpid()):
                handle.file.close()
        self._open = {}


class ItemReader:
    """The items of one cache folder by index, read from its shards on demand: what stage two
    uses when the splits it needs do not fit in memory.

    Items are numbered 0..n_items-1 in shard order, then row order within a shard (the order in
    which `load_text` / `load_image` fill a split). `ids`, `labels`, `splits` (and `lengths`,
    the token count of each text) are read once, at construction, when every shard is checked
    against its checksum as `load_text` / `load_image` check them; features are read per call,
    bit for bit as stored (`_Feature`), by any one thread at a time, in any process.
    """

    def __init__(self, folder: Path, hint: str = "pipeline.py extract"):
        self.folder = Path(folder)
        index = open_index(folder, hint)
        ids, labels, splits, starts, lengths = [], [], [], [], []
        self._features: list[dict[str, _Feature]] = []
        counts = []
        for entry, path in _shards(folder, index):
            with _read_shard(path) as f:
                n = len(f["ids"])
                ids += _strings(f["ids"])
                labels.append(f["labels"][()])
                splits += _strings(f["split"])
                names = ("cls", "tokens") if "offsets" in f else ("maps",)
                if "offsets" in f:
                    off = f["offsets"][()]
                    starts.append(off[:-1])
                    lengths.append(np.diff(off))
                self._features.append({name: _Feature(path, f, name) for name in names})
            if n != entry["n"] or len(labels[-1]) != n or len(ids) != len(splits):
                raise UserError(damage_message(path, f"{n} items where index.json lists {entry['n']}"))
            counts.append(n)
        self.kind = TEXT if starts else IMAGE
        full = [f["cls" if starts else "maps"] for f, n in zip(self._features, counts) if n]
        self.shape: tuple[int, ...] = tuple(full[0].shape[1:]) if full else ()  # an empty shard may have none
        self.ids, self.splits = ids, np.array(splits, dtype=object)
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.shard = np.repeat(np.arange(len(counts)), counts)
        self.row = np.arange(len(ids)) - np.repeat(np.cumsum(counts) - counts, counts)
        self.starts = np.concatenate(starts) if starts else None  # text: first token row of each item in its shard
        self.lengths = np.concatenate(lengths) if lengths else None

    def __len__(self) -> int:
        return len(self.ids)

    def _by_shard(self, idx: np.ndarray):
        """(shard, positions in idx) of every shard that items `idx` touch."""
        shard = self.shard[idx]
        for k in np.unique(shard):
            yield int(k), np.flatnonzero(shard == k)

    def text(self, idx) -> tuple[np.ndarray, np.ndarray]:
        """CLS states (n, L, H) float16 of items `idx`, and their token states back to back,
        (sum of lengths[idx], L, H) float16, as `load_text` lays out a split's."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.lengths[idx]
        cls = np.empty((len(idx), *self.shape), dtype=np.float16)
        tokens = np.empty((int(lengths.sum()), *self.shape), dtype=np.float16)
        first = np.cumsum(lengths) - lengths  # where each text's tokens go
        for k, pos in self._by_shard(idx):
            feats = self._features[k]
            feats["cls"].read(self.row[idx[pos]], cls, pos)
            feats["tokens"].read(_ranges(self.starts[idx[pos]], lengths[pos]), tokens, _ranges(first[pos], lengths[pos]))
        return cls, tokens

    def maps(self, idx) -> np.ndarray:
        """Feature maps (n, C, h, w) float16 of items `idx`."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), *self.shape), dtype=np.float16)
        for k, pos in self._by_shard(idx):
            self._features[k]["maps"].read(self.row[idx[pos]], out, pos)
        return out

    def close(self) -> None:
        for feats in self._features:
            for feat in feats.values():
                feat.close()


# --- checking a whole cache, and the command that repairs it ----------------------------

def repair_command(folder: Path) -> str:
    """The `extract` command that (re)builds cache folder `folder` (text, image or a view) as it
    was built: the data-set flags dataset.json recorded, this folder's encoder settings. It
    re-encodes only the shards that are missing or fail their checksum."""
    folder = Path(folder)
    view = re.fullmatch(r"view-\d+", folder.name)
    enc_folder = folder.parent if view else folder
    kind, root = enc_folder.parent.name, enc_folder.parent.parent
    if kind not in (TEXT, IMAGE):  # a data set's own folder (dataset.json): every modality it has
        kind, root, enc_folder = None, folder, folder / "none"
    info = _json_or_empty(root / "dataset.json")
    own = _json_or_empty(enc_folder / "index.json")
    known = [own, info] + [_json_or_empty(p) for p in sorted(root.glob("*/*/index.json"))]  # whichever survived
    flags = next((d["extract_flags"] for d in known if isinstance(d.get("extract_flags"), list)
                  and d["extract_flags"] and all(isinstance(x, str) for x in d["extract_flags"])), None)
    flags = list(flags) if flags is not None else _flags_from_name(root.name, info.get("source"))
    prov = own.get("provenance")
    prov = prov if isinstance(prov, dict) else {}
    encoder = str(prov.get("encoder", enc_folder.name))
    if kind == TEXT:
        flags += ["--text-encoder", encoder] if encoder != TEXT_ENCODER else []
        flags += ["--text-layers", str(prov["layers"])] if prov.get("layers", 4) != 4 else []
        flags += ["--max-length", str(prov["max_length"])] if prov.get("max_length", 202) != 202 else []
        flags += ["--text-only"] if not (root / IMAGE).is_dir() else []
        views = view_folders(enc_folder)
        flags += ["--text-views", str(len(views))] if views else []
    elif kind == IMAGE and encoder != IMAGE_ENCODER:
        flags += ["--image-encoder", encoder]
    elif kind is None:
        flags += ["--text-only"] if not (root / IMAGE).is_dir() else []
    if root.parent != DEFAULT_CACHE:
        flags += ["--cache-dir", str(root.parent)]
    return "python pipeline.py extract " + " ".join(shlex.quote(x) for x in flags)


def _json_or_empty(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _flags_from_name(dataset: str, source) -> list[str]:
    """A cache's data-set flags when dataset.json does not record them (older caches)."""
    limited = re.fullmatch(r"(.+)-first(\d+)", dataset)
    base = limited.group(1) if limited else dataset
    flags = ["--manifest", str(source), "--name", base] if source and source != base else ["--dataset", base]
    return flags + (["--limit", limited.group(2)] if limited else [])


@dataclass
class FolderCheck:
    """What `verify` found in one cache folder (text, image or a text view)."""

    folder: Path
    shards: int  # shards the folder should hold
    verified: bool  # checked against checksums; False: a cache of the older format, read through instead
    damaged: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)

    @property
    def repair(self) -> str:
        return repair_command(self.folder)


@dataclass
class DatasetCheck:
    root: Path
    damaged: list[tuple[Path, str]]  # dataset.json
    folders: list[FolderCheck]

    @property
    def ok(self) -> bool:
        return not self.damaged and not any(f.damaged for f in self.folders)

    def lines(self) -> list[str]:
        """What `verify` prints: one line per folder that is whole, one per damaged file."""
        out = [f"{self.root.name}/{path.name}: DAMAGED: {why}; repair: `{repair_command(self.root)}`"
               for path, why in self.damaged]
        for c in self.folders:
            where = c.folder.relative_to(self.root)
            if not c.damaged:
                out.append(f"{self.root.name}/{where}: {c.shards} shards, checksums ok" if c.verified else
                           f"{self.root.name}/{where}: {c.shards} shards readable, but unverified: made before "
                           f"checksums (older format); `{c.repair} --force` rebuilds it with them")
            out += [f"{self.root.name}/{where}/{path.name}: DAMAGED: {why}; repair: `{c.repair}`"
                    for path, why in c.damaged]
        return out


def damage_summary(checks: list[DatasetCheck]) -> str | None:
    """One line for the end of `verify` when anything is damaged, else None."""
    bad = [(path, c.repair) for d in checks for c in d.folders for path, _ in c.damaged]
    bad += [(path, repair_command(d.root)) for d in checks for path, _ in d.damaged]
    if not bad:
        return None
    return (f"{len(bad)} damaged file{'s' * (len(bad) > 1)} (listed above, each with the command that repairs it), "
            f"the first {bad[0][0]}: repair with `{bad[0][1]}`")


def verify(cache_dir: Path, dataset: str | None = None) -> list[DatasetCheck]:
    """Check every file of a cache (or of one data set in it): index.json against its SHA-256
    and shape, every shard against its checksum; a shard of the older format, which has none,
    is read through (every dataset decoded). Nothing is changed."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise UserError(f"no cache at {cache_dir}: give the --cache-dir that extract wrote")
    roots = sorted(p for p in cache_dir.iterdir() if p.is_dir() and (
        (p / "dataset.json").exists() or (p / TEXT).is_dir() or (p / IMAGE).is_dir()))
    if dataset is not None:
        if cache_dir / dataset not in roots:
            names = ", ".join(p.name for p in roots) or "none"
            raise UserError(f"no cache for data set {dataset!r} in {cache_dir} (caches there: {names})")
        roots = [cache_dir / dataset]
    if not roots:
        raise UserError(f"no caches in {cache_dir}: give the --cache-dir that extract wrote")
    out = []
    for root in roots:
        info = root / "dataset.json"
        damaged = [] if isinstance(_json_or_empty(info).get("classes"), list) else [
            (info, "missing" if not info.exists() else "unreadable, or without its list of classes")]
        folders = []
        for kind in (TEXT, IMAGE):
            for enc in sorted(p for p in (root / kind).glob("*") if p.is_dir()):
                folders.append(check_folder(enc))
                folders += [check_folder(v) for v in view_folders(enc)] if kind == TEXT else []
        out.append(DatasetCheck(root, damaged, folders))
    return out


def check_folder(folder: Path) -> FolderCheck:
    """Every file of one cache folder, as `verify` checks them."""
    folder = Path(folder)
    index_path = folder / "index.json"
    problem, index = (_index_problem(index_path) if index_path.is_file()
                      else ("missing (an extract that did not finish, or a deleted file)", {}))
    damaged = [(index_path, problem)] if problem else []
    if problem is None:
        names, required = [e["file"] for e in index["shards"]], index.get("checksums") == CHECKSUM
    else:  # the shards that are there, and any missing from their numbering
        found = [m for p in folder.glob("shard-*.h5") if (m := _SHARD.fullmatch(p.name))]
        n = max((int(m.group(2)) for m in found), default=0)
        names, required = [shard_name(k, n) for k in range(n)], _promises_checksums(folder)
    for name in names:
        path = folder / name
        damage = shard_damage(path, required)
        if damage is None and not sidecar(path).is_file():
            damage = _read_through(path)
        if damage:
            damaged.append((path, damage))
    return FolderCheck(folder, len(names), required, damaged)


def _read_through(path: Path) -> str | None:
    """Decode every dataset and attribute of a shard that has no checksum: what can be checked
    of the older format (flipped bytes in an uncompressed dataset go unseen)."""
    try:
        with h5py.File(path, "r") as f:
            dict(f.attrs)
            for name in f:
                ds = f[name]
                step = ds.chunks[0] if ds.chunks else len(ds) or 1
                for start in range(0, len(ds), step):
                    ds[start : start + step]
    except _READ_ERRORS as e:
        return f"unreadable ({_why(e)})"
    return None
