"""heads/: the heads beyond SPP-SCL (CLIP-CA-CG, hybrid fusion, linear probe) on the new contract."""
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

import heads
from core.errors import UserError
from heads import HeadOutput, build_config, create
from heads.bigru import RaggedBiGRU
from heads.ragged import pad
from test_heads import MINILM_EFFNET, SMALL, make_batch, sub_batch

CLIP = {"full": {}, "no_clip": {"clip": False}, "no_ca": {"ca": False}, "no_cg": {"cg": False},
        "fixed_temperature": {"learn_temperature": False}, "none": {"clip": False, "ca": False, "cg": False}}
HYBRID = {"full": {}, "no_self_attention": {"self_attention": False}, "no_cross_attention": {"cross_attention": False},
          "no_birau": {"birau": False}, "rau_steps=1": {"rau_steps": 1}, "equal_weights": {"dynamic_weights": False},
          "no_decision_fusion": {"decision_fusion": False}}
PROBE = {m: {"modalities": m} for m in ("both", "text", "image")}
CASES = ([("clip_ca_cg", k, v) for k, v in CLIP.items()] + [("hybrid_fusion", k, v) for k, v in HYBRID.items()]
         + [("probe", k, v) for k, v in PROBE.items()])
IDS = [f"{name}-{k}" for name, k, _ in CASES]


pytestmark = pytest.mark.usefixtures("one_thread")


def small(name, **values):
    """A small config of head `name` (dim 16 where the head has a shared width)."""
    values = {"dim": 16, **values} if name != "probe" else values
    return build_config(name, values)


def trained_eval(name, cfg, batch, dims=SMALL):
    """A head in eval mode after one train-mode forward (norm statistics are not trivial)."""
    torch.manual_seed(0)
    head = create(name, dims, cfg)
    head.train()
    with torch.no_grad():
        head(batch)
    return head.eval()


def total(head, batch):
    out = head(batch)
    return out, sum(head.objective(out, batch.labels).values())


# --- every head, every ablation: shapes, gradients, batch independence ----------------


@pytest.mark.parametrize("name, case, values", CASES, ids=IDS)
def test_shapes(name, case, values):
    batch = make_batch(SMALL, [5, 1, 9, 3])
    out = create(name, SMALL, small(name, **values))(batch)
    assert isinstance(out, HeadOutput) and out.logits.shape == (4, SMALL.n_classes)
    assert out.fused.shape[0] == 4 and out.fused.dim() == 2
    if name != "probe":
        assert out.text.shape == out.image.shape == out.fused.shape == (4, 16)


@pytest.mark.parametrize("name, case, values", CASES, ids=IDS)
def test_objective_reaches_every_parameter(name, case, values):
    batch = make_batch(SMALL, [3, 6, 1, 4, 2, 5], labels=[0, 1, 2, 0, 1, 2])
    head = create(name, SMALL, small(name, **values)).train()
    _, loss = total(head, batch)
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name, case, values", CASES, ids=IDS)
def test_eval_logits_do_not_depend_on_batch_mates(name, case, values):
    batch = make_batch(SMALL, [4, 2, 11, 3], seed=3)
    head = trained_eval(name, small(name, **values), batch)
    with torch.no_grad():
        alone = torch.cat([head(sub_batch(batch, [i])).logits for i in range(4)])
        assert torch.allclose(alone, head(batch).logits, atol=1e-5)


def test_real_sizes():
    batch = make_batch(MINILM_EFFNET, [30, 12, 41], hw=7)
    for name in ("clip_ca_cg", "hybrid_fusion", "probe"):
        out = create(name, MINILM_EFFNET)(batch)
        assert out.logits.shape == (3, 3)


# --- the ragged BiGRU and padding ------------------------------------------------------


@pytest.mark.parametrize("lengths", [[4, 9, 1, 9, 2, 6], [5], [3, 3, 3], [1, 1, 2]])
def test_ragged_bigru_equals_nn_gru_on_packed_sequences(lengths):
    torch.manual_seed(0)
    lengths = torch.tensor(lengths)
    m = RaggedBiGRU(7, 5).double()
    x = torch.randn(int(lengths.sum()), 7, dtype=torch.float64, requires_grad=True)
    out, _ = m.gru(pack_sequence(list(torch.split(x, lengths.tolist())), enforce_sorted=False))
    padded, _ = pad_packed_sequence(out, batch_first=True)
    reference = torch.cat([padded[i, :n] for i, n in enumerate(lengths.tolist())])
    ours = m(x, lengths)
    assert torch.allclose(ours, reference, atol=1e-12)
    w = torch.randn_like(ours)
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad((ours * w).sum(), params),
                    torch.autograd.grad((reference * w).sum(), params)):
        assert torch.allclose(a, b, atol=1e-12)


def test_pad():
    x = torch.arange(6.0)[:, None]
    padded, mask = pad(x, torch.tensor([1, 3, 2]))
    assert torch.equal(padded[..., 0], torch.tensor([[0.0, 0, 0], [1, 2, 3], [4, 5, 0]]))
    assert torch.equal(mask, torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]]).bool())


# --- CLIP-CA-CG ablations ----------------------------------------------------------------


def test_clip_ca_cg_clip_term_and_its_ablation():
    batch = make_batch(SMALL, [3, 5, 2])
    head = create("clip_ca_cg", SMALL, small("clip_ca_cg", clip_weight=0.5))
    terms = head.objective(head(batch), batch.labels)
    assert set(terms) == {"ce", "clip"} and terms["clip"] > 0
    half = head.objective(head.eval()(batch), batch.labels)["clip"]
    head.cfg.clip_weight = 1.0
    assert torch.allclose(head.objective(head(batch), batch.labels)["clip"], 2 * half)
    off = create("clip_ca_cg", SMALL, small("clip_ca_cg", clip=False))
    assert set(off.objective(off(batch), batch.labels)) == {"ce"}
    assert not any(n.startswith(("p_i.", "p_t.", "log_scale")) for n, _ in off.named_parameters())
    fixed = create("clip_ca_cg", SMALL, small("clip_ca_cg", learn_temperature=False))
    assert fixed.log_scale is None and "log_scale" not in dict(fixed.named_parameters())


def test_clip_ca_cg_without_ca_bypasses_the_attention():
    batch = make_batch(SMALL, [3, 5, 2])
    head = create("clip_ca_cg", SMALL, small("clip_ca_cg", ca=False))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in head.modules())
    calls = []
    full = create("clip_ca_cg", SMALL, small("clip_ca_cg"))
    full.mha_t.register_forward_hook(lambda *a: calls.append(1))
    full(batch)
    assert calls
    # w/o CA the gate reads [F_IT, F_I, F_T] directly
    seen = {}
    head.concat.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    out = head.eval()(batch)
    d = 16
    assert torch.allclose(seen["x"][:, d:2 * d], out.image) and torch.allclose(seen["x"][:, 2 * d:], out.text)


def test_clip_ca_cg_without_cg_has_no_gate():
    head = create("clip_ca_cg", SMALL, small("clip_ca_cg", cg=False))
    assert not hasattr(head, "gate") and not hasattr(head, "nonlinear")
    assert hasattr(create("clip_ca_cg", SMALL, small("clip_ca_cg")), "gate")


def test_clip_ca_cg_lambda_mixes_the_two_branches():
    batch = make_batch(SMALL, [3, 5, 2])
    head = trained_eval("clip_ca_cg", small("clip_ca_cg", lam=1.0), batch)
    with torch.no_grad():
        a = head(batch).logits
        head.mlp_2[0].weight.add_(1.0)  # lam = 1: branch F2 is unused
        assert torch.equal(a, head(batch).logits)
        head.cfg.lam = 0.5
        assert not torch.allclose(a, head(batch).logits)


def test_clip_ca_cg_text_tokens_matter_to_the_attention():
    batch = make_batch(SMALL, [3, 5, 2])
    head = trained_eval("clip_ca_cg", small("clip_ca_cg"), batch)
    tokens = batch.tokens.clone()
    tokens[:3] += 1.0  # sample 0's tokens only
    with torch.no_grad():
        a, b = head(batch).logits, head(replace(batch, tokens=tokens)).logits
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:], atol=1e-6)


@pytest.mark.parametrize("values, word", [({"dim": 30, "heads": 4}, "dim"), ({"lam": 1.5}, "lam"),
                                          ({"temperature": 0.0}, "temperature"), ({"heads": 0}, "heads=0")])
def test_clip_ca_cg_bad_config_is_a_user_error(values, word):
    with pytest.raises(UserError, match=word):
        create("clip_ca_cg", SMALL, build_config("clip_ca_cg", values))


# --- hybrid fusion ablations -------------------------------------------------------------


def test_hybrid_decision_is_a_weighted_mixture_of_the_three_classifiers():
    batch = make_batch(SMALL, [3, 5, 2])
    out = trained_eval("hybrid_fusion", small("hybrid_fusion"), batch)(batch)
    z, w = out.extras["branch_logits"], out.extras["weights"]
    assert z.shape == (3, 3, SMALL.n_classes) and torch.allclose(w.sum(1), torch.ones(3))
    p = (w[..., None] * torch.softmax(z, dim=2)).sum(1)
    assert torch.allclose(out.logits.exp(), p, atol=1e-6)
    equal = create("hybrid_fusion", SMALL, small("hybrid_fusion", dynamic_weights=False))
    assert not hasattr(equal, "weights")
    assert torch.allclose(equal(batch).extras["weights"], torch.full((3, 3), 1 / 3))
    alone = create("hybrid_fusion", SMALL, small("hybrid_fusion", decision_fusion=False))
    out = alone(batch)
    assert "weights" not in out.extras and torch.equal(out.logits, out.extras["branch_logits"][:, 2])


def test_hybrid_objective_terms():
    batch = make_batch(SMALL, [3, 5, 2])
    head = create("hybrid_fusion", SMALL, small("hybrid_fusion", aux_weight=0.25)).eval()
    out = head(batch)
    terms = head.objective(out, batch.labels)
    assert set(terms) == {"ce", "aux"}
    z = out.extras["branch_logits"]
    aux = sum(torch.nn.functional.cross_entropy(z[:, j], batch.labels) for j in range(3)) / 3
    assert torch.allclose(terms["aux"], 0.25 * aux)
    assert torch.allclose(terms["ce"], -out.logits.gather(1, batch.labels[:, None]).mean())


def test_hybrid_ablations_remove_their_parts():
    batch = make_batch(SMALL, [3, 5, 2])
    def parts(**values):
        return {n.split(".")[0] for n, _ in create("hybrid_fusion", SMALL, small("hybrid_fusion", **values)).named_parameters()}
    full = parts()
    assert {"sa_t", "sa_i", "t2i", "i2t", "rau_ti", "rau_it", "weights"} <= full
    assert not {"sa_t", "sa_i"} & parts(self_attention=False)
    assert not {"t2i", "i2t"} & parts(cross_attention=False)
    assert not {"rau_ti", "rau_it"} & parts(birau=False)
    head = create("hybrid_fusion", SMALL, small("hybrid_fusion", self_attention=False)).eval()
    out = head(batch)  # w/o self-attention the unimodal features are the globals
    assert torch.allclose(out.text, head.global_t(batch.cls[:, -1]))
    assert torch.allclose(out.image, head.global_i(batch.maps.mean(dim=(2, 3))))


def test_hybrid_text_tokens_matter_per_sample():
    batch = make_batch(SMALL, [3, 5, 2])
    head = trained_eval("hybrid_fusion", small("hybrid_fusion"), batch)
    tokens = batch.tokens.clone()
    tokens[3:8] += 1.0  # sample 1's tokens only
    with torch.no_grad():
        a, b = head(batch).logits, head(replace(batch, tokens=tokens)).logits
    assert not torch.allclose(a[1], b[1]) and torch.allclose(a[[0, 2]], b[[0, 2]], atol=1e-6)


@pytest.mark.parametrize("values, word", [({"dim": 30, "heads": 4}, "dim"), ({"rau_steps": 0}, "rau_steps"),
                                          ({"heads": 0}, "heads=0"), ({"heads": -2}, "heads=-2")])
def test_hybrid_bad_config_is_a_user_error(values, word):
    with pytest.raises(UserError, match=word):
        create("hybrid_fusion", SMALL, build_config("hybrid_fusion", values))


# --- linear probe ----------------------------------------------------------------------


@pytest.mark.parametrize("modalities, width", [("both", 2 * 24 + 16), ("text", 2 * 24), ("image", 16)])
def test_probe_is_one_linear_layer(modalities, width):
    head = create("probe", SMALL, build_config("probe", {"modalities": modalities}))
    assert [type(m) for m in head.modules()] == [type(head), nn.Linear]
    assert head.linear.in_features == width and head.linear.out_features == SMALL.n_classes


def test_probe_reads_pooled_last_layer_and_image():
    batch = make_batch(SMALL, [2, 3])
    head = create("probe", SMALL)
    x = torch.cat([torch.stack([batch.tokens[:2, -1].mean(0), batch.tokens[2:, -1].mean(0)]), batch.cls[:, -1],
                   batch.maps.mean(dim=(2, 3))], dim=1)
    assert torch.allclose(head(batch).logits, head.linear(x), atol=1e-6)
    text = create("probe", SMALL, build_config("probe", {"modalities": "text"}))
    assert torch.equal(text(batch).logits, text(replace(batch, maps=None)).logits)
    with pytest.raises(UserError, match="modalities"):
        create("probe", SMALL, build_config("probe", {"modalities": "audio"}))


# --- registry ----------------------------------------------------------------------------


def parse_sets(head: str, items: list[str]) -> dict:
    """`--set` items as head `head`'s field values (train.config.head_values with no flag given)."""
    from train.config import head_values

    return head_values(head, {}, items)


def test_registered_with_their_configs():
    assert {"clip_ca_cg", "hybrid_fusion", "probe"} <= set(heads.available())
    assert parse_sets("hybrid_fusion", ["birau=false", "aux_weight=0"]) == {"birau": False, "aux_weight": 0.0}
    assert parse_sets("clip_ca_cg", ["clip=false", "ca=0", "cg=no", "lam=0.3", "heads=2"]) == \
        {"clip": False, "ca": False, "cg": False, "lam": 0.3, "heads": 2}
    assert parse_sets("probe", ["modalities=text"]) == {"modalities": "text"}
    with pytest.raises(UserError, match="valid keys"):
        parse_sets("probe", ["clip=false"])
    for name in ("clip_ca_cg", "hybrid_fusion", "probe"):
        assert all(help for _, _, _, help, _ in heads.describe(name))
