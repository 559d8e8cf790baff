"""The cache in memory: every split as tensors, batches cut by indexing, never by disk reads.

Features stay float16 in RAM (half the bytes) and become float32 one batch at a time.
Text and image caches are joined by id, so an item whose image could not be read is
simply absent from a two-modality run (and counted).

With `text_views` the train split also holds K dropout views of its text states
(`extract --text-views K`): each epoch draws one view per item, so the head, like the
official code's with BERT in train mode, never sees the same text features twice.
Dev and test have no views: they are always scored on the clean (eval-mode) states.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import heads
from core import store
from core.defaults import BUILTIN_DATASETS
from core.errors import UserError
from heads.base import Batch, Dims
from train.config import TrainConfig


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

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, idx: torch.Tensor, view: torch.Tensor | None = None) -> Batch:
        """Rows `idx` as a float32 Batch; the tokens of the chosen texts are gathered back to back.

        `view` (one view number per row) takes each text from its dropout view instead of
        the clean states."""
        text = {"cls": None, "tokens": None, "lengths": None}
        if self.cls is not None:
            lengths = self.offsets[idx + 1] - self.offsets[idx]
            text = {"cls": self.cls[idx].float(), "tokens": self.tokens[_rows(self.offsets, idx)].float(),
                    "lengths": lengths}
            if view is not None:  # views share the clean offsets, so the same token rows
                text["cls"] = self.view_cls[view, idx].float()
                text["tokens"] = self.view_tokens[torch.repeat_interleave(view, lengths),
                                                  _rows(self.offsets, idx)].float()
        maps = self.maps[idx].float() if self.maps is not None else None
        return Batch(labels=self.labels[idx], maps=maps, **text)

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
        if self.view_cls is None:
            raise UserError("this split has no text views (dev and test never do)")
        g = torch.Generator().manual_seed(100_003 * seed + epoch)
        return torch.randint(len(self.view_cls), (len(self),), generator=g)


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
    splits: dict[str, Split]
    dims: Dims
    classes: list[str]
    provenance: CacheProvenance
    dropped: int  # items in the text cache with no image (two-modality runs)


def extract_source(dataset: str) -> str:
    """The `extract` flags that name this data set: a built-in (maybe `--limit`ed) or a manifest."""
    limited = re.fullmatch(r"(.+)-first(\d+)", dataset)
    if limited and limited.group(1) in BUILTIN_DATASETS:
        return f"--dataset {limited.group(1)} --limit {limited.group(2)}"
    return f"--dataset {dataset}" if dataset in BUILTIN_DATASETS else f"--manifest PATH --name {dataset}"


def modalities(cfg: TrainConfig) -> str:
    """Which caches the head reads: its config says, the trainer loads only those."""
    reads = (cfg.head_config or heads.build_config(cfg.head)).reads()
    return "both" if len(reads) == 2 else reads[0]


def load_data(cfg: TrainConfig) -> Data:
    """The caches a run of `cfg` reads, as `load` gives them."""
    return load(cfg.cache_dir, cfg.dataset, modalities(cfg), cfg.text_encoder, cfg.image_encoder,
                split_files=cfg.splits, text_views=cfg.text_views)


def _hint(dataset: str, kind: str, encoder: str) -> str:
    flag = "--text-encoder" if kind == store.TEXT else "--image-encoder"
    base = f"python pipeline.py extract {extract_source(dataset)} {flag} {encoder}"
    return base + (" --text-only" if kind == store.TEXT else "")


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
         split_files: Path | None = None, text_views: bool = False) -> Data:
    """Load what a run needs; a missing cache names the extract command that makes it."""
    root = Path(cache_dir) / dataset
    info_file = root / "dataset.json"
    if not info_file.is_file():
        raise UserError(_no_cache(cache_dir, dataset))
    classes = store.read_dataset_info(root)["classes"]
    prov, text, image, n_views = {}, None, None, 0
    if modalities in ("text", "both"):
        folder = store.cache_folder(cache_dir, dataset, store.TEXT, text_encoder)
        hint = _hint(dataset, store.TEXT, text_encoder)
        prov["text"] = store.provenance(folder, hint)
        text = store.load_text(folder, hint=hint)
        if text_views:
            views = _load_views(folder, prov["text"], text.get("train"), dataset, text_encoder)
            n_views = len(views[0])
    if modalities in ("image", "both"):
        folder = store.cache_folder(cache_dir, dataset, store.IMAGE, image_encoder)
        if not (folder / "index.json").is_file():
            raise UserError(
                f"no image cache for {dataset} with {image_encoder} at {folder}: run "
                f"`python pipeline.py extract {extract_source(dataset)} --image-encoder {image_encoder} --image-dir DIR`, "
                "or train with --modalities text"
            )
        prov["image"] = store.provenance(folder, "")
        image = store.load_image(folder)
    if text is not None and image is not None:
        _check_agree(text, image, dataset)
    splits, dropped = {}, 0
    for s in ("train", "dev", "test"):
        t, im = (text or {}).get(s), (image or {}).get(s)
        if (text is not None and t is None) or (image is not None and im is None):
            raise UserError(f"the {dataset} cache has no {s} split: re-run extract (or give the manifest a split column)")
        splits[s], d = _join(t, im)
        dropped += d
        if s == "train" and text_views and t is not None:
            _attach_views(splits[s], t, *views)
    if split_files is not None:
        if text_views:
            raise UserError("--text-views with --splits is not supported yet: the views follow the cache's own "
                            "train split; train on the clean split without --text-views")
        splits = reassign(splits, Path(split_files))
    any_split = splits["train"]
    dims = Dims(
        text_layers=any_split.cls.shape[1] if any_split.cls is not None else 0,
        text_width=any_split.cls.shape[2] if any_split.cls is not None else 0,
        image_channels=any_split.maps.shape[1] if any_split.maps is not None else 0,
        n_classes=len(classes),
    )
    return Data(splits, dims, classes, CacheProvenance(**prov, text_views=n_views), dropped)


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
    hint = f"python pipeline.py extract {extract_source(dataset)} --text-encoder {encoder} --text-views K"
    folders = store.view_folders(folder)
    if not folders:
        raise UserError(f"the text cache {folder} has no dropout views: run `{hint}` (e.g. K=4; the clean "
                        "states are kept), or train without --text-views")
    if train is None:
        raise UserError(f"the {dataset} cache has no train split to draw text views for")
    cls = tokens = None
    for k, vf in enumerate(folders):
        differs = clean.differences(replace(store.provenance(vf, hint), view=clean.view))
        if differs:
            raise UserError(f"text views {vf} were made from another cache: {'; '.join(differs)}. "
                            f"Run `{hint} --force` to rebuild both")
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
    where = {id_: i for i, id_ in enumerate(image.ids)}
    keep = [i for i, id_ in enumerate(text.ids) if id_ in where]
    if len(keep) == len(text.ids) and text.ids == image.ids:
        maps = image.maps
    else:
        maps = image.maps[torch.tensor([where[text.ids[i]] for i in keep], dtype=torch.long)]
    if len(keep) < len(text.ids):
        split = split.subset(torch.tensor(keep, dtype=torch.long))
    split.maps = maps
    return split, len(text.ids) - len(keep)


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
    rows = {s: [] for s in ("train", "dev", "test")}  # target split -> [(source split, row)]
    for source, split in splits.items():
        for r, id_ in enumerate(split.ids):
            if id_ in where:
                rows[where[id_]].append((source, r))
    out = {}
    for s, picked in rows.items():
        if not picked:
            raise UserError(f"no item of the cache is listed in {folder / (s + '.txt')}: are these split files for this data set?")
        parts = [splits[src].subset(torch.tensor([r for sr, r in picked if sr == src], dtype=torch.long))
                 for src in splits if any(sr == src for sr, _ in picked)]
        out[s] = _cat(parts)
    return out


def _cat(parts: list[Split]) -> Split:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    text = {}
    if first.cls is not None:
        lengths = torch.cat([p.offsets[1:] - p.offsets[:-1] for p in parts])
        text = dict(cls=torch.cat([p.cls for p in parts]), tokens=torch.cat([p.tokens for p in parts]),
                    offsets=_offsets(lengths))
    maps = torch.cat([p.maps for p in parts]) if first.maps is not None else None
    return Split(sum((p.ids for p in parts), []), torch.cat([p.labels for p in parts]), maps=maps, **text)
