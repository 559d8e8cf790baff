"""train/data.py: the cache as in-memory tensors, batches cut by index, text and image
joined by id (items without an image left out and counted), and the loader's errors.

Most tests use a synthetic cache written with the store's own writers, so every feature
row is known; one check runs on the session's tiny real cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core import store
from core.errors import UserError
from train import data

L, H, C, HW = 3, 6, 4, 2  # synthetic text layers, text width, image channels, map side
CLASSES = ["pos", "neu", "neg"]
DATASET = "toy"
ENC = "enc"


def prov(kind: str, n_shards: int) -> store.Provenance:
    text = kind == store.TEXT
    return store.Provenance(kind=kind, encoder=ENC, fingerprint="f0", preprocessing="{}", dataset=DATASET,
                            data_hash="h0", n_shards=n_shards, layers=L if text else 0,
                            max_length=16 if text else 0)


def make_items(n_per_split: dict[str, int], seed: int = 0) -> list[dict]:
    """Items with random features; a map is filled with the item's number, so it names its item."""
    rng = np.random.default_rng(seed)
    items, k = [], 0
    for split, n in n_per_split.items():
        for _ in range(n):
            length = int(rng.integers(1, 7))
            items.append({
                "id": f"i{k:02d}", "split": split, "label": int(rng.integers(0, len(CLASSES))),
                "cls": rng.standard_normal((L, H)).astype(np.float16),
                "tokens": rng.standard_normal((length, L, H)).astype(np.float16),
                "map": np.full((C, HW, HW), k, dtype=np.float16),
            })
            k += 1
    return items


def write_cache(cache_dir: Path, items: list[dict], image_items: list[dict] | None, shard: int = 5) -> None:
    """A complete cache of `items` (text) and `image_items` (image; None: text only)."""
    root = Path(cache_dir) / DATASET
    counts = {s: sum(it["split"] == s for it in items) for s in ("train", "dev", "test")}
    store.write_dataset_info(root, {"name": DATASET, "classes": CLASSES, "counts": counts}, [])
    chunks = [items[i : i + shard] for i in range(0, len(items), shard)]
    folder = store.cache_folder(cache_dir, DATASET, store.TEXT, ENC)
    folder.mkdir(parents=True)
    p = prov(store.TEXT, len(chunks))
    for k, chunk in enumerate(chunks):
        lengths = [len(it["tokens"]) for it in chunk]
        store.write_text_shard(
            folder / store.shard_name(k, p.n_shards), p, [it["id"] for it in chunk], [it["label"] for it in chunk],
            [it["split"] for it in chunk], np.stack([it["cls"] for it in chunk]),
            np.concatenate([it["tokens"] for it in chunk]), np.concatenate([[0], np.cumsum(lengths)]))
    assert store.finish(folder, p)
    if image_items is None:
        return
    folder = store.cache_folder(cache_dir, DATASET, store.IMAGE, ENC)
    folder.mkdir(parents=True)
    chunks = [image_items[i : i + shard + 1] for i in range(0, len(image_items), shard + 1)]
    p = prov(store.IMAGE, len(chunks))
    for k, chunk in enumerate(chunks):
        store.write_image_shard(folder / store.shard_name(k, p.n_shards), p, [it["id"] for it in chunk],
                                [it["label"] for it in chunk], [it["split"] for it in chunk],
                                np.stack([it["map"] for it in chunk]))
    assert store.finish(folder, p)


def load(cache_dir: Path, modalities: str = "both") -> data.Data:
    return data.load(cache_dir, DATASET, modalities, ENC, ENC)


def assert_split_holds(split: data.Split, items: list[dict], with_maps: bool) -> None:
    """`split` holds exactly `items`, in this order, each with its own features."""
    assert split.ids == [it["id"] for it in items]
    assert split.labels.tolist() == [it["label"] for it in items]
    assert split.offsets[0] == 0 and split.offsets[-1] == len(split.tokens)
    for i, it in enumerate(items):
        assert torch.equal(split.cls[i], torch.from_numpy(it["cls"])), it["id"]
        assert torch.equal(split.tokens[split.offsets[i] : split.offsets[i + 1]], torch.from_numpy(it["tokens"])), it["id"]
        if with_maps:
            assert torch.equal(split.maps[i], torch.from_numpy(it["map"])), it["id"]
    assert (split.maps is not None) == with_maps


# --- Split.batch -------------------------------------------------------------------------

def expected_tokens(split: data.Split, idx: list[int]) -> torch.Tensor:
    return torch.cat([split.tokens[split.offsets[i] : split.offsets[i + 1]] for i in idx]).float()


@pytest.mark.parametrize("idx", [[0], [4, 1, 3], [2, 2, 0], [5, 4, 3, 2, 1, 0]])
def test_batch_gathers_the_token_rows_of_the_chosen_items(tmp_path, idx):
    items = make_items({"train": 6, "dev": 2, "test": 2})
    write_cache(tmp_path, items, items)
    split = load(tmp_path).splits["train"]
    b = split.batch(torch.tensor(idx))
    assert torch.equal(b.tokens, expected_tokens(split, idx))
    assert b.lengths.tolist() == [len(items[i]["tokens"]) for i in idx]
    assert int(b.lengths.sum()) == len(b.tokens)
    assert torch.equal(b.cls, split.cls[idx].float())
    assert torch.equal(b.maps, split.maps[idx].float())
    assert b.labels.tolist() == [items[i]["label"] for i in idx]
    # float32 per batch, float16 in RAM
    assert b.tokens.dtype == b.cls.dtype == b.maps.dtype == torch.float32
    assert split.tokens.dtype == split.cls.dtype == split.maps.dtype == torch.float16
    assert b.labels.dtype == b.lengths.dtype == torch.int64


def test_batch_on_the_tiny_real_cache(tiny_cache):
    d = data.load(tiny_cache.cache_dir, tiny_cache.dataset, "both", tiny_cache.text_encoder, tiny_cache.image_encoder)
    split = d.splits["train"]
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:7].tolist()
    b = split.batch(torch.tensor(idx))
    assert torch.equal(b.tokens, expected_tokens(split, idx))
    assert torch.equal(b.lengths, split.offsets[torch.tensor(idx) + 1] - split.offsets[torch.tensor(idx)])
    assert b.maps.shape == (7, d.dims.image_channels, *split.maps.shape[2:])


# --- joining text and image by id --------------------------------------------------------

def test_join_by_id_drops_items_without_image_and_counts_them(tmp_path):
    items = make_items({"train": 8, "dev": 4, "test": 5})
    missing = {"i01", "i06", "i14"}  # two train items, one test item have no image
    images = [it for it in reversed(items) if it["id"] not in missing]  # other order, other shards
    write_cache(tmp_path, items, images)
    d = load(tmp_path)
    assert d.dropped == 3
    for s in ("train", "dev", "test"):
        kept = [it for it in items if it["split"] == s and it["id"] not in missing]
        assert_split_holds(d.splits[s], kept, with_maps=True)  # maps follow the ids, not positions
    # the re-cut offsets still batch correctly
    train = d.splits["train"]
    b = train.batch(torch.tensor([5, 0]))
    assert torch.equal(b.tokens, expected_tokens(train, [5, 0]))
    assert torch.equal(b.maps[:, 0, 0, 0], torch.tensor([int(train.ids[5][1:]), int(train.ids[0][1:])]).float())


def test_join_with_every_image_in_another_order(tmp_path):
    items = make_items({"train": 5, "dev": 3, "test": 3}, seed=1)
    write_cache(tmp_path, items, list(reversed(items)))
    d = load(tmp_path)
    assert d.dropped == 0
    for s in ("train", "dev", "test"):
        assert_split_holds(d.splits[s], [it for it in items if it["split"] == s], with_maps=True)


def test_an_image_without_text_is_ignored(tmp_path):
    items = make_items({"train": 4, "dev": 2, "test": 2}, seed=2)
    write_cache(tmp_path, items[1:], items)  # i00 has an image but no text
    d = load(tmp_path)
    assert d.dropped == 0  # `dropped` counts texts without image only
    assert d.splits["train"].ids == ["i01", "i02", "i03"]
    assert_split_holds(d.splits["train"], items[1:4], with_maps=True)


# --- one modality, dims ------------------------------------------------------------------

def test_dims_and_classes_come_from_the_cache(tmp_path):
    items = make_items({"train": 4, "dev": 2, "test": 2})
    write_cache(tmp_path, items, items)
    d = load(tmp_path)
    assert (d.dims.text_layers, d.dims.text_width, d.dims.image_channels, d.dims.n_classes) == (L, H, C, 3)
    assert d.classes == CLASSES
    assert d.provenance.text.encoder == d.provenance.image.encoder == ENC
    assert d.provenance.text.kind == "text" and d.provenance.image.kind == "image" and d.provenance.text_views == 0


def test_text_modality_on_a_text_only_cache(tmp_path):
    items = make_items({"train": 4, "dev": 2, "test": 3})
    write_cache(tmp_path, items, None)
    d = load(tmp_path, "text")
    assert d.dropped == 0 and set(d.provenance.kinds()) == {"text"}
    assert d.dims.image_channels == 0 and d.dims.text_layers == L
    assert_split_holds(d.splits["test"], items[6:], with_maps=False)
    b = d.splits["test"].batch(torch.tensor([2, 0]))
    assert b.maps is None and torch.equal(b.tokens, expected_tokens(d.splits["test"], [2, 0]))


def test_image_modality_reads_no_text(tmp_path):
    items = make_items({"train": 4, "dev": 2, "test": 2})
    write_cache(tmp_path, items, items)
    d = load(tmp_path, "image")
    assert set(d.provenance.kinds()) == {"image"} and d.dims.text_layers == 0 and d.dims.image_channels == C
    split = d.splits["dev"]
    assert split.cls is None and split.tokens is None and split.offsets is None
    b = split.batch(torch.tensor([1]))
    assert b.cls is None and b.tokens is None and b.lengths is None
    assert torch.equal(b.maps[0], torch.from_numpy(items[5]["map"]).float())


# --- errors name the fix -----------------------------------------------------------------

def test_no_cache_names_the_extract_command(tmp_path):
    with pytest.raises(UserError, match=r"no cache for data set 'toy'.*python pipeline\.py extract --manifest PATH --name toy"):
        load(tmp_path)


def test_a_misspelled_data_set_is_matched_to_the_caches_present(tmp_path):
    write_cache(tmp_path, make_items({"train": 4, "dev": 2, "test": 2}), None)
    with pytest.raises(UserError, match=r"no cache for data set 'tyo': did you mean toy\? \(caches in .*: toy\)") as e:
        data.load(tmp_path, "tyo", "text", ENC, ENC)
    assert "--manifest" not in str(e.value)
    with pytest.raises(UserError, match=r"'zzz' \(caches in .*: toy\): run `python pipeline.py extract"):
        data.load(tmp_path, "zzz", "text", ENC, ENC)


def test_missing_image_cache_says_extract_images_or_text_only(tmp_path):
    items = make_items({"train": 4, "dev": 2, "test": 2})
    write_cache(tmp_path, items, None)
    with pytest.raises(UserError) as e:
        load(tmp_path, "both")
    msg = str(e.value)
    assert "no image cache" in msg and "pipeline.py extract" in msg and "--modalities text" in msg


def test_unfinished_text_cache_names_the_resumable_extract(tmp_path):
    items = make_items({"train": 4, "dev": 2, "test": 2})
    write_cache(tmp_path, items, items)
    (store.cache_folder(tmp_path, DATASET, store.TEXT, ENC) / "index.json").unlink()
    with pytest.raises(UserError, match=r"no complete cache .*pipeline\.py extract --manifest PATH --name toy --text-encoder enc"):
        load(tmp_path, "text")


def test_a_missing_split_is_a_user_error(tmp_path):
    items = make_items({"train": 4, "test": 2})
    write_cache(tmp_path, items, items)
    with pytest.raises(UserError, match="no dev split"):
        load(tmp_path)
    assert json.loads((tmp_path / DATASET / "dataset.json").read_text())["counts"]["dev"] == 0


def test_builtin_data_set_is_named_by_dataset_flag(tmp_path):
    with pytest.raises(UserError, match=r"python pipeline\.py extract --dataset hfm`"):
        data.load(tmp_path, "hfm", "text", "minilm", "efficientnet-lite0")


def test_built_in_names_agree_between_the_stages():
    """Stage two names the built-ins from core.defaults without importing stage one; stage one's
    readers are exactly those (a built-in without training defaults of its own takes MVSA-Single's)."""
    from core.defaults import BUILTIN_DATASETS
    from extract.datasets import BUILTINS, builtin
    from train.config import DEFAULTS

    assert tuple(BUILTINS) == BUILTIN_DATASETS
    assert set(DEFAULTS) <= set(BUILTIN_DATASETS)
    with pytest.raises(ValueError, match="core.defaults.BUILTIN_DATASETS"):
        builtin("mine", "mine", ("a", "b"), marker="x", layout="y")


@pytest.mark.parametrize("field, message", [("labels", r"label 1\) in the image cache"), ("split", r"split dev")])
def test_text_and_image_caches_must_agree_on_labels_and_splits(field, message, tmp_path):
    """Caches are joined by id: an id with another label or split in the image cache is refused."""
    import h5py

    from conftest import write_synth_cache
    from core.errors import UserError
    from train import data as cache

    c = write_synth_cache(tmp_path / "cache")
    shard = next(store.cache_folder(c.cache_dir, c.dataset, store.IMAGE, c.image_encoder).glob("shard-*.h5"))
    with h5py.File(shard, "r+") as f:
        if field == "labels":
            labels = f["labels"][()]
            labels[0] = 1  # train-0 is label 0 in the text cache
            f["labels"][...] = labels
        else:
            split = [s.decode() for s in f["split"][()]]
            split[0] = "dev"
            del f["split"]
            f.create_dataset("split", data=split, dtype=h5py.string_dtype("utf-8"))
    # a cache made so (from other data), not damaged: its checksum is the new bytes'
    store.sidecar(shard).write_text(f"{store.sha256_file(shard)}  {shard.name}\n")
    store.finish(shard.parent, store.read_provenance(shard))  # the index counts the new split
    with pytest.raises(UserError, match=r"item 'train-0' of synth .*" + message):
        cache.load(c.cache_dir, c.dataset, "both", c.text_encoder, c.image_encoder)
    cache.load(c.cache_dir, c.dataset, "text", c.text_encoder, c.image_encoder)  # one modality: nothing to join


# --- streamed from the shards (a cache larger than the memory budget) ----------------------

def _same_batch(a, b) -> None:
    """Two Batches hold the same values, dtypes and memory layout (a conv reads the strides)."""
    for name in ("labels", "cls", "tokens", "lengths", "maps"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.stride() == y.stride() and torch.equal(x, y), name


@pytest.mark.parametrize("modalities", ["both", "text", "image"])
def test_a_streamed_cache_gives_the_in_memory_batches(tmp_path, modalities):
    items = make_items({"train": 9, "dev": 4, "test": 5})
    missing = {"i01", "i06", "i14"}
    write_cache(tmp_path, items, [it for it in reversed(items) if it["id"] not in missing])  # join drops three
    ram = data.load(tmp_path, DATASET, modalities, ENC, ENC, memory=1 << 40)
    streamed = data.load(tmp_path, DATASET, modalities, ENC, ENC, memory=1)
    assert not ram.streamed and streamed.streamed and streamed.needs > 1 and streamed.budget == 1
    assert (ram.dims, ram.dropped, ram.provenance) == (streamed.dims, streamed.dropped, streamed.provenance)
    for s in ("train", "dev", "test"):
        a, b = ram.splits[s], streamed.splits[s]
        assert a.ids == b.ids and torch.equal(a.labels, b.labels)
        order = torch.randperm(len(a), generator=torch.Generator().manual_seed(1))
        chunks = [order[i : i + 3] for i in range(0, len(order), 3)] + [torch.tensor([0, 0, 2])]
        pairs = list(zip(a.batches(chunks), b.batches(chunks), strict=True))
        for x, y in pairs:
            _same_batch(x, y)
        _same_batch(a.batch(chunks[0]), b.batch(chunks[0]))
        sub = torch.tensor([2, 0])
        _same_batch(a.subset(sub).batch(torch.tensor([1, 0])), b.subset(sub).batch(torch.tensor([1, 0])))


def test_the_budget_decides_between_memory_and_streaming(tmp_path):
    items = make_items({"train": 4, "dev": 2, "test": 2})
    write_cache(tmp_path, items, items)
    needs = data.load(tmp_path, DATASET, "both", ENC, ENC, memory=1).needs
    text = store.feature_bytes(store.cache_folder(tmp_path, DATASET, store.TEXT, ENC))
    assert needs == text + len(items) * C * HW * HW * 2  # float16 maps, as load_image holds them
    assert not data.load(tmp_path, DATASET, "both", ENC, ENC, memory=needs).streamed
    assert data.load(tmp_path, DATASET, "both", ENC, ENC, memory=needs - 1).streamed
    assert not data.load(tmp_path, DATASET, "both", ENC, ENC).streamed  # default budget: half the free memory


def test_split_files_reassign_streamed_items_as_in_memory(tmp_path):
    items = make_items({"train": 6, "dev": 3, "test": 3})
    write_cache(tmp_path, items, items)
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.txt").write_text("i00\ni07\ni03\ni11\n")
    (folder / "dev.txt").write_text("i01\ni09\n")
    (folder / "test.txt").write_text("i02\ni10\n")
    kw = dict(split_files=folder)
    ram = data.load(tmp_path, DATASET, "both", ENC, ENC, memory=1 << 40, **kw)
    streamed = data.load(tmp_path, DATASET, "both", ENC, ENC, memory=1, **kw)
    for s in ("train", "dev", "test"):
        assert ram.splits[s].ids == streamed.splits[s].ids
        idx = torch.arange(len(ram.splits[s])).flip(0)
        _same_batch(ram.splits[s].batch(idx), streamed.splits[s].batch(idx))


def test_streamed_text_views_give_the_in_memory_batches(tiny_views_cache):
    c = tiny_views_cache
    args = (c.cache_dir, c.dataset, "both", c.text_encoder, c.image_encoder)
    ram, streamed = data.load(*args, text_views=True, memory=1 << 40), data.load(*args, text_views=True, memory=1)
    assert streamed.streamed and ram.provenance == streamed.provenance
    a, b = ram.splits["train"], streamed.splits["train"]
    views = a.draw_views(1, 3)
    assert torch.equal(views, b.draw_views(1, 3)) and len(set(views.tolist())) > 1
    order = torch.randperm(len(a), generator=torch.Generator().manual_seed(2))
    chunks = [order[i : i + 4] for i in range(0, len(order), 4)]
    for x, y in zip(a.batches(chunks, views), b.batches(chunks, views), strict=True):
        _same_batch(x, y)


def test_training_from_a_streamed_cache_is_bit_identical(synth_cache, tmp_path):
    """metrics.json and log.csv of a run trained from RAM and streamed (a 1-byte budget) agree, seconds aside."""
    import csv

    from conftest import quiet_console, run_numbers
    from train import runs
    from train.config import TrainConfig

    c = synth_cache
    cfg = TrainConfig(dataset=c.dataset, cache_dir=c.cache_dir, text_encoder=c.text_encoder,
                      image_encoder=c.image_encoder, epochs=3, seeds=(1, 2), batch_size=8, eval_orders=2)
    consoles = [quiet_console(), quiet_console()]
    folders = [runs.train(cfg.__class__(**{**vars(cfg), "out": tmp_path / name}), console, memory=memory)
               for console, (name, memory) in zip(consoles, (("ram", 1 << 40), ("streamed", 1)))]
    assert "streamed from the shards" in consoles[1].file.getvalue()
    assert "streamed" not in consoles[0].file.getvalue()

    def strip(folder):
        m = json.loads((folder / "metrics.json").read_text())
        with open(folder / "log.csv") as f:
            rows = [{**r, "seconds": ""} for r in csv.DictReader(f)]
        return run_numbers(m), rows

    assert strip(folders[0]) == strip(folders[1])
