"""The cache format: shards round-trip, the loader's split rows and offsets, provenance
checks, atomic writes and the index written only once every shard is there."""

from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from core import store
from core.errors import UserError

from conftest import FullDisk

L, H = 3, 5  # layers, width of the synthetic text features


def prov(kind=store.TEXT, n_shards=2, **kw) -> store.Provenance:
    base = dict(kind=kind, encoder="enc", fingerprint="abc123", preprocessing='{"x": 1}', dataset="toy",
                data_hash="d0", n_shards=n_shards, layers=L if kind == store.TEXT else 0,
                max_length=32 if kind == store.TEXT else 0)
    base.update(kw)
    return store.Provenance(**base)


def text_shard(rng, ids, splits, lengths):
    """Synthetic arrays of one text shard, as the extractor would pass them."""
    n = len(ids)
    cls = rng.standard_normal((n, L, H)).astype(np.float16)
    per_item = [rng.standard_normal((k, L, H)).astype(np.float16) for k in lengths]
    tokens = np.concatenate(per_item) if per_item else np.zeros((0, L, H), np.float16)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    labels = rng.integers(0, 3, n)
    return dict(ids=ids, labels=labels, splits=splits, cls=cls, tokens=tokens, offsets=offsets, per_item=per_item)


def write_text(folder, k, p, s, problems=()):
    store.write_text_shard(folder / store.shard_name(k, p.n_shards), p, s["ids"], s["labels"], s["splits"],
                           s["cls"], s["tokens"], s["offsets"], problems)


@pytest.fixture
def two_text_shards(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "text" / "enc"
    folder.mkdir(parents=True)
    p = prov()
    shards = [
        text_shard(rng, ["a", "b", "c", "d"], ["train", "dev", "train", "test"], [3, 1, 5, 2]),
        text_shard(rng, ["e", "f", "g"], ["train", "test", "train"], [4, 2, 1]),
    ]
    for k, s in enumerate(shards):
        write_text(folder, k, p, s, problems=[("zz", "text", "because")] if k == 1 else ())
    assert store.finish(folder, p)
    return folder, p, shards


def expected(shards, split):
    rows = [(s, i) for s in shards for i, sp in enumerate(s["splits"]) if sp == split]
    return rows


def test_shard_names_and_folders():
    assert store.shard_name(3, 12) == "shard-00003-of-00012.h5"
    assert store.slug("minilm") == "minilm"
    assert store.slug(os.path.join("/models", "my bert!")) == "my_bert"  # a path names its last folder
    assert store.cache_folder(Path("c"), "mvsa_s", store.IMAGE, "resnet50") == Path("c/mvsa_s/image/resnet50")


def test_a_limited_data_set_name_splits_into_its_base_and_limit():
    assert store.split_limit("hfm-first100") == ("hfm", 100)
    assert store.split_limit("x-first3-first5") == ("x-first3", 5)  # only the last suffix is extract's
    assert store.split_limit("my-first-set") == ("my-first-set", None) and store.split_limit("-first7") == ("-first7", None)


def test_text_shard_holds_the_documented_datasets(two_text_shards):
    folder, p, shards = two_text_shards
    with h5py.File(folder / store.shard_name(0, 2), "r") as f:
        assert set(f) == {"ids", "labels", "split", "cls", "tokens", "offsets"}
        assert f["cls"].dtype == np.float16 and f["cls"].shape == (4, L, H)
        assert f["tokens"].shape == (11, L, H) and f["offsets"][()].tolist() == [0, 3, 4, 9, 11]
        assert f["labels"].dtype == np.int64
        assert [s.decode() for s in f["ids"][()]] == ["a", "b", "c", "d"]
        assert f.attrs["encoder"] == "enc" and f.attrs["layers"] == L and f.attrs["format_version"] == 1
    assert store.read_provenance(folder / store.shard_name(1, 2)) == p


def test_load_text_returns_each_split_with_its_own_offsets(two_text_shards):
    folder, p, shards = two_text_shards
    feats = store.load_text(folder)
    assert set(feats) == {"train", "dev", "test"}
    for split, f in feats.items():
        rows = expected(shards, split)
        assert f.ids == [s["ids"][i] for s, i in rows]  # shard order, then row order
        assert f.labels.dtype == torch.int64 and f.labels.tolist() == [int(s["labels"][i]) for s, i in rows]
        assert f.cls.dtype == torch.float16
        assert torch.equal(f.cls, torch.from_numpy(np.stack([s["cls"][i] for s, i in rows])))
        lengths = [len(s["per_item"][i]) for s, i in rows]
        assert f.lengths.tolist() == lengths
        assert f.offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
        assert f.tokens.shape == (sum(lengths), L, H)
        for j, (s, i) in enumerate(rows):  # every item's tokens sit between its offsets
            got = f.tokens[f.offsets[j] : f.offsets[j + 1]]
            assert torch.equal(got, torch.from_numpy(s["per_item"][i])), (split, s["ids"][i])
    assert feats["train"].ids == ["a", "c", "e", "g"]


def test_load_text_some_splits_only(two_text_shards):
    folder, _, _ = two_text_shards
    feats = store.load_text(folder, splits=("test",))
    assert list(feats) == ["test"] and feats["test"].ids == ["d", "f"]
    with pytest.raises(UserError, match="holds none of the splits validation"):
        store.load_text(folder, splits=("validation",))


def test_index_lists_shards_and_counts(two_text_shards):
    folder, p, _ = two_text_shards
    index = json.loads((folder / "index.json").read_text())
    assert index["n_items"] == 7
    assert index["provenance"] == {**vars(p)}
    assert [e["file"] for e in index["shards"]] == [store.shard_name(0, 2), store.shard_name(1, 2)]
    assert index["shards"][0]["splits"] == {"dev": [1, 1], "test": [1, 2], "train": [2, 8]}  # [items, tokens]
    assert store.provenance(folder) == p
    assert store.shard_problems(folder) == [("zz", "text", "because")]


def test_index_only_when_every_shard_is_there(tmp_path):
    rng = np.random.default_rng(1)
    p = prov(n_shards=3)
    s = text_shard(rng, ["a"], ["train"], [2])
    write_text(tmp_path, 0, p, s)
    write_text(tmp_path, 2, p, s)
    assert store.finish(tmp_path, p) is False
    assert not (tmp_path / "index.json").exists()
    with pytest.raises(UserError, match="no complete cache at .*: run `pipeline.py extract` \\(it resumes"):
        store.load_text(tmp_path)
    write_text(tmp_path, 1, p, s)
    assert store.finish(tmp_path, p) is True
    assert json.loads((tmp_path / "index.json").read_text())["n_items"] == 3
    assert not list(tmp_path.glob("*.tmp*"))


def test_image_shards_round_trip_with_an_empty_shard(tmp_path):
    rng = np.random.default_rng(2)
    p = prov(store.IMAGE, n_shards=3)
    maps = [np.zeros((0, 1, 1, 1)), np.maximum(rng.standard_normal((3, 4, 2, 2)), 0), rng.standard_normal((2, 4, 2, 2))]
    ids = [[], ["a", "b", "c"], ["d", "e"]]
    splits = [[], ["train", "test", "train"], ["dev", "train"]]
    for k in range(3):  # shard 0: every image of it was unreadable
        store.write_image_shard(tmp_path / store.shard_name(k, 3), p, ids[k], list(range(len(ids[k]))), splits[k],
                                maps[k], problems=[("x", "image", "corrupt")] if k == 0 else ())
    assert store.finish(tmp_path, p)
    with h5py.File(tmp_path / store.shard_name(1, 3), "r") as f:
        assert f["maps"].compression == "gzip" and f["maps"].dtype == np.float16
        assert f["maps"].chunks == (1, 4, 2, 2)
    feats = store.load_image(tmp_path)
    assert feats["train"].ids == ["a", "c", "e"]
    m16 = [m.astype(np.float16) for m in maps]
    assert torch.equal(feats["train"].maps, torch.from_numpy(np.stack([m16[1][0], m16[1][2], m16[2][1]])))
    assert feats["train"].labels.tolist() == [0, 2, 1]
    assert feats["dev"].ids == ["d"] and torch.equal(feats["dev"].maps[0], torch.from_numpy(m16[2][0]))
    assert feats["test"].ids == ["b"]
    assert store.shard_problems(tmp_path) == [("x", "image", "corrupt")]


def test_prepare_returns_finished_shards(two_text_shards):
    folder, p, _ = two_text_shards
    assert store.prepare(folder, p, force=False) == {0, 1}
    assert store.prepare(folder.parent / "new", p, force=False) == set()
    assert (folder.parent / "new").is_dir()


@pytest.mark.parametrize("change, named", [
    (dict(layers=2), "layers 3 (asked 2)"),
    (dict(max_length=64), "max_length 32 (asked 64)"),
    (dict(fingerprint="other"), "fingerprint 'abc123' (asked 'other')"),
    (dict(preprocessing='{"x": 2}'), "preprocessing"),
    (dict(data_hash="d1"), "data_hash"),
    (dict(n_shards=4), "n_shards 2 (asked 4)"),
])
def test_prepare_refuses_a_cache_built_differently(two_text_shards, change, named):
    folder, p, _ = two_text_shards
    asked = replace(p, **change)
    with pytest.raises(UserError) as e:
        store.prepare(folder, asked, force=False)
    msg = str(e.value)
    assert named in msg and str(folder) in msg and "--force" in msg
    assert len(list(folder.glob("shard-*.h5"))) == 2  # nothing touched


def test_force_wipes_the_old_cache(two_text_shards):
    folder, p, _ = two_text_shards
    asked = replace(p, layers=2)
    assert store.prepare(folder, asked, force=True) == set()
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_killed_write_leaves_no_shard_and_its_temp_is_removed(tmp_path):
    rng = np.random.default_rng(3)
    p = prov(n_shards=1)
    s = text_shard(rng, ["a", "b"], ["train", "dev"], [2, 3])
    path = tmp_path / store.shard_name(0, 1)
    # a writer killed half-way through: a real process, SIGKILLed with half the temp file written
    code = (
        "import sys, os, signal\n"
        "from pathlib import Path\n"
        "from core import paths, store\n"
        "class Half:\n"
        "    def __init__(self, f): self.f = f\n"
        "    def __enter__(self): return self\n"
        "    def __exit__(self, *a): self.f.close()\n"
        "    def write(self, data):\n"
        "        self.f.write(data[:len(data) // 2]); self.f.flush()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "paths.open = lambda p, *a, **k: (Half(open(p, *a, **k)) if str(p).endswith('.h5.tmp%d' % os.getpid())\n"
        "                                else open(p, *a, **k))\n"
        "store._atomic(Path(sys.argv[1]), lambda f: f.create_dataset('ids', data=[1, 2]))\n"
    )
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=repo, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, err.decode()
    tmps = list(tmp_path.glob("*.tmp*"))
    assert [t.name for t in tmps] == [f"{path.name}.tmp{proc.pid}"]
    assert not path.exists()  # never a half-written shard under the real name
    assert store.prepare(tmp_path, p, force=False) == set()
    assert not list(tmp_path.glob("*.tmp*"))
    write_text(tmp_path, 0, p, s)
    assert store.prepare(tmp_path, p, force=False) == {0}


def test_failed_write_keeps_the_previous_shard(tmp_path):
    rng = np.random.default_rng(4)
    p = prov(n_shards=1)
    s = text_shard(rng, ["a"], ["train"], [2])
    write_text(tmp_path, 0, p, s)
    before = (tmp_path / store.shard_name(0, 1)).read_bytes()

    def fill(f):
        f.create_dataset("ids", data=[1])
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store._atomic(tmp_path / store.shard_name(0, 1), fill)
    assert (tmp_path / store.shard_name(0, 1)).read_bytes() == before
    assert not list(tmp_path.glob("*.tmp*"))  # the shard was built in memory: nothing was written
    assert store.prepare(tmp_path, p, force=False) == {0}




def test_a_full_disk_deletes_the_temp_file_keeps_the_previous_shard_and_names_it(tmp_path, monkeypatch):
    from core import paths

    rng = np.random.default_rng(5)
    p = prov(n_shards=1)
    s = text_shard(rng, ["a"], ["train"], [2])
    write_text(tmp_path, 0, p, s)
    shard = tmp_path / store.shard_name(0, 1)
    before = shard.read_bytes()
    monkeypatch.setattr(paths, "open", lambda *a, **k: FullDisk(open(*a, **k)), raising=False)
    with pytest.raises(OSError) as e:
        write_text(tmp_path, 0, p, s)
    # the checksum is written first: the disk refuses it, naming it; the previous shard stays whole
    assert e.value.errno == errno.ENOSPC and e.value.filename in (str(shard), str(store.sidecar(shard)))
    assert shard.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp*"))


def test_prepare_spares_the_temp_file_of_a_live_writer(tmp_path):
    """Two ranks share a folder: one starting late must not delete the other's shard in progress."""
    p = prov(n_shards=2)
    live = tmp_path / f"{store.shard_name(1, 2)}.tmp{os.getppid()}"
    live.write_bytes(b"being written")
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    dead = tmp_path / f"index.json.tmp{done.pid}"  # that process has exited
    dead.write_text("{}")
    assert store.prepare(tmp_path, p, force=False) == set()
    assert live.exists() and not dead.exists()


def test_dataset_info_and_problems_csv(tmp_path):
    store.write_dataset_info(tmp_path / "toy", {"name": "toy", "classes": ["a", "b"]},
                             [("7", "image", "unreadable image 7.jpg: bad, comma")])
    assert json.loads((tmp_path / "toy" / "dataset.json").read_text())["classes"] == ["a", "b"]
    with open(tmp_path / "toy" / "problems.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["id", "stage", "reason"], ["7", "image", "unreadable image 7.jpg: bad, comma"]]


def test_image_maps_load_channels_last(tmp_path):
    """The loader hands maps over in the layout the heads' 1x1 convolution is fastest on."""
    st = store
    prov = st.Provenance(st.IMAGE, "enc", "fp", "{}", "toy", "h", 1)
    maps = np.random.default_rng(0).random((3, 5, 2, 2)).astype(np.float16)
    st.prepare(tmp_path, prov, force=False)
    st.write_image_shard(tmp_path / st.shard_name(0, 1), prov, ["a", "b", "c"], [0, 1, 0], ["train"] * 3, maps)
    st.finish(tmp_path, prov)
    got = st.load_image(tmp_path)["train"].maps
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, torch.from_numpy(maps))


# --- checksums: damage is detected, named and repairable -------------------------------------

def flip(path: Path, offset: int, n: int = 1) -> None:
    """Invert n bytes of a file from `offset` (negative: from the end)."""
    b = bytearray(path.read_bytes())
    start = offset % len(b)
    b[start : start + n] = bytes(x ^ 0xFF for x in b[start : start + n])
    path.write_bytes(bytes(b))


def as_older_format(folder: Path) -> None:
    """What the writer before checksums left: no sidecars, an index without `checksums`/`sha256`."""
    for side in folder.glob("*.sha256"):
        side.unlink()
    index = json.loads((folder / "index.json").read_text())
    index = {k: index[k] for k in ("provenance", "shards", "n_items")}
    (folder / "index.json").write_text(json.dumps(index, indent=1))


def test_every_shard_has_its_sha256_beside_it_and_the_index_its_own(two_text_shards):
    import hashlib

    folder, _, _ = two_text_shards
    for k in range(2):
        shard = folder / store.shard_name(k, 2)
        digest = hashlib.sha256(shard.read_bytes()).hexdigest()
        assert (folder / f"{shard.name}.sha256").read_text() == f"{digest}  {shard.name}\n"  # sha256sum -c reads it
    index = json.loads((folder / "index.json").read_text())
    assert index["checksums"] == "sha256"
    body = {k: v for k, v in index.items() if k != "sha256"}
    assert index["sha256"] == hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("kind", [store.TEXT, store.IMAGE])
def test_a_flipped_byte_anywhere_is_caught_before_a_number_is_read(tmp_path, kind):
    from conftest import write_synth_cache

    c = write_synth_cache(tmp_path / "cache")
    folder = store.cache_folder(c.cache_dir, c.dataset, kind, c.text_encoder if kind == store.TEXT else c.image_encoder)
    load = store.load_text if kind == store.TEXT else store.load_image
    shard = folder / store.shard_name(0, 1)
    clean = shard.read_bytes()
    size = len(clean)
    for offset in (0, 100, 2048, size // 3, size // 2, size - 700, size - 1):  # header, metadata, ids, features, end
        flip(shard, offset)
        with pytest.raises(UserError) as e:
            load(folder)
        msg = str(e.value)
        assert str(shard) in msg and "differ from the SHA-256" in msg and "\n" not in msg
        assert "python pipeline.py extract --dataset synth" in msg and f"--cache-dir {c.cache_dir}" in msg
        shard.write_bytes(clean)
    assert load(folder)["train"].ids  # whole again


def test_a_truncated_or_missing_shard_names_the_file(two_text_shards):
    folder, _, _ = two_text_shards
    shard = folder / store.shard_name(1, 2)
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match=f"cache file {shard} is damaged: .*Run `python pipeline.py extract"):
        store.load_text(folder)
    shard.unlink()
    with pytest.raises(UserError, match=f"cache file {shard} is damaged: missing"):
        store.load_text(folder)
    shard.write_bytes(raw)
    (folder / f"{shard.name}.sha256").unlink()
    with pytest.raises(UserError, match=f"{shard} is damaged: its checksum file {shard.name}.sha256 is missing"):
        store.load_text(folder)


@pytest.mark.parametrize("damage, why", [
    (lambda t: t[: len(t) // 2], "unreadable"),  # cut off
    (lambda t: t.replace('"n": 4', '"n": 5', 1), "does not match its SHA-256"),  # still valid JSON
    (lambda t: t.replace('"checksums"', '"checksumz"', 1), "does not match its SHA-256"),
    (lambda t: "[]", "not a JSON object"),
    (lambda t: "\xff\xfe", "unreadable"),
])
def test_a_damaged_index_names_the_file_and_the_command(two_text_shards, damage, why):
    folder, _, _ = two_text_shards
    index = folder / "index.json"
    index.write_text(damage(index.read_text()), encoding="latin-1")
    for read in (store.load_text, store.provenance, store.read_meta):
        with pytest.raises(UserError) as e:
            read(folder)
        assert f"cache file {index} is damaged" in str(e.value) and why in str(e.value)
        assert "to rewrite it" in str(e.value)


def test_the_older_format_loads_unverified_and_its_damage_is_still_one_line(two_text_shards):
    folder, p, shards = two_text_shards
    want = store.load_text(folder)
    as_older_format(folder)
    assert store.unverified(folder)
    got = store.load_text(folder)  # the same numbers, bit for bit
    for split in want:
        for name in ("cls", "tokens", "offsets", "labels"):
            assert torch.equal(getattr(got[split], name), getattr(want[split], name))
    assert store.prepare(folder, p, force=False) == {0, 1}  # kept, never refused
    check = store.check_folder(folder)
    assert not check.verified and not check.damaged and check.shards == 2

    shard = folder / store.shard_name(0, 2)
    shard.write_bytes(shard.read_bytes()[:3000])  # truncated: h5py's own error becomes one line
    with pytest.raises(UserError, match=f"cache file {shard} is damaged: unreadable .*truncated"):
        store.load_text(folder)
    assert [path for path, _ in store.check_folder(folder).damaged] == [shard]
    seen = []
    assert store.prepare(folder, p, force=False, on_damage=lambda path, why: seen.append(path)) == {1}
    assert seen == [shard]


def test_an_older_index_whose_counts_disagree_is_refused_not_read_into_garbage(two_text_shards):
    folder, _, _ = two_text_shards
    as_older_format(folder)
    index = json.loads((folder / "index.json").read_text())
    for change in ({"train": [3, 8]}, {"train": [2, 9]}, {"train": [1, 8]}):
        bad = json.loads(json.dumps(index))
        bad["shards"][0]["splits"].update(change)
        (folder / "index.json").write_text(json.dumps(bad))
        with pytest.raises(UserError, match="index.json is damaged: its split counts disagree with the shards"):
            store.load_text(folder)


def test_prepare_leaves_damaged_shards_out_of_the_done_ones(two_text_shards):
    folder, p, _ = two_text_shards
    flip(folder / store.shard_name(1, 2), 500, 100)
    (folder / "index.json").write_text("{")
    seen = []
    assert store.prepare(folder, p, force=False, on_damage=lambda path, why: seen.append((path.name, why))) == {0}
    assert [name for name, _ in seen] == ["index.json", store.shard_name(1, 2)]
    assert (folder / store.shard_name(1, 2)).exists()  # replaced by the re-encoded one's rename, never deleted here
    assert store.finish(folder, p) is False  # no index over a damaged shard


def test_verify_names_each_damaged_file(tmp_path):
    from conftest import write_synth_cache

    c = write_synth_cache(tmp_path / "cache")
    text = store.cache_folder(c.cache_dir, c.dataset, store.TEXT, c.text_encoder)
    image = store.cache_folder(c.cache_dir, c.dataset, store.IMAGE, c.image_encoder)
    [check] = store.verify(c.cache_dir)
    assert check.ok and [f.folder for f in check.folders] == [text, image]
    assert store.damage_summary([check]) is None
    flip(image / store.shard_name(0, 1), -100)
    (text / "index.json").unlink()
    [check] = store.verify(c.cache_dir, c.dataset)
    assert not check.ok
    assert [(f.folder, [p.name for p, _ in f.damaged]) for f in check.folders] == [
        (text, ["index.json"]), (image, [store.shard_name(0, 1)])]
    lines = check.lines()
    assert len(lines) == 2 and all("DAMAGED" in line and "repair: `python pipeline.py extract" in line for line in lines)
    assert "2 damaged files" in store.damage_summary([check])
    with pytest.raises(UserError, match="no cache for data set 'nope'.*caches there: synth"):
        store.verify(c.cache_dir, "nope")
    with pytest.raises(UserError, match="no cache at"):
        store.verify(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["", " ", ".", "..", "a/b", "../up", "/abs", "a\x00b"])
def test_a_data_set_name_must_be_one_folder(name):
    with pytest.raises(UserError, match="--name .*plain folder name"):
        store.check_name(name)


def test_ids_hdf5_can_store_and_those_it_cannot():
    for ok in ("17", "é漢字🙂", "a b", "a,b", "x" * 10_000, "a/b"):
        assert store.id_problem(ok) is None
    assert "NUL" in store.id_problem("a\x00b")
    assert "surrogate" in store.id_problem("\ud800x")


# --- reading items by index (a cache larger than memory) --------------------------------------

def image_shards(folder: Path, rng) -> np.ndarray:
    """Three image shards (the first empty, without a map shape, as extract writes a shard whose every image
    failed) of post-ReLU-like maps; returns every map, in item order."""
    p = prov(store.IMAGE, n_shards=3)
    maps = [np.zeros((0, 1, 1, 1)), np.maximum(rng.standard_normal((3, 4, 3, 3)), 0), rng.standard_normal((2, 4, 3, 3))]
    ids, splits = [[], ["a", "b", "c"], ["d", "e"]], [[], ["train", "test", "train"], ["dev", "train"]]
    for k in range(3):
        store.write_image_shard(folder / store.shard_name(k, 3), p, ids[k], [0] * len(ids[k]), splits[k], maps[k])
    assert store.finish(folder, p)
    return np.concatenate(maps[1:]).astype(np.float16)


IDX = np.array([4, 0, 2, 2, 1, 3])  # across shards, out of order, one item twice


def test_the_item_reader_gives_any_items_bit_for_bit(two_text_shards, tmp_path):
    folder, _, shards = two_text_shards
    r = store.ItemReader(folder)
    assert r.ids == list("abcdefg") and r.splits.tolist() == sum((s["splits"] for s in shards), [])
    assert r.lengths.tolist() == [3, 1, 5, 2, 4, 2, 1] and r.shape == (L, H)
    items = [(s, i) for s in shards for i in range(len(s["ids"]))]
    cls, tokens = r.text(IDX)
    assert cls.tobytes() == np.stack([items[i][0]["cls"][items[i][1]] for i in IDX]).tobytes()
    assert tokens.tobytes() == np.concatenate([items[i][0]["per_item"][items[i][1]] for i in IDX]).tobytes()

    maps = image_shards(tmp_path, np.random.default_rng(3))
    r = store.ItemReader(tmp_path)
    assert r.shape == (4, 3, 3) and r.ids == list("abcde")
    assert [f["maps"].chunks is not None for f in r._features[1:]] == [True, True]  # the writer's maps: read without h5py
    assert r.maps(IDX).tobytes() == maps[IDX].tobytes() and r.maps([]).shape == (0, 4, 3, 3)
    assert store.feature_bytes(tmp_path) == maps.nbytes and store.feature_bytes(tmp_path, ("dev",)) == maps[0].nbytes


@pytest.mark.parametrize("layout", [{}, {"compression": "gzip"}, {"shuffle": True}, {"compression": "lzf"},
                                    {"compression": "gzip", "shuffle": True, "fletcher32": True}])
def test_maps_stored_another_way_read_the_same(tmp_path, layout):
    """Without filters, deflate alone or shuffle alone: decoded here; a filter this reader does not
    decode (lzf, a checksum filter): read through h5py. The same bytes either way."""
    maps = image_shards(tmp_path, np.random.default_rng(4))
    for path in sorted(tmp_path.glob("shard-*.h5"))[1:]:  # the maps rewritten by h5py, checksums anew
        with h5py.File(path, "r") as old:
            def fill(f):
                f.attrs.update(old.attrs)
                for name in ("ids", "labels", "split"):
                    old.copy(old[name], f)
                f.create_dataset("maps", data=old["maps"][()], chunks=(1, *old["maps"].shape[1:]), **layout)

            store._atomic(path, fill)
    r = store.ItemReader(tmp_path)
    assert (r._features[1]["maps"].chunks is None) == ("lzf" in layout.values() or "fletcher32" in layout)
    assert r.maps(IDX).tobytes() == maps[IDX].tobytes()


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_maps_deflate_and_inflate_alike_with_zlib(tmp_path, monkeypatch, deflate):
    """ISA-L is optional: without it zlib deflates and inflates the same maps, and HDF5's own filters
    (h5py) read the chunks this writer deflated, whichever deflated them."""
    import zlib

    if deflate == "zlib":
        monkeypatch.setattr(store.writer, "_deflate", zlib.compress)
    maps = image_shards(tmp_path, np.random.default_rng(5))
    monkeypatch.setattr(store.items, "_inflate", zlib.decompress)
    assert store.ItemReader(tmp_path).maps(IDX).tobytes() == maps[IDX].tobytes()
    with h5py.File(tmp_path / store.shard_name(1, 3), "r") as f:
        assert f["maps"].compression == "gzip" and f["maps"].shuffle and f["maps"].compression_opts == 1
        assert f["maps"][()].tobytes() == maps[:3].tobytes()


def test_the_item_reader_checks_every_shard_and_a_map_damaged_later_is_one_line(tmp_path):
    image_shards(tmp_path, np.random.default_rng(6))
    shard = tmp_path / store.shard_name(1, 3)
    clean = shard.read_bytes()
    flip(shard, len(clean) // 2, 50)
    with pytest.raises(UserError, match=f"cache file {shard} is damaged: .*differ from the SHA-256"):
        store.ItemReader(tmp_path)
    shard.write_bytes(clean)
    r = store.ItemReader(tmp_path)
    offset, size, _ = r._features[1]["maps"].chunks[0]
    flip(shard, int(offset), int(size))  # after the check: the inflate fails, named
    with pytest.raises(UserError, match=f"cache file {shard} is damaged: map 0 "):
        r.maps([0])


def test_finish_does_not_read_back_the_shards_it_was_told_it_wrote(tmp_path, monkeypatch):
    """Their checksums are of the bytes this process wrote; the other shards are checked as ever."""
    rng = np.random.default_rng(3)
    p = prov(n_shards=2)
    for k in range(2):
        write_text(tmp_path, k, p, text_shard(rng, [f"a{k}"], ["train"], [2]))
    hashed = []
    real = store.sha256_file
    monkeypatch.setattr(store.layout, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    assert store.finish(tmp_path, p, written={1})
    assert hashed == [store.shard_name(0, 2)]
    (tmp_path / "index.json").unlink()
    (tmp_path / store.shard_name(1, 2)).unlink()
    assert store.finish(tmp_path, p, written={1}) is False  # written, yet gone: not finished
