"""Hybrid-fusion head after the ITEMI-2025 abstract (papers/itemi2025-hybrid-fusion-abstract.txt).

Data flows top to bottom, one block per sentence of the abstract:

  1. dual channel   per modality a global feature (text: last layer's CLS; image: global
                    average of the map) and local features (text: the real tokens; image:
                    the spatial positions), each by its own Linear into width D.
  2. unimodal SA    self-attention over [global; locals] of each modality; the global
                    token's output h_t / h_i (computed alone: the other rows are unused)
                    feeds a unimodal classifier.
  3. cross-attn     text locals attend to image locals and image locals to text locals
                    (multi-head, LayerNorm residual).
  4. BiRAU + SA     two recurrent attention chains, text->image (state from h_t, reads the
                    cross-attended image locals) and image->text (state from h_i, reads the
                    text locals); each of `rau_steps` steps is s = GRUCell(attend(s, seq), s).
                    Self-attention over [s_ti, s_it, h_t, h_i], mean -> h_m -> multimodal
                    classifier.
  5. decision       p = sum_k w_k softmax(z_k) over k in (text, image, multimodal), with
                    w = softmax(W [h_t, h_i, h_m]) per sample (learned dynamic weights);
                    logits = log p.

The abstract leaves the details open; the choices and why:
- "Self-attention over unimodal global features" would be a softmax over one vector, so the
  global feature is a query token among its modality's locals (a ViT-style CLS token).
- The BiRAU is read as recurrent attention in both directions between the modalities,
  its state a GRU cell (the "recurrent unit"), its query the state: each step re-reads the
  other modality in light of what it has gathered so far. Weights shared across steps.
- Decision fusion mixes probabilities (a mixture of experts), not logits, so a weight is
  the share of a classifier's vote; log p goes out as the logits (argmax and CE work on it).
- Objective: CE on the fused prediction + aux_weight * the mean CE of the three branch
  classifiers, so each branch stays a classifier in its own right (else the weights can
  favour one branch and starve the others). Both terms logged.
- LayerNorm only, attention only within a sample: predictions never see batch mates.
- `dropout` acts on the features, not on attention weights (sampling masks of
  (B * heads, S, S) was a large share of the CPU time).

Ablations: `self_attention=false` (unimodal features = the globals), `cross_attention=false`
(locals as they are), `birau=false` (masked mean of the locals instead of the recurrent
chains), `dynamic_weights=false` (equal weights 1/3), `decision_fusion=false` (the
multimodal classifier alone; the unimodal ones still train through the auxiliary terms).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.cli_fields import option
from core.errors import UserError

from .base import Batch, Dims, Head, HeadConfig, HeadOutput
from .ragged import pad
from .registry import register


@dataclass
class HybridFusionConfig(HeadConfig):
    """Hybrid fusion hyper-parameters; each part of the model can be switched off."""

    dim: int = option(64, "D, the width of every feature; divisible by `heads`")
    heads: int = option(4, "attention heads of every attention block")
    self_attention: bool = option(True, "false: unimodal features are the globals, no self-attention")
    cross_attention: bool = option(True, "false: no image<->text cross-attention")
    birau: bool = option(True, "false: mean of the locals instead of the bidirectional recurrent attention unit")
    rau_steps: int = option(2, "recurrent steps of each BiRAU direction")
    dynamic_weights: bool = option(True, "false: equal decision weights 1/3 instead of learned per-sample ones")
    decision_fusion: bool = option(True, "false: the multimodal classifier alone decides")
    aux_weight: float = option(0.5, "weight of the mean auxiliary CE of the three branch classifiers")

    SEARCH = {"dim": "32,64,128", "dropout": "0:0.5", "aux_weight": "0:1"}  # `pipeline.py search` (dim: by heads)
    ABLATIONS = {"w/o self-attention": {"self_attention": False}, "w/o cross-attention": {"cross_attention": False},
                 "w/o BiRAU": {"birau": False}, "equal decision weights": {"dynamic_weights": False},
                 "w/o decision fusion": {"decision_fusion": False}, "linear probe": {"head": "probe"}}

    def validate(self) -> None:
        super().validate()
        if self.heads < 1:
            raise UserError(f"heads={self.heads}: every attention block needs at least 1 head")
        if self.dim % self.heads:
            raise UserError(f"dim={self.dim}, heads={self.heads}: dim must be divisible by heads")
        if self.rau_steps < 1 or self.aux_weight < 0:
            raise UserError(f"rau_steps={self.rau_steps}, aux_weight={self.aux_weight}: "
                            "need rau_steps >= 1 and aux_weight >= 0")


class Attend(nn.Module):
    """LayerNorm(q + MHA(q, kv, kv)), keys masked to real tokens (mask: (B, S) true = real)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln = nn.LayerNorm(dim)

    def forward(self, q: Tensor, kv: Tensor, mask: Tensor | None = None) -> Tensor:
        pad_mask = None if mask is None else ~mask
        return self.ln(q + self.mha(q, kv, kv, key_padding_mask=pad_mask, need_weights=False)[0])


class RecurrentAttention(nn.Module):
    """One BiRAU direction: s_{k+1} = GRUCell(MHA(s_k, seq, seq), s_k), k < steps."""

    def __init__(self, dim: int, heads: int, steps: int):
        super().__init__()
        self.steps = steps
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cell = nn.GRUCell(dim, dim)

    def forward(self, s: Tensor, seq: Tensor, mask: Tensor | None = None) -> Tensor:
        pad_mask = None if mask is None else ~mask
        for _ in range(self.steps):
            read = self.mha(s[:, None], seq, seq, key_padding_mask=pad_mask, need_weights=False)[0][:, 0]
            s = self.cell(read, s)
        return s


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the real positions of (B, S, D)."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1)


@register("hybrid_fusion", config=HybridFusionConfig)
class HybridFusion(Head):
    """Dual-channel features, unimodal SA, cross-attention, BiRAU, dynamic decision fusion."""

    def __init__(self, dims: Dims, cfg: HybridFusionConfig):
        super().__init__()
        self.cfg = cfg
        d, h, p, k = cfg.dim, cfg.heads, cfg.dropout, dims.n_classes
        # 1. dual channel: global and local per modality
        self.global_t, self.local_t = nn.Linear(dims.text_width, d), nn.Linear(dims.text_width, d)
        self.global_i, self.local_i = nn.Linear(dims.image_channels, d), nn.Linear(dims.image_channels, d)
        self.drop = nn.Dropout(p)
        # 2. unimodal self-attention and classifiers
        if cfg.self_attention:
            self.sa_t, self.sa_i = Attend(d, h), Attend(d, h)
        self.clf_t, self.clf_i = nn.Linear(d, k), nn.Linear(d, k)
        # 3. cross-attention
        if cfg.cross_attention:
            self.t2i, self.i2t = Attend(d, h), Attend(d, h)
        # 4. BiRAU + self-attention, multimodal classifier
        if cfg.birau:
            self.rau_ti, self.rau_it = (RecurrentAttention(d, h, cfg.rau_steps) for _ in range(2))
        self.sa_m = Attend(d, h)
        self.clf_m = nn.Linear(d, k)
        # 5. decision-level weights
        if cfg.decision_fusion and cfg.dynamic_weights:
            self.weights = nn.Linear(3 * d, 3)

    def forward(self, batch: Batch) -> HeadOutput:
        cfg = self.cfg
        batch.require(text=True, image=True)
        # 1. globals (B, D) and locals (B, S, D) / (B, hw, D)
        g_t, g_i = self.drop(self.global_t(batch.cls[:, -1])), self.drop(self.global_i(batch.maps.mean(dim=(2, 3))))
        l_t, mask = pad(self.drop(self.local_t(batch.tokens[:, -1])), batch.lengths)
        l_i = self.drop(self.local_i(batch.maps.flatten(2).transpose(1, 2)))
        # 2. unimodal: h = SA([global; locals])[0]
        if cfg.self_attention:  # only the global token's row is used, so it is the only query
            seq_t, seq_i = torch.cat([g_t[:, None], l_t], 1), torch.cat([g_i[:, None], l_i], 1)
            mask_t = torch.cat([mask.new_ones(len(mask), 1), mask], 1)
            h_t, h_i = self.sa_t(g_t[:, None], seq_t, mask_t)[:, 0], self.sa_i(g_i[:, None], seq_i)[:, 0]
        else:
            h_t, h_i = g_t, g_i
        # 3. cross-attention: text reads image, image reads text
        if cfg.cross_attention:
            l_t, l_i = self.t2i(l_t, l_i), self.i2t(l_i, l_t, mask)
        # 4. BiRAU: text->image chain from h_t over image, image->text chain from h_i over text
        if cfg.birau:
            s_ti, s_it = self.rau_ti(h_t, l_i), self.rau_it(h_i, l_t, mask)
        else:
            s_ti, s_it = masked_mean(l_i, None), masked_mean(l_t, mask)
        tokens = torch.stack([s_ti, s_it, h_t, h_i], 1)
        h_m = self.sa_m(tokens, tokens).mean(dim=1)  # feature-level fusion: SA over the four
        # 5. decision level: p = sum_k w_k softmax(z_k), logits = log p
        z = torch.stack([self.clf_t(h_t), self.clf_i(h_i), self.clf_m(h_m)], 1)  # (B, 3, K)
        if not cfg.decision_fusion:
            logits, w = z[:, 2], None
        else:
            if cfg.dynamic_weights:
                w = torch.softmax(self.weights(torch.cat([h_t, h_i, h_m], 1)), dim=1)  # (B, 3)
            else:
                w = z.new_full(z.shape[:2], 1 / 3)
            logits = torch.logsumexp(torch.log(w)[..., None] + F.log_softmax(z, dim=2), dim=1)
        extras = {"branch_logits": z} if w is None else {"branch_logits": z, "weights": w}
        return HeadOutput(logits=logits, text=h_t, image=h_i, fused=h_m, extras=extras)

    def objective(self, out: HeadOutput, labels: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
        """CE on the decision (log p: cross_entropy's log_softmax leaves it unchanged) +
        aux_weight * mean CE of the text, image and multimodal classifiers."""
        z = out.extras["branch_logits"]
        aux = sum(F.cross_entropy(z[:, j], labels, weight=weight) for j in range(3)) / 3
        return {"ce": F.cross_entropy(out.logits, labels, weight=weight), "aux": self.cfg.aux_weight * aux}
