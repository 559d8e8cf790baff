"""Readers: every data source becomes one list of `Item`s plus the problems met on the way.

Three sources, one result:
- the built-in splits in the shared data folder (`mvsa_s`, `mvsa_m`, `hfm`);
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from core import store
from core.errors import UserError

SPLITS = ("train", "dev", "test")
SENTIMENT = ("positive", "neutral", "negative")
SARCASM = ("not_sarcastic", "sarcastic")
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
    folder: str
    classes: tuple[str, ...]
    images: str | None  # image folder inside the data folder, when the data ships them


BUILTINS = {
    "mvsa_s": Builtin("mvsa_single", SENTIMENT, "images"),
    "mvsa_m": Builtin("mvsa_multiple", SENTIMENT, None),
    "hfm": Builtin("hfm", SARCASM, None),
}


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
        id_ = str(id_).strip()
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
        self.problems.append(Problem(str(id_).strip() or "?", "text", f"{what} is not valid UTF-8: decoded as "
                                     "Windows-1252/Latin-1; re-save it as UTF-8 if characters look wrong"))

    def dataset(self, name: str, split_rule: str = "given") -> Dataset:
        classes = self.classes or tuple(sorted({it.label for it in self.items}))
        index = {c: i for i, c in enumerate(classes)}
        items = [Item(it.id, it.text, it.image, index[it.label], it.split) for it in self.items]
        return Dataset(name, tuple(classes), items, self.problems, self.fallbacks, split_rule)


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


def load_builtin(name: str, data_root: Path, image_dir: Path | None = None) -> Dataset:
    """The standard splits shipped in the shared data folder."""
    if name not in BUILTINS:
        raise UserError(f"unknown data set {name!r}: use one of {', '.join(BUILTINS)} or --manifest PATH")
    spec = BUILTINS[name]
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
    read = read_rows(path)
    rows = [row for row, _ in read]
    if not rows:
        raise UserError(f"manifest {path} has no rows")
    missing = [c for c in ("id", "label") if c not in rows[0]]
    if missing or not ({"text", "text_file"} & rows[0].keys()):
        raise UserError(
            f"manifest {path}: columns id, label and text or text_file are required; found {', '.join(rows[0])}"
        )
    base = path.parent
    col = _Collector(tuple(classes) if classes else None)
    given_split = "split" in rows[0]
    for row, fell_back in read:
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
    if not given_split:
        _assign_splits(col, seed)
    ds = col.dataset(name or path.stem, "given" if given_split else f"stratified 8:1:1, seed {seed}")
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


def _assign_splits(col: _Collector, seed: int) -> None:
    """Seeded, stratified 8:1:1 split, for manifests that do not give one."""
    from sklearn.model_selection import train_test_split

    items = col.items
    if len(items) < 10:
        raise UserError(f"only {len(items)} usable rows: give a split column or at least 10 rows")
    labels = [it.label for it in items]
    stratify = labels if min(Counter(labels).values()) >= 2 else None
    idx = list(range(len(items)))
    train, rest = train_test_split(idx, test_size=0.2, random_state=seed, stratify=stratify)
    rest_labels = [labels[i] for i in rest]
    ok = stratify is not None and min(Counter(rest_labels).values()) >= 2
    dev, test = train_test_split(rest, test_size=0.5, random_state=seed, stratify=rest_labels if ok else None)
    split_of = {i: s for s, part in (("train", train), ("dev", dev), ("test", test)) for i in part}
    col.items = [Item(it.id, it.text, it.image, it.label, split_of[i]) for i, it in enumerate(items)]


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
    dropped = 0
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
            dropped += 1
            col.problems.append(Problem(cells[0], "read", "annotations conflict (positive vs negative): dropped"))
            continue
        col.add(cells[0], _read_text_file(data / f"{cells[0]}.txt", col, cells[0]), data / f"{cells[0]}.jpg", label, "train")
    _assign_splits(col, seed)
    return col.dataset(name, f"MVSA aggregation; stratified 8:1:1, seed {seed}")


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
        raise UserError("say which data: --dataset mvsa_s|mvsa_m|hfm or --manifest PATH")
    return load_builtin(dataset, data_root, image_dir)
