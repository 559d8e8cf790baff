"""What a damaged cache file costs its user: one line naming the file, why, and the `extract`
command that rebuilds exactly what is damaged; and `verify`, which checks every file of a cache
without changing any."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from core.defaults import IMAGE_ENCODER, TEXT_ENCODER
from core.errors import UserError
from core.paths import DEFAULT_CACHE
from core.store.layout import (CHECKSUM, IMAGE, TEXT, _READ_ERRORS, _SHARD, _index_problem, _json_or_empty,
                               _promises_checksums, _why, shard_damage, shard_name, sidecar, split_limit,
                               view_folders)

def damage_message(path: Path, reason: str) -> str:
    """One line: which cache file is damaged, why, and the `extract` that repairs it."""
    path = Path(path)
    redo = "re-encode it (only damaged shards are redone)" if _SHARD.search(path.name) else "rewrite it"
    return f"cache file {path} is damaged: {reason}. Run `{repair_command(path.parent)}` to {redo}"


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


def _flags_from_name(dataset: str, source) -> list[str]:
    """A cache's data-set flags when dataset.json does not record them (older caches)."""
    base, limit = split_limit(dataset)
    flags = ["--manifest", str(source), "--name", base] if source and source != base else ["--dataset", base]
    return flags + (["--limit", str(limit)] if limit is not None else [])


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
