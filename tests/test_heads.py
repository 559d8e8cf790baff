"""heads/: the Batch -> HeadOutput contract, packing, CMF scope, ablations, registry."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

import heads
from core.errors import UserError
from heads import Batch, Dims, HeadConfig, HeadOutput, available, create, register
from heads.spp_scl import SppSclConfig
from heads.bilstm import RaggedBiLSTM
from heads.losses import supcon
from heads.ragged import pack_plan, segment_mean


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


@pytest.mark.parametrize("lengths", [[4, 9, 1, 9, 2, 6], [5], [3, 3, 3], [1, 1, 2]])
def test_ragged_bilstm_equals_nn_lstm_on_packed_sequences(lengths):
    torch.manual_seed(0)
    lengths = torch.tensor(lengths)
    m = RaggedBiLSTM(7, 5).double()
    x = torch.randn(int(lengths.sum()), 7, dtype=torch.float64, requires_grad=True)
    packed = pack_sequence(list(torch.split(x, lengths.tolist())), enforce_sorted=False)
    out, _ = m.lstm(packed)
    padded, _ = pad_packed_sequence(out, batch_first=True)  # zeros after each end
    reference = padded.sum(1) / lengths[:, None]
    ours = m(x, lengths)
    assert torch.allclose(ours, reference, atol=1e-12)
    w = torch.randn_like(ours)  # any downstream loss
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad((ours * w).sum(), params),
                    torch.autograd.grad((reference * w).sum(), params)):
        assert torch.allclose(a, b, atol=1e-12)


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
    from train.config import head_flags, head_values

    by_flag = {o: f for f in head_flags() for o in f.opts}
    assert (by_flag["--alpha"].field, by_flag["--alpha"].kind) == ("alpha", float)
    assert by_flag["--one-step"] is by_flag["--two-step"] and by_flag["--one-step"].field == "two_step"
    assert by_flag["--cmf-scope"].choices == ("batch", "sample")
    assert {"spp_scl", "probe"} <= set(by_flag["--modalities"].owners)  # declared once, in ModalitiesConfig
    given = {"alpha": 0.5, "two_step": False, "clm": None, "modalities": None}  # clm, modalities: not given
    assert head_values("spp_scl", given) == {"alpha": 0.5, "two_step": False}
    assert head_values("spp_scl", {"cmf": True}) == {"cmf": True}  # the on side, given, is a value too
    assert head_values("probe", {"modalities": "text"}) == {"modalities": "text"}
    with pytest.raises(UserError, match=r"head 'probe' has no option --alpha \(a flag of spp_scl\)"):
        head_values("probe", {"alpha": 0.5})
    with pytest.raises(UserError, match=r"head 'probe' has no option --no-cmf \(a flag of spp_scl\)"):
        head_values("probe", {"cmf": False})


def test_a_flag_with_two_meanings_is_refused(monkeypatch):
    from dataclasses import dataclass

    from core.cli_fields import option
    from heads import registry
    from train.config import head_flags

    monkeypatch.setattr(registry, "_HEADS", dict(registry._HEADS))  # this head leaves with the test

    @dataclass
    class OtherAlpha(HeadConfig):
        beta: float = option(1.0, "not SPP-SCL's alpha", flag="--alpha")

    register("other_alpha", config=OtherAlpha)(nn.Module)
    with pytest.raises(ValueError, match="--alpha"):
        head_flags()


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
    """`--ha / --no-ha` reads "--no-ha: plain last cached layer, no HA", not "false: ..." (the field's
    wording), and shows its default: the side that is on unless given."""
    from train.config import head_flags

    for f in head_flags():
        if f.kind is bool:
            assert not f.summary.startswith(("false:", "true:")), f.summary
            assert f.shown_default == f.opts[not f.default].lstrip("-")
    ha = {o: f for f in head_flags() for o in f.opts}["--no-ha"]
    assert ha.summary.startswith("--no-ha: plain last cached layer, no HA") and ha.shown_default == "ha"
