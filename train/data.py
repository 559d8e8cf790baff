"""The cache for stage two: every split as tensors in RAM when they fit, else read from the shards.

Features stay float16 in RAM (half the bytes) and become float32 one batch at a time.
When the splits a run needs are larger than its memory budget (`core/memory.py`: `--memory`,
by default half of the memory available divided by --jobs), a split is a `StreamedSplit`:
the same batches, bit for bit and in the same order, read from the shards (`store.ItemReader`)
by one reader thread per process (`Source`) a few batches ahead of the head.
Text and image caches are joined by id, so an item whose image could not be read is
simply absent from a two-modality run (and counted).

With `text_views` the train split also holds K dropout views of its text states
(`extract --cache-text-views K`): each epoch draws one view per item, so the head, like the
official code's with BERT in train mode, never sees the same text features twice.
Dev and test have no views: they are always scored on the clean (eval-mode) states.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

import heads
from core import store
from core.defaults import BUILTIN_DATASETS
from core.errors import UserError
from heads.base import Batch, Dims
from train.config import TrainConfig, splits_path


@dataclass
class Split:
    ids: list[str]
    labels: torch.Tensor  # (N,)
    cls: torch.Tensor | None = None  # (N, L, H) f16
    tokens: torch.Tensor | None = None  # (T, L, H) f16
    offsets: torch.Tensor | None = None  # (N+1,)
    maps: torch.Tensor | None = None  # (N, C, h, w) f16
    view_cls: torch.Tensor | None = None  # (K, N, L, H) f16: dropout views (train split only)
    view_tokens: torch.Tensor | None = None  # (K, T, L, H) f16, same offsets as the clean tokens
    pin: bool = False  # batches in pinned memory (a GPU the cache does not fit on; Data.place)

    FEATURES = ("cls", "tokens", "maps", "view_cls", "view_tokens")

    def __len__(self) -> int:
        return len(self.ids)

    def to_device(self, device_: torch.device) -> None:
        """Features onto `device_` (labels and offsets stay on the CPU: they index from there)."""
        for name in self.FEATURES:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device_))

    def batch(self, idx: torch.Tensor, view: torch.Tensor | None = None) -> Batch:
        """Rows `idx` as a float32 Batch; the tokens of the chosen texts are gathered back to back.

        `view` (one view number per row) takes each text from its dropout view instead of
        the clean states."""
        text = {"cls": None, "tokens": None, "lengths": None}
        if self.cls is not None:
            lengths, rows = self.offsets[idx + 1] - self.offsets[idx], _rows(self.offsets, idx)
            if view is None:
                cls, tokens = self.cls[idx], self.tokens[rows]
            else:  # views share the clean offsets, so the same token rows
                cls, tokens = self.view_cls[view, idx], self.view_tokens[torch.repeat_interleave(view, lengths), rows]
            text = {"cls": cls.float(), "tokens": tokens.float(), "lengths": lengths}
        maps = self.maps[idx].float() if self.maps is not None else None
        return Batch(labels=self.labels[idx], maps=maps, **text)

    def batches(self, chunks: list[torch.Tensor], views: torch.Tensor | None = None):
        """`batch` of each index chunk in turn (`views`: one view number per item of the split)."""
        for idx in chunks:
            batch = self.batch(idx, None if views is None else views[idx])
            yield batch.pin() if self.pin else batch

    def feature_dims(self) -> tuple[int, int, int]:
        """(text layers, text width, image channels); 0 for a modality it does not hold."""
        return (*(self.cls.shape[1:] if self.cls is not None else (0, 0)),
                self.maps.shape[1] if self.maps is not None else 0)

    def subset(self, idx: torch.Tensor) -> "Split":
        """Items `idx` (in that order) as a Split of their own, features still float16."""
        text = {}
        if self.cls is not None:
            lengths = self.offsets[idx + 1] - self.offsets[idx]
            text = {"cls": self.cls[idx], "tokens": self.tokens[_rows(self.offsets, idx)], "offsets": _offsets(lengths)}
        return Split([self.ids[i] for i in idx.tolist()], self.labels[idx],
                     maps=self.maps[idx] if self.maps is not None else None, **text)

    def draw_views(self, seed: int, epoch: int) -> torch.Tensor:
        """One view per item for this epoch; its own generator (seed, epoch), so the batch
        order is the same with and without views."""
        return _draw_views(0 if self.view_cls is None else len(self.view_cls), len(self), seed, epoch)


def _draw_views(k: int, n: int, seed: int, epoch: int) -> torch.Tensor:
    if not k:
        raise UserError("this split has no text views (dev and test never do)")
    g = torch.Generator().manual_seed(100_003 * seed + epoch)
    return torch.randint(k, (n,), generator=g)


_READING: dict = {}  # this process's reader thread and its readers by folder (see `Source`)


def _reader(folder: Path, hint: str) -> store.ItemReader:
    """One `store.ItemReader` per cache folder and process (a grid's cells share it)."""
    if _READING.get("pid") != os.getpid():  # a forked child opens its own
        _READING.clear()
        _READING["pid"] = os.getpid()
    index = Path(folder) / "index.json"
    key = ("reader", str(index.resolve()), index.stat().st_mtime_ns)  # a rebuilt cache is read anew
    if key not in _READING:
        _READING[key] = store.ItemReader(folder, hint)
    return _READING[key]


class Source:
    """The readers of a streamed cache. Every read of a process goes through one reader thread
    (started at the first read), which reads, inflates and converts batches while the head trains
    on earlier ones (the inflate releases the GIL); `READ_AHEAD` batches ahead at most."""

    READ_AHEAD = 4

    def __init__(self, text: store.ItemReader | None, image: store.ItemReader | None, views: list[store.ItemReader]):
        self.text, self.image, self.views = text, image, views

    def submit(self, fn, *args):
        from concurrent.futures import ThreadPoolExecutor

        if _READING.get("pid") != os.getpid() or "thread" not in _READING:  # first read, or a forked child
            _READING["pid"] = os.getpid()
            _READING["thread"] = ThreadPoolExecutor(1, thread_name_prefix="cache-reader")
        return _READING["thread"].submit(fn, *args)


@dataclass
class StreamedSplit:
    """A split read from the shards batch by batch (see `Source`); the same interface and the
    same Batch values as `Split`. Rows point at items of the source's readers."""

    ids: list[str]
    labels: torch.Tensor  # (N,)
    source: Source
    text_rows: torch.Tensor | None = None  # (N,) items of source.text
    image_rows: torch.Tensor | None = None  # (N,) items of source.image
    view_rows: torch.Tensor | None = None  # (N,) items of every view reader (train split only)
    pin: bool = False  # batches pinned in the reader thread (on a GPU; Data.place)

    def __len__(self) -> int:
        return len(self.ids)

    def feature_dims(self) -> tuple[int, int, int]:
        s = self.source
        return (*(s.text.shape if self.text_rows is not None else (0, 0)),
                s.image.shape[0] if self.image_rows is not None else 0)

    def _read(self, idx: torch.Tensor, view: torch.Tensor | None) -> Batch:
        """Rows `idx` as `Split.batch` makes them (runs in the reader thread)."""
        text = {"cls": None, "tokens": None, "lengths": None}
        if self.text_rows is not None:
            rows = self.text_rows[idx].numpy()
            lengths = torch.from_numpy(self.source.text.lengths[rows])
            if view is None:
                cls, tokens = self.source.text.text(rows)
            else:  # each text from its view's reader (views number items alike), tokens in the clean places
                vrows, v = self.view_rows[idx].numpy(), view.numpy()
                cls = np.empty((len(rows), *self.source.text.shape), np.float16)
                tokens = np.empty((int(lengths.sum()), *self.source.text.shape), np.float16)
                for k in np.unique(v):
                    pos = np.flatnonzero(v == k)
                    cls[pos], tokens[_rows(_offsets(lengths), torch.from_numpy(pos)).numpy()] = \
                        self.source.views[k].text(vrows[pos])
            text = {"cls": torch.from_numpy(cls).float(), "tokens": torch.from_numpy(tokens).float(), "lengths": lengths}
        maps = None
        if self.image_rows is not None:  # channels-last, as the in-memory maps are (transposed while still float16)
            maps = torch.from_numpy(self.source.image.maps(self.image_rows[idx].numpy()))
            maps = maps.contiguous(memory_format=torch.channels_last).float()
        batch = Batch(labels=self.labels[idx], maps=maps, **text)
        return batch.pin() if self.pin else batch

    def batch(self, idx: torch.Tensor, view: torch.Tensor | None = None) -> Batch:
        return self.source.submit(self._read, idx, view).result()

    def batches(self, chunks: list[torch.Tensor], views: torch.Tensor | None = None):
        """`batch` of each chunk in turn, the next `Source.READ_AHEAD` ones read ahead."""
        from collections import deque

        ahead = deque()
        try:
            for idx in chunks:
                ahead.append(self.source.submit(self._read, idx, None if views is None else views[idx]))
                if len(ahead) > Source.READ_AHEAD:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:  # stopped early (an error, Ctrl-C): reads not started yet are dropped
            for f in ahead:
                f.cancel()

    def subset(self, idx: torch.Tensor) -> "StreamedSplit":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return StreamedSplit([self.ids[i] for i in idx.tolist()], self.labels[idx], self.source,
                             pick(self.text_rows), pick(self.image_rows), pick(self.view_rows), self.pin)

    def draw_views(self, seed: int, epoch: int) -> torch.Tensor:
        return _draw_views(0 if self.view_rows is None else len(self.source.views), len(self), seed, epoch)


@dataclass(frozen=True)
class CacheProvenance:
    """What a run's features came from: each cache's `store.Provenance` and how many dropout
    views of the train texts it drew from (0: the clean states only). Written to config.json,
    read back by resume, `eval`, `report` and `predict`, and compared only by `differences`."""

    text: store.Provenance | None = None
    image: store.Provenance | None = None
    text_views: int = 0

    def kinds(self) -> dict[str, store.Provenance]:
        return {k: p for k in (store.TEXT, store.IMAGE) if (p := getattr(self, k)) is not None}

    def differences(self, now: "CacheProvenance") -> dict[str, list[str]]:
        """Per cache kind of this record ("text", "image"), what differs in `now`; the views count
        with the text cache. Empty when `now` is the same data."""
        out = {}
        for kind, p in self.kinds().items():
            other = getattr(now, kind)
            diff = [f"no {kind} cache"] if other is None else p.differences(other)
            if diff:
                out[kind] = diff
        if self.text_views != now.text_views:
            out.setdefault(store.TEXT, []).append(f"dropout views {now.text_views} (asked {self.text_views})")
        return out

    def to_json(self) -> dict:
        views = {"text_views": self.text_views} if self.text_views else {}
        return {**{k: asdict(p) for k, p in self.kinds().items()}, **views}

    @classmethod
    def from_json(cls, d: dict) -> "CacheProvenance":
        kinds = {k: store.Provenance.from_dict(d[k]) for k in (store.TEXT, store.IMAGE) if k in d}
        return cls(**kinds, text_views=int(d.get("text_views", 0)))


@dataclass
class Data:
    splits: dict[str, Split | StreamedSplit]
    dims: Dims
    classes: list[str]
    provenance: CacheProvenance
    dropped: int  # items in the text cache with no image (two-modality runs)
    needs: int = 0  # bytes the splits' features take in memory (float16)
    budget: int | None = None  # bytes they were allowed (None: no limit)

    @property
    def streamed(self) -> bool:
        """Read from the shards batch by batch (the splits did not fit the budget)."""
        return any(isinstance(s, StreamedSplit) for s in self.splits.values())

    def place(self, device_: torch.device) -> None:
        """On a GPU, once: the cache moves to the device when it fits in half its free memory
        (batches are then cut there); else batches are pinned for non-blocking copies. On the
        CPU nothing changes."""
        if device_.type != "cuda" or getattr(self, "_placed", False):
            return
        free, _ = torch.cuda.mem_get_info(device_)
        on_device = not self.streamed and self.needs < free // 2
        for split in self.splits.values():
            if on_device:
                split.to_device(device_)
            else:
                split.pin = True
        self._placed = True


def extract_source(dataset: str) -> str:
    """The `extract` flags that name this data set: a built-in (maybe `--limit`ed) or a manifest."""
    base, limit = store.split_limit(dataset)
    if limit is not None and base in BUILTIN_DATASETS:
        return f"--dataset {base} --limit {limit}"
    return f"--dataset {dataset}" if dataset in BUILTIN_DATASETS else f"--manifest PATH --name {dataset}"


def modalities(cfg: TrainConfig) -> str:
    """Which caches the head reads: its config says, the trainer loads only those."""
    reads = (cfg.head_config or heads.build_config(cfg.head)).reads()
    return "both" if len(reads) == 2 else reads[0]


def load_data(cfg: TrainConfig, memory: int | None = None) -> Data:
    """The caches a run of `cfg` reads, as `load` gives them (`memory`: the budget in bytes)."""
    return load(cfg.cache_dir, cfg.dataset, modalities(cfg), cfg.text_encoder, cfg.image_encoder,
                split_files=cfg.splits and splits_path(cfg.splits), text_views=cfg.text_views, memory=memory)


def _no_cache(cache_dir: Path, dataset: str) -> str:
    """Why `dataset` cannot load: a likely misspelling of a cached data set, else the extract command."""
    import difflib

    present = sorted(p.parent.name for p in Path(cache_dir).glob("*/dataset.json"))
    close = difflib.get_close_matches(dataset, present, n=1)
    here = f"caches in {cache_dir}: {', '.join(present)}" if present else f"no caches in {cache_dir} yet"
    if close:
        return f"no cache for data set {dataset!r}: did you mean {close[0]}? ({here})"
    return f"no cache for data set {dataset!r} ({here}): run `python pipeline.py extract {extract_source(dataset)}` first"


def load(cache_dir: Path, dataset: str, modalities: str, text_encoder: str, image_encoder: str,
         split_files: Path | None = None, text_views: bool = False, memory: int | None = None) -> Data:
    """Load what a run needs; a missing cache names the extract command that makes it.

    In RAM when the splits' features fit `memory` bytes (None: `core.memory.budget()`, half of
    what is available), else streamed from the shards (`StreamedSplit`): the same batches."""
    from core import memory as core_memory

    root = Path(cache_dir) / dataset
    if not (root / "dataset.json").is_file():
        raise UserError(_no_cache(cache_dir, dataset))
    classes = store.read_dataset_info(root)["classes"]
    prov, folders, needs = {}, {}, 0
    if modalities in ("text", "both"):
        folder = store.cache_folder(cache_dir, dataset, store.TEXT, text_encoder)
        hint = f"python pipeline.py extract {extract_source(dataset)} --text-encoder {text_encoder} --text-only"
        prov["text"], folders["text"] = store.provenance(folder, hint), folder
        needs += store.feature_bytes(folder, hint=hint)
        if text_views:
            needs += sum(store.feature_bytes(vf, ("train",), hint) for vf in store.view_folders(folder)
                         if (vf / "index.json").is_file())
    if modalities in ("image", "both"):
        folder = store.cache_folder(cache_dir, dataset, store.IMAGE, image_encoder)
        if not (folder / "index.json").is_file():
            raise UserError(
                f"no image cache for {dataset} with {image_encoder} at {folder}: run "
                f"`python pipeline.py extract {extract_source(dataset)} --image-encoder {image_encoder} --image-dir DIR`, "
                "or train with --modalities text"
            )
        prov["image"], folders["image"] = store.provenance(folder, ""), folder
        needs += store.feature_bytes(folder, hint="")
    budget = core_memory.budget() if memory is None else memory
    read = _streamed if needs > budget else _in_memory
    splits, dropped, n_views = read(folders, prov, dataset, text_encoder, text_views, hint if "text" in folders else "")
    if split_files is not None:
        if text_views:
            raise UserError("--text-views with --splits is not supported yet: the views follow the cache's own "
                            "train split; train on the clean split without --text-views")
        splits = reassign(splits, Path(split_files))
    layers, width, channels = splits["train"].feature_dims()
    dims = Dims(text_layers=layers, text_width=width, image_channels=channels, n_classes=len(classes))
    return Data(splits, dims, classes, CacheProvenance(**prov, text_views=n_views), dropped, needs, budget)


def _in_memory(folders: dict, prov: dict, dataset: str, encoder: str, text_views: bool, hint: str):
    """Every split as tensors in RAM; returns (splits, items dropped by the join, views)."""
    text = store.load_text(folders["text"], hint=hint) if "text" in folders else None
    n_views = 0
    if text is not None and text_views:
        views = _load_views(folders["text"], prov["text"], text.get("train"), dataset, encoder)
        n_views = len(views[0])
    image = store.load_image(folders["image"]) if "image" in folders else None
    if text is not None and image is not None:
        _check_agree(text, image, dataset)
    splits, dropped = {}, 0
    for s, t, im in _parts(text, image, dataset):
        splits[s], d = _join(t, im)
        dropped += d
        if s == "train" and n_views:
            _attach_views(splits[s], t, *views)
    return splits, dropped, n_views


def _streamed(folders: dict, prov: dict, dataset: str, encoder: str, text_views: bool, hint: str):
    """Every split as a `StreamedSplit` over one `Source`: the same items, order and joins as
    `_in_memory`, with only ids, labels and token counts in RAM."""
    from types import SimpleNamespace

    readers = {k: _reader(f, hint if k == "text" else "") for k, f in folders.items()}
    text, image = readers.get("text"), readers.get("image")

    def by_split(r):  # split -> ids, labels and item numbers, in the order load_text/_image fill it
        out = {}
        for s in ("train", "dev", "test"):
            rows = np.flatnonzero(r.splits == s)
            if len(rows):
                out[s] = SimpleNamespace(ids=[r.ids[i] for i in rows], labels=torch.from_numpy(r.labels[rows]),
                                         rows=torch.from_numpy(rows))
        return out

    tsplits, isplits = (by_split(text) if text else None), (by_split(image) if image else None)
    if tsplits is not None and isplits is not None:
        _check_agree(tsplits, isplits, dataset)
    views = _stream_views(folders["text"], prov["text"], text, tsplits.get("train"), dataset, encoder) if text_views else []
    source = Source(text, image, views)
    splits, dropped = {}, 0
    for s, t, im in _parts(tsplits, isplits, dataset):
        if t is None:
            splits[s] = StreamedSplit(im.ids, im.labels, source, image_rows=im.rows)
            continue
        view_rows = torch.arange(len(t.ids)) if s == "train" and views else None  # views hold train items alone
        split = StreamedSplit(t.ids, t.labels, source, text_rows=t.rows, view_rows=view_rows)
        if im is not None:
            split, at, d = _with_image(split, im.ids)
            split.image_rows, dropped = im.rows[at], dropped + d
        splits[s] = split
    return splits, dropped, len(views)


def _parts(text: dict | None, image: dict | None, dataset: str):
    """(split, its text part, its image part) for train, dev and test; a split that a cache lacks is refused."""
    for s in ("train", "dev", "test"):
        t, im = (text or {}).get(s), (image or {}).get(s)
        if (text is not None and t is None) or (image is not None and im is None):
            raise UserError(f"the {dataset} cache has no {s} split: re-run extract (or give the manifest a split column)")
        yield s, t, im


def _with_image(split: Split | StreamedSplit, image_ids: list[str]):
    """Text and image joined by id: `split` without its items that have no image, the image item of
    each item it keeps, and how many it dropped."""
    where = {id_: i for i, id_ in enumerate(image_ids)}
    keep = [i for i, id_ in enumerate(split.ids) if id_ in where]
    dropped = len(split) - len(keep)
    if dropped:
        split = split.subset(torch.tensor(keep, dtype=torch.long))
    return split, torch.tensor([where[id_] for id_ in split.ids], dtype=torch.long), dropped


def _view_folders(folder: Path, clean: store.Provenance, train, dataset: str, encoder: str) -> tuple[str, list[Path]]:
    """The command that makes the dropout views, and their folders, each made from this clean cache
    (else one UserError: no views, no train split, or views of another cache)."""
    hint = f"python pipeline.py extract {extract_source(dataset)} --text-encoder {encoder} --cache-text-views K"
    folders = store.view_folders(folder)
    if not folders:
        raise UserError(f"the text cache {folder} has no dropout views: run `{hint}` (e.g. K=4; the clean "
                        "states are kept), or train without --text-views")
    if train is None:
        raise UserError(f"the {dataset} cache has no train split to draw text views for")
    for vf in folders:
        differs = clean.differences(replace(store.provenance(vf, hint), view=clean.view))
        if differs:
            raise UserError(f"text views {vf} were made from another cache: {'; '.join(differs)}. "
                            f"Run `{hint} --force` to rebuild both")
    return hint, folders


def _stream_views(folder: Path, clean: store.Provenance, text: store.ItemReader, train, dataset: str,
                  encoder: str) -> list[store.ItemReader]:
    """A reader per dropout view, checked as `_load_views` checks them; a view's train items are
    numbered 0..N-1 in the clean train split's order."""
    hint, folders = _view_folders(folder, clean, train, dataset, encoder)
    out = []
    for vf in folders:
        v = _reader(vf, hint)
        rows = np.flatnonzero(v.splits == "train")
        if ([v.ids[i] for i in rows] != train.ids or len(rows) != len(v)
                or not np.array_equal(v.lengths[rows], text.lengths[train.rows.numpy()])):
            raise UserError(f"text views {vf} do not hold the clean cache's train texts: run `{hint} --force`")
        out.append(v)
    return out


def _check_agree(text: dict, image: dict, dataset: str) -> None:
    """Text and image caches are joined by id: the same id must have the same label and split in
    both, or the run would silently train on mixed-up items."""
    image_at = {id_: (s, y) for s, f in image.items() for id_, y in zip(f.ids, f.labels.tolist())}
    for s, f in text.items():
        for id_, y in zip(f.ids, f.labels.tolist()):
            other = image_at.get(id_)
            if other is not None and other != (s, y):
                raise UserError(
                    f"item {id_!r} of {dataset} is (split {s}, label {y}) in the text cache but "
                    f"(split {other[0]}, label {other[1]}) in the image cache: the two were built from different "
                    "data; re-extract both with --force"
                )


def _load_views(folder: Path, clean: store.Provenance, train: store.TextFeatures | None, dataset: str, encoder: str):
    """The K dropout views of the train texts as (K, N, L, H) and (K, T, L, H) tensors.

    Refused, never silently replaced by clean states: no views, an unfinished view, or
    views made from another clean cache."""
    hint, folders = _view_folders(folder, clean, train, dataset, encoder)
    cls = tokens = None
    for k, vf in enumerate(folders):
        v = store.load_text(vf, splits=("train",), hint=hint).get("train")
        if v is None or v.ids != train.ids or not torch.equal(v.offsets, train.offsets):
            raise UserError(f"text views {vf} do not hold the clean cache's train texts: run `{hint} --force`")
        if cls is None:  # preallocated: each view is copied straight into its place
            cls = torch.empty(len(folders), *v.cls.shape, dtype=torch.float16)
            tokens = torch.empty(len(folders), *v.tokens.shape, dtype=torch.float16)
        cls[k], tokens[k] = v.cls, v.tokens
    return cls, tokens


def _attach_views(split: Split, text: store.TextFeatures, cls: torch.Tensor, tokens: torch.Tensor) -> None:
    """Give a joined train split its views, keeping only the rows the join kept."""
    if split.ids == text.ids:
        split.view_cls, split.view_tokens = cls, tokens
        return
    where = {id_: i for i, id_ in enumerate(text.ids)}
    idx = torch.tensor([where[i] for i in split.ids], dtype=torch.long)
    split.view_cls, split.view_tokens = cls[:, idx], tokens[:, _rows(text.offsets, idx)]


def _join(text: store.TextFeatures | None, image: store.ImageFeatures | None) -> tuple[Split, int]:
    if text is None:
        return Split(image.ids, image.labels, maps=image.maps), 0
    split = Split(text.ids, text.labels, text.cls, text.tokens, text.offsets)
    if image is None:
        return split, 0
    split, at, dropped = _with_image(split, image.ids)
    split.maps = image.maps if text.ids == image.ids else image.maps[at]
    return split, dropped


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """(N+1,) offsets of texts of these token counts stored back to back."""
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])


def _rows(offsets: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Token rows of texts `idx`, back to back: row j of text i is offsets[i] + j."""
    starts, lengths = offsets[idx], offsets[idx + 1] - offsets[idx]
    first = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths)
    return first + torch.arange(int(lengths.sum()))


def reassign(splits: dict[str, Split], folder: Path) -> dict[str, Split]:
    """Splits as listed in `folder/{train,dev,test}.txt` (one id a line, as `audit
    --write-clean` writes them): each item goes where its file puts it; unlisted items are
    dropped. The cache stays as it is, so a cleaned split costs no second extraction."""
    where = {}
    for s in ("train", "dev", "test"):
        path = folder / f"{s}.txt"
        if not path.is_file():
            raise UserError(f"split file {path} missing: --splits takes the folder written by `pipeline.py audit --write-clean DIR`")
        where.update((line.strip(), s) for line in path.read_text().splitlines() if line.strip())
    picked = {s: {} for s in ("train", "dev", "test")}  # target split -> source split -> its rows
    for source, split in splits.items():
        for r, id_ in enumerate(split.ids):
            if id_ in where:
                picked[where[id_]].setdefault(source, []).append(r)
    out = {}
    for s, parts in picked.items():
        if not parts:
            raise UserError(f"no item of the cache is listed in {folder / (s + '.txt')}: are these split files for this data set?")
        out[s] = _cat([splits[src].subset(torch.tensor(rows, dtype=torch.long)) for src, rows in parts.items()])
    return out


def _cat(parts: list[Split]) -> Split:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, StreamedSplit):
        cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return StreamedSplit(sum((p.ids for p in parts), []), torch.cat([p.labels for p in parts]), first.source,
                             cat("text_rows"), cat("image_rows"), cat("view_rows"))
    text = {}
    if first.cls is not None:
        lengths = torch.cat([p.offsets[1:] - p.offsets[:-1] for p in parts])
        text = dict(cls=torch.cat([p.cls for p in parts]), tokens=torch.cat([p.tokens for p in parts]),
                    offsets=_offsets(lengths))
    maps = torch.cat([p.maps for p in parts]) if first.maps is not None else None
    return Split(sum((p.ids for p in parts), []), torch.cat([p.labels for p in parts]), maps=maps, **text)
