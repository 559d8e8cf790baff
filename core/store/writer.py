"""Writing a cache: shards built in memory and renamed into place beside their checksums, so
that a shard on disk is always whole and an interrupted `extract` resumes where it stopped."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np

from core.errors import UserError
from core.paths import make_dir, write_atomic
from core.store.layout import (CHECKSUM, MAP_FILTERS, Provenance, _READ_ERRORS, _SHARD, _STR, _deflate,
                               _index_problem, _promises_checksums, _why, index_digest, shard_damage,
                               shard_name, sidecar)
from core.store.loader import _read_shard, _strings, read_provenance

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


def write_dataset_info(root: Path, info: dict, problems: list[tuple[str, str, str]]) -> None:
    make_dir(root)
    write_atomic(root / "dataset.json", json.dumps(info, indent=1))
    rows = io.StringIO(newline="")
    w = csv.writer(rows)
    w.writerow(["id", "stage", "reason"])
    w.writerows(problems)
    write_atomic(root / "problems.csv", rows.getvalue())
