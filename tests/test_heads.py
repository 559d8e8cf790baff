"""heads/: the Batch -> HeadOutput contract, packing, CMF scope, ablations, registry; then the heads
beyond SPP-SCL (CLIP-CA-CG, hybrid fusion, linear probe) on the same contract."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

import heads
from core.errors import UserError
from heads import Batch, Dims, HeadConfig, HeadOutput, available, build_config, create, parse_sets, register
from heads.spp_scl import SppSclConfig
from heads.bigru import RaggedBiGRU
from heads.bilstm import RaggedBiLSTM
from heads.losses import supcon
from heads.ragged import pack_plan, pad, segment_mean


pytestmark = pytest.mark.usefixtures("one_thread")


MINILM_EFFNET = Dims(text_layers=4, text_width=384, image_channels=1280, n_classes=3)
BERT_RESNET = Dims(text_layers=4, text_width=768, image_channels=2048, n_classes=2)
SMALL = Dims(text_layers=4, text_width=24, image_channels=16, n_classes=3)


def make_batch(dims, lengths, seed=0, labels=None, hw=3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths)
    b, n_tok = len(lengths), int(lengths.sum())
    if labels is None:
        labels = torch.arange(b) % dims.n_classes
    return Batch(
        labels=torch.as_tensor(labels),
        cls=torch.randn(b, dims.text_layers, dims.text_width, generator=g),
        tokens=torch.randn(n_tok, dims.text_layers, dims.text_width, generator=g),
        lengths=lengths,
        maps=torch.relu(torch.randn(b, dims.image_channels, hw, hw, generator=g)),
    )


def sub_batch(batch, idx):
    """Samples `idx` of a ragged batch as a batch of their own."""
    start = torch.cumsum(batch.lengths, 0) - batch.lengths
    rows = torch.cat([torch.arange(int(start[i]), int(start[i] + batch.lengths[i])) for i in idx])
    idx = torch.as_tensor(idx)
    return Batch(batch.labels[idx], batch.cls[idx], batch.tokens[rows], batch.lengths[idx],
                 batch.maps[idx])


def trained_eval_head(name, dims, cfg, batch):
    """A head in eval mode whose BN running stats are not the trivial 0/1."""
    torch.manual_seed(0)
    head = create(name, dims, cfg)
    head.train()
    with torch.no_grad():
        head(batch)
    return head.eval()


# --- shapes --------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [MINILM_EFFNET, BERT_RESNET], ids=["minilm-effnet", "bert-resnet"])
@pytest.mark.parametrize("name", ["spp_scl", "text_only", "image_only", "late_concat"])
def test_output_shapes(dims, name):
    batch = make_batch(dims, [5, 1, 9, 3])
    out = create(name, dims)(batch)  # each head's default config
    assert isinstance(out, HeadOutput)
    assert out.logits.shape == (4, dims.n_classes)
    if name != "image_only":
        assert out.text.shape == (4, 32)
    if name != "text_only":
        assert out.image.shape == (4, 32)
    assert out.text is None if name == "image_only" else out.image is None if name == "text_only" else True


def test_dim_is_configurable():
    out = create("spp_scl", SMALL, SppSclConfig(dim=16))(make_batch(SMALL, [2, 3, 4]))
    assert out.text.shape == out.image.shape == (3, 16)


# --- ragged text: packing, no padding ------------------------------------------------


def test_pack_plan_matches_torch_pack_sequence():
    lengths = torch.tensor([3, 6, 1, 6, 2])
    tokens = torch.arange(int(lengths.sum()))
    packed = pack_sequence(list(torch.split(tokens, lengths.tolist())), enforce_sorted=False)
    plan = pack_plan(lengths)
    assert plan.batch_sizes == packed.batch_sizes.tolist()
    assert torch.equal(plan.forward_rows, packed.data)
    assert torch.equal(plan.order, packed.sorted_indices)
    reverse = pack_sequence([s.flip(0) for s in torch.split(tokens, lengths.tolist())],
                            enforce_sorted=False)
    assert torch.equal(plan.backward_rows, reverse.data)


RAGGED_LENGTHS = [[4, 9, 1, 9, 2, 6], [5], [3, 3, 3], [1, 1, 2]]


def assert_ragged_rnn_equals_packed(ragged, rnn: str, lengths, reference_of):
    """A ragged RNN module (`ragged`(7, 5)) on items of `lengths` tokens gives, in float64, the
    values and gradients of its torch RNN (attribute `rnn`) on the same items packed;
    `reference_of(padded, lengths)`: what the module returns, from the torch RNN's padded output."""
    torch.manual_seed(0)
    lengths = torch.tensor(lengths)
    m = ragged(7, 5).double()
    x = torch.randn(int(lengths.sum()), 7, dtype=torch.float64, requires_grad=True)
    out, _ = getattr(m, rnn)(pack_sequence(list(torch.split(x, lengths.tolist())), enforce_sorted=False))
    padded, _ = pad_packed_sequence(out, batch_first=True)  # zeros after each end
    reference = reference_of(padded, lengths)
    ours = m(x, lengths)
    assert torch.allclose(ours, reference, atol=1e-12)
    w = torch.randn_like(ours)  # any downstream loss
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad((ours * w).sum(), params),
                    torch.autograd.grad((reference * w).sum(), params)):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("lengths", RAGGED_LENGTHS)
def test_ragged_bilstm_equals_nn_lstm_on_packed_sequences(lengths):
    assert_ragged_rnn_equals_packed(RaggedBiLSTM, "lstm", lengths, lambda padded, n: padded.sum(1) / n[:, None])


def test_text_embedding_does_not_depend_on_batch_mates():
    # one short sample, alone and next to a long one: with padding (or a mean over
    # padded steps) its T_contra would change; packed, it must not
    batch = make_batch(SMALL, [3, 40, 7])
    head = trained_eval_head("spp_scl", SMALL, SppSclConfig(), batch)
    with torch.no_grad():
        together = head.text(batch)
        for i in range(3):
            alone = head.text(sub_batch(batch, [i]))
            assert torch.allclose(alone[0], together[i], atol=1e-5)


def test_hierarchical_attention_weights_each_sample_own_layers():
    batch = make_batch(SMALL, [2, 5, 3])
    head = create("spp_scl", SMALL, SppSclConfig(text_layers=3)).eval()
    seen = {}
    head.text.lstm.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    head.text(batch)
    w = head.text.ha(batch.cls[:, -3:])  # (B, 3)
    expected, row = [], 0
    for b, n in enumerate(batch.lengths.tolist()):
        for _ in range(n):
            expected.append(sum(w[b, l] * batch.tokens[row, 1 + l] for l in range(3)))
            row += 1
    assert torch.allclose(seen["x"], torch.stack(expected), atol=1e-6)


def test_segment_mean():
    x = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(segment_mean(x, torch.tensor([1, 2, 3])),
                       torch.tensor([[0.0, 1.0], [3.0, 4.0], [8.0, 9.0]]))


# --- CMF scope -----------------------------------------------------------------------


def logits_alone_and_together(scope: str):
    """(head, batch, logits of each sample run alone, logits of the whole batch), eval mode."""
    batch = make_batch(SMALL, [4, 2, 7, 3], seed=3)
    head = trained_eval_head("spp_scl", SMALL, SppSclConfig(cmf_scope=scope), batch)
    with torch.no_grad():
        alone = torch.cat([head(sub_batch(batch, [i])).logits for i in range(4)])
        return head, batch, alone, head(batch).logits


def test_sample_scope_logits_do_not_depend_on_the_batch():
    _, _, alone, together = logits_alone_and_together("sample")
    assert torch.allclose(alone, together, atol=1e-5)


def test_batch_scope_logits_depend_on_the_batch():
    head, batch, alone, together = logits_alone_and_together("batch")
    assert not torch.allclose(alone, together, atol=1e-3)
    with torch.no_grad():  # the embeddings the losses see are per-sample in both scopes
        assert torch.allclose(head(sub_batch(batch, [0])).text[0], head(batch).text[0], atol=1e-5)


# --- ablations -----------------------------------------------------------------------

ABLATIONS = {
    **{f"text_layers={k}": SppSclConfig(text_layers=k) for k in (1, 2, 3, 4)},
    "no_ha": SppSclConfig(hierarchical_attention=False),
    "no_cmf": SppSclConfig(cmf=False),
    "sample_scope": SppSclConfig(cmf_scope="sample"),
    "text": SppSclConfig(modalities="text"),
    "image": SppSclConfig(modalities="image"),
}


@pytest.mark.parametrize("cfg", ABLATIONS.values(), ids=ABLATIONS.keys())
def test_ablation_forward_backward_reaches_every_parameter(cfg):
    batch = make_batch(SMALL, [3, 6, 1, 4, 2, 5], labels=[0, 1, 2, 0, 1, 2])
    head = create("spp_scl", SMALL, cfg).train()
    out = head(batch)
    loss = 5 * F.cross_entropy(out.logits, batch.labels)
    for z in (out.text, out.image):
        if z is not None:
            loss = loss + supcon(z, batch.labels)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert (out.text is None) == (cfg.modalities == "image")
    assert (out.image is None) == (cfg.modalities == "text")


def changed(batch, **fields):
    return replace(batch, **fields)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_text_layers_uses_only_the_last_k(k):
    batch = make_batch(SMALL, [3, 5])
    head = trained_eval_head("spp_scl", SMALL, SppSclConfig(text_layers=k), batch)
    older = torch.zeros(SMALL.text_layers, dtype=torch.bool)
    older[: SMALL.text_layers - k] = True
    noisy_cls, noisy_tok = batch.cls.clone(), batch.tokens.clone()
    noisy_cls[:, older] += 3.0
    noisy_tok[:, older] += 3.0
    with torch.no_grad():
        a = head.text(batch)
        assert torch.equal(a, head.text(changed(batch, cls=noisy_cls, tokens=noisy_tok)))
        last_tok = batch.tokens.clone()
        last_tok[:, -1] += 3.0
        assert not torch.allclose(a, head.text(changed(batch, tokens=last_tok)))


def test_no_hierarchical_attention_reads_only_last_layer_tokens():
    batch = make_batch(SMALL, [3, 5])
    head = trained_eval_head("spp_scl", SMALL, SppSclConfig(hierarchical_attention=False), batch)
    assert not hasattr(head.text, "ha") or head.text.ha is None
    tok = batch.tokens.clone()
    tok[:, :-1] = 0.0
    with torch.no_grad():
        a = head.text(batch)
        assert torch.equal(a, head.text(changed(batch, cls=torch.zeros_like(batch.cls), tokens=tok)))


def test_single_modality_heads_ignore_the_other_modality():
    batch = make_batch(SMALL, [3, 5, 2])
    text_head = trained_eval_head("spp_scl", SMALL, SppSclConfig(modalities="text"), batch)
    image_head = trained_eval_head("spp_scl", SMALL, SppSclConfig(modalities="image"), batch)
    with torch.no_grad():
        assert torch.equal(text_head(batch).logits, text_head(changed(batch, maps=None)).logits)
        no_text = changed(batch, cls=None, tokens=None, lengths=None)
        assert torch.equal(image_head(batch).logits, image_head(no_text).logits)
    assert not any(n.startswith(("image.", "cmf.")) for n, _ in text_head.named_parameters())
    with pytest.raises(UserError, match="no image maps"):
        create("spp_scl", SMALL, SppSclConfig())(changed(batch, maps=None))


def test_no_cmf_classifies_the_concatenation():
    head = create("spp_scl", SMALL, SppSclConfig(cmf=False, dim=8))
    assert head.cmf is None and head.classifier[0].in_features == 16
    assert create("spp_scl", SMALL, SppSclConfig(dim=8)).classifier[0].in_features == 32


# --- registry and contract -----------------------------------------------------------


def test_registry_lists_and_creates():
    assert {"spp_scl", "text_only", "image_only", "late_concat"} <= set(available())
    assert isinstance(create("spp_scl", SMALL), nn.Module)


def test_unknown_head_is_a_user_error_naming_the_choices():
    with pytest.raises(UserError, match="spp_scl") as err:
        create("sppscl", SMALL, HeadConfig())
    assert "sppscl" in str(err.value) and "late_concat" in str(err.value)


@pytest.mark.parametrize("cfg, word", [(SppSclConfig(text_layers=5), "text_layers"),
                                       (SppSclConfig(text_layers=0), "text_layers"),
                                       (SppSclConfig(cmf_scope="global"), "cmf_scope"),
                                       (SppSclConfig(modalities="audio"), "modalities"),
                                       (SppSclConfig(alpha=0.0), "alpha"), (SppSclConfig(alpha=-1.0), "alpha")])
def test_bad_config_is_a_user_error(cfg, word):
    with pytest.raises(UserError, match=word):
        create("spp_scl", SMALL, cfg)


def test_train_flags_come_from_the_head_configs():
    by_flag = {f.flag: f for f in heads.flags()}
    assert (by_flag["--alpha"].field, by_flag["--alpha"].kind) == ("alpha", float)
    assert (by_flag["--one-step"].field, by_flag["--one-step"].switch_to) == ("two_step", False)
    assert by_flag["--cmf-scope"].choices == ("batch", "sample")
    assert {"spp_scl", "probe"} <= set(by_flag["--modalities"].heads)  # declared once, in ModalitiesConfig
    given = {"alpha": 0.5, "one_step": True, "no_clm": False, "modalities": None}  # no_clm, modalities: not given
    assert heads.flag_values("spp_scl", given) == {"alpha": 0.5, "two_step": False}
    assert heads.flag_values("probe", {"modalities": "text"}) == {"modalities": "text"}
    with pytest.raises(UserError, match=r"head 'probe' has no option --alpha \(a flag of spp_scl\)"):
        heads.flag_values("probe", {"alpha": 0.5})


def test_a_flag_with_two_meanings_is_refused(monkeypatch):
    from dataclasses import dataclass

    from heads import registry
    from heads.base import opt

    monkeypatch.setattr(registry, "_HEADS", dict(registry._HEADS))  # this head leaves with the test

    @dataclass
    class OtherAlpha(HeadConfig):
        beta: float = opt(1.0, "not SPP-SCL's alpha", flag="--alpha")

    register("other_alpha", config=OtherAlpha)(nn.Module)
    with pytest.raises(ValueError, match="--alpha"):
        heads.flags()


def test_one_modality_caches():
    # stage two reports a missing modality as size 0 in Dims
    image_cache = Dims(text_layers=0, text_width=0, image_channels=16, n_classes=3)
    text_cache = Dims(text_layers=4, text_width=24, image_channels=0, n_classes=3)
    create("spp_scl", image_cache, SppSclConfig(modalities="image"))
    create("image_only", image_cache)
    create("spp_scl", text_cache, SppSclConfig(modalities="text"))
    create("text_only", text_cache)
    for name, dims, word in [("spp_scl", image_cache, "no text"), ("late_concat", image_cache, "no text"),
                             ("text_only", image_cache, "no text"), ("spp_scl", text_cache, "no image"),
                             ("image_only", text_cache, "no image")]:
        with pytest.raises(UserError, match=word):
            create(name, dims)


def test_register_adds_a_head_without_other_edits():
    @register("test_constant")
    class Constant(nn.Module):
        def __init__(self, dims, cfg):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(dims.n_classes))

        def forward(self, batch):
            return HeadOutput(logits=self.bias.expand(len(batch), -1))

    try:
        assert "test_constant" in available()
        out = create("test_constant", SMALL, HeadConfig())(make_batch(SMALL, [1, 2]))
        assert out.logits.shape == (2, 3) and out.extras == {}
    finally:
        heads.registry._HEADS.pop("test_constant")


def test_batch_to_moves_tensors_and_keeps_none():
    batch = changed(make_batch(SMALL, [2, 1]), maps=None)
    moved = batch.to("meta")
    assert moved.maps is None and batch.tokens.device.type == "cpu"
    for name in ("labels", "cls", "tokens", "lengths"):
        assert getattr(moved, name).device.type == "meta"
        assert getattr(moved, name).dtype == getattr(batch, name).dtype


def test_a_switchs_help_says_what_the_flag_does():
    """`--no-ha` reads "plain last cached layer, no HA", not "false: ..." (the field's wording)."""
    for f in heads.flags():
        if f.kind is bool:
            assert not f.summary.startswith(("false:", "true:")), f.summary
            assert f"{f.field}={str(f.switch_to).lower()}" in f.summary
    no_ha = {f.flag: f for f in heads.flags()}["--no-ha"]
    assert no_ha.summary.startswith("plain last cached layer, no HA")


# === the heads beyond SPP-SCL: CLIP-CA-CG, hybrid fusion, linear probe =====================

CLIP = {"full": {}, "no_clip": {"clip": False}, "no_ca": {"ca": False}, "no_cg": {"cg": False},
        "fixed_temperature": {"learn_temperature": False}, "none": {"clip": False, "ca": False, "cg": False}}
HYBRID = {"full": {}, "no_self_attention": {"self_attention": False}, "no_cross_attention": {"cross_attention": False},
          "no_birau": {"birau": False}, "rau_steps=1": {"rau_steps": 1}, "equal_weights": {"dynamic_weights": False},
          "no_decision_fusion": {"decision_fusion": False}}
PROBE = {m: {"modalities": m} for m in ("both", "text", "image")}
CASES = ([("clip_ca_cg", k, v) for k, v in CLIP.items()] + [("hybrid_fusion", k, v) for k, v in HYBRID.items()]
         + [("probe", k, v) for k, v in PROBE.items()])
IDS = [f"{name}-{k}" for name, k, _ in CASES]


def small(name, **values):
    """A small config of head `name` (dim 16 where the head has a shared width)."""
    values = {"dim": 16, **values} if name != "probe" else values
    return build_config(name, values)


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
    head = trained_eval_head(name, SMALL, small(name, **values), batch)
    with torch.no_grad():
        alone = torch.cat([head(sub_batch(batch, [i])).logits for i in range(4)])
        assert torch.allclose(alone, head(batch).logits, atol=1e-5)


def test_real_sizes():
    batch = make_batch(MINILM_EFFNET, [30, 12, 41], hw=7)
    for name in ("clip_ca_cg", "hybrid_fusion", "probe"):
        out = create(name, MINILM_EFFNET)(batch)
        assert out.logits.shape == (3, 3)


# --- the ragged BiGRU and padding ------------------------------------------------------


@pytest.mark.parametrize("lengths", RAGGED_LENGTHS)
def test_ragged_bigru_equals_nn_gru_on_packed_sequences(lengths):
    assert_ragged_rnn_equals_packed(RaggedBiGRU, "gru", lengths,
                                    lambda padded, n: torch.cat([padded[i, :k] for i, k in enumerate(n.tolist())]))


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
    head = trained_eval_head("clip_ca_cg", SMALL, small("clip_ca_cg", lam=1.0), batch)
    with torch.no_grad():
        a = head(batch).logits
        head.mlp_2[0].weight.add_(1.0)  # lam = 1: branch F2 is unused
        assert torch.equal(a, head(batch).logits)
        head.cfg.lam = 0.5
        assert not torch.allclose(a, head(batch).logits)


def test_clip_ca_cg_text_tokens_matter_to_the_attention():
    batch = make_batch(SMALL, [3, 5, 2])
    head = trained_eval_head("clip_ca_cg", SMALL, small("clip_ca_cg"), batch)
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
    out = trained_eval_head("hybrid_fusion", SMALL, small("hybrid_fusion"), batch)(batch)
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
    head = trained_eval_head("hybrid_fusion", SMALL, small("hybrid_fusion"), batch)
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
