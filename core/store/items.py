"""Reading a cache item by item, from its shards on demand (`ItemReader`): what stage two uses
when the splits it needs do not fit in memory."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from core.errors import UserError
from core.store.layout import IMAGE, TEXT, _InflateError, _inflate
from core.store.loader import _read_shard, _shards, _strings, open_index
from core.store.repair import damage_message

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
