"""The SPP-SCL head (docs/method.md, "Stage two: the SPP-SCL head"), reading only cached encoder features.

Data flows top to bottom: image branch and text branch give I_contra and T_contra,
the align layers give I_a and T_a (the embeddings the SupCon losses use), CMF fuses
them and an MLP classifies M = [I_m, T_m, I_a, T_a]. The head owns its objective:
step one's terms (`objective`) and the gated step two (`second_step`) are at the end
of this file, over the loss functions of losses.py. Every ablation of the paper is a
field of `SppSclConfig`, never a code edit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.cli_fields import option
from core.defaults import per_data_set
from core.errors import UserError

from .base import Batch, Dims, Head, HeadOutput, ModalitiesConfig
from .bilstm import RaggedBiLSTM
from .blocks import align, classifier, projection, qkv
from .losses import cross_supcon, should_pull, supcon
from .registry import register

# lambda_ce per data set (docs/method.md, "Losses and the two-step (semi-push-pull) update": paper 5 / 5 / 10;
# the official code 5 everywhere)
LAMBDA_CE = {"mvsa_s": 5.0, "mvsa_m": 5.0, "hfm": 10.0}


@dataclass
class SppSclConfig(ModalitiesConfig):
    """SPP-SCL hyper-parameters; every paper ablation (Tables 4-7) is one field (`modalities`: Table 7)."""

    text_layers: int = option(4, "hierarchical attention over the last k cached layers (Table 6)", flag="--text-layers")
    hierarchical_attention: bool = option(True, "false: plain last cached layer, no HA (Table 6)", flag="--ha/--no-ha")
    cmf: bool = option(True, "false: concatenate I_a, T_a instead of cross-modal fusion (Table 7)", flag="--cmf")
    cmf_scope: str = option("batch", "batch: B x B attention across the batch (paper); sample: per item",
                         flag="--cmf-scope", choices=("batch", "sample"))
    lambda_ce: float | None = option(None, f"weight of cross-entropy {per_data_set(LAMBDA_CE)}", flag="--lambda-ce")
    temperature: float = option(0.07, "SupCon temperature tau", flag="--temperature")
    alpha: float = option(2 / 3, "step-two gate: pull when c < alpha * c_mask", flag="--alpha")
    two_step: bool = option(True, "false: L_clm joins step one every batch, no gated step (Table 4)", flag="--two-step/--one-step")
    clm: bool = option(True, "false: no cross-modal loss L_clm (Table 5)", flag="--clm")
    intra: bool = option(True, "false: no intra-modal SupCon L_cli, L_clt (Table 5)", flag="--intra")
    supcon_official: bool = option(False, "SupCon as the official code: self logit 0, kept in the denominator",
                                flag="--supcon-official")
    gate_floor: bool = option(False, "the official gate's rounding: pull when c < int(alpha * c_mask)")

    # `train --official`: the authors' code (docs/method.md, "More behaviours of the official code")
    OFFICIAL = {"supcon_official": True, "gate_floor": True, "lambda_ce": 5.0, "alpha": 2 / 3}
    # `pipeline.py search`: the losses' weights, SupCon's temperature and the gate, beside width and dropout
    SEARCH = {**ModalitiesConfig.SEARCH, "temperature": "0.03:0.3:log", "alpha": "0.3:0.95", "lambda_ce": "0.5:20:log"}

    # Tables 4-7 of the paper, and the linear probe every table needs
    ABLATIONS = {
        "one-step": {"two_step": False}, "w/o L_clm": {"clm": False, "slug": "wo-clm"},
        "w/o L_cli,L_clt": {"intra": False, "slug": "wo-intra"},
        "HA last 1": {"text_layers": 1}, "HA last 2": {"text_layers": 2}, "HA last 3": {"text_layers": 3},
        "HA last 4": {}, "no HA": {"hierarchical_attention": False}, "w/o CMF": {"cmf": False},
        "text only": {"modalities": "text"}, "image only": {"modalities": "image"}, "linear probe": {"head": "probe"},
    }
    PAPER = {  # (accuracy, F1) on test; text only = BERT and image only = ResNet-50 of Tables 3 and 7
        "mvsa_s": {"full": (0.8133, 0.8015), "one-step": (0.7956, 0.7684), "w/o L_clm": (0.7289, 0.7040),
                   "w/o L_cli,L_clt": (0.7244, 0.7170), "HA last 1": (0.7133, 0.7025), "HA last 2": (0.8222, 0.8181),
                   "HA last 3": (0.7667, 0.7565), "HA last 4": (0.8133, 0.8015), "w/o CMF": (0.7289, 0.7482),
                   "text only": (0.7111, 0.6970), "image only": (0.6467, 0.6155)},
        "mvsa_m": {"full": (0.7871, 0.7753), "one-step": (0.7276, 0.6929), "w/o L_clm": (0.7688, 0.7500),
                   "w/o L_cli,L_clt": (0.7459, 0.7411), "HA last 1": (0.7282, 0.6840), "HA last 2": (0.5918, 0.5847),
                   "HA last 3": (0.7612, 0.7275), "HA last 4": (0.7871, 0.7753), "w/o CMF": (0.7453, 0.7389),
                   "text only": (0.6759, 0.6624), "image only": (0.6188, 0.6098)},
        "hfm": {"full": (0.9469, 0.9450), "one-step": (0.8800, 0.8765), "w/o L_clm": (0.7812, 0.7753),
                "w/o L_cli,L_clt": (0.9427, 0.9409), "HA last 1": (0.6617, 0.6512), "HA last 2": (0.9311, 0.9293),
                "HA last 3": (0.9402, 0.9385), "HA last 4": (0.9469, 0.9450), "w/o CMF": (0.8117, 0.8260),
                "text only": (0.8389, 0.8326), "image only": (0.7277, 0.7138)},
    }

    def resolved(self, dataset: str) -> "SppSclConfig":
        if self.lambda_ce is not None:
            return self
        from dataclasses import replace

        return replace(self, lambda_ce=LAMBDA_CE.get(dataset, LAMBDA_CE["mvsa_s"]))

    def validate(self) -> None:
        super().validate()
        if not self.temperature > 0:
            raise UserError(f"temperature={self.temperature}: must be > 0 (SupCon divides by it)")
        if not self.alpha > 0:  # c < alpha * c_mask never holds for alpha <= 0: step two would silently never run
            raise UserError(f"alpha={self.alpha}: must be > 0 (to switch the gated step off, set two_step=false: `train --one-step`)")
        if self.lambda_ce is not None and self.lambda_ce < 0:
            raise UserError(f"lambda_ce={self.lambda_ce}: must be >= 0")

    def check(self, dims: Dims) -> None:
        super().check(dims)
        if self.uses_text and not 1 <= self.text_layers <= dims.text_layers:
            raise UserError(
                f"text_layers={self.text_layers}: the cache holds {dims.text_layers} text "
                f"layers; choose 1..{dims.text_layers} or rebuild the cache with more layers"
            )

LSTM_HIDDEN = 64  # per direction -> 128 after the BiLSTM (docs/method.md, "Stage two: the SPP-SCL head")
IMAGE_WIDTH = 128  # channels after the 1x1 conv (docs/method.md, "Stage two: the SPP-SCL head")


class ImageBranch(nn.Module):
    """Conv2d(C, 128, 1x1) -> BN2d -> ReLU -> Dropout -> GAP -> P_I: maps -> I_contra."""

    def __init__(self, channels: int, cfg: SppSclConfig):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, IMAGE_WIDTH, 1), nn.BatchNorm2d(IMAGE_WIDTH),
                                  nn.ReLU(), nn.Dropout(cfg.dropout))
        self.proj = projection(IMAGE_WIDTH, cfg.dim, cfg.dropout)

    def forward(self, maps: Tensor) -> Tensor:
        """maps (B, C, h, w) -> I_contra (B, D)."""
        return self.proj(self.conv(maps).mean(dim=(2, 3)))


class HierarchicalAttention(nn.Module):
    """HA: one weight in (0, 1) per cached layer, from how strongly its CLS fires."""

    def __init__(self, layers: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(layers, layers, bias=False), nn.ReLU(),
                                nn.Linear(layers, layers, bias=False), nn.Sigmoid())

    def forward(self, cls: Tensor) -> Tensor:
        """cls (B, k, H) -> layer weights (B, k)."""
        # HA weights: sigmoid(W2 relu(W1 mean_H(CLS_l)))
        return self.fc(cls.mean(dim=2))


class TextBranch(nn.Module):
    """HA over the last k cached layers -> BiLSTM -> mean over real tokens -> P_T."""

    def __init__(self, dims: Dims, cfg: SppSclConfig):
        super().__init__()
        self.layers = cfg.text_layers if cfg.hierarchical_attention else 1
        self.ha = HierarchicalAttention(self.layers) if cfg.hierarchical_attention else None
        self.lstm = RaggedBiLSTM(dims.text_width, LSTM_HIDDEN)
        self.proj = projection(2 * LSTM_HIDDEN, cfg.dim, cfg.dropout)

    def forward(self, batch: Batch) -> Tensor:
        """Ragged tokens (T, L, H) + CLS (B, L, H) -> T_contra (B, D)."""
        if self.ha is None:
            x = batch.tokens[:, -1]  # no HA: plain last cached layer
        else:
            k = self.layers
            weights = self.ha(batch.cls[:, -k:])  # (B, k)
            per_token = torch.repeat_interleave(weights, batch.lengths, dim=0)  # (T, k)
            # HA weighted sum over layers: x_t = sum_l w_{b(t),l} tokens_{t,l}
            # (a loop over the k layers, not the samples: k fused multiply-adds on (T, H))
            tokens = batch.tokens[:, -k:]
            x = tokens[:, 0] * per_token[:, :1]
            for layer in range(1, k):
                x = torch.addcmul(x, tokens[:, layer], per_token[:, layer:layer + 1])
        return self.proj(self.lstm(x, batch.lengths))


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(Q K^T / sqrt(D)) V over the second-to-last axis; (..., N, D) -> (..., N, D)."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


class CrossModalFusion(nn.Module):
    """CMF: self-attention whose queries and keys are gated by the other modality.

    scope "batch" (paper, official code): the attention is B x B; sample i's I_m mixes
    the V_I(I_a) of every sample in the batch, so a prediction depends on the batch.
    scope "sample": the same gated vectors, but each sample attends only over its own
    two modality tokens. Token 0 = image (query T_a*Q_I(I_a), key T_a*K_I(I_a), value
    V_I(I_a)), token 1 = text (query I_a*Q_T(T_a), key I_a*K_T(T_a), value V_T(T_a)).
    One (B, 2, 2) attention; its image row is I_m, its text row is T_m. Each output is
    then a mix of the sample's own image and text values, and nothing crosses samples.
    """

    def __init__(self, dim: int, dropout: float, scope: str):
        super().__init__()
        self.scope = scope
        self.q_i, self.k_i, self.v_i = (qkv(dim, dropout) for _ in range(3))
        self.q_t, self.k_t, self.v_t = (qkv(dim, dropout) for _ in range(3))

    def forward(self, i_a: Tensor, t_a: Tensor) -> tuple[Tensor, Tensor]:
        """I_a, T_a (B, D) -> I_m, T_m (B, D)."""
        # CMF image side: Q = T_a * Q_I(I_a), K = T_a * K_I(I_a), V = V_I(I_a)
        q_i, k_i, v_i = t_a * self.q_i(i_a), t_a * self.k_i(i_a), self.v_i(i_a)
        # CMF text side, roles swapped: Q = I_a * Q_T(T_a), K = I_a * K_T(T_a), V = V_T(T_a)
        q_t, k_t, v_t = i_a * self.q_t(t_a), i_a * self.k_t(t_a), self.v_t(t_a)
        if self.scope == "batch":
            # CMF: A = softmax(Q K^T / sqrt(D)) (B x B); I_m = A V_I(I_a), T_m likewise
            return attend(q_i, k_i, v_i), attend(q_t, k_t, v_t)
        # CMF per sample: A (B, 2, 2) over the sample's [image, text] tokens
        fused = attend(torch.stack([q_i, q_t], 1), torch.stack([k_i, k_t], 1),
                       torch.stack([v_i, v_t], 1))
        return fused[:, 0], fused[:, 1]


@register("spp_scl", config=SppSclConfig)
class SppSclHead(Head):
    """SPP-SCL head: logits and T_a, I_a; its objective is the semi-push-pull update."""

    def __init__(self, dims: Dims, cfg: SppSclConfig):
        super().__init__()
        cfg.check(dims)
        self.cfg = cfg
        d, p = cfg.dim, cfg.dropout
        if cfg.uses_image:
            self.image = ImageBranch(dims.image_channels, cfg)
            self.align_i = align(d, p)
        if cfg.uses_text:
            self.text = TextBranch(dims, cfg)
            self.align_t = align(d, p)
        both = cfg.uses_text and cfg.uses_image
        self.cmf = CrossModalFusion(d, p, cfg.cmf_scope) if both and cfg.cmf else None
        width = d * (4 if self.cmf is not None else 2 if both else 1)
        self.classifier = classifier(width, dims.n_classes, p)

    def forward(self, batch: Batch) -> HeadOutput:
        i_a = t_a = None
        batch.require(text=self.cfg.uses_text, image=self.cfg.uses_image)
        if self.cfg.uses_image:
            i_a = self.align_i(self.image(batch.maps))
        if self.cfg.uses_text:
            t_a = self.align_t(self.text(batch))
        if self.cmf is not None:
            i_m, t_m = self.cmf(i_a, t_a)
            # CMF output: M = [I_m, T_m, I_a, T_a]
            m = torch.cat([i_m, t_m, i_a, t_a], dim=1)
        else:
            # no CMF: M = [I_a, T_a]; one modality: its own embedding
            m = torch.cat([x for x in (i_a, t_a) if x is not None], dim=1)
        return HeadOutput(logits=self.classifier(m), text=t_a, image=i_a, fused=m)

    # --- the objective (docs/method.md, "Losses and the two-step (semi-push-pull) update") ---

    def objective(self, out: HeadOutput, labels: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
        """Step one: L1 = lambda_ce * CE + SupCon(T_a, y) + SupCon(I_a, y) [+ L_clm, one-step ablation]."""
        cfg = self.cfg
        terms = {"ce": cfg.lambda_ce * F.cross_entropy(out.logits, labels, weight=weight)}
        if cfg.intra:
            # L_clt = SupCon(T_a, y), L_cli = SupCon(I_a, y)
            for name, z in (("clt", out.text), ("cli", out.image)):
                if z is not None:
                    terms[name] = supcon(z, labels, cfg.temperature, official=cfg.supcon_official)
        if self._pulls and not cfg.two_step:
            terms["clm"] = cross_supcon(out.text, out.image, labels, cfg.temperature)  # one-step ablation
        return terms

    @property
    def batch_dependent(self) -> bool:
        return self.cmf is not None and self.cfg.cmf_scope == "batch"

    @property
    def _pulls(self) -> bool:
        return self.cfg.clm and self.cfg.uses_text and self.cfg.uses_image

    @property
    def has_second_step(self) -> bool:
        return self._pulls and self.cfg.two_step

    def second_step(self, out: HeadOutput, labels: Tensor) -> dict[str, Tensor] | None:
        """Step two on a fresh forward: L2 = L_clm(T_a, I_a, y) if the gate opens, else skip."""
        # step two gate: pull when c < alpha * c_mask (S = sigmoid(T_a I_a^T), see losses.pull_gate)
        if not should_pull(out.text, out.image, labels, self.cfg.alpha, floor=self.cfg.gate_floor):
            return None  # aligned enough: push only
        return {"clm": cross_supcon(out.text, out.image, labels, self.cfg.temperature)}
