"""Stage one: run the frozen encoders once over a data set and write the cache.

The work is cut into fixed shards of the data set's item order. A shard is encoded in
batches that depend only on the shard (texts sorted by length inside it), so the
bytes of a shard do not depend on what ran before: resuming after a kill, or splitting
the shards over processes (`--shard i/N`, torchrun), gives the same cache as one
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from core import store
from core.cli_fields import flag_of, option
from core.errors import UserError
from core.defaults import DATASET, IMAGE_ENCODER, TEXT_ENCODER
from core.paths import DEFAULT_CACHE, default_data_root
from core.shards import parse_shard
from core.terminal import Passes
from extract import datasets
from extract.datasets import Dataset, Item
from extract.encoders import create_image_encoder, create_text_encoder


def _names(text: str) -> tuple[str, ...] | None:
    """`positive,neutral,negative` -> a tuple of the names; nothing given: None (the labels that occur).
    A name given twice is refused: it would be two classes, one of which no item ever has."""
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    twice = [c for k, c in enumerate(names) if c in names[:k]]
    if twice:
        raise ValueError(f"{text!r}: {twice[0]} given twice; give each class once")
    return names or None


@dataclass
class ExtractConfig:
    """What `extract` caches; each `option(...)` field is also an option of it (core/cli_fields.py)."""

    dataset: str | None = option(None, "built-in data set: mvsa_s, mvsa_m, hfm, tumemo or mmsd2 "
                                 "[default: mvsa_s, unless --manifest]", short="-d")
    manifest: Path | None = option(None, "CSV/JSONL manifest or raw MVSA release folder")
    name: str | None = option(None, "name of the data set a manifest makes")
    data_root: Path = option(help="folder with the built-in data sets [default: $SPP_DATA_ROOT or ../shared/data]",
                             default_factory=default_data_root)
    image_dir: Path | None = option(None, "folder of {id}.jpg images")
    cache_dir: Path = option(DEFAULT_CACHE, "where caches live")
    text_encoder: str = option(TEXT_ENCODER, "HF name or local path; 'minilm' is the packaged offline model")
    image_encoder: str = option(IMAGE_ENCODER, "efficientnet-lite0..4, a torchvision name (resnet50), or timm:<name>")
    text_layers: int = option(4, "keep the CLS and tokens of this many last layers (`train --text-layers` picks "
                              "among them)", flag="--cache-text-layers", was=("--text-layers",), min=1)
    max_length: int = option(202, "tokenizer truncation", min=2)
    text_only: bool = option(False, "cache text alone (no images at hand)")
    random_weights: bool = option(False, "untrained encoders of the same shape (tests, benchmarks)")
    image_weights: Path | None = option(None, "state dict file for the image encoder")
    batch_size: int = option(64, "items per encoder batch", flag="--encoder-batch-size", was=("--batch-size",), min=1)
    shard_size: int = option(512, "items per shard (the unit of resuming)", min=1)
    shard: str | None = option(None, "i/N: do only this process's share of the shards [default: set by torchrun "
                               "(RANK/WORLD_SIZE) and by a Slurm array task; else every shard]")  # shards k with k % N == i
    force: bool = option(False, "rebuild a cache that was built differently")
    seed: int = option(0, "seed of the stratified 8:1:1 split of data without one: TumEmo, a manifest without a "
                       "split column, a raw MVSA release folder", flag="--split-seed", was=("--seed",),
                       min=0, max=2**32 - 1)  # numpy's seeds
    limit: int | None = option(None, "only the first N items of each split (quick looks and tests); the cache is "
                               "then named <name>-first<N> (train -d mvsa_s-first<N>)", min=1)
    classes: tuple[str, ...] | None = option(None, "a manifest's label set, e.g. positive,neutral,negative "
                                             "(other labels are problems) [default: the labels that occur]",
                                             parse=_names)
    keep_rare_labels: bool = option(False, "keep a manifest label seen only a few times (else dropped as a likely typo)")
    text_views: int = option(0, "also store K dropout views of the train texts (`train --text-views` uses them)",
                             flag="--cache-text-views", was=("--text-views",), min=0)


@dataclass
class Summary:
    dataset: str
    counts: dict[str, int]
    text_items: int = 0
    image_items: int = 0
    problems: int = 0
    text_fallbacks: int = 0
    complete: bool = True
    folders: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    work_seconds: dict[str, float] = field(default_factory=dict)  # per modality, encoder loading excluded
    rare_labels: dict[str, int] = field(default_factory=dict)  # manifest labels reported as likely typos


def load_dataset(cfg: ExtractConfig) -> Dataset:
    if cfg.name is not None:
        store.check_name(cfg.name, "--name")
    ds = datasets.load(cfg.dataset, cfg.data_root, cfg.manifest, cfg.name, cfg.image_dir, cfg.seed,
                       cfg.classes, cfg.keep_rare_labels)
    if cfg.limit:
        taken: dict[str, int] = {}
        keep = []
        for it in ds.items:
            if taken.get(it.split, 0) < cfg.limit:
                taken[it.split] = taken.get(it.split, 0) + 1
                keep.append(it)
        ds.items = keep
        ds.name = f"{ds.name}-first{cfg.limit}"
    if not ds.items:
        first = f"; the first: {ds.problems[0].id}: {ds.problems[0].reason}" if ds.problems else ""
        raise UserError(f"{ds.name}: no usable items ({len(ds.problems)} problems{first})")
    return ds


def run(cfg: ExtractConfig, console: Console | None = None) -> Summary:
    console = console or Console()
    t0 = time.time()
    rank, world = parse_shard(cfg.shard)
    if cfg.dataset is None and cfg.manifest is None:  # as every command that names a data set
        cfg = replace(cfg, dataset=DATASET)
    ds = load_dataset(cfg)
    with_images = [it for it in ds.items if it.image is not None]
    if not cfg.text_only and not with_images:
        raise UserError(
            f"{ds.name}: no images found. Pass --image-dir DIR (files named {{id}}.jpg), or --text-only to cache text alone"
        )
    root = Path(cfg.cache_dir) / ds.name
    store.write_dataset_info(root, _info(ds, cfg), [])
    for p in ds.problems:
        console.print(f"[yellow]{p.stage} problem[/] {p.id}: {p.reason}", highlight=False)

    summary = Summary(ds.name, ds.counts(), text_items=len(ds.items), text_fallbacks=ds.text_fallbacks,
                      rare_labels=ds.rare_labels)
    with Passes(console) as progress:
        folder, complete = _extract_text(cfg, ds, rank, world, progress, summary.work_seconds)
        summary.folders["text"] = str(folder)
        if not cfg.text_only:
            folder, done = _extract_image(cfg, ds, with_images, rank, world, progress, summary.work_seconds)
            summary.folders["image"], summary.image_items = str(folder), len(with_images)
            complete = complete and done
    problems = [(p.id, p.stage, p.reason) for p in ds.problems]
    for folder in summary.folders.values():
        problems += store.shard_problems(Path(folder))
    store.write_dataset_info(root, _info(ds, cfg), problems)
    summary.problems, summary.complete, summary.seconds = len(problems), complete, time.time() - t0
    return summary


def _info(ds: Dataset, cfg: ExtractConfig) -> dict:
    return {
        "name": ds.name, "classes": list(ds.classes), "counts": ds.counts(), "split_rule": ds.split_rule,
        "text_fallbacks": ds.text_fallbacks, "text_hash": ds.text_hash(),
        "source": cfg.manifest and str(cfg.manifest) or cfg.dataset, "extract_flags": data_flags(cfg),
    }


# The settings a cache's bytes depend on besides its encoders (those are in each folder's
# provenance): recorded in dataset.json, so a damaged shard is named with the command that
# re-encodes it exactly as it was.
_DATA_FLAGS = ("dataset", "manifest", "name", "data_root", "image_dir", "seed", "limit", "classes",
               "keep_rare_labels", "random_weights", "image_weights", "batch_size", "shard_size")


def data_flags(cfg: ExtractConfig) -> list[str]:
    """`cfg`'s data-set and batching settings as `extract` flags, defaults left out."""
    out = []
    for f in fields(ExtractConfig):
        value = getattr(cfg, f.name)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if f.name not in _DATA_FLAGS or value is None or value == default or value is False:
            continue
        flag = flag_of(f)
        out += [flag] if value is True else [flag, ",".join(value) if isinstance(value, tuple) else str(value)]
    return out


def _shards(items: list[Item], size: int) -> list[list[Item]]:
    return [items[k : k + size] for k in range(0, len(items), size)]


def _plan(folder: Path, prov: store.Provenance, force: bool, rank: int, world: int, console: Console):
    def damaged(path, reason):
        redo = "rewritten" if path.name == "index.json" else "re-encoded"
        console.print(f"[yellow]damaged[/] {path}: {reason}; {redo} now", highlight=False, soft_wrap=True)

    done = store.prepare(folder, prov, force and world == 1, on_damage=damaged)
    if store.unverified(folder) and not force:
        console.print(f"[yellow]note[/] {folder} was made before checksums (older format): used unverified; "
                      "`extract --force` rebuilds it with them", highlight=False, soft_wrap=True)
    if force and world > 1:  # each rank rebuilds only its own shards
        for k in [k for k in done if k % world == rank]:
            (folder / store.shard_name(k, prov.n_shards)).unlink()
            done.discard(k)
        (folder / "index.json").unlink(missing_ok=True)
    return [k for k in range(prov.n_shards) if k % world == rank and k not in done]


@contextlib.contextmanager
def _written_behind(progress: Passes, task):
    """`write(fn, *args)` writes a shard on a thread while the encoder computes the next one; the
    block ends once every shard is on disk (an interrupted pass too: a shard computed is never lost
    to Ctrl-C). Why: making a shard's file (its bytes, their checksum, their way to the disk)
    took about 5% of the text pass's time with the encoder idle (bench/extract.py). At most one write is in
    flight, so memory holds two shards' outputs at most; a failed write (a full disk) raises at the
    next write or at the end, naming its shard."""
    with ThreadPoolExecutor(1, thread_name_prefix="write") as pool:
        pending = None

        def settle():
            nonlocal pending
            if pending is not None:
                f, pending = pending, None
                f.result()
                progress.shard_written(task)

        def write(fn, *args):
            nonlocal pending
            settle()
            pending = pool.submit(fn, *args)

        try:
            yield write
        finally:
            settle()


def _task(progress: Passes, label: str, shards, todo, unit: str):
    """The pass's line: the items of this process's shards still to encode (none: cached)."""
    total = sum(len(shards[k]) for k in todo)
    return progress.add(label, total, unit, len(todo), cached=len(shards) - len(todo))


def _extract_text(cfg, ds, rank, world, progress, timing) -> tuple[Path, bool]:
    shards = _shards(ds.items, cfg.shard_size)
    enc = create_text_encoder(cfg.text_encoder, cfg.text_layers, cfg.max_length, cfg.random_weights)
    prov = store.Provenance(
        store.TEXT, cfg.text_encoder, enc.fingerprint, enc.preprocessing, ds.name, ds.text_hash(),
        len(shards), cfg.text_layers, cfg.max_length,
    )
    folder = store.cache_folder(cfg.cache_dir, ds.name, store.TEXT, cfg.text_encoder)
    complete = _text_pass(cfg, enc, shards, prov, folder, rank, world, progress, timing)
    # View v: the train items of every clean shard again, with dropout on (dev/test are always
    # scored on the clean states, so only train is stored). Same tokenisation and shard
    # numbering as the clean cache, hence the same token counts.
    train = [[it for it in items if it.split == "train"] for items in shards]
    for v in range(1, cfg.text_views + 1):
        complete = _text_pass(cfg, enc, train, replace(prov, view=v), store.view_folder(folder, v), rank, world,
                              progress, timing) and complete
    return folder, complete


def view_seed(shard: int, view: int) -> int:
    """Dropout seed of one shard of one view: fixed, so a resumed or split run writes the same bytes."""
    return 1_000_003 * view + shard


def _text_pass(cfg, enc, shards, prov, folder, rank, world, progress, timing) -> bool:
    """This process's shards of the clean cache (`prov.view` 0) or of one dropout view; a view's
    shard without train items is written empty."""
    v = prov.view
    view = f" view {v}" if v else ""
    todo = _plan(folder, prov, cfg.force, rank, world, progress.console)
    task = _task(progress, f"text  {cfg.text_encoder}{view}", shards, todo, "texts")
    empty = np.zeros((0, cfg.text_layers, enc.width), np.float16)
    t0 = time.time()
    with _written_behind(progress, task) as write:
        for k in todo:
            items = shards[k]
            cls, tokens = empty, []
            if items:
                with enc.dropout(view_seed(k, v)) if v else contextlib.nullcontext():
                    cls, tokens = encode_texts(enc, [it.text for it in items], cfg.batch_size,
                                               on_batch=lambda b: progress.advance(task, b))
            offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])])
            write(store.write_text_shard, folder / store.shard_name(k, prov.n_shards), prov, [it.id for it in items],
                  [it.label for it in items], [it.split for it in items], cls,
                  np.concatenate(tokens) if tokens else empty, offsets)
    timing[f"text{view}"] = time.time() - t0
    return store.finish(folder, prov, data_flags(cfg), written=set(todo))


def encode_texts(enc, texts: list[str], batch_size: int, on_batch):
    """Encode texts in length-sorted batches (dynamic padding), returned in input order."""
    ids = enc.tokenize(texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    cls = [None] * len(ids)
    tokens = [None] * len(ids)
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        c, t = enc.encode([ids[i] for i in rows])
        for j, i in enumerate(rows):
            cls[i], tokens[i] = c[j], t[j]
        on_batch(len(rows))
    return np.stack(cls), tokens


def _decode_batch(enc, items: list[Item], rows: np.ndarray):
    """(items decoded, their batch tensor or None, (id, stage, reason) of each unreadable file);
    `rows`: the (>= len(items), size, size, 3) float32 buffer to decode into."""
    good, bad = [], []
    for it in items:
        try:
            enc.load_into(it.image, rows[len(good)])
            good.append(it)
        except Exception as e:  # any decoder error means this one file is unusable
            bad.append((it.id, "image", f"unreadable image {it.image.name}: {type(e).__name__}: {e}; "
                                       "replace the file or drop the item"))
    return good, (torch.from_numpy(rows[: len(good)]).permute(0, 3, 1, 2) if good else None), bad


def _decoded(enc, batches: list[list[Item]], ahead: int = 2):
    """The batches decoded, in order, by a thread that runs `ahead` batches before the forward.

    Why a thread, not a DataLoader worker process: PIL decodes and resizes without the GIL, while
    a forked worker shares the parent's heap copy-on-write (pages the forward writes into get
    copied while it lives) and hands each batch over in a fresh shared-memory segment, faulted
    in on both sides: kernel time that the forward does not need.

    The batches are decoded into `ahead` + 1 buffers in turn (the one the forward reads and the
    `ahead` being filled), allocated once: a new 38 MB buffer a batch cost a pass 640 MB of page
    faults (2.3 s of kernel time) before the allocator had grown to hold them. A batch's tensor is
    valid until the next one is asked for."""
    size = max((len(b) for b in batches), default=0)
    buffers = [np.empty((size, enc.size, enc.size, 3), np.float32) for _ in range(min(ahead + 1, len(batches)))]
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        pending = deque(pool.submit(_decode_batch, enc, b, buffers[j]) for j, b in enumerate(batches[:ahead]))
        try:
            for j, b in enumerate(batches[ahead:] + [None] * min(ahead, len(batches)), start=ahead):
                done = pending.popleft().result()
                if b is not None:  # into the buffer of the batch before `done`, which the forward is done with
                    pending.append(pool.submit(_decode_batch, enc, b, buffers[j % len(buffers)]))
                yield done
        finally:
            for f in pending:
                f.cancel()


def _extract_image(cfg, ds, items, rank, world, progress, timing) -> tuple[Path, bool]:
    shards = _shards(items, cfg.shard_size)
    enc = create_image_encoder(cfg.image_encoder, cfg.random_weights, cfg.image_weights)
    prov = store.Provenance(
        store.IMAGE, cfg.image_encoder, enc.fingerprint, enc.preprocessing, ds.name, ds.image_hash(), len(shards),
    )
    folder = store.cache_folder(cfg.cache_dir, ds.name, store.IMAGE, cfg.image_encoder)
    todo = _plan(folder, prov, cfg.force, rank, world, progress.console)
    task = _task(progress, f"image {cfg.image_encoder}", shards, todo, "images")
    # Batches never cross a shard, so a shard's output never depends on its neighbours; a shard's
    # batches come in a row, and its last one writes it.
    size = cfg.batch_size
    starts = [(k, b) for k in todo for b in range(0, len(shards[k]), size)]
    got, maps, bad_all = [], [], []
    t0 = time.time()
    with _written_behind(progress, task) as write:
        for (k, b), (good, x, bad) in zip(starts, _decoded(enc, [shards[k][b : b + size] for k, b in starts])):
            got += good
            if x is not None:
                maps.append(enc.encode(x))
            for id_, _, reason in bad:
                progress.console.print(f"[yellow]image problem[/] {id_}: {reason}", highlight=False)
            bad_all += bad
            progress.advance(task, len(good) + len(bad))
            if b + size >= len(shards[k]):
                write(store.write_image_shard, folder / store.shard_name(k, prov.n_shards), prov, [it.id for it in got],
                      [it.label for it in got], [it.split for it in got],
                      np.concatenate(maps) if maps else np.zeros((0, 1, 1, 1)), bad_all)
                got, maps, bad_all = [], [], []
    timing["image"] = time.time() - t0
    return folder, store.finish(folder, prov, data_flags(cfg), written=set(todo))
