"""Readers: every data source becomes one list of `Item`s plus the problems met on the way.

Three sources, one result:
- the built-in splits in the shared data folder (`mvsa_s`, `mvsa_m`, `hfm`), and the built-in
  data sets the user brings in their released layout (`tumemo`, `mmsd2`: see `@builtin` below);
- a CSV or JSONL manifest of the user's own (`--manifest file.csv`);
- a raw MVSA release folder (`data/{id}.jpg`, `data/{id}.txt`, `labelResultAll.txt`).

Nothing here raises on a bad *item*: a duplicate id, an unknown label, an empty or
undecodable text, a missing image is recorded as a `Problem` and the item is dropped
(or, for a missing image, kept for the text cache only). Bad *arguments* (a wrong data
set name, a path that does not exist) raise `UserError`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from core import store
from core.defaults import BUILTIN_DATASETS
from core.errors import UserError

SPLITS = ("train", "dev", "test")
SENTIMENT = ("positive", "neutral", "negative")
SARCASM = ("not_sarcastic", "sarcastic")
EMOTIONS = ("Angry", "Bored", "Calm", "Fear", "Happy", "Love", "Sad")  # TumEmo, spelled as its label file
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # a release's images, in order of preference for one id
# A manifest label seen fewer than RARE_LABEL times, while the commonest label is at least
# RARE_RATIO times as frequent, is most likely a typo ("furious" among positive/neutral/negative):
# it would silently become a class of its own.
RARE_LABEL, RARE_RATIO = 5, 10


@dataclass(frozen=True)
class Item:
    id: str
    text: str
    image: Path | None  # None: no image for this item (text-only, or the file is missing)
    label: int  # index into Dataset.classes
    split: str


@dataclass(frozen=True)
class Problem:
    id: str
    stage: str  # "read", "text", "image"
    reason: str


@dataclass
class Dataset:
    name: str
    classes: tuple[str, ...]
    items: list[Item]
    problems: list[Problem] = field(default_factory=list)
    text_fallbacks: int = 0  # texts that were not valid UTF-8 and were decoded another way
    split_rule: str = "given"
    rare_labels: dict[str, int] = field(default_factory=dict)  # likely typos found in a manifest (label -> items)

    def counts(self) -> dict[str, int]:
        return dict(Counter(it.split for it in self.items))

    def text_hash(self) -> str:
        """What a text cache depends on: ids, texts, labels, splits, in order."""
        return _digest((it.id, it.text, it.label, it.split) for it in self.items)

    def image_hash(self) -> str:
        """What an image cache depends on: ids, labels, splits and the image files' sizes."""
        return _digest(
            (it.id, it.label, it.split, it.image.name, it.image.stat().st_size)
            for it in self.items
            if it.image is not None
        )


@dataclass(frozen=True)
class Builtin:
    folder: str  # inside --data-root
    classes: tuple[str, ...]
    images: str | None  # image folder inside the data folder, when the data ships them
    # A data set the user brings in its released layout: read(name, folder, image_dir, seed) -> Dataset.
    # None: the shipped {train,dev,test}.jsonl.
    read: Callable[..., Dataset] | None = None
    marker: str = ""  # a file or folder that only the release has (--data-root may point at the release itself)
    layout: str = ""  # what the release holds, for messages


BUILTINS = {
    "mvsa_s": Builtin("mvsa_single", SENTIMENT, "images"),
    "mvsa_m": Builtin("mvsa_multiple", SENTIMENT, None),
    "hfm": Builtin("hfm", SARCASM, None),
}  # + tumemo, mmsd2, registered with their readers by @builtin below


def builtin(name: str, folder: str, classes: tuple[str, ...], marker: str, layout: str):
    """Register a reader of a released layout as the built-in data set `name` (`--dataset name`).
    The name must be in core.defaults.BUILTIN_DATASETS too: stage two knows the built-ins from there."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"built-in data set {name!r}: add it to core.defaults.BUILTIN_DATASETS as well")

    def register(read):
        BUILTINS[name] = Builtin(folder, classes, None, read, marker, layout)
        return read
    return register


def _digest(rows) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, default=str).encode())
    return h.hexdigest()[:16]


def decode_text(raw: bytes) -> tuple[str, bool]:
    """Decode tweet bytes; returns (text, needed_fallback).

    Raw MVSA text files are a mix of UTF-8, UTF-8 with BOM and Windows-1252; cp1252
    leaves five bytes undefined, so latin-1 (which maps every byte) is the last resort.
    """
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252"), True
    except UnicodeDecodeError:
        return raw.decode("latin-1"), True


class _Collector:
    """Turns raw rows into Items, recording every row it has to drop."""

    def __init__(self, classes: tuple[str, ...] | None):
        self.classes = classes
        self.items: list[Item] = []
        self.problems: list[Problem] = []
        self.seen: set[str] = set()
        self.fallbacks = 0

    def add(self, id_: str, text: str | None, image: Path | None, label: str, split: str) -> None:
        id_ = id_.strip()
        if text is not None and not isinstance(text, str):  # a number or a list in a JSON text field
            text = str(text)
        if not id_:
            self.problems.append(Problem("?", "read", "row without an id: give every row an id"))
            return
        if why := store.id_problem(id_):  # listed escaped: the id itself cannot be written anywhere
            self.problems.append(Problem(id_.encode("unicode_escape").decode("ascii"), "read", why))
            return
        if id_ in self.seen:
            self.problems.append(Problem(id_, "read", "duplicate id: kept the first row, dropped this one"))
            return
        self.seen.add(id_)
        if not label:
            self.problems.append(Problem(id_, "read", "no label: give every row a label"))
            return
        if self.classes is not None and label not in self.classes:
            self.problems.append(
                Problem(id_, "read", f"unknown label {label!r}: expected one of {', '.join(self.classes)}")
            )
            return
        if split not in SPLITS:
            what = f"unknown split {split!r}" if split else "blank split cell"
            self.problems.append(Problem(id_, "read", f"{what}: use train, dev or test"))
            return
        if text is None or not text.strip():
            self.problems.append(Problem(id_, "text", "empty text: fix the text or drop the row"))
            return
        if image is not None and not image.is_file():
            self.problems.append(Problem(id_, "image", f"image file missing: {image}; kept for text only"))
            image = None
        self.items.append(Item(id_, text.strip(), image, label, split))  # label index set later

    def repaired(self, id_: str, what: str) -> None:
        """A text that was not valid UTF-8: kept, counted and listed (nothing silent)."""
        self.fallbacks += 1
        self.problems.append(Problem(id_.strip() or "?", "text", f"{what} is not valid UTF-8: decoded as "
                                     "Windows-1252/Latin-1; re-save it as UTF-8 if characters look wrong"))

    def dataset(self, name: str, split_rule: str = "given") -> Dataset:
        classes = self.classes or tuple(sorted({it.label for it in self.items}))
        index = {c: i for i, c in enumerate(classes)}
        items = [Item(it.id, it.text, it.image, index[it.label], it.split) for it in self.items]
        return Dataset(name, classes, items, self.problems, self.fallbacks, split_rule)


def _read_jsonl(path: Path) -> list[tuple[dict, bool]]:
    """Rows, each with whether its line needed a non-UTF-8 fallback."""
    rows = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            text, fell_back = decode_text(line)
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected one JSON object per line; fix or remove that line")
            rows.append((row, fell_back))
    return rows


def _read_csv(path: Path) -> list[tuple[dict, bool]]:
    """Rows, each with whether one of its lines needed a non-UTF-8 fallback.

    Decoded line by line: a file that is mostly UTF-8 with a few Windows-1252 rows keeps
    its UTF-8 rows intact, and a U+2028 inside a tweet does not split a row.
    """
    lines, fell = [], []
    for raw in path.read_bytes().splitlines():  # bytes: splits on \n, \r\n and \r only
        text, fell_back = decode_text(raw)
        lines.append(text)
        fell.append(fell_back)
    reader = csv.DictReader(lines)
    reader.fieldnames  # reads the header line
    rows, start = [], reader.line_num
    for row in reader:
        rows.append((row, any(fell[start : reader.line_num])))
        start = reader.line_num
    return rows


def read_rows(path: Path) -> list[tuple[dict, bool]]:
    """A .csv or .jsonl manifest's rows, each with whether it needed a non-UTF-8 fallback
    (`extract --manifest` and `predict --manifest` read manifests so)."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path)
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    raise UserError(f"manifest {path}: expected a .csv or .jsonl file, or a raw MVSA folder")


def read_text_file(path: Path) -> tuple[str | None, bool]:
    """A `text_file` cell's text (None: no such file) and whether it needed a non-UTF-8 fallback."""
    if not path.is_file():
        return None, False
    return decode_text(path.read_bytes())


def load_builtin(name: str, data_root: Path, image_dir: Path | None = None, seed: int = 0) -> Dataset:
    """A built-in data set: the standard splits shipped in the shared data folder, or a release
    the user brings (`seed` draws the split of one that has none)."""
    if name not in BUILTINS:
        raise UserError(f"unknown data set {name!r}: use one of {', '.join(BUILTINS)} or --manifest PATH")
    spec = BUILTINS[name]
    if spec.read is not None:
        if image_dir is not None and not Path(image_dir).is_dir():
            raise UserError(f"image folder {image_dir} not found: check --image-dir")
        return spec.read(name, _release_folder(name, spec, Path(data_root)), image_dir, seed)
    folder = Path(data_root) / spec.folder
    if not folder.is_dir():
        raise UserError(f"data folder {folder} not found: pass --data-root (or set SPP_DATA_ROOT)")
    images = image_dir or (folder / spec.images if spec.images else None)
    if images is not None and not Path(images).is_dir():
        raise UserError(f"image folder {images} not found: check --image-dir")
    col = _Collector(spec.classes)
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            raise UserError(f"split file {path} missing: the data folder is incomplete")
        for row, fell_back in _read_jsonl(path):
            id_ = str(row.get("id", ""))
            if fell_back:
                col.repaired(id_, f"{path.name} line of {id_}")
            image = Path(images) / f"{id_}.jpg" if images is not None else None
            col.add(id_, row.get("text"), image, str(row.get("label")), split)
    return col.dataset(name)


def _release_folder(name: str, spec: Builtin, data_root: Path) -> Path:
    """`<data-root>/<folder>`, or `--data-root` itself when it is the release (holds the marker)."""
    folder = data_root / spec.folder
    if folder.is_dir():
        return folder
    if (data_root / spec.marker).exists():
        return data_root
    raise UserError(f"{name}: data folder {folder} not found: this data set is not shipped; put the release "
                    f"there ({spec.layout}), or pass --data-root DIR with DIR/{spec.folder} or the release itself")


def _images_by_id(folder: Path) -> dict[str, Path]:
    """id -> image file in a folder of `{id}.jpg|.jpeg|.png` (listed once: cheaper than a stat per item)."""
    rank = {suffix: k for k, suffix in enumerate(IMAGE_SUFFIXES)}
    found: dict[str, Path] = {}
    with os.scandir(folder) as entries:
        for e in entries:
            stem, suffix = os.path.splitext(e.name)
            if suffix.lower() in rank and (stem not in found or rank[suffix.lower()] < rank[found[stem].suffix.lower()]):
                found[stem] = Path(e.path)
    return found


# --- TumEmo (Yang et al., MVAN, IEEE TMM 2020) -------------------------------------------

@builtin("tumemo", "tumemo", EMOTIONS, marker="all_data_id_and_label.txt",
         layout="all_data_id_and_label.txt (one 'id label' line per post) and all_data/ with {id}.txt and {id}.jpg")
def read_tumemo(name: str, folder: Path, image_dir: Path | None, seed: int) -> Dataset:
    """TumEmo as released with MVAN: `all_data_id_and_label.txt` and the posts of `all_data.zip`
    (`{id}.txt`, `{id}.jpg`), unzipped into `all_data/` (or `data/`). No official split: a seeded
    stratified 8:1:1 one, recorded in dataset.json."""
    labels_file = folder / "all_data_id_and_label.txt"
    posts = next((folder / d for d in ("all_data", "data") if (folder / d).is_dir()), None)
    if not labels_file.is_file() or posts is None:
        raise UserError(f"{folder}: a TumEmo folder holds all_data_id_and_label.txt and all_data/ (all_data.zip "
                        "unzipped: {id}.txt and {id}.jpg per post)")
    images = Path(image_dir) if image_dir is not None else posts
    found = _images_by_id(images)
    canonical = {c.lower(): c for c in EMOTIONS}
    col = _Collector(EMOTIONS)
    first = True
    for n, line in enumerate(decode_text(labels_file.read_bytes())[0].splitlines(), 1):
        cells = [c for c in re.split(r"[\s,]+", line) if c]
        if not cells:
            continue
        if first:
            first = False
            if not cells[0].isdigit() and cells[-1].lower() not in canonical:
                continue  # a header line ("id label")
        if len(cells) != 2:
            col.problems.append(Problem(cells[0], "read", f"{labels_file.name} line {n} unreadable ({line.strip()!r}): "
                                        "expected 'id label'"))
            continue
        id_, label = cells
        text_file = posts / f"{id_}.txt"
        if not text_file.is_file():
            col.problems.append(Problem(id_, "text", f"text file missing: {text_file}; add it or drop the line"))
            continue
        text = _read_text_file(text_file, col, id_)
        col.add(id_, text, found.get(id_, images / f"{id_}.jpg"), canonical.get(label.lower(), label), "train")
    rule = _assign_splits(col, seed)
    return col.dataset(name, f"no official split: {rule}, seed {seed}")


# --- MMSD2.0 (Qin et al., ACL 2023 findings) ---------------------------------------------

MMSD2_SPLITS = {"train": "train", "valid": "dev", "test": "test"}  # file stem -> our split
MMSD2_LABELS = {"0": "not_sarcastic", "1": "sarcastic"}


@builtin("mmsd2", "mmsd2", SARCASM, marker="text_json_final",
         layout="text_json_final/{train,valid,test}.json with image_id, text, label 0|1, and dataset_image/{image_id}.jpg")
def read_mmsd2(name: str, folder: Path, image_dir: Path | None, seed: int) -> Dataset:
    """MMSD2.0 as released (JoeYing1019/MMSD2.0, `data/`): `text_json_final/{train,valid,test}.json`,
    each a JSON list of {"image_id", "text", "label": 0|1}, and the images `dataset_image/{image_id}.jpg`.
    The split files may also sit in the folder itself, and be JSON Lines."""
    texts = folder / "text_json_final" if (folder / "text_json_final").is_dir() else folder
    images = Path(image_dir) if image_dir is not None else folder / "dataset_image"
    images = images if images.is_dir() else None  # images not at hand: text only, as for hfm
    col = _Collector(SARCASM)
    for stem, split in MMSD2_SPLITS.items():
        path = texts / f"{stem}.json"
        if not path.is_file():
            raise UserError(f"split file {path} missing: an MMSD2.0 folder holds text_json_final/"
                            "{train,valid,test}.json")
        for row, fell_back in _read_json_rows(path):
            raw_id = row.get("image_id", row.get("id"))
            id_ = "" if raw_id is None else str(raw_id)
            if fell_back:
                col.repaired(id_, f"{path.name} text of {id_}")
            label = row.get("label")
            label = "" if label is None else str(label).strip()
            image = images / f"{id_.strip()}.jpg" if images is not None else None
            col.add(id_, row.get("text"), image, MMSD2_LABELS.get(label, label), split)
    return col.dataset(name)


def _read_json_rows(path: Path) -> list[tuple[dict, bool]]:
    """The objects of a JSON list file (or of a JSON Lines file), each with whether its text may
    have needed a non-UTF-8 fallback (a whole-file fallback touches only rows with non-ASCII text)."""
    text, fell_back = decode_text(path.read_bytes())
    if not text.lstrip().startswith("["):
        return _read_jsonl(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); fix that place or get the file again") from None
    for k, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(f"{path}: element {k} of the list is not a JSON object; fix or remove it")
    return [(row, fell_back and not str(row.get("text", "")).isascii()) for row in rows]


def load_manifest(path: Path, name: str | None = None, image_dir: Path | None = None, seed: int = 0,
                  classes: tuple[str, ...] | None = None, keep_rare_labels: bool = False) -> Dataset:
    """A CSV/JSONL manifest (columns id, text|text_file, image, label, [split]) or a raw MVSA folder.

    `classes` declares the label set (other labels are problems, listed by id); without it
    the classes are the labels that occur, and a rare one is dropped as a likely typo unless
    `keep_rare_labels`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"manifest {path} not found: give the path of a .csv or .jsonl manifest or a raw MVSA folder")
    if path.is_dir():
        return load_raw_mvsa(path, name or path.name, seed)
    rows = read_rows(path)
    if not rows:
        raise UserError(f"manifest {path} has no rows")
    header = rows[0][0].keys()
    if not {"id", "label"} <= header or not {"text", "text_file"} & header:
        raise UserError(
            f"manifest {path}: columns id, label and text or text_file are required; found "
            f"{', '.join(str(h) for h in header if h is not None)}"
        )
    base = path.parent
    col = _Collector(tuple(classes) if classes else None)
    given_split = "split" in header
    for row, fell_back in rows:
        id_ = str(row.get("id", "")).strip()
        if fell_back:
            col.repaired(id_, f"{path.name} row of {id_}")
        text = row.get("text")
        if not text and row.get("text_file"):
            text = _read_text_file(base / row["text_file"], col, id_)
        if row.get("image"):
            image = base / row["image"]
        elif image_dir is not None:
            image = Path(image_dir) / f"{id_}.jpg"
        else:
            image = None
        label = "" if row.get("label") is None else str(row["label"]).strip()
        split = str(row.get("split") or "").strip() if given_split else "train"  # reassigned below
        col.add(id_, text, image, label, split)
    rare = {} if classes else _rare_labels(col, keep_rare_labels)
    rule = "given" if given_split else f"{_assign_splits(col, seed)}, seed {seed}"
    ds = col.dataset(name or path.stem, rule)
    ds.rare_labels = rare
    return ds


def _rare_labels(col: _Collector, keep: bool) -> dict[str, int]:
    """Labels seen fewer than RARE_LABEL times next to a label RARE_RATIO times commoner: each
    item is listed as a problem, and dropped unless `keep` (--keep-rare-labels)."""
    counts = Counter(it.label for it in col.items)
    if not counts:
        return {}
    top = max(counts.values())
    rare = {lbl: n for lbl, n in counts.items() if n < RARE_LABEL and n * RARE_RATIO <= top}
    for it in col.items:
        if it.label in rare:
            fate = "kept (--keep-rare-labels)" if keep else "dropped; fix the label, declare the classes with --classes, or pass --keep-rare-labels"
            col.problems.append(Problem(it.id, "read", f"label {it.label!r} seen {rare[it.label]} time(s): likely a typo; {fate}"))
    if not keep:
        col.items = [it for it in col.items if it.label not in rare]
    return rare


def _read_text_file(path: Path, col: _Collector, id_: str) -> str | None:
    text, fell_back = read_text_file(path)  # None: reported as empty text by the collector
    if fell_back:
        col.repaired(id_, path.name)
    return text


def _assign_splits(col: _Collector, seed: int) -> str:
    """Seeded 8:1:1 split, for data that does not give one; stratified by label where every class
    has enough items (else plain random, and the returned rule says so)."""
    from sklearn.model_selection import train_test_split

    items = col.items
    if len(items) < 10:
        raise UserError(f"only {len(items)} usable rows: give a split column or at least 10 rows")
    labels = [it.label for it in items]
    stratify = labels if _can_stratify(labels, 0.2) else None
    idx = list(range(len(items)))
    train, rest = train_test_split(idx, test_size=0.2, random_state=seed, stratify=stratify)
    rest_labels = [labels[i] for i in rest]
    ok = stratify is not None and _can_stratify(rest_labels, 0.5)
    dev, test = train_test_split(rest, test_size=0.5, random_state=seed, stratify=rest_labels if ok else None)
    split_of = {i: s for s, part in (("train", train), ("dev", dev), ("test", test)) for i in part}
    col.items = [Item(it.id, it.text, it.image, it.label, split_of[i]) for i, it in enumerate(items)]
    if ok:
        return "stratified 8:1:1"
    if stratify is not None:
        return "8:1:1, train stratified, dev/test not (too few items of a class)"
    return "8:1:1, not stratified (too few items of a class)"


def _can_stratify(labels: list, test_size: float) -> bool:
    """What sklearn's stratified split needs: 2 items of every class, and each side at least one per class."""
    counts = Counter(labels)
    n_test = math.ceil(test_size * len(labels))
    return min(counts.values()) >= 2 and min(n_test, len(labels) - n_test) >= len(counts)


# --- raw MVSA release -------------------------------------------------------------------

def aggregate_pair(text_label: str, image_label: str) -> str | None:
    """MVSA rule for one annotation: conflicting polarities are dropped, neutral yields."""
    if text_label == image_label:
        return text_label
    if "neutral" in (text_label, image_label):
        return image_label if text_label == "neutral" else text_label
    return None  # positive vs negative: no consistent label


def aggregate_annotators(pairs: list[tuple[str, str]]) -> str | None:
    """MVSA-Multiple: each annotator's pair gives a label; keep the majority (2 of 3)."""
    votes = Counter(lbl for lbl in (aggregate_pair(t, i) for t, i in pairs) if lbl is not None)
    if not votes:
        return None
    label, n = votes.most_common(1)[0]
    return label if n > len(pairs) / 2 else None


def load_raw_mvsa(folder: Path, name: str, seed: int = 0) -> Dataset:
    """A raw MVSA-Single or MVSA-Multiple release: `data/` plus `labelResultAll.txt`."""
    labels_file = folder / "labelResultAll.txt"
    data = folder / "data"
    if not labels_file.is_file() or not data.is_dir():
        raise UserError(f"{folder}: a raw MVSA folder holds data/ and labelResultAll.txt")
    col = _Collector(SENTIMENT)
    lines = decode_text(labels_file.read_bytes())[0].splitlines()
    for line in lines[1:]:  # first line is the header
        cells = line.split()
        if len(cells) < 2:
            continue
        pairs = [tuple(c.split(",")) for c in cells[1:]]
        if any(len(p) != 2 for p in pairs):
            col.problems.append(Problem(cells[0], "read", f"unreadable label cell {line!r}"))
            continue
        label = aggregate_pair(*pairs[0]) if len(pairs) == 1 else aggregate_annotators(pairs)
        if label is None:
            col.problems.append(Problem(cells[0], "read", "annotations conflict (positive vs negative): dropped"))
            continue
        col.add(cells[0], _read_text_file(data / f"{cells[0]}.txt", col, cells[0]), data / f"{cells[0]}.jpg", label, "train")
    rule = _assign_splits(col, seed)
    return col.dataset(name, f"MVSA aggregation; {rule}, seed {seed}")


def load(
    dataset: str | None,
    data_root: Path,
    manifest: Path | None = None,
    name: str | None = None,
    image_dir: Path | None = None,
    seed: int = 0,
    classes: tuple[str, ...] | None = None,
    keep_rare_labels: bool = False,
) -> Dataset:
    """The one entry point: a built-in name or a manifest path."""
    if manifest is not None:
        return load_manifest(manifest, name, image_dir, seed, classes, keep_rare_labels)
    if dataset is None:
        raise UserError(f"say which data: --dataset {'|'.join(BUILTINS)} or --manifest PATH")
    return load_builtin(dataset, data_root, image_dir, seed)
