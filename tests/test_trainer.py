"""train/trainer.py: every ablation flag trains and does what it says; step two takes a
second optimizer step only when the gate opens; the dev-selected epoch is the one kept;
the same seed gives the same run.

Trainings are in process, on the session's tiny real cache (12 items a split, all of
one class), one epoch and batch 8 unless a test needs more: 2 batches an epoch."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from train import runs, trainer
from train.config import TrainConfig

from conftest import quiet_console

BATCHES_PER_EPOCH = 2  # 12 train items in batches of 8: 8 + 4


@pytest.fixture(scope="module", autouse=True)
def one_thread(tiny_cache):
    """One intra-op thread: on two cores shared with a long background run, two torch
    threads spin against each other (about 10x slower on these tiny batches).
    Requests tiny_cache first, so the session's cache is built as other modules expect."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text_only_cache(tiny_cache, tmp_path_factory) -> Path:
    """The tiny cache without its image features. This is what `extract --text-only` writes
    (test_extract checks that its text shards equal the tiny cache's), without encoding again."""
    cache = tmp_path_factory.mktemp("text_only") / "cache"
    shutil.copytree(tiny_cache.cache_dir / tiny_cache.dataset, cache / tiny_cache.dataset,
                    ignore=lambda folder, names: ["image"] if Path(folder).name == tiny_cache.dataset else [])
    assert not (cache / tiny_cache.dataset / "image").exists()
    return cache


@pytest.fixture(scope="module")
def tiny_data(tiny_cache):
    return runs.load_data(tiny_config(tiny_cache, None).resolved())


def tiny_config(tiny_cache, out, **kw) -> TrainConfig:
    base = dict(dataset=tiny_cache.dataset, cache_dir=tiny_cache.cache_dir, text_encoder=tiny_cache.text_encoder,
                image_encoder=tiny_cache.image_encoder, epochs=1, seeds=(1,), batch_size=8, out=out)
    base.update(kw)
    return TrainConfig(**base)


def read_log(run: Path) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


class Spy:
    """Records the trainer's calls of the loss functions (and still runs them)."""

    def __init__(self, monkeypatch):
        self.gate: list[bool] = []  # what should_pull answered, per call
        self.alphas: list[float] = []
        self.cross = 0
        self.official: list[bool] = []  # the `official` flag of each supcon call
        gate, cross, supcon = trainer.should_pull, trainer.cross_supcon, trainer.supcon

        def spy_gate(text, image, labels, alpha):
            self.alphas.append(alpha)
            self.gate.append(bool(gate(text, image, labels, alpha)))
            return self.gate[-1]

        def spy_cross(*args, **kw):
            self.cross += 1
            return cross(*args, **kw)

        def spy_supcon(*args, official=False, **kw):
            self.official.append(official)
            return supcon(*args, official=official, **kw)

        monkeypatch.setattr(trainer, "should_pull", spy_gate)
        monkeypatch.setattr(trainer, "cross_supcon", spy_cross)
        monkeypatch.setattr(trainer, "supcon", spy_supcon)


@pytest.fixture
def spy(monkeypatch) -> Spy:
    return Spy(monkeypatch)


# --- ablations -------------------------------------------------------------------------

ABLATIONS = [
    pytest.param({}, id="paper"),
    pytest.param({"two_step": False}, id="one_step"),
    pytest.param({"clm": False}, id="no_clm"),
    pytest.param({"intra": False}, id="no_intra"),
    *(pytest.param({"text_layers": k}, id=f"text_layers_{k}") for k in (1, 2, 3, 4)),
    pytest.param({"hierarchical_attention": False}, id="no_ha"),
    pytest.param({"cmf": False}, id="no_cmf"),
    pytest.param({"cmf_scope": "sample"}, id="cmf_sample"),
    pytest.param({"supcon_official": True}, id="supcon_official"),
    pytest.param({"alpha": 0.0}, id="alpha_0"),  # c < 0 never holds: the gate never opens
    pytest.param({"modalities": "text"}, id="text_only_view"),
    pytest.param({"modalities": "image"}, id="image"),
]


@pytest.mark.parametrize("flags", ABLATIONS)
def test_ablation_trains_and_does_what_its_flag_says(flags, tiny_cache, text_only_cache, tmp_path, spy):
    cache = text_only_cache if flags.get("modalities") == "text" else tiny_cache.cache_dir
    cfg = tiny_config(tiny_cache, tmp_path / "run", cache_dir=cache, **flags).resolved()
    run = runs.train(cfg, quiet_console())

    saved = json.loads((run / "config.json").read_text())["train"]
    assert {k: saved[k] for k in flags} == flags  # the run records its ablation
    (row,) = read_log(run)
    per_seed = json.loads((run / "metrics.json").read_text())["per_seed"][0]
    rate = float(row["step_two_rate"])
    assert 0.0 <= rate <= 1.0
    assert per_seed["step_two_rate"] == pytest.approx(rate, abs=5e-4)

    both = cfg.modalities == "both"
    gated = cfg.two_step and cfg.clm and both
    # step two: the gate is asked once per batch, with the configured alpha; the rate is how often it opened
    assert len(spy.gate) == (BATCHES_PER_EPOCH if gated else 0)
    assert all(a == cfg.alpha for a in spy.alphas)
    if gated:
        assert rate == pytest.approx(sum(spy.gate) / BATCHES_PER_EPOCH, abs=5e-4)
        if cfg.alpha == 0.0:
            assert rate == 0.0 and float(row["loss_step_two"]) == 0.0
    else:
        assert rate == 0.0 and float(row["loss_step_two"]) == 0.0
    # L_clm: in step two when the gate opens; in step one every batch with one_step; never without clm
    one_step_clm = not cfg.two_step and cfg.clm and both
    assert spy.cross == (sum(spy.gate) if gated else BATCHES_PER_EPOCH if one_step_clm else 0)
    # L_cli / L_clt: one SupCon per embedding per batch, official form only when asked
    assert len(spy.official) == (BATCHES_PER_EPOCH * (2 if both else 1) if cfg.intra else 0)
    assert set(spy.official) <= {cfg.supcon_official}
    assert (float(row["loss_intra"]) > 0) == cfg.intra

    # the architecture the flags ask for, as saved in the checkpoint
    state = torch.load(run / "seed-1.pt", weights_only=True)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    assert has("image.") == (cfg.modalities != "text")
    assert has("text.") == (cfg.modalities != "image")
    assert has("text.ha.") == (cfg.modalities != "image" and cfg.hierarchical_attention)
    if has("text.ha."):
        k = cfg.text_layers
        assert state["text.ha.fc.0.weight"].shape == state["text.ha.fc.2.weight"].shape == (k, k)
    assert has("cmf.") == (both and cfg.cmf)
    assert state["classifier.0.weight"].shape[1] == cfg.dim * (4 if both and cfg.cmf else 2 if both else 1)

    if cfg.cmf_scope == "sample":  # each prediction on its own: alone or in a batch, the same logits
        data = runs.load_data(cfg)
        head = trainer.build_head(cfg, data)
        head.load_state_dict(state)
        head.eval()
        test = data.splits["test"]
        with torch.no_grad():
            together = head(test.batch(torch.arange(len(test)))).logits[:3]
            alone = torch.cat([head(test.batch(torch.tensor([i]))).logits for i in range(3)])
        torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)


def test_two_modalities_on_a_text_only_cache_is_a_user_error(tiny_cache, text_only_cache, tmp_path):
    with pytest.raises(UserError, match="--modalities text"):
        runs.train(tiny_config(tiny_cache, tmp_path / "run", cache_dir=text_only_cache), quiet_console())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    ({"text_layers": 5}, r"text_layers=5: the cache holds 4 text layers; choose 1\.\.4"),
    ({"head": "nope"}, r"unknown head 'nope'; available heads: .*spp_scl"),
    ({"cmf_scope": "everything"}, r"cmf_scope='everything'"),
])
def test_bad_head_settings_fail_before_a_run_folder_is_written(flags, message, tiny_cache, tmp_path):
    with pytest.raises(UserError, match=message):
        runs.train(tiny_config(tiny_cache, tmp_path / "run", **flags), quiet_console())
    assert not (tmp_path / "run").exists()


# --- step two ----------------------------------------------------------------------------

class CountingAdamW(torch.optim.AdamW):
    steps = 0

    def step(self, closure=None):
        type(self).steps += 1
        return super().step(closure)


@pytest.mark.parametrize("gate", [True, False])
def test_step_two_steps_the_optimizer_only_when_the_gate_opens(gate, tiny_cache, tiny_data, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", CountingAdamW)
    monkeypatch.setattr(CountingAdamW, "steps", 0)
    monkeypatch.setattr(trainer, "should_pull", lambda text, image, labels, alpha: gate)
    cfg = tiny_config(tiny_cache, None, epochs=2).resolved()
    r = trainer.train_seed(cfg, tiny_data, seed=1)
    batches = 2 * BATCHES_PER_EPOCH
    assert CountingAdamW.steps == batches * (2 if gate else 1)
    assert r.step_two_rate == float(gate)
    assert [log.step_two_rate for log in r.log] == [float(gate)] * 2
    assert all((log.loss_step_two > 0) == gate for log in r.log)


def test_the_gate_changes_the_weights(tiny_cache, tiny_data, monkeypatch):
    cfg = tiny_config(tiny_cache, None).resolved()
    states = {}
    for gate in (True, False):
        monkeypatch.setattr(trainer, "should_pull", lambda text, image, labels, alpha, gate=gate: gate)
        states[gate] = trainer.train_seed(cfg, tiny_data, seed=1).state
    changed = [k for k in states[True] if not torch.equal(states[True][k], states[False][k])]
    assert any(k.startswith("text.") for k in changed) and any(k.startswith("image.") for k in changed)


def test_a_lone_last_sample_is_skipped(tiny_cache, tiny_data, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", CountingAdamW)
    monkeypatch.setattr(CountingAdamW, "steps", 0)
    monkeypatch.setattr(trainer, "should_pull", lambda *a: False)
    cfg = tiny_config(tiny_cache, None, batch_size=11).resolved()  # 11 + 1: BatchNorm cannot train on one
    trainer.train_seed(cfg, tiny_data, seed=1)
    assert CountingAdamW.steps == 1


def test_one_step_puts_the_cross_modal_loss_into_step_one(tiny_cache, tiny_data, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", CountingAdamW)
    monkeypatch.setattr(CountingAdamW, "steps", 0)
    cfg = tiny_config(tiny_cache, None, two_step=False).resolved()
    batch = tiny_data.splits["train"].batch(torch.arange(8))
    head = trainer.build_head(cfg, tiny_data)
    out = head(batch)
    with_clm, _, _ = trainer.step_one_loss(cfg, out, batch.labels)
    without, _, _ = trainer.step_one_loss(replace(cfg, clm=False), out, batch.labels)
    cross = trainer.cross_supcon(out.image, out.text, batch.labels, cfg.temperature)
    torch.testing.assert_close(with_clm - without, cross)
    trainer.train_seed(cfg, tiny_data, seed=1)
    assert CountingAdamW.steps == BATCHES_PER_EPOCH  # one step a batch


# --- dev selection and determinism -------------------------------------------------------

def scripted_dev(monkeypatch, values: list[float], metric: str = "weighted_f1") -> None:
    """Dev scores of epoch 1, 2, ... take `values` for `metric` (the tiny dev split is one class,
    so its real scores tie); the test split, scored after the last epoch, keeps its real scores."""
    real, left = trainer.scores, list(values)

    def scores(y_true, y_pred, n_classes):
        s = real(y_true, y_pred, n_classes)
        if left:
            s[metric] = left.pop(0)
        return s

    monkeypatch.setattr(trainer, "scores", scores)


def test_dev_selection_keeps_the_best_epoch_and_its_weights(tiny_cache, tiny_data, tmp_path, monkeypatch):
    dev = [0.2, 0.9, 0.9, 0.4]  # best at epoch 2; epoch 3 only ties it, so 2 stays
    scripted_dev(monkeypatch, dev)
    run = runs.train(tiny_config(tiny_cache, tmp_path / "run", epochs=4), quiet_console())
    column = [float(r["dev_weighted_f1"]) for r in read_log(run)]
    assert column == dev
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["per_seed"][0]["best_epoch"] == column.index(max(column)) + 1 == 2
    assert metrics["per_seed"][0]["dev"]["weighted_f1"] == metrics["dev"]["weighted_f1"]["mean"] == 0.9
    kept = torch.load(run / "seed-1.pt", weights_only=True)

    cfg = tiny_config(tiny_cache, None).resolved()
    scripted_dev(monkeypatch, [0.1, 0.2])  # the same seed, stopped after epoch 2: its last weights
    at_two = trainer.train_seed(replace(cfg, epochs=2), tiny_data, seed=1).state
    scripted_dev(monkeypatch, [0.1, 0.2, 0.3, 0.4])  # and after epoch 4
    at_four = trainer.train_seed(replace(cfg, epochs=4), tiny_data, seed=1).state
    assert kept.keys() == at_two.keys()
    assert all(torch.equal(kept[k], at_two[k]) for k in kept)
    assert not all(torch.equal(kept[k], at_four[k]) for k in kept)


@pytest.mark.parametrize("select", ["accuracy", "macro_f1"])
def test_dev_selection_reads_the_select_metric(select, tiny_cache, tiny_data, monkeypatch):
    scripted_dev(monkeypatch, [0.3, 0.5], metric=select)
    cfg = tiny_config(tiny_cache, None, epochs=2, select=select).resolved()
    r = trainer.train_seed(cfg, tiny_data, seed=1)
    assert r.best_epoch == 2 and r.dev[select] == 0.5


def test_same_seed_same_run_other_seed_other_run(tiny_cache, tiny_data):
    cfg = tiny_config(tiny_cache, None, epochs=2).resolved()
    a, b, c = (trainer.train_seed(cfg, tiny_data, seed=s) for s in (3, 3, 4))
    assert a.state.keys() == b.state.keys()
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert (a.best_epoch, a.dev, a.test, a.test_pred, a.step_two_rate) == \
        (b.best_epoch, b.dev, b.test, b.test_pred, b.step_two_rate)
    strip = [(log.lr, log.loss_ce, log.loss_intra, log.loss_step_two, log.step_two_rate, log.dev) for log in a.log]
    assert strip == [(log.lr, log.loss_ce, log.loss_intra, log.loss_step_two, log.step_two_rate, log.dev) for log in b.log]
    assert not all(torch.equal(a.state[k], c.state[k]) for k in a.state)


# --- class weighting (--balanced) ----------------------------------------------------------

def test_class_weights_are_inverse_frequency():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])  # 3, 1, 2 of 3 classes, 6 items
    torch.testing.assert_close(trainer.class_weights(labels, 3), torch.tensor([6 / 9, 6 / 3, 6 / 6]))
    # a class absent from train gets the weight of a class seen once, not a division by zero
    torch.testing.assert_close(trainer.class_weights(torch.tensor([0, 0]), 2), torch.tensor([1 / 2, 1.0]))


def test_balanced_weights_the_cross_entropy(tiny_cache, tiny_data):
    cfg = tiny_config(tiny_cache, None).resolved()
    batch = tiny_data.splits["train"].batch(torch.arange(8))
    head = trainer.build_head(cfg, tiny_data).eval()
    out = head(batch)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])  # three classes (the tiny split has one)
    weight = torch.tensor([1.0, 3.0, 0.5])
    _, plain, _ = trainer.step_one_loss(cfg, out, y)
    _, weighted, _ = trainer.step_one_loss(cfg, out, y, weight)
    per_item = torch.nn.functional.cross_entropy(out.logits, y, reduction="none")
    assert weighted == pytest.approx(((weight[y] * per_item).sum() / weight[y].sum()).item())
    assert plain == pytest.approx(per_item.mean().item()) and weighted != pytest.approx(plain)
    trainer.train_seed(replace(cfg, balanced=True), tiny_data, seed=1)  # runs end to end


# --- dropout views of the train texts (--text-views) ---------------------------------------

def test_text_views_on_a_cache_without_them_is_a_user_error(tiny_cache, tiny_views_cache, tmp_path):
    with pytest.raises(UserError, match=r"no dropout views: run `python pipeline.py extract --dataset mvsa_s "
                                        r"--limit 12 --text-encoder minilm --text-views K`"):
        runs.train(tiny_config(tiny_cache, tmp_path / "run", text_views=True), quiet_console())
    assert not (tmp_path / "run").exists()
    cache = tmp_path / "cache"
    shutil.copytree(tiny_views_cache.cache_dir, cache)
    unfinished = cache / tiny_cache.dataset / "text" / "minilm" / "view-02"
    (unfinished / "index.json").unlink()  # an interrupted extract --text-views
    with pytest.raises(UserError, match=r"no complete cache at .*view-02: run .*--text-views K"):
        runs.load_data(tiny_config(tiny_cache, None, cache_dir=cache, text_views=True))
    with pytest.raises(UserError, match="--text-views needs text"):
        tiny_config(tiny_cache, None, modalities="image", text_views=True).resolved()


def test_training_draws_a_view_per_item_and_epoch_and_scores_on_clean_states(tiny_views_cache, monkeypatch):
    from conftest import TINY_VIEWS
    from train.data import Split

    cfg = tiny_config(tiny_views_cache, None, epochs=4, text_views=True, batch_size=6).resolved()
    data = runs.load_data(cfg)
    train, dev, test = (data.splits[s] for s in ("train", "dev", "test"))
    assert train.view_cls.shape == (TINY_VIEWS, *train.cls.shape) and dev.view_cls is None and test.view_cls is None
    seen = []  # (split, rows, cls and tokens the head got), in call order
    real = Split.batch

    def spy(self, idx, view=None):
        b = real(self, idx, view)
        seen.append((self, idx.clone(), b.cls.clone(), b.tokens.clone()))
        return b

    monkeypatch.setattr(Split, "batch", spy)
    trainer.train_seed(cfg, data, seed=1)
    per_epoch: list[dict[int, int]] = [{}]  # item -> the view it got, per training epoch
    for split, idx, cls, tokens in seen:
        if split is train:
            for row, i in enumerate(idx.tolist()):
                match = [v for v in range(TINY_VIEWS) if torch.equal(cls[row], train.view_cls[v, i].float())]
                assert len(match) == 1, "a training item got clean states or a mixture"
                assert not torch.equal(cls[row], train.cls[i].float())
                per_epoch[-1][i] = match[0]
            assert torch.equal(tokens, real(train, idx, train.draw_views(1, len(per_epoch))[idx]).tokens)
        else:  # dev (once after each epoch) and test: always the clean states
            assert split is dev or split is test
            assert torch.equal(cls, split.cls[idx].float())
            assert torch.equal(tokens, split.tokens[data_rows(split, idx)].float())
            if split is dev and per_epoch[-1]:
                per_epoch.append({})
    per_epoch.pop()  # the empty one opened by the last dev scoring
    assert len(per_epoch) == cfg.epochs and all(len(e) == len(train) for e in per_epoch)
    assert any(per_epoch[0] != e for e in per_epoch[1:])  # the draw changes across epochs
    assert {v for e in per_epoch for v in e.values()} == set(range(TINY_VIEWS))
    for epoch, got in enumerate(per_epoch, 1):  # seeded by (seed, epoch): reproducible
        assert torch.equal(torch.tensor([got[i] for i in range(len(train))]), train.draw_views(1, epoch))


def data_rows(split, idx):
    from train.data import _rows

    return _rows(split.offsets, idx)


def test_a_view_batch_takes_every_token_of_a_text_from_its_view(tiny_views_cache):
    data = runs.load_data(tiny_config(tiny_views_cache, None, text_views=True).resolved())
    train = data.splits["train"]
    idx, view = torch.tensor([3, 0, 7]), torch.tensor([1, 0, 1])
    b = train.batch(idx, view=view)
    start = 0
    for i, v in zip(idx.tolist(), view.tolist()):
        a, z = int(train.offsets[i]), int(train.offsets[i + 1])
        assert torch.equal(b.tokens[start : start + z - a], train.view_tokens[v, a:z].float())
        start += z - a
    assert start == len(b.tokens) and torch.equal(b.labels, train.labels[idx])
    assert torch.equal(b.maps, train.maps[idx].float())  # images are untouched
