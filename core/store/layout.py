"""The cache's format: names, layout, provenance and checksums, which the writer, both readers
and `verify` share (the package `core.store` is the only code that knows HDF5 dataset and
attribute names).

Layout (a public contract; docs/cache.md, "Cache format", documents it for plain-h5py readers):

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

import hashlib
import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import h5py

from core.errors import UserError

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


def split_limit(name: str) -> tuple[str, int | None]:
    """`hfm-first100` -> ("hfm", 100): extract names a `--limit`ed data set so, and training,
    the repair command and the defaults of a run need the data set and the limit back; any
    other name -> (name, None)."""
    limited = re.fullmatch(r"(.+)-first(\d+)", name)
    return (limited.group(1), int(limited.group(2))) if limited else (name, None)


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


def _json_or_empty(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


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
