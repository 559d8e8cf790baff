"""inference/predict.py and `pipeline.py predict`: new items through the run's own encoders, features as
the cache holds them, probabilities that sum to 1, a prediction independent of the request, and
one clear line for each kind of bad input.

One run is trained once for the module on the tiny real cache (1 epoch, 2 seeds, batch 8, SPP-SCL
with batch-scope CMF); one Predictor (real encoders, ~10 s) is shared."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import heads
from core.errors import UserError
from train import run_folder, runs
from train.config import TrainConfig
from inference.predict import NewItem, Predictor, items_from_args, read_manifest

from conftest import DATA, quiet_console

IMAGES = DATA / "mvsa_single" / "images"


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(tiny_cache, out, seeds=(1, 2), **head):
    cfg = TrainConfig(dataset=tiny_cache.dataset, cache_dir=tiny_cache.cache_dir, text_encoder=tiny_cache.text_encoder,
                      image_encoder=tiny_cache.image_encoder, head_config=heads.build_config("spp_scl", head) if head else None,
                      epochs=1, seeds=seeds, batch_size=8, eval_orders=1, out=out)
    return runs.train(cfg, quiet_console())


@pytest.fixture(scope="module")
def run(tiny_cache, tmp_path_factory):
    return _train(tiny_cache, tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor(run)


def _test_items(n: int) -> list[NewItem]:
    rows = [json.loads(line) for line in (DATA / "mvsa_single" / "test.jsonl").read_text().splitlines()[:n]]
    return [NewItem(r["id"], r["text"], IMAGES / f"{r['id']}.jpg") for r in rows]


def test_batch_scope_predict_of_a_views_run(views_run):
    """Regression: batch-scope `predict` of a --text-views run draws its context from the clean
    train states (TypeError before)."""
    p = Predictor(views_run)
    assert p.heads[0].batch_dependent and p.context is not None and p.provenance.text_views > 0
    (pred,) = p.predict(_test_items(1))
    assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_features_are_what_the_cache_holds(predictor, run):
    """A shipped test item encoded by predict equals its row in the cache (float16 either way)."""
    _, _, data = run_folder.RunFolder(run).open()
    test = data.splits["test"]
    item = _test_items(1)[0]
    i = test.ids.index(item.id)
    new = predictor.features(item)
    assert new.cls.dtype == torch.float16 and new.maps.dtype == torch.float16
    cached = test.subset(torch.tensor([i]))
    assert new.tokens.shape == cached.tokens.shape  # real tokens, no CLS, SEP kept
    np.testing.assert_allclose(new.cls.float(), cached.cls.float(), atol=2e-2)
    np.testing.assert_allclose(new.tokens.float(), cached.tokens.float(), atol=2e-2)
    np.testing.assert_allclose(new.maps.float(), cached.maps.float(), atol=2e-2)


def test_probabilities_sum_to_one_and_do_not_depend_on_the_request(predictor):
    assert predictor.heads[0].batch_dependent  # the batch-scope rule is what is under test
    items = _test_items(4)
    alone = predictor.predict(items[:1])[0]
    among = predictor.predict(items[2:] + items[:1] + items[1:2])[2]
    assert alone.id == among.id == items[0].id
    assert abs(sum(alone.probabilities.values()) - 1) < 1e-5
    assert set(alone.probabilities) == {"positive", "neutral", "negative"}
    assert alone.label == among.label
    for c in alone.probabilities:
        assert alone.probabilities[c] == pytest.approx(among.probabilities[c], abs=1e-6)


def test_mean_over_seeds_or_one_seed(run, predictor):
    """Default: the mean of the seeds' probabilities; --seed s: that seed's head alone."""
    item = _test_items(1)
    per_seed = []
    for s in (1, 2):
        one = Predictor(run, seed=s)
        one._encoders = predictor._encoders  # the same encoders: skip loading them again
        assert len(one.heads) == 1
        per_seed.append(np.array(list(one.predict(item)[0].probabilities.values())))
    mean = np.array(list(predictor.predict(item)[0].probabilities.values()))
    np.testing.assert_allclose(mean, (per_seed[0] + per_seed[1]) / 2, atol=1e-6)
    with pytest.raises(UserError, match="--seed 9"):
        Predictor(run, seed=9)


def test_unfinished_seed_names_a_finished_one(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "seed-2.pt").unlink()
    with pytest.raises(UserError, match="seed-2.pt missing.*--seed 1"):
        Predictor(copy)


def test_bad_items_are_one_clear_error(predictor, tmp_path):
    with pytest.raises(UserError, match="item a: image file .*missing.jpg not found"):
        predictor.predict([NewItem("a", "hello", tmp_path / "missing.jpg")])
    with pytest.raises(UserError, match="item b: empty text"):
        predictor.predict([NewItem("b", "  ", IMAGES / "17.jpg")])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="item c: unreadable image"):
        predictor.predict([NewItem("c", "hello", bad)])


def test_manifest_paths_are_relative_to_it(tmp_path):
    shutil.copy(IMAGES / "17.jpg", tmp_path / "x.jpg")
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": "x", "text": "hi", "image": "x.jpg"}) + "\n\n")
    (item,) = read_manifest(m)
    assert item.image == tmp_path / "x.jpg" and item.image.is_file()
    m.write_text("{oops\n")
    with pytest.raises(UserError, match="m.jsonl:1: not valid JSON"):
        read_manifest(m)


def test_an_extract_manifest_with_text_files_and_non_utf8_text(predictor, tmp_path):
    """What `extract --manifest` takes, predict takes: CSV or JSONL, text or text_file (relative to
    the manifest), Windows-1252 bytes decoded as stage one does; labels and splits are ignored."""
    shutil.copy(IMAGES / "17.jpg", tmp_path / "p.jpg")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_bytes("caf\xe9 cr\xe8me, so good".encode("cp1252"))
    csv = tmp_path / "m.csv"
    csv.write_bytes(b"id,text,text_file,image,label,split\n"
                    b"a,,texts/a.txt,p.jpg,positive,train\n"
                    + "b,na\xefve \u201cquotes\u201d,,p.jpg,negative,test\n".encode("cp1252"))
    items = read_manifest(csv)
    assert [(i.id, i.text) for i in items] == [("a", "café crème, so good"), ("b", "naïve \u201cquotes\u201d")]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes(json.dumps({"id": "c", "text_file": "texts/a.txt", "image": "p.jpg"}).encode() + b"\n"
                      + '{"text": "d\xe9j\xe0 vu", "image": "p.jpg"}\n'.encode("cp1252"))
    c, unnamed = read_manifest(jsonl)
    assert c.text == "café crème, so good" and unnamed.id == "row 2" and unnamed.text == "déjà vu"
    preds = predictor.predict(items + [c])
    assert [p.id for p in preds] == ["a", "b", "c"] and preds[0].probabilities == preds[2].probabilities
    (tmp_path / "texts" / "a.txt").unlink()
    with pytest.raises(UserError, match="item a: text file .*a.txt not found"):
        read_manifest(csv)


def test_a_missing_image_is_refused_before_any_run_is_read(tmp_path):
    with pytest.raises(UserError, match="^item gone.jpg: image file .*gone.jpg not found"):
        items_from_args(tmp_path / "gone.jpg", "hi", None)
    with pytest.raises(UserError, match="^item x: image file"):
        items_from_args(tmp_path / "gone.jpg", "hi", None, "x")


def test_fingerprint_mismatch_is_refused(run, monkeypatch):
    """Encoder weights other than the ones the cache was built with: refused, not silently used."""
    import extract.encoders

    monkeypatch.setattr(extract.encoders, "fingerprint", lambda module: "0000000000000000")
    with pytest.raises(UserError, match="text encoder 'minilm' here has fingerprint '0000000000000000'"):
        Predictor(run).predict(_test_items(1))


def test_text_only_run_needs_only_text(tiny_cache, tmp_path, predictor):
    run = _train(tiny_cache, tmp_path / "text", seeds=(1,), modalities="text")
    p = Predictor(run)
    assert p.context is None  # no image, no CMF: nothing crosses items, no cache needed
    p._encoders["text"] = predictor.text_enc
    (pred,) = p.predict([NewItem("t", "what a lovely day", None)])
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5


def test_encoders_that_cannot_be_loaded(synth_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no waiting on the network for a name that is nowhere
    cfg = TrainConfig(dataset=synth_cache.dataset, cache_dir=synth_cache.cache_dir, text_encoder=synth_cache.text_encoder,
                      image_encoder=synth_cache.image_encoder, epochs=1, seeds=(1,), batch_size=12, eval_orders=1,
                      head_config=heads.build_config("spp_scl", {"cmf_scope": "sample"}), out=tmp_path / "synth")
    run = runs.train(cfg, quiet_console())
    with pytest.raises(UserError, match="cannot load this run's text encoder 'synth-text'"):
        Predictor(run).predict([NewItem("s", "text", IMAGES / "17.jpg")])


def test_cli_json_and_errors(cli, run, tmp_path):
    m = tmp_path / "m.jsonl"
    shutil.copy(IMAGES / "17.jpg", tmp_path / "17.jpg")
    m.write_text("\n".join(json.dumps({"id": i, "text": "so happy today", "image": "17.jpg"}) for i in ("a", "b")))
    r = cli.run("predict", run, "--manifest", m, "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["id"] for x in lines] == ["a", "b"] and lines[0]["probabilities"] == lines[1]["probabilities"]
    assert set(lines[0]) == {"id", "label", "probabilities"}
    r = cli.run("predict", run, "--text", "hi", "--image", tmp_path / "nope.jpg")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "nope.jpg not found" in r.stderr
