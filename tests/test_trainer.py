"""train/trainer.py: every ablation trains and does what it says; the head's objective is the
loss and its gated second step steps the optimizer only when the gate opens; dev and test are
scored label-blind; `--official` is the authors' step; the dev-selected epoch is kept; the same
seed gives the same run.

Trainings are in process on the synthetic 3-class cache (36 train items stored sorted by
label, as the shipped files are), one epoch and batch 16 unless a test needs more:
3 batches an epoch (16 + 16 + 4)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import heads
from core.errors import UserError
from heads import spp_scl
from heads.spp_scl import SppSclConfig
from train import data as train_data
from train import runs, scoring, trainer
from train.config import TrainConfig

from conftest import quiet_console

BATCHES_PER_EPOCH = 3  # 36 train items in batches of 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth_data(synth_cache):
    return train_data.load_data(synth_config(synth_cache, None).resolved())


def synth_config(c, out, head_cfg: dict | None = None, head: str = "spp_scl", **kw) -> TrainConfig:
    base = dict(dataset=c.dataset, cache_dir=c.cache_dir, text_encoder=c.text_encoder,
                image_encoder=c.image_encoder, epochs=1, seeds=(1,), batch_size=16, out=out, head=head,
                head_config=heads.build_config(head, head_cfg or {}))
    base.update(kw)
    return TrainConfig(**base)


def read_log(run: Path) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


class Spy:
    """Records SPP-SCL's calls of the loss functions (and still runs them)."""

    def __init__(self, monkeypatch):
        self.gate: list[bool] = []
        self.alphas: list[float] = []
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.official: list[bool] = []
        gate, cross, supcon = spp_scl.should_pull, spp_scl.cross_supcon, spp_scl.supcon

        def spy_gate(text, image, labels, alpha, floor=False):
            self.alphas.append(alpha)
            self.gate.append(bool(gate(text, image, labels, alpha, floor)))
            return self.gate[-1]

        def spy_cross(text, image, *args, **kw):
            self.cross.append((text, image))
            return cross(text, image, *args, **kw)

        def spy_supcon(*args, official=False, **kw):
            self.official.append(official)
            return supcon(*args, official=official, **kw)

        monkeypatch.setattr(spp_scl, "should_pull", spy_gate)
        monkeypatch.setattr(spp_scl, "cross_supcon", spy_cross)
        monkeypatch.setattr(spp_scl, "supcon", spy_supcon)


@pytest.fixture
def spy(monkeypatch) -> Spy:
    return Spy(monkeypatch)


# --- ablations -------------------------------------------------------------------------

ABLATIONS = [
    pytest.param({}, id="paper"),
    pytest.param({"two_step": False}, id="one_step"),
    pytest.param({"clm": False}, id="no_clm"),
    pytest.param({"intra": False}, id="no_intra"),
    *(pytest.param({"text_layers": k}, id=f"text_layers_{k}") for k in (1, 4)),
    pytest.param({"hierarchical_attention": False}, id="no_ha"),
    pytest.param({"cmf": False}, id="no_cmf"),
    pytest.param({"cmf_scope": "sample"}, id="cmf_sample"),
    pytest.param({"supcon_official": True}, id="supcon_official"),
    pytest.param({"alpha": 0.5}, id="alpha_half"),  # the gate asks with the configured alpha (alpha <= 0 is refused)
    pytest.param({"modalities": "text"}, id="text"),
    pytest.param({"modalities": "image"}, id="image"),
]


@pytest.mark.parametrize("flags", ABLATIONS)
def test_ablation_trains_and_does_what_its_flag_says(flags, synth_cache, tmp_path, spy):
    cfg = synth_config(synth_cache, tmp_path / "run", flags).resolved()
    h = cfg.head_config
    run = runs.train(cfg, quiet_console())

    saved = json.loads((run / "config.json").read_text())["train"]["head_config"]
    assert {k: saved[k] for k in flags} == flags  # the run records its ablation
    (row,) = read_log(run)
    per_seed = json.loads((run / "metrics.json").read_text())["per_seed"][0]
    rate = float(row["step_two_rate"])
    assert per_seed["step_two_rate"] == pytest.approx(rate, abs=5e-4)

    both = h.modalities == "both"
    gated = h.two_step and h.clm and both
    # step two: the gate is asked once per batch, with the configured alpha; the rate is how often it opened
    assert len(spy.gate) == (BATCHES_PER_EPOCH if gated else 0)
    assert all(a == h.alpha for a in spy.alphas)
    assert rate == pytest.approx(sum(spy.gate) / BATCHES_PER_EPOCH if gated else 0.0, abs=5e-4)
    assert ("loss_step2_clm" in row) == (gated and any(spy.gate))
    # L_clm: in step two when the gate opens; in step one every batch with one_step; never without clm
    one_step_clm = not h.two_step and h.clm and both
    assert len(spy.cross) == (sum(spy.gate) if gated else BATCHES_PER_EPOCH if one_step_clm else 0)
    assert ("loss_clm" in row) == one_step_clm
    # L_cli / L_clt: one SupCon per embedding per batch, official form only when asked, logged by name
    assert len(spy.official) == (BATCHES_PER_EPOCH * (2 if both else 1) if h.intra else 0)
    assert set(spy.official) <= {h.supcon_official}
    assert ("loss_clt" in row) == (h.intra and h.modalities != "image")
    assert ("loss_cli" in row) == (h.intra and h.modalities != "text")
    assert float(row["loss_ce"]) > 0

    state = torch.load(run / "seed-1.pt", weights_only=True)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    assert has("image.") == (h.modalities != "text")
    assert has("text.") == (h.modalities != "image")
    assert has("text.ha.") == (h.modalities != "image" and h.hierarchical_attention)
    if has("text.ha."):
        assert state["text.ha.fc.0.weight"].shape == (h.text_layers, h.text_layers)
    assert has("cmf.") == (both and h.cmf)
    assert state["classifier.0.weight"].shape[1] == h.dim * (4 if both and h.cmf else 2 if both else 1)


def test_the_cross_modal_loss_is_anchored_on_the_text(synth_cache, synth_data, spy, monkeypatch):
    """Eq. 7, L_clm(T, I, y): the text embedding T_a is the first (anchor) argument."""
    monkeypatch.setattr(spp_scl, "should_pull", lambda *a, **k: True)
    outs = []
    real = spp_scl.SppSclHead.forward
    monkeypatch.setattr(spp_scl.SppSclHead, "forward", lambda self, b: outs.append(real(self, b)) or outs[-1])
    trainer.train_seed(synth_config(synth_cache, None).resolved(), synth_data, seed=1)
    assert spy.cross
    second_forwards = [o for k, o in enumerate(outs) if k % 2 == 1][: len(spy.cross)]
    for (text, image), out in zip(spy.cross, second_forwards):
        assert text is out.text and image is out.image


def test_two_modalities_on_a_text_only_cache_is_a_user_error(synth_cache, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(synth_cache.cache_dir / synth_cache.dataset, cache / synth_cache.dataset,
                    ignore=lambda folder, names: ["image"] if Path(folder).name == synth_cache.dataset else [])
    with pytest.raises(UserError, match="--modalities text"):
        runs.train(synth_config(synth_cache, tmp_path / "run", cache_dir=cache), quiet_console())
    assert not (tmp_path / "run").exists()
    run = runs.train(synth_config(synth_cache, tmp_path / "t", head="text_only", cache_dir=cache), quiet_console())
    assert (run / "metrics.json").is_file()  # a text head needs no image cache and no --modalities


@pytest.mark.parametrize("head_cfg, kw, message", [
    ({"text_layers": 5}, {}, r"text_layers=5: the cache holds 4 text layers; choose 1\.\.4"),
    ({"cmf_scope": "everything"}, {}, r"cmf_scope='everything'"),
    ({"temperature": 0.0}, {}, r"temperature=0.0: must be > 0"),
    ({}, {"lr": 0.0}, r"--lr 0\.0: must be > 0"),
    ({}, {"weight_decay": -1.0}, r"--weight-decay -1\.0: must be >= 0"),  # AdamW's own ValueError was a traceback
    ({}, {"lr_gamma": 2.0}, r"lr_gamma=2\.0: must be <= 1"),
    ({"alpha": float("inf")}, {}, r"alpha=inf: give a finite number"),
])
def test_bad_settings_fail_before_a_run_folder_is_written(head_cfg, kw, message, synth_cache, tmp_path):
    with pytest.raises(UserError, match=message):
        runs.train(synth_config(synth_cache, tmp_path / "run", head_cfg, **kw), quiet_console())
    assert not (tmp_path / "run").exists()


def test_unknown_head_is_a_user_error(synth_cache, tmp_path):
    with pytest.raises(UserError, match=r"unknown head 'nope'; available heads: .*spp_scl"):
        runs.train(replace(synth_config(synth_cache, tmp_path / "run"), head="nope", head_config=None), quiet_console())


def test_a_train_split_of_one_item_is_a_user_error(synth_data, synth_cache):
    one = replace(synth_data, splits={**synth_data.splits, "train": synth_data.splits["train"].subset(torch.tensor([0]))})
    with pytest.raises(UserError, match=r"train split of synth has 1 item\(s\)"):
        trainer.train_seed(synth_config(synth_cache, None).resolved(), one, seed=1)


def test_limited_data_sets_take_their_family_defaults():
    for name, (batch, lr, step, lam, select) in {
        "hfm-first100": (256, 5e-5, 5, 10.0, "macro_f1"), "mvsa_m-first7": (128, 1e-4, 15, 5.0, "weighted_f1"),
        "mine": (64, 1e-4, 10, 5.0, "weighted_f1"),
    }.items():
        cfg = TrainConfig(dataset=name).resolved()
        assert (cfg.batch_size, cfg.lr, cfg.lr_step, cfg.head_config.lambda_ce, cfg.select) == (batch, lr, step, lam, select)


# --- step two ----------------------------------------------------------------------------

class CountingAdamW(torch.optim.AdamW):
    steps = 0

    def step(self, closure=None):
        type(self).steps += 1
        return super().step(closure)


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", CountingAdamW)
    monkeypatch.setattr(CountingAdamW, "steps", 0)
    return CountingAdamW


@pytest.mark.parametrize("gate", [True, False])
def test_step_two_steps_the_optimizer_only_when_the_gate_opens(gate, synth_cache, synth_data, monkeypatch, counting):
    monkeypatch.setattr(spp_scl, "should_pull", lambda *a, **k: gate)
    r = trainer.train_seed(synth_config(synth_cache, None, epochs=2).resolved(), synth_data, seed=1)
    assert counting.steps == 2 * BATCHES_PER_EPOCH * (2 if gate else 1)
    assert r.step_two_rate == float(gate)
    assert [log.step_two_rate for log in r.log] == [float(gate)] * 2
    assert all(("step2_clm" in log.losses) == gate for log in r.log)


def test_the_gate_changes_the_weights(synth_cache, synth_data, monkeypatch):
    cfg = synth_config(synth_cache, None).resolved()
    states = {}
    for gate in (True, False):
        monkeypatch.setattr(spp_scl, "should_pull", lambda *a, gate=gate, **k: gate)
        states[gate] = trainer.train_seed(cfg, synth_data, seed=1).state
    changed = [k for k in states[True] if not torch.equal(states[True][k], states[False][k])]
    assert any(k.startswith("text.") for k in changed) and any(k.startswith("image.") for k in changed)


def test_a_lone_last_sample_is_skipped(synth_cache, synth_data, monkeypatch, counting):
    monkeypatch.setattr(spp_scl, "should_pull", lambda *a, **k: False)
    trainer.train_seed(synth_config(synth_cache, None, batch_size=35).resolved(), synth_data, seed=1)  # 35 + 1
    assert counting.steps == 1


def test_one_step_puts_the_cross_modal_loss_into_step_one(synth_cache, synth_data, counting):
    cfg = synth_config(synth_cache, None, {"two_step": False}).resolved()
    batch = synth_data.splits["train"].batch(torch.arange(0, 36, 3))
    head = trainer.build_head(cfg, synth_data)
    out = head(batch)
    terms = head.objective(out, batch.labels)
    torch.testing.assert_close(terms["clm"], spp_scl.cross_supcon(out.text, out.image, batch.labels, 0.07))
    assert not head.has_second_step
    trainer.train_seed(cfg, synth_data, seed=1)
    assert counting.steps == BATCHES_PER_EPOCH  # one step a batch


# --- --official: the authors' training step ------------------------------------------------

def test_official_sets_what_spec_lists_and_records_it(synth_cache, tmp_path):
    cfg = synth_config(synth_cache, tmp_path / "run", official=True, batch_size=None).resolved()
    h = cfg.head_config
    assert (h.supcon_official, h.gate_floor, h.lambda_ce) == (True, True, 5.0)
    assert (cfg.lr_step, cfg.eval_batch_size) == (10, 64)
    hfm = replace(cfg, dataset="hfm", head_config=None, batch_size=None, lr_step=None).resolved()
    assert (hfm.head_config.lambda_ce, hfm.lr_step, hfm.eval_batch_size) == (5.0, 10, 64)  # not HFM's 10 / 5 / 256
    run = runs.train(replace(cfg, batch_size=16), quiet_console())
    saved = json.loads((run / "config.json").read_text())
    assert saved["official_changes"]["head"] == spp_scl.SppSclConfig.OFFICIAL
    assert saved["official_changes"]["train"] == {"lr_step": 10, "eval_batch_size": 64}
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["last_epoch_test"]) == {"accuracy", "weighted_f1", "macro_f1"}  # no selection in their protocol


@pytest.mark.parametrize("official", [False, True])
def test_official_step_two_moves_parameters_l_clm_does_not_reach(official, synth_cache, synth_data, monkeypatch):
    """torch 1.8's zero_grad kept zero tensors: AdamW's step two then moved the classifier too
    (momentum and weight decay); with set_to_none it stays put."""
    monkeypatch.setattr(spp_scl, "should_pull", lambda *a, **k: True)
    moved = []

    class Watch(torch.optim.AdamW):
        n = 0

        def step(self, closure=None):
            w = self.param_groups[0]["params"]
            before = [p.detach().clone() for p in w]
            out = super().step(closure)
            type(self).n += 1
            if type(self).n % 2 == 0:  # every second step is a step two
                classifier = [k for k, p in enumerate(w) if p.shape == (3, 64)]  # the last Linear(64, 3)
                moved.append(any(not torch.equal(before[k], w[k]) for k in classifier))
            return out

    monkeypatch.setattr(torch.optim, "AdamW", Watch)
    trainer.train_seed(synth_config(synth_cache, None, official=official).resolved(), synth_data, seed=1)
    assert moved and all(m == official for m in moved)


# --- label-blind scoring -------------------------------------------------------------------

def test_scoring_never_follows_the_stored_order(synth_cache, synth_data, monkeypatch):
    """Dev (every epoch) and test are fed in seeded random orders; only leak_check uses file order."""
    seen = []
    real = scoring.forward

    def spy_forward(head, split, batch_size, device_, order):
        seen.append((len(split), order))
        return real(head, split, batch_size, device_, order)

    monkeypatch.setattr(scoring, "forward", spy_forward)
    cfg = synth_config(synth_cache, None, epochs=2, eval_orders=3).resolved()
    r = trainer.train_seed(cfg, synth_data, seed=1)
    stored = [o for _, o in seen if torch.equal(o, scoring.file_order(len(o)))]
    assert len(stored) == 1 and r.leak_check is not None  # the leak check alone, batch scope
    orders = [o for _, o in seen if not torch.equal(o, scoring.file_order(len(o)))]
    assert len(orders) == 2 + 3  # dev per epoch, then 3 test orders
    for o in orders:
        assert not torch.equal(o, torch.arange(len(o)))
        assert sorted(o.tolist()) == list(range(len(o)))
    assert len({tuple(o.tolist()) for o in orders[2:]}) == 3
    assert len(r.test["orders"]) == 3
    assert r.test["accuracy"] == pytest.approx(np.mean([s["accuracy"] for s in r.test["orders"]]))


def test_sample_scope_predictions_do_not_depend_on_the_order(synth_cache, synth_data):
    cfg = synth_config(synth_cache, None, {"cmf_scope": "sample"}, epochs=2).resolved()
    r = trainer.train_seed(cfg, synth_data, seed=1)
    head = trainer.build_head(cfg, synth_data)
    head.load_state_dict(r.state)
    test = synth_data.splits["test"]
    stored = scoring.forward(head, test, 4, torch.device("cpu"), scoring.file_order(len(test))).logits
    for order in scoring.eval_orders(len(test), cfg, 3):
        torch.testing.assert_close(scoring.forward(head, test, 4, torch.device("cpu"), order).logits, stored)
    assert r.leak_check is None and not head.batch_dependent


def test_batch_scope_predictions_depend_on_the_order(synth_cache, synth_data):
    cfg = synth_config(synth_cache, None, epochs=3).resolved()
    r = trainer.train_seed(cfg, synth_data, seed=1)
    head = trainer.build_head(cfg, synth_data)
    head.load_state_dict(r.state)
    test = synth_data.splits["test"]
    a, b = (scoring.forward(head, test, 6, torch.device("cpu"), o).logits
            for o in (scoring.file_order(len(test)), scoring.eval_orders(len(test), cfg, 1)[0]))
    assert not torch.allclose(a, b, atol=1e-4)


# --- logging, dev selection and determinism ------------------------------------------------

def test_log_shows_the_learning_rate_each_epoch_trained_with(synth_cache, synth_data):
    cfg = synth_config(synth_cache, None, epochs=3, lr_step=1).resolved()
    r = trainer.train_seed(cfg, synth_data, seed=1)
    assert [log.lr for log in r.log] == pytest.approx([1e-4, 5e-5, 2.5e-5])


def scripted_dev(monkeypatch, values: list[float], metric: str = "weighted_f1") -> None:
    """Dev scores of epoch 1, 2, ... take `values` for `metric`; later calls keep real scores."""
    real, left = trainer.scores, list(values)

    def scores(y_true, y_pred, n_classes):
        s = real(y_true, y_pred, n_classes)
        if left:
            s[metric] = left.pop(0)
        return s

    monkeypatch.setattr(trainer, "scores", scores)


def test_dev_selection_keeps_the_best_epoch_and_its_weights(synth_cache, synth_data, tmp_path, monkeypatch):
    dev = [0.2, 0.9, 0.9, 0.4]  # best at epoch 2; epoch 3 only ties it, so 2 stays
    scripted_dev(monkeypatch, dev)
    run = runs.train(synth_config(synth_cache, tmp_path / "run", epochs=4), quiet_console())
    column = [float(r["dev_weighted_f1"]) for r in read_log(run)]
    assert column == dev
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["per_seed"][0]["best_epoch"] == 2
    kept = torch.load(run / "seed-1.pt", weights_only=True)

    cfg = synth_config(synth_cache, None).resolved()
    scripted_dev(monkeypatch, [0.1, 0.2])
    at_two = trainer.train_seed(replace(cfg, epochs=2), synth_data, seed=1).state
    scripted_dev(monkeypatch, [0.1, 0.2, 0.3, 0.4])
    at_four = trainer.train_seed(replace(cfg, epochs=4), synth_data, seed=1).state
    assert all(torch.equal(kept[k], at_two[k]) for k in kept)
    assert not all(torch.equal(kept[k], at_four[k]) for k in kept)


@pytest.mark.parametrize("select", ["accuracy", "macro_f1"])
def test_dev_selection_reads_the_select_metric(select, synth_cache, synth_data, monkeypatch):
    scripted_dev(monkeypatch, [0.3, 0.5], metric=select)
    r = trainer.train_seed(synth_config(synth_cache, None, epochs=2, select=select).resolved(), synth_data, seed=1)
    assert r.best_epoch == 2 and r.dev[select] == 0.5


def test_same_seed_same_run_other_seed_other_run(synth_cache, synth_data):
    cfg = synth_config(synth_cache, None, epochs=2).resolved()
    a, b, c = (trainer.train_seed(cfg, synth_data, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert (a.best_epoch, a.dev, a.test, a.test_pred, a.step_two_rate, a.leak_check) == \
        (b.best_epoch, b.dev, b.test, b.test_pred, b.step_two_rate, b.leak_check)
    assert [(log.lr, log.losses, log.dev) for log in a.log] == [(log.lr, log.losses, log.dev) for log in b.log]
    assert not all(torch.equal(a.state[k], c.state[k]) for k in a.state)


def test_the_head_learns_the_synthetic_labels(synth_cache, synth_data):
    """The synthetic features carry the label: a mix-up of labels and items would not reach this."""
    r = trainer.train_seed(synth_config(synth_cache, None, {"cmf_scope": "sample"}, epochs=15, lr=3e-3).resolved(),
                           synth_data, seed=1)
    assert r.test["accuracy"] > 0.8


# --- class weighting (--balanced) ----------------------------------------------------------

def test_class_weights_are_inverse_frequency():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    torch.testing.assert_close(trainer.class_weights(labels, 3), torch.tensor([6 / 9, 6 / 3, 6 / 6]))
    torch.testing.assert_close(trainer.class_weights(torch.tensor([0, 0]), 2), torch.tensor([1 / 2, 1.0]))


def test_balanced_weights_the_cross_entropy(synth_cache, synth_data):
    cfg = synth_config(synth_cache, None).resolved()
    batch = synth_data.splits["train"].batch(torch.arange(0, 36, 4))
    head = trainer.build_head(cfg, synth_data).eval()
    out = head(batch)
    y = batch.labels
    weight = torch.tensor([1.0, 3.0, 0.5])
    plain = head.objective(out, y)["ce"] / 5.0
    weighted = head.objective(out, y, weight)["ce"] / 5.0
    per_item = torch.nn.functional.cross_entropy(out.logits, y, reduction="none")
    assert weighted.item() == pytest.approx(((weight[y] * per_item).sum() / weight[y].sum()).item())
    assert plain.item() == pytest.approx(per_item.mean().item()) and weighted.item() != pytest.approx(plain.item())
    trainer.train_seed(replace(cfg, balanced=True), synth_data, seed=1)


def test_patience_stops_a_seed_once_dev_stops_improving(synth_cache, synth_data, monkeypatch):
    scripted_dev(monkeypatch, [0.2, 0.5, 0.4, 0.45, 0.9, 0.1])
    r = trainer.train_seed(synth_config(synth_cache, None, epochs=6, patience=2).resolved(), synth_data, seed=1)
    assert [log.epoch for log in r.log] == [1, 2, 3, 4] and r.best_epoch == 2  # epoch 5's 0.9 is never seen
    with pytest.raises(UserError, match="--patience -1"):
        synth_config(synth_cache, None, patience=-1).resolved()
    assert synth_config(synth_cache, None, patience=0).resolved().patience is None  # 0: every epoch


# --- dropout views of the train texts (--text-views) ---------------------------------------

def test_text_views_on_a_cache_without_them_is_a_user_error(tiny_cache, tiny_views_cache, tmp_path):
    with pytest.raises(UserError, match=r"no dropout views: run `python pipeline.py extract --dataset mvsa_s "
                                        r"--limit 12 --text-encoder minilm --cache-text-views K`"):
        runs.train(synth_config(tiny_cache, tmp_path / "run", text_views=True), quiet_console())
    assert not (tmp_path / "run").exists()
    cache = tmp_path / "cache"
    shutil.copytree(tiny_views_cache.cache_dir, cache)
    unfinished = cache / tiny_cache.dataset / "text" / "minilm" / "view-02"
    (unfinished / "index.json").unlink()  # an interrupted extract --text-views
    with pytest.raises(UserError, match=r"no complete cache at .*view-02: run .*--cache-text-views K"):
        train_data.load_data(synth_config(tiny_cache, None, cache_dir=cache, text_views=True))
    with pytest.raises(UserError, match="--text-views needs a head that reads text"):
        synth_config(tiny_cache, None, {"modalities": "image"}, text_views=True).resolved()


def test_training_draws_a_view_per_item_and_epoch_and_scores_on_clean_states(tiny_views_cache, monkeypatch):
    from conftest import TINY_VIEWS
    from train.data import Split

    cfg = synth_config(tiny_views_cache, None, epochs=4, text_views=True, batch_size=6).resolved()
    data = train_data.load_data(cfg)
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
    data = train_data.load_data(synth_config(tiny_views_cache, None, text_views=True).resolved())
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


# --- resuming inside a seed ------------------------------------------------------------------

def saved_states(cfg, data, seed: int = 1) -> tuple[trainer.SeedResult, list[bytes]]:
    """An uninterrupted seed and the state it saved after each epoch, as the bytes of the file."""
    states = []

    def save(state):
        buf = io.BytesIO()
        torch.save(state, buf)
        states.append(buf.getvalue())

    return trainer.train_seed(cfg, data, seed, save=save), states


def load_state(raw: bytes) -> dict:
    return torch.load(io.BytesIO(raw), weights_only=True)  # plain tensors and numbers only


def same_seed_result(a: trainer.SeedResult, b: trainer.SeedResult) -> bool:
    return (all(torch.equal(a.state[k], b.state[k]) for k in a.state)
            and (a.best_epoch, a.dev, a.test, a.test_pred, a.step_two_rate, a.leak_check)
            == (b.best_epoch, b.dev, b.test, b.test_pred, b.step_two_rate, b.leak_check)
            and [(log.epoch, log.lr, log.losses, log.step_two_rate, log.dev) for log in a.log]
            == [(log.epoch, log.lr, log.losses, log.step_two_rate, log.dev) for log in b.log])


def test_a_seed_resumed_from_its_saved_state_ends_as_an_uninterrupted_one(synth_cache, synth_data, monkeypatch):
    """Weights, AdamW, the lr schedule, the epoch order and dropout all continue where they were."""
    cfg = synth_config(synth_cache, None, epochs=4, lr=3e-3, lr_step=3).resolved()
    whole, states = saved_states(cfg, synth_data)
    assert [load_state(s)["epoch"] for s in states] == [1, 2, 3, 4]
    torch.manual_seed(123)  # whatever ran in between
    resumed = trainer.train_seed(cfg, synth_data, 1, resume=load_state(states[1]))
    assert same_seed_result(resumed, whole)
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)  # dropout would not line up
    assert not same_seed_result(trainer.train_seed(cfg, synth_data, 1, resume=load_state(states[1])), whole)


def test_a_seed_patience_stopped_stays_stopped_when_resumed(synth_cache, synth_data, monkeypatch):
    scripted_dev(monkeypatch, [0.5, 0.4, 0.3])  # epoch 3 is the last: 2 epochs without a better dev
    cfg = synth_config(synth_cache, None, epochs=6, patience=2).resolved()
    whole, states = saved_states(cfg, synth_data)
    assert len(states) == 3
    resumed = trainer.train_seed(cfg, synth_data, 1, resume=load_state(states[-1]))
    assert [log.epoch for log in resumed.log] == [1, 2, 3] and resumed.best_epoch == 1
    assert same_seed_result(resumed, whole)


# --- --protocol-check ------------------------------------------------------------------------

@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_protocol_check_scores_test_in_file_order_and_changes_nothing_else(scope, synth_cache, synth_data,
                                                                            monkeypatch):
    """The extra file-order scoring after every epoch draws no random number and selects nothing:
    the run is the one without it, epoch for epoch (a sample-scope head takes the same path)."""
    cfg = synth_config(synth_cache, None, {"cmf_scope": scope}, epochs=4, lr=3e-3, patience=2).resolved()
    plain = trainer.train_seed(cfg, synth_data, seed=1)
    rng_moved, real = [], scoring.predict

    def watch(head, split, batch_size, dev, order):
        before = torch.get_rng_state()
        out = real(head, split, batch_size, dev, order)
        rng_moved.append(order is None and not torch.equal(before, torch.get_rng_state()))
        return out

    monkeypatch.setattr(scoring, "predict", watch)
    checked = trainer.train_seed(replace(cfg, protocol_check=True), synth_data, seed=1)
    assert same_seed_result(checked, plain) and checked.last_epoch_test == plain.last_epoch_test
    assert not any(rng_moved) and len(rng_moved) > len(checked.log)
    assert plain.protocol_check is None and all(log.test_file_order is None for log in plain.log)
    stored = [log.test_file_order for log in checked.log]
    assert all(set(s) == {"accuracy", "weighted_f1", "macro_f1"} for s in stored)
    p = checked.protocol_check
    assert p["last_epoch"] == {"epoch": checked.log[-1].epoch, **stored[-1]}
    best = int(np.argmax([s["accuracy"] for s in stored]))  # the first of equals
    assert p["best_epoch"] == {"epoch": best + 1, **stored[best]}
    assert p["test"] == {m: checked.test[m] for m in ("accuracy", "weighted_f1", "macro_f1")}
    assert p["inflation"] == pytest.approx(stored[best]["accuracy"] - checked.test["accuracy"])


def test_protocol_check_rows_come_back_with_a_resumed_seed(synth_cache, synth_data):
    cfg = synth_config(synth_cache, None, epochs=3, protocol_check=True).resolved()
    whole, states = saved_states(cfg, synth_data)
    resumed = trainer.train_seed(cfg, synth_data, 1, resume=load_state(states[0]))
    assert [log.test_file_order for log in resumed.log] == [log.test_file_order for log in whole.log]
    assert resumed.protocol_check == whole.protocol_check
