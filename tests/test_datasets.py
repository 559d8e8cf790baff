"""Readers: built-in splits, CSV/JSONL manifests, the raw MVSA layout, robust decoding,
and every bad input recorded as a Problem (items) or refused with a UserError (arguments)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from core.errors import UserError
from core.paths import DATA_ROOT_ENV, default_data_root
from extract import datasets
from extract.datasets import SARCASM, SENTIMENT, aggregate_annotators, aggregate_pair, decode_text

POS, NEU, NEG = SENTIMENT


# --- small builders ----------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def jpeg(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), color).save(path, "JPEG")
    return path


def by_id(ds) -> dict:
    return {it.id: it for it in ds.items}


def problems_of(ds) -> dict[str, list]:
    out: dict[str, list] = {}
    for p in ds.problems:
        out.setdefault(p.id, []).append(p)
    return out


def balanced_rows(n_per_label: int, labels=("pos", "neu", "neg")) -> list[dict]:
    return [{"id": f"{lab}{k}", "text": f"text {lab} {k}", "label": lab} for lab in labels for k in range(n_per_label)]


# --- built-in splits ---------------------------------------------------------------------

def test_mvsa_s_builtin_has_every_image(data_root):
    ds = datasets.load("mvsa_s", data_root)
    assert ds.name == "mvsa_s"
    assert ds.classes == SENTIMENT
    assert ds.counts() == {"train": 3611, "dev": 450, "test": 450}
    assert ds.problems == [] and ds.text_fallbacks == 0
    assert all(it.image is not None and it.image.is_file() for it in ds.items)
    assert all(it.image.name == f"{it.id}.jpg" for it in ds.items)
    assert {it.label for it in ds.items} == {0, 1, 2}
    assert all(it.text == it.text.strip() and it.text for it in ds.items)
    assert len({it.id for it in ds.items}) == len(ds.items)
    # item order is the files' order, split by split
    first = json.loads((data_root / "mvsa_single" / "train.jsonl").read_text().splitlines()[0])
    assert ds.items[0].id == first["id"] and ds.items[0].label == SENTIMENT.index(first["label"])
    assert [it.split for it in ds.items] == ["train"] * 3611 + ["dev"] * 450 + ["test"] * 450


@pytest.mark.parametrize("name, classes, counts", [
    ("mvsa_m", SENTIMENT, {"train": 13624, "dev": 1700, "test": 1700}),
    ("hfm", SARCASM, {"train": 19816, "dev": 2410, "test": 2409}),
])
def test_builtins_without_images(data_root, name, classes, counts):
    ds = datasets.load(name, data_root)
    assert ds.classes == classes
    assert ds.counts() == counts
    assert all(it.image is None for it in ds.items)
    assert ds.problems == []  # no image was promised, so none is missing
    assert set(Counter(it.label for it in ds.items)) == set(range(len(classes)))


def test_builtin_with_image_dir_finds_some_images(data_root, tmp_path):
    ids = [json.loads(line)["id"] for line in (data_root / "hfm" / "dev.jsonl").read_text().splitlines()[:2]]
    for i in ids:
        jpeg(tmp_path / "img" / f"{i}.jpg")
    ds = datasets.load("hfm", data_root, image_dir=tmp_path / "img")
    found = [it for it in ds.items if it.image is not None]
    assert sorted(it.id for it in found) == sorted(ids)
    assert len(ds.items) == 19816 + 2410 + 2409  # a missing image keeps the item for text
    assert len(ds.problems) == len(ds.items) - 2
    assert all(p.stage == "image" and "missing" in p.reason for p in ds.problems)


def test_data_root_follows_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "elsewhere"))
    assert default_data_root() == tmp_path / "elsewhere"
    monkeypatch.delenv(DATA_ROOT_ENV)
    assert default_data_root().name == "data" and default_data_root().parent.name == "shared"


def fake_mvsa_s(root: Path, train: list[dict], dev=None, test=None) -> Path:
    """A data root holding a built-in `mvsa_single` folder made of the given rows."""
    folder = root / "mvsa_single"
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "dev.jsonl", dev or [{"id": "d1", "text": "dev text", "label": "neutral"}])
    write_jsonl(folder / "test.jsonl", test or [{"id": "t1", "text": "test text", "label": "negative"}])
    (folder / "images").mkdir(exist_ok=True)
    for i in ("a", "b", "d1", "t1"):
        jpeg(folder / "images" / f"{i}.jpg")
    return root


def test_builtin_bad_rows_become_problems(tmp_path):
    root = fake_mvsa_s(tmp_path, [
        {"id": "a", "text": "  good one  ", "label": "positive"},
        {"id": "a", "text": "same id again", "label": "negative"},
        {"id": "b", "text": "label typo", "label": "postive"},
        {"id": "c", "text": "image file absent", "label": "neutral"},
        {"id": "e", "text": "   ", "label": "positive"},
        {"id": "f", "text": None, "label": "positive"},
    ], test=[{"id": "t1", "text": "test text", "label": "negative"}, {"id": "d1", "text": "dup across splits", "label": "positive"}])
    ds = datasets.load("mvsa_s", root)
    items, probs = by_id(ds), problems_of(ds)
    assert sorted(items) == ["a", "c", "d1", "t1"]
    assert items["a"].text == "good one" and items["a"].label == SENTIMENT.index("positive")
    assert items["d1"].split == "dev" and items["d1"].text == "dev text"  # the first row of an id wins
    assert items["c"].image is None  # kept for the text cache only
    assert items["a"].image == root / "mvsa_single" / "images" / "a.jpg"
    assert [p.stage for p in probs["a"]] == ["read"] and "duplicate" in probs["a"][0].reason
    assert [p.stage for p in probs["d1"]] == ["read"] and "duplicate" in probs["d1"][0].reason
    assert "unknown label 'postive'" in probs["b"][0].reason and "positive" in probs["b"][0].reason
    assert probs["c"][0].stage == "image" and "c.jpg" in probs["c"][0].reason and "text only" in probs["c"][0].reason
    assert probs["e"][0].stage == "text" and "empty text" in probs["e"][0].reason
    assert probs["f"][0].stage == "text"
    assert len(ds.problems) == 6


def test_builtin_non_utf8_line_is_decoded_counted_and_listed(tmp_path):
    root = fake_mvsa_s(tmp_path, [{"id": "a", "text": "plain", "label": "positive"}])
    train = root / "mvsa_single" / "train.jsonl"
    with open(train, "ab") as f:
        f.write('{"id": "w", "text": "caf\u00e9 \u201cquoted\u201d", "label": "neutral"}\n'.encode("cp1252"))
    ds = datasets.load("mvsa_s", root)
    assert by_id(ds)["w"].text == "caf\u00e9 \u201cquoted\u201d"
    assert ds.text_fallbacks == 1
    assert sorted((p.id, p.stage) for p in ds.problems) == [("w", "image"), ("w", "text")]  # no w.jpg either
    assert "not valid UTF-8" in next(p.reason for p in ds.problems if p.stage == "text")


def test_unknown_dataset_name_is_a_user_error(data_root):
    with pytest.raises(UserError, match=r"unknown data set 'mvsa'.*mvsa_s, mvsa_m, hfm.*--manifest"):
        datasets.load("mvsa", data_root)


def test_no_dataset_and_no_manifest_is_a_user_error(data_root):
    with pytest.raises(UserError, match="--dataset.*--manifest"):
        datasets.load(None, data_root)


def test_missing_data_root_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"not found: pass --data-root \(or set SPP_DATA_ROOT\)") as e:
        datasets.load("hfm", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "hfm") in str(e.value)


def test_missing_image_dir_is_a_user_error(data_root, tmp_path):
    with pytest.raises(UserError, match="--image-dir"):
        datasets.load("mvsa_m", data_root, image_dir=tmp_path / "no_images")


def test_incomplete_data_folder_is_a_user_error(tmp_path):
    root = fake_mvsa_s(tmp_path, [{"id": "a", "text": "x", "label": "positive"}])
    (root / "mvsa_single" / "test.jsonl").unlink()
    with pytest.raises(UserError, match="test.jsonl missing"):
        datasets.load("mvsa_s", root)


def test_broken_json_line_names_file_and_line(tmp_path):
    root = fake_mvsa_s(tmp_path, [{"id": "a", "text": "x", "label": "positive"}])
    with open(root / "mvsa_single" / "train.jsonl", "a") as f:
        f.write("\n{not json\n")
    with pytest.raises(UserError, match=r"train\.jsonl:3: not valid JSON"):
        datasets.load("mvsa_s", root)


# --- manifests ---------------------------------------------------------------------------

def test_csv_manifest_with_text_image_and_split(tmp_path, monkeypatch):
    base = tmp_path / "set"
    jpeg(base / "pics" / "one.jpg")
    jpeg(base / "pics" / "two.jpg")
    manifest = write_csv(base / "m.csv", [
        {"id": "1", "text": "hello", "image": "pics/one.jpg", "label": "happy", "split": "train"},
        {"id": "2", "text": "bye", "image": "pics/two.jpg", "label": "sad", "split": "dev"},
        {"id": "3", "text": "no picture", "image": "", "label": "happy", "split": "test"},
    ])
    monkeypatch.chdir(tmp_path)  # image paths are relative to the manifest, not to the working folder
    ds = datasets.load(None, Path("unused"), manifest=Path("set/m.csv"))
    assert ds.name == "m" and ds.split_rule == "given"
    assert ds.classes == ("happy", "sad")  # classes are the manifest's labels, sorted
    items = by_id(ds)
    assert [(i.id, i.text, i.label, i.split) for i in ds.items] == [
        ("1", "hello", 0, "train"), ("2", "bye", 1, "dev"), ("3", "no picture", 0, "test")]
    assert items["1"].image.resolve() == (base / "pics" / "one.jpg").resolve()
    assert items["3"].image is None
    assert ds.problems == []
    assert datasets.load_manifest(manifest, name="custom").name == "custom"


def test_csv_manifest_with_text_file_and_image_dir(tmp_path):
    base = tmp_path / "set"
    (base / "texts").mkdir(parents=True)
    for i, t in (("a", "first text"), ("b", "second text")):
        (base / "texts" / f"{i}.txt").write_text(t + "\n", encoding="utf-8")
    jpeg(tmp_path / "imgs" / "a.jpg")
    manifest = write_csv(base / "m.csv", [
        {"id": "a", "text_file": "texts/a.txt", "label": "x", "split": "train"},
        {"id": "b", "text_file": "texts/b.txt", "label": "y", "split": "test"},
    ])
    ds = datasets.load_manifest(manifest, image_dir=tmp_path / "imgs")
    items = by_id(ds)
    assert items["a"].text == "first text" and items["b"].text == "second text"
    assert items["a"].image == tmp_path / "imgs" / "a.jpg"
    assert items["b"].image is None  # b.jpg is not in --image-dir: text only, and said so
    assert [(p.id, p.stage) for p in ds.problems] == [("b", "image")]


def test_jsonl_manifest_with_text_and_with_text_file(tmp_path):
    (tmp_path / "t.txt").write_text("from a file", encoding="utf-8")
    jpeg(tmp_path / "p.jpg")
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": 7, "text": "inline", "image": "p.jpg", "label": "pos", "split": "train"},
        {"id": 8, "text_file": "t.txt", "label": "neg", "split": "dev"},
    ])
    ds = datasets.load_manifest(manifest)
    items = by_id(ds)
    assert items["7"].text == "inline" and items["7"].image == tmp_path / "p.jpg"
    assert items["8"].text == "from a file" and items["8"].image is None
    assert ds.classes == ("neg", "pos") and items["7"].label == 1


def test_manifest_bad_rows_become_problems(tmp_path):
    jpeg(tmp_path / "ok.jpg")
    manifest = write_csv(tmp_path / "m.csv", [
        {"id": "1", "text": "fine", "text_file": "", "image": "ok.jpg", "label": "a", "split": "train"},
        {"id": "1", "text": "again", "text_file": "", "image": "", "label": "a", "split": "train"},
        {"id": "2", "text": "", "text_file": "", "image": "", "label": "a", "split": "train"},
        {"id": "3", "text": "", "text_file": "gone.txt", "image": "", "label": "a", "split": "train"},
        {"id": "4", "text": "no picture", "text_file": "", "image": "gone.jpg", "label": "b", "split": "dev"},
        {"id": "5", "text": "which split?", "text_file": "", "image": "", "label": "a", "split": "validation"},
        {"id": "6", "text": "no label", "text_file": "", "image": "", "label": "", "split": "test"},
        {"id": "", "text": "no id", "text_file": "", "image": "", "label": "a", "split": "test"},
        {"id": "7", "text": "blank split", "text_file": "", "image": "", "label": "a", "split": " "},
    ])
    ds = datasets.load_manifest(manifest)
    assert sorted(by_id(ds)) == ["1", "4"]  # a blank split cell is not silently train
    assert by_id(ds)["4"].image is None
    assert ds.classes == ("a", "b")  # an empty label does not become a class
    reasons = {(p.id, p.stage): p.reason for p in ds.problems}
    assert set(reasons) == {("1", "read"), ("2", "text"), ("3", "text"), ("4", "image"), ("5", "read"),
                            ("6", "read"), ("?", "read"), ("7", "read")}
    assert "blank split cell" in reasons["7", "read"]
    assert "duplicate" in reasons["1", "read"]
    assert "empty text" in reasons["3", "text"]
    assert "gone.jpg" in reasons["4", "image"]
    assert "'validation'" in reasons["5", "read"]
    assert "no label" in reasons["6", "read"]


def test_manifest_without_split_gets_seeded_stratified_8_1_1(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", balanced_rows(20))
    ds = datasets.load_manifest(manifest, seed=3)
    assert ds.counts() == {"train": 48, "dev": 6, "test": 6}
    per = Counter((it.label, it.split) for it in ds.items)
    for label in range(3):  # stratified: every class split 16/2/2
        assert (per[label, "train"], per[label, "dev"], per[label, "test"]) == (16, 2, 2)
    assert "seed 3" in ds.split_rule and "8:1:1" in ds.split_rule
    again = datasets.load_manifest(manifest, seed=3)
    assert [(i.id, i.split) for i in again.items] == [(i.id, i.split) for i in ds.items]
    other = datasets.load_manifest(manifest, seed=4)
    train = {i.id for i in ds.items if i.split == "train"}
    assert {i.id for i in other.items if i.split == "train"} != train
    assert [i.id for i in other.items] == [i.id for i in ds.items]  # order is the manifest's


def test_manifest_split_too_small_to_stratify_is_random_and_says_so(tmp_path):
    """10 rows of 5 labels: a stratified test part of 2 cannot hold 5 classes (sklearn raises); the split
    is drawn without strata and the rule recorded in dataset.json says so (no traceback)."""
    manifest = write_csv(tmp_path / "m.csv", balanced_rows(2, labels=("a", "b", "c", "d", "e")))
    ds = datasets.load_manifest(manifest, seed=1)
    assert ds.counts() == {"train": 8, "dev": 1, "test": 1}
    assert ds.split_rule == "8:1:1, not stratified (too few items of a class), seed 1"


def test_manifest_without_split_needs_ten_rows(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", balanced_rows(3))
    with pytest.raises(UserError, match="only 9 usable rows: give a split column or at least 10 rows"):
        datasets.load_manifest(manifest)


@pytest.mark.parametrize("content, message", [
    ("id,caption,label\n1,x,a\n", "columns id, label and text or text_file are required; found id, caption, label"),
    ("id,text\n1,x\n", "columns id, label"),
    ("id,label,txt\n1,pos,hello,extra\n", "text or text_file are required; found id, label, txt$"),  # a cell beyond the header
    ("id,text,label\n", "has no rows"),
])
def test_manifest_missing_columns_or_rows(tmp_path, content, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(content)
    with pytest.raises(UserError, match=message):
        datasets.load_manifest(manifest)


def test_manifest_wrong_kind_or_path(tmp_path):
    with pytest.raises(UserError, match=r"manifest .*nope\.csv not found: give the path"):
        datasets.load(None, tmp_path, manifest=tmp_path / "nope.csv")
    (tmp_path / "m.xlsx").write_bytes(b"PK")
    with pytest.raises(UserError, match=r"expected a \.csv or \.jsonl file"):
        datasets.load_manifest(tmp_path / "m.xlsx")
    (tmp_path / "m.jsonl").write_text('["a", "list"]\n')
    with pytest.raises(UserError, match=r"m\.jsonl:1: expected one JSON object"):
        datasets.load_manifest(tmp_path / "m.jsonl")


# --- decoding ----------------------------------------------------------------------------

def test_decode_text_fallbacks():
    assert decode_text("ok \u2603".encode()) == ("ok \u2603", False)
    assert decode_text(b"\xef\xbb\xbfwith bom") == ("with bom", False)  # a BOM is UTF-8, stripped
    assert decode_text("\u201cq\u201d \u20ac".encode("cp1252")) == ("\u201cq\u201d \u20ac", True)
    # 0x81 and 0x9d are undefined in cp1252: latin-1 maps every byte
    assert decode_text(b"a\x81b\x9dc\xe9") == ("a\x81b\x9dc\u00e9", True)


def test_text_files_in_other_encodings_are_decoded_and_counted(tmp_path):
    files = {
        "utf8": "plain caf\u00e9 \U0001f600".encode(),
        "bom": b"\xef\xbb\xbf" + "caf\u00e9 with BOM".encode(),
        "cp1252": "it\u2019s \u20ac5 \u2013 caf\u00e9".encode("cp1252"),
        "latin1": b"odd \x81 byte \xe9t\xe9",
    }
    for k, raw in files.items():
        (tmp_path / f"{k}.txt").write_bytes(raw)
    manifest = write_csv(tmp_path / "m.csv", [
        {"id": k, "text_file": f"{k}.txt", "label": "a", "split": "train"} for k in files])
    ds = datasets.load_manifest(manifest)
    texts = {it.id: it.text for it in ds.items}
    assert texts == {"utf8": "plain caf\u00e9 \U0001f600", "bom": "caf\u00e9 with BOM",
                     "cp1252": "it\u2019s \u20ac5 \u2013 caf\u00e9", "latin1": "odd \x81 byte \u00e9t\u00e9"}
    assert ds.text_fallbacks == 2
    assert sorted((p.id, p.stage) for p in ds.problems) == [("cp1252", "text"), ("latin1", "text")]
    assert all("cp1252.txt" in p.reason or "latin1.txt" in p.reason for p in ds.problems)


def test_csv_manifest_in_mixed_encodings(tmp_path):
    """An Excel export: BOM header, mostly UTF-8, one Windows-1252 row, a U+2028 inside a tweet."""
    raw = (b"\xef\xbb\xbfid,text,label,split\r\n"
           + "1,caf\u00e9 \u2615,a,train\r\n".encode()
           + "2,na\u00efve \u201cquote\u201d,b,dev\r\n".encode("cp1252")
           + '3,"line\u2028separator, and comma",a,test\r\n'.encode())
    (tmp_path / "m.csv").write_bytes(raw)
    ds = datasets.load_manifest(tmp_path / "m.csv")
    assert [(it.id, it.text, it.split) for it in ds.items] == [
        ("1", "caf\u00e9 \u2615", "train"),  # UTF-8 rows are not re-read as cp1252
        ("2", "na\u00efve \u201cquote\u201d", "dev"),
        ("3", "line\u2028separator, and comma", "test"),
    ]
    assert ds.text_fallbacks == 1
    assert [(p.id, p.stage) for p in ds.problems] == [("2", "text")]


# --- raw MVSA release --------------------------------------------------------------------

@pytest.mark.parametrize("text, image, label", [
    (POS, POS, POS), (NEG, NEG, NEG), (NEU, NEU, NEU),
    (NEU, POS, POS), (POS, NEU, POS), (NEG, NEU, NEG), (NEU, NEG, NEG),  # neutral yields
    (POS, NEG, None), (NEG, POS, None),  # conflict: dropped
])
def test_aggregate_pair(text, image, label):
    assert aggregate_pair(text, image) == label


@pytest.mark.parametrize("pairs, label", [
    ([(POS, POS), (POS, NEU), (NEG, NEG)], POS),  # 2 of 3 annotators
    ([(NEU, POS), (NEG, NEU), (POS, POS)], POS),  # each pair aggregated first, then the vote
    ([(NEU, NEU), (NEU, NEG), (NEU, NEU)], NEU),
    ([(POS, NEG), (POS, NEG), (NEU, NEU)], None),  # two conflicts leave no majority
    ([(POS, NEG), (NEU, NEU), (POS, POS)], None),  # 1 vs 1: no majority of three
    ([(POS, POS), (NEU, NEU), (NEG, NEG)], None),  # three different labels
])
def test_aggregate_annotators(pairs, label):
    assert aggregate_annotators(pairs) == label


def raw_mvsa(folder: Path, lines: list[str], texts: dict[str, bytes], images: list[str]) -> Path:
    (folder / "data").mkdir(parents=True)
    for i, raw in texts.items():
        (folder / "data" / f"{i}.txt").write_bytes(raw)
    for i in images:
        jpeg(folder / "data" / f"{i}.jpg")
    (folder / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_raw_mvsa_single(tmp_path):
    labels = {str(i): (POS, POS) for i in range(1, 7)}
    labels.update({"7": (NEU, NEG), "8": (POS, NEU), "9": (NEU, NEU), "10": (NEG, NEG), "11": (NEG, NEU),
                   "12": (POS, NEG), "13": (NEU, POS), "14": (POS, POS)})
    lines = ["ID\ttext,image"] + [f"{i}\t{t},{im}" for i, (t, im) in labels.items()]
    texts = {i: f"tweet number {i} #x".encode() for i in labels}
    texts["8"] = "smart \u201cquotes\u201d".encode("cp1252")
    del texts["14"]  # text file missing
    images = [i for i in labels if i != "13"]  # image missing: kept for text
    folder = raw_mvsa(tmp_path / "MVSA_Single", lines, texts, images)

    ds = datasets.load(None, tmp_path, manifest=folder, seed=1)
    assert ds.name == "MVSA_Single" and ds.classes == SENTIMENT
    got = {it.id: SENTIMENT[it.label] for it in ds.items}
    assert got == {**{str(i): POS for i in range(1, 7)}, "7": NEG, "8": POS, "9": NEU, "10": NEG, "11": NEG,
                   "13": POS}
    items = by_id(ds)
    assert items["8"].text == "smart \u201cquotes\u201d" and ds.text_fallbacks == 1
    assert items["13"].image is None and items["1"].image == folder / "data" / "1.jpg"
    probs = {(p.id, p.stage) for p in ds.problems}
    assert probs == {("12", "read"), ("14", "text"), ("13", "image"), ("8", "text")}
    assert sum(ds.counts().values()) == 12 and set(ds.counts()) == {"train", "dev", "test"}
    assert "MVSA" in ds.split_rule and "seed 1" in ds.split_rule
    again = datasets.load_manifest(folder, seed=1)
    assert [(i.id, i.split) for i in again.items] == [(i.id, i.split) for i in ds.items]


def test_raw_mvsa_multiple(tmp_path):
    rows = {str(i): [(POS, POS), (POS, NEU), (NEU, POS)] for i in range(1, 10)}
    rows.update({
        "10": [(NEU, POS), (NEG, NEU), (POS, POS)],  # pos, neg, pos -> positive
        "11": [(NEU, NEU), (NEU, NEG), (NEG, NEG)],  # neu, neg, neg -> negative
        "12": [(POS, NEG), (POS, NEG), (NEU, NEU)],  # conflict twice -> dropped
        "13": [(POS, POS), (NEU, NEU), (NEG, NEG)],  # no majority -> dropped
        "14": [(NEU, NEU), (NEU, NEU), (POS, NEG)],  # neutral by 2 of 3
    })
    lines = ["ID\ttext,image\ttext,image\ttext,image"] + [
        f"{i}\t" + "\t".join(f"{t},{im}" for t, im in pairs) for i, pairs in rows.items()]
    folder = raw_mvsa(tmp_path / "MVSA", lines, {i: f"t{i}".encode() for i in rows}, list(rows))
    ds = datasets.load_manifest(folder, name="mvsa_raw_m")
    assert ds.name == "mvsa_raw_m"
    got = {it.id: SENTIMENT[it.label] for it in ds.items}
    assert got == {**{str(i): POS for i in range(1, 11)}, "11": NEG, "14": NEU}
    assert sorted(p.id for p in ds.problems) == ["12", "13"]
    assert all(p.stage == "read" and "dropped" in p.reason for p in ds.problems)


def test_raw_mvsa_unreadable_label_cell_is_a_problem(tmp_path):
    lines = ["ID\ttext,image"] + [f"{i}\tpositive,positive" for i in range(1, 12)] + ["12\tpositive"]
    folder = raw_mvsa(tmp_path / "m", lines, {str(i): b"x" for i in range(1, 13)}, [])
    ds = datasets.load_manifest(folder)
    assert len(ds.items) == 11
    assert [(p.id, p.stage) for p in ds.problems if p.stage == "read"] == [("12", "read")]


def test_raw_mvsa_folder_must_have_its_files(tmp_path):
    (tmp_path / "release" / "data").mkdir(parents=True)
    with pytest.raises(UserError, match="data/ and labelResultAll.txt"):
        datasets.load_manifest(tmp_path / "release")


# --- TumEmo, brought by the user in its released layout ------------------------------------

def png(path: Path, color=(30, 200, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 16), color).save(path, "PNG")
    return path


def fake_tumemo(root: Path, per_label: int = 10, header: bool = True, extra: list[str] = (),
                texts: dict[str, bytes] | None = None, no_image: tuple[str, ...] = (), posts: str = "all_data") -> Path:
    """`root/tumemo`: all_data_id_and_label.txt ('id label' lines, ids 0, 1, 2, ...) and posts/{id}.txt|jpg."""
    folder = root / "tumemo"
    (folder / posts).mkdir(parents=True)
    lines = ["id label"] if header else []
    n = 0
    for label in datasets.EMOTIONS:
        for _ in range(per_label):
            lines.append(f"{n} {label}")
            n += 1
    lines += list(extra)
    for line in lines[1 if header else 0:]:
        i = line.split()[0]
        (folder / posts / f"{i}.txt").write_bytes((texts or {}).get(i, f"post {i} #tumblr".encode()))
        if i not in no_image:
            jpeg(folder / posts / f"{i}.jpg")
    (folder / "all_data_id_and_label.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_tumemo_reads_the_released_layout_with_a_seeded_stratified_split(tmp_path):
    folder = fake_tumemo(tmp_path)
    ds = datasets.load("tumemo", tmp_path, seed=3)
    assert ds.name == "tumemo" and ds.classes == datasets.EMOTIONS
    assert ds.problems == [] and ds.text_fallbacks == 0
    assert ds.counts() == {"train": 56, "dev": 7, "test": 7}
    per = Counter((it.label, it.split) for it in ds.items)
    for label in range(7):  # stratified: every emotion split 8/1/1
        assert (per[label, "train"], per[label, "dev"], per[label, "test"]) == (8, 1, 1)
    assert [it.id for it in ds.items] == [str(i) for i in range(70)]  # the label file's order
    items = by_id(ds)
    assert items["0"].text == "post 0 #tumblr" and items["0"].image == folder / "all_data" / "0.jpg"
    assert datasets.EMOTIONS[items["69"].label] == "Sad"
    assert "seed 3" in ds.split_rule and "8:1:1" in ds.split_rule and "no official split" in ds.split_rule
    again = datasets.load("tumemo", tmp_path, seed=3)
    assert [(i.id, i.split) for i in again.items] == [(i.id, i.split) for i in ds.items]
    other = datasets.load("tumemo", tmp_path, seed=4)
    assert {i.id for i in other.items if i.split == "test"} != {i.id for i in ds.items if i.split == "test"}


def test_tumemo_without_header_in_data_folder_and_other_image_types(tmp_path):
    folder = fake_tumemo(tmp_path, per_label=2, header=False, posts="data", no_image=("3",))
    png(folder / "data" / "3.png")
    (folder / "data" / "4.jpg").unlink()
    png(folder / "data" / "4.png")  # 4.jpg missing, 4.png there
    ds = datasets.load("tumemo", tmp_path)
    assert len(ds.items) == 14 and ds.problems == []  # no header: the first line is an item
    # 2 posts an emotion: a test split of 2 cannot hold all 7 emotions, so the split is plain random, and says so
    assert ds.split_rule == "no official split: 8:1:1, not stratified (too few items of a class), seed 0"
    assert ds.counts() == {"train": 11, "dev": 1, "test": 2}
    items = by_id(ds)
    assert items["0"].image == folder / "data" / "0.jpg" and items["3"].image == folder / "data" / "3.png"
    assert items["4"].image.name == "4.png"


def test_tumemo_bad_lines_and_posts_become_problems(tmp_path):
    folder = fake_tumemo(tmp_path, extra=["70 Excited", "71 happy", "5 Sad", "72", "73 Calm", "74 Fear", "75 Love",
                                          "76 Bored"],
                         texts={"73": b"   \n", "74": "caf\u00e9 \u201cq\u201d".encode("cp1252")}, no_image=("75",))
    (folder / "all_data" / "76.txt").unlink()
    ds = datasets.load("tumemo", tmp_path)
    items, probs = by_id(ds), problems_of(ds)
    assert datasets.EMOTIONS[items["71"].label] == "Happy"  # a label's case does not matter
    assert items["5"].label == datasets.EMOTIONS.index("Angry")  # the first line of an id wins
    assert items["74"].text == "caf\u00e9 \u201cq\u201d" and ds.text_fallbacks == 1
    assert items["75"].image is None  # kept for the text cache only
    assert {(p.id, p.stage) for p in ds.problems} == {
        ("70", "read"), ("5", "read"), ("72", "read"), ("73", "text"), ("74", "text"), ("75", "image"), ("76", "text")}
    assert "unknown label 'Excited'" in probs["70"][0].reason and "Angry, Bored" in probs["70"][0].reason
    assert "duplicate" in probs["5"][0].reason
    assert "line 75 unreadable ('72')" in probs["72"][0].reason
    assert "empty text" in probs["73"][0].reason
    assert "not valid UTF-8" in probs["74"][0].reason
    assert "75.jpg" in probs["75"][0].reason and "text only" in probs["75"][0].reason
    assert "text file missing" in probs["76"][0].reason and "76.txt" in probs["76"][0].reason
    assert "71" in items and "70" not in items and "72" not in items and "73" not in items and "76" not in items


def test_tumemo_image_dir_and_the_release_as_data_root(tmp_path):
    folder = fake_tumemo(tmp_path / "root", per_label=2)
    jpeg(tmp_path / "pics" / "0.jpg")
    ds = datasets.load("tumemo", tmp_path / "root", image_dir=tmp_path / "pics")
    assert by_id(ds)["0"].image == tmp_path / "pics" / "0.jpg"
    assert {p.id for p in ds.problems} == {str(i) for i in range(1, 14)}  # the others are not in --image-dir
    assert all(p.stage == "image" for p in ds.problems)
    direct = datasets.load("tumemo", folder)  # --data-root the release folder itself
    assert len(direct.items) == 14 and direct.problems == []


def test_tumemo_missing_pieces_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"tumemo: data folder .*tumemo not found: this data set is not shipped"):
        datasets.load("tumemo", tmp_path)
    folder = fake_tumemo(tmp_path, per_label=2)
    with pytest.raises(UserError, match="--image-dir"):
        datasets.load("tumemo", tmp_path, image_dir=tmp_path / "nope")
    (folder / "all_data").rename(folder / "posts")
    with pytest.raises(UserError, match="holds all_data_id_and_label.txt and all_data/"):
        datasets.load("tumemo", tmp_path)


def test_tumemo_too_few_posts_for_a_split_is_a_user_error(tmp_path):
    fake_tumemo(tmp_path, per_label=1)
    with pytest.raises(UserError, match="only 7 usable rows"):
        datasets.load("tumemo", tmp_path)


# --- MMSD2.0, brought by the user in its released layout -----------------------------------

def fake_mmsd2(root: Path, train: list[dict], valid: list[dict] | None = None, test: list[dict] | None = None,
               images=None, jsonl: bool = False, texts_in: str = "text_json_final") -> Path:
    """`root/mmsd2`: text_json_final/{train,valid,test}.json (JSON lists, as released) and dataset_image/."""
    folder = root / "mmsd2"
    splits = {"train": train, "valid": valid or [{"image_id": 900, "text": "valid one", "label": 0}],
              "test": test or [{"image_id": 901, "text": "test one", "label": 1}]}
    for stem, rows in splits.items():
        path = folder / texts_in / f"{stem}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows), encoding="utf-8")
        for r in rows:
            if images is None or r.get("image_id") in images:
                jpeg(folder / "dataset_image" / f"{r.get('image_id')}.jpg")
    return folder


MMSD2_TRAIN = [{"image_id": 915657464401580032, "text": "whew ... that extra <num> miles wore me out", "label": 1},
               {"image_id": 854678856724340736, "text": "a plain caption", "label": 0}]


def test_mmsd2_reads_the_released_layout(tmp_path):
    folder = fake_mmsd2(tmp_path, MMSD2_TRAIN)
    ds = datasets.load("mmsd2", tmp_path)
    assert ds.name == "mmsd2" and ds.classes == SARCASM and ds.split_rule == "given"
    assert ds.problems == []
    assert [(it.id, it.label, it.split) for it in ds.items] == [
        ("915657464401580032", 1, "train"), ("854678856724340736", 0, "train"), ("900", 0, "dev"), ("901", 1, "test")]
    assert by_id(ds)["900"].image == folder / "dataset_image" / "900.jpg"
    assert by_id(ds)["915657464401580032"].text == "whew ... that extra <num> miles wore me out"


def test_mmsd2_flat_json_lines_and_the_release_as_data_root(tmp_path):
    fake_mmsd2(tmp_path, MMSD2_TRAIN, jsonl=True, texts_in=".")
    assert datasets.load("mmsd2", tmp_path).counts() == {"train": 2, "dev": 1, "test": 1}
    release = fake_mmsd2(tmp_path / "clone", MMSD2_TRAIN).rename(tmp_path / "clone" / "data")
    ds = datasets.load("mmsd2", release)  # --data-root MMSD2.0/data, as the repository has it
    assert ds.counts() == {"train": 2, "dev": 1, "test": 1} and ds.problems == []


def test_mmsd2_without_images_is_text_only_and_image_dir_finds_them(tmp_path):
    folder = fake_mmsd2(tmp_path, MMSD2_TRAIN)
    (folder / "dataset_image").rename(tmp_path / "elsewhere")
    ds = datasets.load("mmsd2", tmp_path)
    assert all(it.image is None for it in ds.items) and ds.problems == []  # no images promised, none missing
    ds = datasets.load("mmsd2", tmp_path, image_dir=tmp_path / "elsewhere")
    assert all(it.image is not None and it.image.is_file() for it in ds.items)


def test_mmsd2_bad_rows_become_problems(tmp_path):
    fake_mmsd2(tmp_path, [
        *MMSD2_TRAIN,
        {"image_id": 854678856724340736, "text": "same id again", "label": 1},
        {"image_id": 11, "text": "label two", "label": 2},
        {"image_id": 12, "text": "   ", "label": 0},
        {"image_id": 13, "text": "no picture", "label": 1},
        {"text": "no id", "label": 0},
        {"image_id": 14, "text": "no label"},
        {"image_id": 15, "text": 404, "label": "1"},
    ], test=[{"image_id": 901, "text": "test one", "label": 1}, {"image_id": 900, "text": "in valid too", "label": 1}],
        images={915657464401580032, 854678856724340736, 11, 12, 15, 900, 901})
    ds = datasets.load("mmsd2", tmp_path)
    items, probs = by_id(ds), problems_of(ds)
    assert sorted(items) == ["13", "15", "854678856724340736", "900", "901", "915657464401580032"]
    assert items["13"].image is None and items["15"].text == "404" and SARCASM[items["15"].label] == "sarcastic"
    assert items["900"].split == "dev"  # the first row of an id wins
    assert {(p.id, p.stage) for p in ds.problems} == {
        ("854678856724340736", "read"), ("11", "read"), ("12", "text"), ("13", "image"), ("?", "read"),
        ("14", "read"), ("900", "read")}
    assert "unknown label '2'" in probs["11"][0].reason and "not_sarcastic, sarcastic" in probs["11"][0].reason
    assert "13.jpg" in probs["13"][0].reason and "no label" in probs["14"][0].reason


def test_mmsd2_broken_or_missing_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="mmsd2: data folder .* not found: this data set is not shipped"):
        datasets.load("mmsd2", tmp_path)
    folder = fake_mmsd2(tmp_path, MMSD2_TRAIN)
    (folder / "text_json_final" / "valid.json").write_text('[{"image_id": 1, "text": "x", "label": 0},\n {"image_id": 2,, }]')
    with pytest.raises(UserError, match=r"valid\.json:2:17: not valid JSON"):
        datasets.load("mmsd2", tmp_path)
    (folder / "text_json_final" / "valid.json").write_text('[{"image_id": 1, "text": "x", "label": 0}, [2, "y", 1]]')
    with pytest.raises(UserError, match=r"valid\.json: element 2 of the list is not a JSON object"):
        datasets.load("mmsd2", tmp_path)
    (folder / "text_json_final" / "valid.json").write_text('{"image_id": 1, "text": "x", "label": 0}\n{"image_id": 2\n')
    with pytest.raises(UserError, match=r"valid\.json:2: not valid JSON"):  # JSON Lines: the line
        datasets.load("mmsd2", tmp_path)
    (folder / "text_json_final" / "valid.json").unlink()
    with pytest.raises(UserError, match=r"valid\.json missing"):
        datasets.load("mmsd2", tmp_path)


def test_mmsd2_non_utf8_file_lists_the_rows_it_may_have_changed(tmp_path):
    folder = fake_mmsd2(tmp_path, MMSD2_TRAIN)
    rows = [{"image_id": 5, "text": "na\u00efve \u201cquote\u201d", "label": 1}, {"image_id": 6, "text": "ascii", "label": 0}]
    (folder / "text_json_final" / "valid.json").write_bytes(json.dumps(rows, ensure_ascii=False).encode("cp1252"))
    ds = datasets.load("mmsd2", tmp_path)
    assert by_id(ds)["5"].text == "na\u00efve \u201cquote\u201d"
    assert ds.text_fallbacks == 1 and [(p.id, p.stage) for p in ds.problems] == [("5", "text"), ("5", "image"),
                                                                                ("6", "image")]


def test_every_builtin_is_named_in_messages_and_falls_back_to_training_defaults(data_root):
    from train.config import TrainConfig, family
    from train.data import extract_source

    with pytest.raises(UserError, match="use one of mvsa_s, mvsa_m, hfm, tumemo, mmsd2 or --manifest"):
        datasets.load("tum", data_root)
    with pytest.raises(UserError, match=r"--dataset mvsa_s\|mvsa_m\|hfm\|tumemo\|mmsd2 or --manifest"):
        datasets.load(None, data_root)
    for name in ("tumemo", "mmsd2"):
        assert extract_source(name) == f"--dataset {name}" and extract_source(f"{name}-first5") == f"--dataset {name} --limit 5"
        assert family(name) == "mvsa_s"  # no paper gives their training settings: MVSA-Single's
        assert TrainConfig(dataset=name).resolved().batch_size == 64
