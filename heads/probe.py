"""Linear probe: one nn.Linear on pooled cached features, the reference line of every table.

Text: [mean of the last cached layer's real tokens, the last layer's CLS] (2H);
image: global average of the feature map (C); `modalities` picks text, image or both
(concatenated). No hidden layer, no normalisation, no dropout: what a linear read-out
of the frozen encoders gets. Trained by plain cross-entropy (the base objective).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Batch, Dims, Head, HeadOutput, ModalitiesConfig
from .ragged import segment_mean
from .registry import register


@dataclass
class ProbeConfig(ModalitiesConfig):
    """Linear probe; `dim` and `dropout` are unused (there is only the one linear layer)."""

    SEARCH = {}  # nothing of its own to tune: the trainer's space alone


@register("probe", config=ProbeConfig)
class Probe(Head):
    """logits = W [mean_tokens(L_last), CLS(L_last), GAP(maps)] + b."""

    def __init__(self, dims: Dims, cfg: ProbeConfig):
        super().__init__()
        self.cfg = cfg
        width = (2 * dims.text_width if cfg.uses_text else 0) + (dims.image_channels if cfg.uses_image else 0)
        self.linear = torch.nn.Linear(width, dims.n_classes)

    def forward(self, batch: Batch) -> HeadOutput:
        batch.require(text=self.cfg.uses_text, image=self.cfg.uses_image)
        t = i = None
        if self.cfg.uses_text:  # pooled text: [mean of real tokens, CLS], last cached layer
            t = torch.cat([segment_mean(batch.tokens[:, -1], batch.lengths), batch.cls[:, -1]], dim=1)
        if self.cfg.uses_image:  # pooled image: global average of the map
            i = batch.maps.mean(dim=(2, 3))
        x = torch.cat([z for z in (t, i) if z is not None], dim=1)
        return HeadOutput(logits=self.linear(x), text=t, image=i, fused=x)
