"""The data audit (extract/audit.py): each check on a tiny synthetic cache with planted
duplicates, the blocked search against brute force, the clean split through `train`, and
the manifest label rules of extract/datasets.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core import store
from core.errors import UserError
from extract import audit, datasets
from train import data as cache

C, H, W, L, HID = 32, 2, 2, 2, 4  # tiny feature shapes

# id, split, label, text; the planted cases are named in the comments
ITEMS = [
    ("t1", "train", "positive", "the parade was wonderful today"),
    ("t2", "train", "negative", "Storm warning for the whole coast tonight"),
    ("t3", "train", "positive", "my dog at the beach"),
    ("t4", "train", "neutral", "a grey building on a grey street"),
    ("t5", "train", "positive", "same tweet twice in train"),
    ("t6", "train", "negative", "same tweet twice in train"),  # within-train duplicate of t5, other label
    ("d1", "dev", "positive", "the parade was wonderful today"),  # exact text of t1
    ("d2", "dev", "positive", "an unrelated caption"),  # image: a resized copy of t3's picture
    ("d3", "dev", "neutral", "nothing to see here"),
    ("e1", "test", "positive", "RT @bob: STORM warning for the whole   coast tonight http://t.co/xyz"),  # t2, normalised; other label
    ("e2", "test", "neutral", "features close to t4, different picture"),  # image features near t4, hash says no
    ("e3", "test", "negative", "a last unique tweet"),
]
CLASSES = ["positive", "neutral", "negative"]


def picture(seed: int, size: int = 64) -> Image.Image:
    """A distinct picture per seed: coarse random blocks scaled up (pHash sees their layout)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((size, size), Image.NEAREST)


def make_cache(tmp_path: Path, images: bool = True) -> tuple[Path, str]:
    """A synthetic cache of ITEMS (one text and one image shard) whose source is a JSONL manifest."""
    base = tmp_path / "data"
    (base / "img").mkdir(parents=True)
    rows = []
    for k, (id_, split, label, text) in enumerate(ITEMS):
        pic = {"d2": picture(3).resize((48, 48)), "e2": picture(99)}.get(id_) or picture(k + 1)
        pic.save(base / "img" / f"{id_}.png")
        rows.append({"id": id_, "text": text, "image": f"img/{id_}.png", "label": label, "split": split})
    manifest = base / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = "toy"
    cache_dir = tmp_path / "cache"
    rng = np.random.default_rng(0)
    n = len(ITEMS)
    ids = [r[0] for r in ITEMS]
    labels = [CLASSES.index(r[2]) for r in ITEMS]
    splits = [r[1] for r in ITEMS]
    maps = rng.random((n, C, H, W)).astype(np.float32) - 0.5  # unrelated items: cosine far below 0.95
    maps[ids.index("d2")] = maps[ids.index("t3")] * 1.02  # same picture: near-identical features
    maps[ids.index("e2")] = maps[ids.index("t4")] + 0.001
    lengths = rng.integers(1, 4, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    common = dict(fingerprint="fp", preprocessing="{}", dataset=name, data_hash="h", n_shards=1)
    tprov = store.Provenance(store.TEXT, "minilm", layers=L, max_length=8, **common)
    tdir = store.cache_folder(cache_dir, name, store.TEXT, "minilm")
    tdir.mkdir(parents=True)
    store.write_text_shard(tdir / store.shard_name(0, 1), tprov, ids, labels, splits,
                           rng.random((n, L, HID)), rng.random((int(offsets[-1]), L, HID)), offsets)
    assert store.finish(tdir, tprov)
    if images:
        iprov = store.Provenance(store.IMAGE, "efficientnet-lite0", **common)
        idir = store.cache_folder(cache_dir, name, store.IMAGE, "efficientnet-lite0")
        idir.mkdir(parents=True)
        store.write_image_shard(idir / store.shard_name(0, 1), iprov, ids, labels, splits, maps)
        assert store.finish(idir, iprov)
    store.write_dataset_info(cache_dir / name, {"name": name, "classes": CLASSES, "source": str(manifest)}, [])
    return cache_dir, name


@pytest.fixture
def toy(tmp_path):
    cache_dir, name = make_cache(tmp_path)
    return audit.AuditConfig(dataset=name, cache_dir=cache_dir, data_root=tmp_path / "unused")


def pairs(result, kind=None) -> set[tuple]:
    df = result.leaks if kind is None else result.leaks[result.leaks["kind"] == kind]
    return {(r.split, r.id, r.other_split, r.other_id) for r in df.itertuples()}


# --- the checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("a, b", [
    ("RT @bob: Storm warning http://t.co/x", "storm   warning"),
    ("@alice  Great DAY www.example.com", "great day"),
    ("rt great day", "Great day"),
])
def test_normalise_matches_retweets_and_reposts(a, b):
    assert audit.normalise(a) == audit.normalise(b)


def test_normalise_keeps_different_texts_apart():
    assert audit.normalise("great day") != audit.normalise("great days")
    assert audit.normalise("http://t.co/x @bob") == ""  # nothing left: never grouped (see _group_pairs)


def test_text_checks_find_the_planted_texts(toy):
    r = audit.run(toy)
    assert pairs(r, "text_exact") == {("dev", "d1", "train", "t1"), ("train", "t6", "train", "t5")}
    assert pairs(r, "text_normalised") == {("test", "e1", "train", "t2")}


def test_image_check_is_confirmed_by_the_perceptual_hash(toy):
    r = audit.run(toy)
    assert pairs(r, "image") == {("dev", "d2", "train", "t3")}  # a resized copy: confirmed
    # e2's features are as close to t4 as d2's to t3, but the pictures differ: the hash rejects it
    assert r.summary["image"]["candidates"] == 2 and r.summary["image"]["rejected_by_hash"] == 1
    score = r.leaks.loc[r.leaks["id"] == "d2", "score"].item()
    assert score >= toy.image_threshold


def test_image_pairs_without_files_are_kept_as_unconfirmed(toy, tmp_path):
    (tmp_path / "data" / "img" / "t4.png").unlink()
    r = audit.run(toy)
    assert pairs(r, "image_unconfirmed") == {("test", "e2", "train", "t4")}
    assert pairs(r, "image") == {("dev", "d2", "train", "t3")}


def test_label_conflicts_and_counts(toy):
    r = audit.run(toy)
    conflicts = {(row.id, row.other_id) for row in r.leaks.itertuples() if not row.same_label}
    assert conflicts == {("t6", "t5"), ("e1", "t2")}
    c = r.summary["counts"]
    assert c["dev-train"]["text"]["items"] == 1 and c["dev-train"]["image"]["items"] == 1
    assert c["dev-train"]["any"]["items"] == 2 and c["dev-train"]["label_conflicts"]["items"] == 0
    assert c["test-train"]["text_normalised"]["items"] == 1 and c["test-train"]["label_conflicts"]["items"] == 1
    assert c["train-train"]["label_conflicts"]["items"] == 1
    assert c["test-dev"]["any"]["items"] == 0


def test_outputs_on_disk(toy):
    r = audit.run(toy)
    assert r.out == toy.cache_dir / "toy" / "audit"
    leaks = pd.read_csv(r.out / "leaks.csv", dtype={"id": str, "other_id": str})
    assert list(leaks.columns) == ["split", "id", "other_split", "other_id", "kind", "score", "same_label"]
    assert len(leaks) == len(r.leaks) == 4
    summary = json.loads((r.out / "summary.json").read_text())
    assert summary["counts"] == r.summary["counts"] and summary["items"] == {"train": 6, "dev": 3, "test": 3}


def test_text_only_cache_runs_text_checks_and_says_so(tmp_path):
    cache_dir, name = make_cache(tmp_path, images=False)
    r = audit.run(audit.AuditConfig(dataset=name, cache_dir=cache_dir))
    assert r.summary["image"] is None
    assert any("text checks only" in n for n in r.notes)
    assert set(r.leaks["kind"]) == {"text_exact", "text_normalised"}
    assert audit.table_rows(r.summary)[0][4] == "n/a"


def test_missing_cache_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no cache for data set 'nope'.*extract --dataset nope"):
        audit.run(audit.AuditConfig(dataset="nope", cache_dir=tmp_path))


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_blocked_search_equals_brute_force(block):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 16)).astype(np.float32)
    x[[5, 17, 30]] = x[[4, 3, 29]] + 0.01  # three planted near-copies, one across a block edge
    x[31] = x[29] * 3  # same direction, other length: cosine 1
    found = {(int(i), int(j)) for ii, jj, _ in audit.near_duplicates(x, 0.95, block) for i, j in zip(ii, jj)}
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = xn @ xn.T
    brute = {(i, j) for i in range(40) for j in range(i + 1, 40) if s[i, j] >= 0.95}
    assert found == brute and {(4, 5), (3, 17), (29, 30), (29, 31), (30, 31)} <= found


# --- the clean split through train -------------------------------------------------------

def test_write_clean_drops_dev_and_test_leaks_per_class(toy, tmp_path):
    toy.write_clean = tmp_path / "clean"
    r = audit.run(toy)
    read = {s: (tmp_path / "clean" / f"{s}.txt").read_text().split() for s in ("train", "dev", "test")}
    assert read == {"train": ["t1", "t2", "t3", "t4", "t5", "t6"], "dev": ["d3"], "test": ["e2", "e3"]}
    assert r.clean["dropped_per_class"] == {"dev": {"positive": 2, "neutral": 0, "negative": 0},
                                            "test": {"positive": 1, "neutral": 0, "negative": 0}}
    dropped = pd.read_csv(tmp_path / "clean" / "dropped.csv")
    assert dict(zip(dropped["id"], dropped["kind"])) == {"d1": "text_exact", "d2": "image", "e1": "text_normalised"}


def test_write_clean_refuses_a_folder_of_other_files_and_rewrites_its_own(toy, tmp_path):
    from core.errors import UserError

    toy.write_clean = tmp_path / "mine"
    toy.write_clean.mkdir()
    (toy.write_clean / "notes.txt").write_text("someone's")
    with pytest.raises(UserError, match="holds other files \\(notes.txt\\)"):
        audit.run(toy)
    assert (toy.write_clean / "notes.txt").read_text() == "someone's"
    toy.write_clean = tmp_path / "clean"
    audit.run(toy)
    audit.run(toy)  # its own files again: rewritten, not refused
    assert (tmp_path / "clean" / "train.txt").is_file()


def test_split_files_reassign_items_with_their_features(tmp_path):
    cache_dir, name = make_cache(tmp_path)
    before = cache.load(cache_dir, name, "both", "minilm", "efficientnet-lite0")
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.txt").write_text("t1\nt2\nd3\nt4\n")  # d3 moves to train; t3, t5, t6 are dropped
    (folder / "dev.txt").write_text("d1\nd2\n")
    (folder / "test.txt").write_text("e3\nt5\n")  # t5 moves to test
    after = cache.load(cache_dir, name, "both", "minilm", "efficientnet-lite0", split_files=folder)
    assert after.splits["train"].ids == ["t1", "t2", "t4", "d3"]
    assert after.splits["test"].ids == ["t5", "e3"]
    old = {id_: (s, i) for s, sp in before.splits.items() for i, id_ in enumerate(sp.ids)}
    for split in after.splits.values():
        for i, id_ in enumerate(split.ids):
            s, j = old[id_]
            src = before.splits[s]
            assert torch.equal(split.cls[i], src.cls[j]) and torch.equal(split.maps[i], src.maps[j])
            assert split.labels[i] == src.labels[j]
            assert torch.equal(split.tokens[split.offsets[i]:split.offsets[i + 1]],
                               src.tokens[src.offsets[j]:src.offsets[j + 1]])


def test_missing_split_file_is_a_user_error(tmp_path):
    cache_dir, name = make_cache(tmp_path, images=False)
    with pytest.raises(UserError, match="split file .*dev.txt missing.*audit --write-clean"):
        (tmp_path / "s").mkdir()
        (tmp_path / "s" / "train.txt").write_text("t1\n")
        cache.load(cache_dir, name, "text", "minilm", "x", split_files=tmp_path / "s")


def test_clean_split_round_trips_through_train(tiny_cache, tmp_path, cli):
    """audit --write-clean on the tiny real cache, then train --splits on it: the run uses the
    listed items and records the split folder in config.json."""
    shutil.copytree(tiny_cache.cache_dir, tmp_path / "cache")
    cache_dir = tmp_path / "cache"
    r = cli.run("audit", "--dataset", tiny_cache.dataset, "--cache-dir", cache_dir, "--write-clean", tmp_path / "clean")
    assert r.returncode == 0, r.stderr
    assert "dev-train" in r.stdout and (cache_dir / tiny_cache.dataset / "audit" / "summary.json").is_file()
    # drop one more dev item by hand, so the round trip must show a change
    dev = (tmp_path / "clean" / "dev.txt").read_text().split()
    (tmp_path / "clean" / "dev.txt").write_text("\n".join(dev[1:]) + "\n")
    r = cli.run("train", "--dataset", tiny_cache.dataset, "--cache-dir", cache_dir, "--splits", tmp_path / "clean",
                "--epochs", "1", "--seeds", "1", "--batch-size", "8", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["splits"] == str((tmp_path / "clean").resolve())
    assert f"'dev': {len(dev) - 1}" in r.stdout


# --- manifest label sanity ----------------------------------------------------------------

def manifest(tmp_path: Path, labels: list[str]) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": f"tweet {i}", "label": lbl, "split": "train"}) + "\n"
                            for i, lbl in enumerate(labels)))
    return path


LABELS = ["positive"] * 12 + ["neutral"] * 10 + ["negative"] * 11 + ["furious"]


def test_declared_classes_list_other_labels_by_id(tmp_path):
    ds = datasets.load_manifest(manifest(tmp_path, LABELS), classes=("positive", "neutral", "negative"))
    assert ds.classes == ("positive", "neutral", "negative") and len(ds.items) == 33
    assert [(p.id, "furious" in p.reason) for p in ds.problems] == [("33", True)]


def test_rare_label_is_reported_and_dropped(tmp_path):
    ds = datasets.load_manifest(manifest(tmp_path, LABELS))
    assert ds.classes == ("negative", "neutral", "positive")
    assert ds.rare_labels == {"furious": 1}
    assert [p.id for p in ds.problems] == ["33"] and "likely a typo" in ds.problems[0].reason


def test_rare_label_kept_when_asked(tmp_path):
    ds = datasets.load_manifest(manifest(tmp_path, LABELS), keep_rare_labels=True)
    assert "furious" in ds.classes and len(ds.items) == 34 and ds.rare_labels == {"furious": 1}


def test_small_balanced_manifest_has_no_rare_label(tmp_path):
    ds = datasets.load_manifest(manifest(tmp_path, ["a", "b", "c"] * 3))
    assert ds.classes == ("a", "b", "c") and not ds.rare_labels and not ds.problems


def test_extract_cli_reports_the_typo_in_problems_csv(tmp_path, cli):
    path = manifest(tmp_path, LABELS)
    r = cli.run("extract", "--manifest", path, "--name", "typo", "--text-only", "--cache-dir", tmp_path / "cache",
                "--random-weights")
    assert r.returncode == 0, r.stderr
    assert "likely typo" in r.stdout and "furious" in r.stdout
    problems = pd.read_csv(tmp_path / "cache" / "typo" / "problems.csv", dtype=str)
    assert problems["id"].tolist() == ["33"] and "likely a typo" in problems["reason"].item()
    assert json.loads((tmp_path / "cache" / "typo" / "dataset.json").read_text())["classes"] == ["negative", "neutral", "positive"]
