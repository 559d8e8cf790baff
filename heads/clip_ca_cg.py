"""CLIP-CA-CG head (papers/clip-ca-cg-paper.txt, Section III) on cached features.

Data flows top to bottom, one block per section of the paper:

  A. features   text: last cached layer's real tokens -> BiGRU (bigru.py, ragged, no
                padding) -> h_x (Eq. 2), F_T = mean h_x
                (Eq. 3); image: Linear on every position of the map, F_I = their mean
                (Eq. 4; the mean of a Linear is the Linear of the global average pool).
     CLIP       P_I, P_T: linear projections into a shared space, trained by a symmetric
                image-text InfoNCE loss (the `clip` term); F_IT = P_I(F_I) * P_T(F_T) (Eq. 5).
  B. CA         multi-head attention, query F_IT, keys/values the image's spatial
                positions (image side) and the text's BiGRU tokens (text side), with a
                LayerNorm residual onto F_I, F_T (Eqs. 9-10).
  C. CG         F_VT = [F_image-IT, F_text-IT] (Eq. 11); F_mix (Eq. 12) = a gated mix of a
                linear map of [F_IT, F_VT] and a non-linear map of its LayerNorm; then
                F1 = MLP([F_I, F_mix]), F2 = MLP([F_T, F_mix]), F = lam F1 + (1-lam) F2
                (Eqs. 13-15).
  D. classifier logits = Linear(F) (Eq. 16), softmax in the loss.

Choices the paper leaves open (and why):
- The "CLIP model" here is the paper's Eq. 5 on cached features: two trainable linear
  projections and CLIP's symmetric contrastive loss over the batch (we have no CLIP
  weights in the cache). The temperature is learnable as in CLIP (log-parametrised,
  initialised at `temperature`, scale clamped at 100) unless `learn_temperature=false`.
  The loss only shapes training; a prediction never sees its batch mates.
- Keys/values of CA are the local features (image positions, text tokens), not the two
  globals: attention over one global vector would be a constant softmax of 1 and the
  paper speaks of learning "the sequential information of the secondary modality".
- Eq. 12's sigma is read as a gate: g = sigmoid(W_g x), F_mix = g * W_c x + (1 - g) *
  tanh(W_n LN(x)) with x = [F_IT, F_VT] (concatenation path vs normalised non-linear path).
- lambda (Eq. 15) is a fixed hyper-parameter, as in the paper.
- Only LayerNorm, no BatchNorm: every prediction is per sample in any mode.
- `dropout` acts on the features (BiGRU states, image positions, MLPs), not on the
  attention weights.

Ablations (paper Table IV): `clip=false` drops the projections and the loss, F_IT = F_I * F_T
(raw features into the attention); `ca=false` bypasses the attention (F_image-IT = F_I,
F_text-IT = F_T); `cg=false` replaces the gate by concatenation + an encoder
(F_mix = ReLU(W_c [F_IT, F_VT])).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.cli_fields import option
from core.errors import UserError

from .base import Batch, Dims, Head, HeadConfig, HeadOutput
from .bigru import RaggedBiGRU
from .ragged import pad, segment_mean
from .registry import register


@dataclass
class ClipCaCgConfig(HeadConfig):
    """CLIP-CA-CG hyper-parameters; the paper's ablations are `clip`, `ca`, `cg`."""

    dim: int = option(128, "D, the shared width (BiGRU: D/2 per direction); divisible by `heads`")
    clip: bool = option(True, "false: no CLIP projections nor contrastive loss, F_IT = F_I * F_T (w/o CLIP)")
    ca: bool = option(True, "false: no multi-head cross attention (w/o CA)")
    cg: bool = option(True, "false: concatenation + encoder instead of the cross-modal gate (w/o CG)")
    heads: int = option(4, "attention heads of CA")
    lam: float = option(0.5, "lambda of Eq. 15: F = lam F1 + (1 - lam) F2")
    clip_weight: float = option(1.0, "weight of the CLIP contrastive term in the objective")
    temperature: float = option(0.07, "CLIP temperature (the initial value if learn_temperature)")
    learn_temperature: bool = option(True, "learn the CLIP temperature (CLIP's logit scale, clamped at 100)")

    # `pipeline.py search` (dim: choices, even and divisible by the 4 heads)
    SEARCH = {"dim": "64,128,256", "dropout": "0:0.5", "lam": "0:1", "clip_weight": "0.1:10:log",
              "temperature": "0.02:0.2:log"}
    ABLATIONS = {"w/o CLIP": {"clip": False}, "w/o CA": {"ca": False}, "w/o CG": {"cg": False},
                 "linear probe": {"head": "probe"}}
    PAPER = {"mvsa_s": {"full": (0.7538, 0.7521), "w/o CLIP": (0.7365, 0.7336), "w/o CA": (0.7215, 0.7156),
                        "w/o CG": (0.7241, 0.7198)},  # Table IV of the paper
             "mvsa_m": {"full": (0.7395, 0.7383)}}

    def validate(self) -> None:
        super().validate()
        if self.heads < 1:
            raise UserError(f"heads={self.heads}: CA needs at least 1 attention head")
        if self.dim % 2 or self.dim % self.heads:
            raise UserError(f"dim={self.dim}, heads={self.heads}: dim must be even and divisible by heads")
        if not 0.0 <= self.lam <= 1.0:
            raise UserError(f"lam={self.lam}: use a value in [0, 1]")
        if not self.temperature > 0 or self.clip_weight < 0:
            raise UserError(f"temperature={self.temperature}, clip_weight={self.clip_weight}: "
                            "need temperature > 0 and clip_weight >= 0")


def clip_loss(z_image: Tensor, z_text: Tensor, scale: Tensor) -> Tensor:
    """Symmetric image-text InfoNCE of CLIP (Radford et al. 2021).

    z_image, z_text: (B, D) paired embeddings (L2-normalised here); scale: 1 / temperature.
    Row i's positive is column i; the loss is the mean of image->text and text->image CE.
    """
    logits = scale * F.normalize(z_image, dim=1) @ F.normalize(z_text, dim=1).T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def mlp(in_features: int, dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, dim), nn.ReLU(), nn.Dropout(dropout))


@register("clip_ca_cg", config=ClipCaCgConfig)
class ClipCaCg(Head):
    """CLIP-CA-CG: BiGRU text, linear image, CLIP-fused query, cross attention, gated fusion."""

    def __init__(self, dims: Dims, cfg: ClipCaCgConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.dim, cfg.dropout
        # A. features
        self.gru = RaggedBiGRU(dims.text_width, d // 2)
        self.image = nn.Linear(dims.image_channels, d)
        self.drop = nn.Dropout(p)
        # A. CLIP projections and (log) logit scale
        if cfg.clip:
            self.p_i, self.p_t = nn.Linear(d, d), nn.Linear(d, d)
            scale = torch.tensor(math.log(1 / cfg.temperature))
            self.log_scale = nn.Parameter(scale) if cfg.learn_temperature else None
            if not cfg.learn_temperature:
                self.register_buffer("fixed_log_scale", scale)
        # B. cross attention
        if cfg.ca:
            self.mha_i = nn.MultiheadAttention(d, cfg.heads, batch_first=True)
            self.mha_t = nn.MultiheadAttention(d, cfg.heads, batch_first=True)
            self.ln_i, self.ln_t = nn.LayerNorm(d), nn.LayerNorm(d)
        # C. cross-modal gate
        self.concat = nn.Linear(3 * d, d)
        if cfg.cg:
            self.gate, self.norm, self.nonlinear = nn.Linear(3 * d, d), nn.LayerNorm(3 * d), nn.Linear(3 * d, d)
        self.mlp_1, self.mlp_2 = mlp(2 * d, d, p), mlp(2 * d, d, p)
        # D. classifier
        self.classifier = nn.Linear(d, dims.n_classes)

    def forward(self, batch: Batch) -> HeadOutput:
        cfg = self.cfg
        batch.require(text=True, image=True)
        # A. text: BiGRU tokens h_x, F_T = their mean (Eq. 2-3)
        h = self.drop(self.gru(batch.tokens[:, -1], batch.lengths))  # (T, D)
        f_t = segment_mean(h, batch.lengths)
        # A. image: F_I = Linear(F_In) (Eq. 4), per position for CA's keys
        local_i = self.drop(self.image(batch.maps.flatten(2).transpose(1, 2)))  # (B, hw, D)
        f_i = local_i.mean(dim=1)
        # A. CLIP: F_IT = CLIP(F_I) * CLIP(F_T) (Eq. 5)
        extras = {}
        if cfg.clip:
            z_i, z_t = self.p_i(f_i), self.p_t(f_t)
            extras = {"clip_image": z_i, "clip_text": z_t}
        else:
            z_i, z_t = f_i, f_t  # w/o CLIP: the raw features
        f_it = z_i * z_t
        # B. F_image-IT = LN(F_I + MHA(F_IT, image, image)), F_text-IT likewise over tokens (Eq. 9-10)
        if cfg.ca:
            q = f_it[:, None]
            tokens, mask = pad(h, batch.lengths)
            a_i = self.mha_i(q, local_i, local_i, need_weights=False)[0][:, 0]
            a_t = self.mha_t(q, tokens, tokens, key_padding_mask=~mask, need_weights=False)[0][:, 0]
            f_iit, f_tit = self.ln_i(f_i + a_i), self.ln_t(f_t + a_t)
        else:
            f_iit, f_tit = f_i, f_t  # w/o CA
        # C. F_VT = [F_image-IT, F_text-IT] (Eq. 11); x = [F_IT, F_VT]
        x = torch.cat([f_it, f_iit, f_tit], dim=1)
        if cfg.cg:
            # F_mix = g * W_c x + (1 - g) * tanh(W_n Norm(x)), g = sigmoid(W_g x)  (Eq. 12)
            g = torch.sigmoid(self.gate(x))
            f_mix = g * self.concat(x) + (1 - g) * torch.tanh(self.nonlinear(self.norm(x)))
        else:
            f_mix = F.relu(self.concat(x))  # w/o CG: concatenation + encoder
        # F1 = MLP(F_I (+) F_mix), F2 = MLP(F_T (+) F_mix), F = lam F1 + (1 - lam) F2  (Eq. 13-15)
        f_1 = self.mlp_1(torch.cat([f_i, f_mix], dim=1))
        f_2 = self.mlp_2(torch.cat([f_t, f_mix], dim=1))
        fused = cfg.lam * f_1 + (1 - cfg.lam) * f_2
        # D. y = softmax(Linear(F)) (Eq. 16; the softmax is in the cross-entropy)
        return HeadOutput(logits=self.classifier(fused), text=f_t, image=f_i, fused=fused, extras=extras)

    def objective(self, out: HeadOutput, labels: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
        """CE on the logits, plus clip_weight * the symmetric CLIP loss when `clip`."""
        terms = {"ce": F.cross_entropy(out.logits, labels, weight=weight)}
        if self.cfg.clip:
            log_scale = self.log_scale if self.log_scale is not None else self.fixed_log_scale
            scale = log_scale.clamp(max=math.log(100)).exp()  # CLIP: logit scale at most 100
            terms["clip"] = self.cfg.clip_weight * clip_loss(out.extras["clip_image"], out.extras["clip_text"], scale)
        return terms
