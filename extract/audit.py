"""Data audit from the cache: items shared across splits, and duplicates whose labels disagree.

Why: a dev or test tweet whose text or picture also sits in train is scored on something
the head has seen, which flatters every result; two copies of one item with different
labels cap the accuracy any model can reach. The audit counts both, lists every pair in
`leaks.csv`, and can write a clean split (`--write-clean DIR`) that `train --splits DIR`
reads.

Sources of truth: the cache says who is in which split with which label (it is what
`train` reads); it keeps features, not texts, so raw texts and image files come from
the data set's own reader (`extract/datasets.py`), joined by id.

Checks, for every pair of splits (train-dev, train-test, dev-test) and within train:
- `text_exact`: the same text string;
- `text_normalised`: the same after `normalise()` (and not exact): lower case, URLs,
  @mentions and a leading `RT` / `RT @user:` removed, white space collapsed, end colons stripped;
- `image`: cosine of the spatially pooled feature maps >= `image_threshold`, searched
  block against block (memory is `block**2` floats, never N x N), then confirmed by a
  perceptual hash of the two files (`imagehash.phash`, Hamming distance <=
  `hash_distance`) when both files are at hand; `image_unconfirmed` when one is not;
- label conflicts: any pair above whose two labels differ (`same_label` false).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from core import store
from core.cli_fields import option
from core.errors import UserError
from core.defaults import DATASET, IMAGE_ENCODER, TEXT_ENCODER
from core.paths import DEFAULT_CACHE, default_data_root, make_dir, output_dir

SPLIT_ORDER = {"train": 0, "dev": 1, "test": 2}
# (split, other_split) as written in leaks.csv: the later split first, its earlier partner second
PAIRS = (("train", "train"), ("dev", "train"), ("test", "train"), ("test", "dev"))
TEXT_KINDS = ("text_exact", "text_normalised")
IMAGE_KINDS = ("image", "image_unconfirmed")
COLUMNS = ["split", "id", "other_split", "other_id", "kind", "score", "same_label"]

# Calibrated on MVSA-Single (docs/audit.md, "Calibration of the image threshold"): of the pairs
# of pooled EfficientNet-lite0 maps with cosine >= 0.85, the lowest-scoring true copy seen by eye
# sat at 0.892; candidates start at 0.88 and the perceptual hash decides. Without the files,
# cosine alone is less sure: same-template pictures (a screenshot layout, a poster series) also
# reach 0.93-0.95.
IMAGE_THRESHOLD = 0.88
# pHash is 64 bits. On those pairs, copies (re-encoded, rescaled) were 0-2 bits apart; the
# closest pair that was not a copy (another frame of one scene) was 10 apart; unrelated ~30.
HASH_DISTANCE = 8


@dataclass
class AuditConfig:
    """What `audit` checks; each `option(...)` field is also an option of it (core/cli_fields.py)."""

    dataset: str = option(DATASET, "data set name in the cache", short="-d")
    cache_dir: Path = option(DEFAULT_CACHE, "where caches live")
    data_root: Path = option(help="folder with the built-in data sets [default: $SPP_DATA_ROOT or ../shared/data]",
                             default_factory=default_data_root)
    text_encoder: str = option(TEXT_ENCODER, "which text cache gives ids, labels and splits")
    image_encoder: str = option(IMAGE_ENCODER, "which image cache to search for near-duplicates")
    # a cosine: above 1 nothing is found, and at 0 or below every pair of (non-negative) pooled maps is one
    image_threshold: float = option(IMAGE_THRESHOLD, "cosine of pooled maps for an image candidate "
                                    "(calibrated on MVSA-Single)", min=0, min_open=True, max=1)
    # the hash has 64 bits: a larger distance confirms every pair, as 64 does
    hash_distance: int = option(HASH_DISTANCE, "max pHash Hamming distance that confirms an image pair", min=0, max=64)
    block: int = 2048  # rows per block of the similarity search
    write_clean: Path | None = option(None, "write split files without the dev/test items leaking from train here")
    out: Path | None = option(None, "[default: <cache>/<dataset>/audit]")


@dataclass
class AuditResult:
    dataset: str
    out: Path
    leaks: pd.DataFrame  # COLUMNS
    summary: dict  # what summary.json holds
    notes: list[str] = field(default_factory=list)  # what the audit could not do, and why
    clean: dict | None = None  # what --write-clean wrote


# --- text ---------------------------------------------------------------------------------

_RT = re.compile(r"^rt\s+(@\w+\s*:?\s*)?")  # retweet prefix, with the retweeted user
_URL = re.compile(r"(https?://|www\.)\S+")
_MENTION = re.compile(r"@\w+")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The text a retweet or a re-post shares with its original: lower case, no URLs (each
    copy gets its own short link), no @mentions, no leading `RT`, white space collapsed, a
    colon left at either end (of `RT @user:`) stripped."""
    t = _SPACE.sub(" ", text.lower()).strip()
    t = _RT.sub("", t)
    t = _MENTION.sub(" ", _URL.sub(" ", t))
    return _SPACE.sub(" ", t).strip(" :")


def _group_pairs(keys: list[str | None]) -> Iterator[tuple[int, int]]:
    """Every pair (i, j), i < j, of items with the same non-empty key."""
    groups = defaultdict(list)
    for i, k in enumerate(keys):
        if k:
            groups[k].append(i)
    for members in groups.values():
        for a, i in enumerate(members):
            for j in members[a + 1 :]:
                yield i, j


# --- images -------------------------------------------------------------------------------

def near_duplicates(x: np.ndarray, threshold: float, block: int = 2048) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Pairs (i, j), i < j, of rows of `x` (N, C) whose cosine is >= threshold, as arrays
    per block. The search runs block of rows against block of rows, upper triangle only, so
    memory is the features plus one block x block matrix, whatever N. (torch rather than
    numpy: its matmul and comparison were 2-3x faster here on the same 2 cores.)"""
    import torch

    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = len(x)
    for a in range(0, n, block):
        xa = x[a : a + block]
        for b in range(a, n, block):
            s = xa @ x[b : b + block].T
            hit = s >= threshold
            if a == b:
                hit.triu_(1)  # each pair once, no self-pairs
            ij = hit.nonzero()
            if len(ij):
                ii, jj = ij[:, 0], ij[:, 1]
                yield (a + ii).numpy(), (b + jj).numpy(), s[ii, jj].numpy()


def _phash(path: Path | None, memo: dict):
    """pHash of an image file (None when the file is not at hand), computed once per file."""
    if path is None or not Path(path).is_file():
        return None
    if path not in memo:
        import imagehash
        from PIL import Image

        try:
            with Image.open(path) as im:
                memo[path] = imagehash.phash(im)
        except OSError:  # unreadable file: treated as not at hand
            memo[path] = None
    return memo[path]


# --- the audit ----------------------------------------------------------------------------

def _reader_items(dataset: str, info: dict, data_root: Path) -> dict:
    """id -> Item from the data set's reader (texts and image paths are not in the cache)."""
    from extract import datasets

    source = info.get("source") or dataset
    try:
        if source in datasets.BUILTINS:
            ds = datasets.load_builtin(source, data_root)
        else:
            ds = datasets.load_manifest(Path(source), dataset)
    except UserError as e:
        raise UserError(f"the audit reads the texts of {dataset} from its source ({e})") from None
    return {it.id: it for it in ds.items}


def run(cfg: AuditConfig) -> AuditResult:
    """Audit a cached data set; write leaks.csv and summary.json (and the clean split if asked)."""
    root = Path(cfg.cache_dir) / cfg.dataset
    info_file = root / "dataset.json"
    if not info_file.is_file():
        raise UserError(f"no cache for data set {cfg.dataset!r} in {cfg.cache_dir}: run "
                        f"`python pipeline.py extract --dataset {cfg.dataset}` first, or pass --cache-dir")
    info = store.read_dataset_info(root)
    classes = info["classes"]
    text_dir = store.cache_folder(cfg.cache_dir, cfg.dataset, store.TEXT, cfg.text_encoder)
    image_dir = store.cache_folder(cfg.cache_dir, cfg.dataset, store.IMAGE, cfg.image_encoder)
    has_image = (image_dir / "index.json").is_file()
    meta_dir = text_dir if (text_dir / "index.json").is_file() else image_dir
    ids, labels, splits = store.read_meta(meta_dir, f"python pipeline.py extract --dataset {cfg.dataset}")
    items = _reader_items(cfg.dataset, info, cfg.data_root)
    notes = []
    missing = [i for i in ids if i not in items]
    if missing:
        notes.append(f"{len(missing)} cached ids not found in the source (e.g. {missing[0]}): their texts are not checked")
    pairs = _Pairs(ids, labels, splits)
    _text_pairs([items[i].text if i in items else None for i in ids], pairs)
    image_info = None
    if has_image:
        image_info = _image_pairs(cfg, image_dir, items, pairs)
    else:
        notes.append(f"text-only cache (no image cache at {image_dir}): text checks only")

    leaks = pd.DataFrame(pairs.rows, columns=COLUMNS)
    summary = {
        "dataset": cfg.dataset, "cache": str(meta_dir), "classes": classes,
        "items": {s: splits.count(s) for s in SPLIT_ORDER},
        "normalisation": " ".join(normalise.__doc__.split(":", 1)[1].split()),
        "image": image_info, "counts": counts(leaks), "notes": notes,
    }
    out = Path(cfg.out or root / "audit")
    make_dir(out)
    leaks.to_csv(out / "leaks.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    result = AuditResult(cfg.dataset, out, leaks, summary, notes)
    if cfg.write_clean is not None:
        result.clean = write_clean(Path(cfg.write_clean), leaks, ids, labels, splits, classes, cfg)
    return result


class _Pairs:
    """The leaks found so far, as leaks.csv rows: the text and the image checks add to one list,
    each pair once with the later split (or later item) first, kept only if its splits are audited."""

    def __init__(self, ids: list[str], labels, splits: list[str]):
        self.ids, self.labels, self.splits = ids, labels, splits
        self.rows: list[tuple] = []

    def add(self, i: int, j: int, kind: str, score: float) -> None:
        ids, labels, splits = self.ids, self.labels, self.splits
        if SPLIT_ORDER[splits[i]] < SPLIT_ORDER[splits[j]] or (splits[i] == splits[j] and i < j):
            i, j = j, i  # the later split (or later item) first
        if (splits[i], splits[j]) in PAIRS:
            self.rows.append((splits[i], ids[i], splits[j], ids[j], kind, round(float(score), 4),
                              bool(labels[i] == labels[j])))


def _text_pairs(texts: list[str | None], pairs: _Pairs) -> None:
    """Items with the same text (text_exact), then those the same once normalised (text_normalised)."""
    exact = set()
    for i, j in _group_pairs(texts):
        exact.add((i, j))
        pairs.add(i, j, "text_exact", 1.0)
    for i, j in _group_pairs([normalise(t) if t else None for t in texts]):
        if (i, j) not in exact:
            pairs.add(i, j, "text_normalised", 1.0)


def _image_pairs(cfg: AuditConfig, image_dir: Path, items: dict, pairs: _Pairs) -> dict:
    """Near-duplicate images across audited splits: candidates by the cosine of their pooled maps,
    confirmed by perceptual hash (image), else kept as image_unconfirmed when a file is missing;
    returns what summary.json says of the image check."""
    ids, splits = pairs.ids, pairs.splits
    row_of = {id_: i for i, id_ in enumerate(ids)}
    img_ids, pooled = store.pooled_maps(image_dir)
    rows_img = np.array([row_of.get(i, -1) for i in img_ids])  # -1: an image without a text entry
    memo: dict = {}
    candidates = rejected = unconfirmed = 0
    for ii, jj, ss in near_duplicates(pooled, cfg.image_threshold, cfg.block):
        for a, b, s in zip(rows_img[ii], rows_img[jj], ss):
            if a < 0 or b < 0:
                continue
            if (splits[a], splits[b]) not in PAIRS and (splits[b], splits[a]) not in PAIRS:
                continue
            candidates += 1
            ha = _phash(items[ids[a]].image if ids[a] in items else None, memo)
            hb = _phash(items[ids[b]].image if ids[b] in items else None, memo)
            if ha is None or hb is None:
                unconfirmed += 1
                pairs.add(a, b, "image_unconfirmed", s)
            elif ha - hb <= cfg.hash_distance:
                pairs.add(a, b, "image", s)
            else:
                rejected += 1
    return {"threshold": cfg.image_threshold, "hash": "imagehash.phash (64 bits)",
            "hash_distance": cfg.hash_distance, "items": len(img_ids), "candidates": candidates,
            "rejected_by_hash": rejected, "unconfirmed_no_file": unconfirmed}


def counts(leaks: pd.DataFrame) -> dict:
    """Per split pair and check: distinct items on the `split` side, and pairs.

    `text` is either text check, `any` is any check; `label_conflicts` are items with a
    duplicate (by any check) of another label."""
    out = {}
    checks = {"text_exact": ("text_exact",), "text_normalised": ("text_normalised",), "text": TEXT_KINDS,
              "image": IMAGE_KINDS, "any": TEXT_KINDS + IMAGE_KINDS}
    for split, other in PAIRS:
        part = leaks[(leaks["split"] == split) & (leaks["other_split"] == other)]
        row = {}
        for name, kinds in checks.items():
            sel = part[part["kind"].isin(kinds)]
            row[name] = {"items": int(sel["id"].nunique()), "pairs": int(len(sel.drop_duplicates(["id", "other_id"])))}
        conflicts = part[~part["same_label"].astype(bool)]
        row["label_conflicts"] = {"items": int(conflicts["id"].nunique()),
                                  "pairs": int(len(conflicts.drop_duplicates(["id", "other_id"])))}
        out[f"{split}-{other}"] = row
    return out


def write_clean(folder: Path, leaks: pd.DataFrame, ids, labels, splits, classes, cfg: AuditConfig) -> dict:
    """Split files without the dev and test items that leak from train (any check).

    `<folder>/{train,dev,test}.txt` hold one id a line (what `train --splits` reads);
    `dropped.csv` says which item went and why; `clean.json` counts per split and class."""
    from_train = leaks[leaks["other_split"].eq("train") & leaks["split"].isin(["dev", "test"])]
    why = from_train.groupby("id").agg(kind=("kind", lambda k: "+".join(sorted(set(k)))),
                                       train_id=("other_id", "first"))
    output_dir(folder, ("train.txt", "dev.txt", "test.txt", "dropped.csv", "clean.json"), "--write-clean")
    kept = {s: [] for s in SPLIT_ORDER}
    dropped_rows, per_class = [], {s: {c: 0 for c in classes} for s in ("dev", "test")}
    for id_, label, split in zip(ids, labels, splits):
        if split != "train" and id_ in why.index:
            name = classes[label] if 0 <= label < len(classes) else str(label)
            per_class[split][name] += 1
            dropped_rows.append((id_, split, name, why.at[id_, "kind"], why.at[id_, "train_id"]))
        elif split in kept:
            kept[split].append(id_)
    for s, members in kept.items():
        (folder / f"{s}.txt").write_text("".join(f"{i}\n" for i in members))
    pd.DataFrame(dropped_rows, columns=["id", "split", "label", "kind", "train_id"]).to_csv(folder / "dropped.csv", index=False)
    clean = {"dataset": cfg.dataset, "kept": {s: len(v) for s, v in kept.items()}, "dropped_per_class": per_class,
             "dropped": {s: sum(v.values()) for s, v in per_class.items()},
             "rule": "dev and test items with a text or image duplicate in train are dropped",
             "audit": {"image_threshold": cfg.image_threshold, "hash_distance": cfg.hash_distance}}
    (folder / "clean.json").write_text(json.dumps(clean, indent=1))
    return clean


def table_rows(summary: dict) -> list[list[str]]:
    """Rows of the on-screen table: split pair, then items (pairs) per check."""
    out = []
    for pair, row in summary["counts"].items():
        out.append([pair] + ["n/a" if k == "image" and summary["image"] is None else f"{row[k]['items']} ({row[k]['pairs']})"
                             for k in TABLE_CHECKS])
    return out


TABLE_CHECKS = ("text_exact", "text_normalised", "text", "image", "any", "label_conflicts")
TABLE_HEADERS = ("exact text", "normalised", "text", "image", "any", "conflicts")
