"""train/robustness.py: missing and noisy modalities at test time, on a tiny synthetic run."""

from __future__ import annotations

import pytest
import torch

from core.device import device
from train import robustness, runs
from train.config import TrainConfig
from train.data import load_data
from train.run_folder import RunFolder
from train.scoring import eval_orders, score_split

from conftest import quiet_console

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(synth_cache, tmp_path_factory):
    c = synth_cache
    cfg = TrainConfig(dataset=c.dataset, cache_dir=c.cache_dir, text_encoder=c.text_encoder, image_encoder=c.image_encoder,
                      head="late_concat", epochs=3, seeds=(1,), batch_size=8, eval_orders=2,
                      out=tmp_path_factory.mktemp("rob") / "run")
    runs.train(cfg, quiet_console())
    cfg = cfg.resolved()
    data = load_data(cfg)
    return cfg, data, RunFolder(cfg.out).load_head(cfg, data.dims, 1)


def test_drop_replaces_one_modality_by_its_train_mean(run):
    _, data, _ = run
    train, test = data.splits["train"], data.splits["test"]
    moments = robustness.train_moments(train)
    no_image = robustness.degrade(test, moments, drop="image")
    assert no_image.maps.dtype == test.maps.dtype and no_image.maps.shape == test.maps.shape
    assert torch.equal(no_image.maps[0], no_image.maps[-1])  # every item the same: the mean map
    assert torch.allclose(no_image.maps[0].float(), train.maps.float().mean(0), atol=1e-2)
    assert torch.equal(no_image.cls, test.cls) and torch.equal(no_image.tokens, test.tokens)
    no_text = robustness.degrade(test, moments, drop="text")
    assert torch.equal(no_text.offsets, test.offsets) and torch.equal(no_text.maps, test.maps)
    assert torch.equal(no_text.tokens[0], no_text.tokens[-1])


def test_noise_is_scaled_by_the_train_std_and_seeded(run):
    _, data, _ = run
    test = data.splits["test"]
    moments = robustness.train_moments(data.splits["train"])
    a = robustness.degrade(test, moments, noise=0.5, seed=3)
    assert torch.equal(a.maps, robustness.degrade(test, moments, noise=0.5, seed=3).maps)
    ratio = (a.cls.float() - test.cls.float()).std() / moments["cls"][1].mean()
    assert 0.35 < float(ratio) < 0.65
    assert torch.equal(robustness.degrade(test, moments, noise=0.0).maps, test.maps)


def test_scores_under_each_condition(run):
    cfg, data, head = run
    conds = robustness.conditions(("text", "image"), ["text", "image"], [0.0, 1.0])
    assert list(conds) == ["drop_text", "drop_image", "noise_0", "noise_1"]
    got = robustness.score(head, data, cfg, conds, device())
    test = data.splits["test"]
    clean, _ = score_split(head, test, cfg, data.dims.n_classes, device(), eval_orders(len(test), cfg))
    assert got["noise_0"]["accuracy"] == clean["accuracy"]
    assert set(got["drop_image"]) == {"accuracy", "weighted_f1", "macro_f1"}
    assert robustness.conditions(("text",), ["text", "image"], []) == {}  # nothing left without its only input


def test_eval_drop_and_noise_write_robustness_json(run, run_main):
    cfg, _, _ = run
    r = run_main("eval", cfg.out, "--drop", "image", "--noise", "0.5")
    assert r.code == 0, r.err
    assert "drop_image: test accuracy" in r.out and "noise_0.5: test accuracy" in r.out
    import json

    saved = json.loads((cfg.out / "robustness.json").read_text())
    assert set(saved["summary"]) == {"drop_image", "noise_0.5"} and saved["per_seed"][0]["seed"] == 1
    r = run_main("eval", cfg.out, "--drop", "audio")
    assert r.code == 1 and "--drop audio: give text or image" in r.err and "Traceback" not in r.err


def test_train_robustness_scores_every_head_condition(synth_cache, tmp_path, run_main):
    import json

    c = synth_cache
    import heads

    for head in heads.available():  # every registered head
        out = tmp_path / head
        r = run_main("train", "--dataset", c.dataset, "--cache-dir", c.cache_dir, "--text-encoder", c.text_encoder,
                     "--image-encoder", c.image_encoder, "--head", head, "--epochs", "1", "--seeds", "1",
                     "--batch-size", "8", "--eval-orders", "1", "--robustness", "--out", out, "--jobs", "1", "--threads", "1")
        assert r.code == 0, r.err
        got = set(json.loads((out / "robustness.json").read_text())["summary"])
        both = {"drop_text", "drop_image"} if len(heads.config_class(head)().reads()) == 2 else set()
        assert got == both | {"noise_0.5", "noise_1"}


def test_a_grid_scores_every_cell_with_robustness(synth_cache, tmp_path, run_main):
    import json

    c = synth_cache
    r = run_main("ablate", "--head", "clip_ca_cg", "--rows", "w/o CG", "--dataset", c.dataset, "--cache-dir", c.cache_dir,
                 "--text-encoder", c.text_encoder, "--image-encoder", c.image_encoder, "--epochs", "1", "--seeds", "1,2",
                 "--batch-size", "8", "--eval-orders", "1", "--robustness", "--runs-dir", tmp_path, "--jobs", "1",
                 "--threads", "1")
    assert r.code == 0, r.err
    cells = [p.parent for p in tmp_path.glob("*/config.json")]
    assert len(cells) == 2
    for cell in cells:
        assert set(json.loads((cell / "robustness.json").read_text())["summary"]) == {
            "drop_text", "drop_image", "noise_0.5", "noise_1"}


def test_robustness_on_a_streamed_cache_is_refused_before_training(synth_cache, tmp_path):
    """Its train moments and degraded test features need whole splits: one line naming the budget,
    before a run folder is made."""
    from core.errors import UserError

    c = synth_cache
    cfg = TrainConfig(dataset=c.dataset, cache_dir=c.cache_dir, text_encoder=c.text_encoder, image_encoder=c.image_encoder,
                      epochs=1, seeds=(1,), out=tmp_path / "run")
    with pytest.raises(UserError, match=r"needs the cache in memory: .* exceed the memory budget of 0\.00 GiB .*--memory 1G"):
        runs.train(cfg, quiet_console(), robust=True, memory=1)
    assert not (tmp_path / "run").exists()


def test_results_shows_the_robustness_columns(run):
    from experiments import results, results_view

    cfg, data, _ = run
    conds = robustness.conditions(("text", "image"), ["image"], [1.0])
    scored = robustness.evaluate_run(cfg.out, cfg, data, conds, device())
    md = results_view.markdown(results.build([cfg.out]))
    assert "| acc drop image |" in md and "| acc noise 1 |" in md
    assert f"{scored['summary']['drop_image']['accuracy']['mean']:.4f}" in md


def test_robustness_json_is_written_under_the_folders_writer_lock(run, synth_cache, tmp_path, monkeypatch):
    """Scoring robustness is the last write of a run: a second process that found the run finished but
    unscored (two grid lanes on one cell) scored it too, beside the first. Whoever scores it, `train
    --robustness`, a grid cell, or `eval --drop/--noise`, holds the folder's writer lock while it does."""
    from core.errors import UserError
    from train.runs import evaluate

    held = []
    real = robustness.evaluate_run

    def scoring(out, *a, **k):
        with pytest.raises(UserError, match="is being written by another process"):
            with RunFolder(out).writer():  # what a second writer would meet
                pass
        held.append(out)
        return real(out, *a, **k)

    monkeypatch.setattr(robustness, "evaluate_run", scoring)
    c = synth_cache
    cfg = TrainConfig(dataset=c.dataset, cache_dir=c.cache_dir, text_encoder=c.text_encoder, image_encoder=c.image_encoder,
                      head="late_concat", epochs=1, seeds=(1,), batch_size=8, eval_orders=1, out=tmp_path / "a")
    runs.train(cfg, quiet_console(), robust=True)
    from dataclasses import replace

    runs.train_run(replace(cfg, out=tmp_path / "b"), load_data(cfg.resolved()), robust=True)
    evaluate(run[0].out, drop=["image"])
    assert held == [tmp_path / "a", tmp_path / "b", run[0].out]
    assert not (tmp_path / "a" / RunFolder.LOCK).exists()  # and let go of it after
