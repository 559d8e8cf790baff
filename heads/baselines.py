"""Baselines on the same cache and trainer: text only, image only, late concatenation.

Each pools its features (mean of the last cached layer's real tokens; global average
of the image map), embeds them in the D-dim space and classifies with the SPP-SCL
classifier MLP, trained by plain cross-entropy (the base `Head.objective`): a baseline
adds no loss of its own. Each reads the modalities its name says.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Batch, Dims, Head, HeadConfig, HeadOutput
from .blocks import classifier, embedding
from .ragged import segment_mean
from .registry import register


def pooled_text(batch: Batch):
    """Mean of the last cached layer over each sample's real tokens: (B, H)."""
    return segment_mean(batch.tokens[:, -1], batch.lengths)


def pooled_image(batch: Batch):
    """Global average pool of the feature map: (B, C)."""
    return batch.maps.mean(dim=(2, 3))


@dataclass
class TextOnlyConfig(HeadConfig):
    def reads(self) -> tuple[str, ...]:
        return ("text",)


@dataclass
class ImageOnlyConfig(HeadConfig):
    def reads(self) -> tuple[str, ...]:
        return ("image",)


class _OneModality(Head):
    """Pooled features of one modality -> D-dim embedding -> classifier."""

    modality = ""  # "text" or "image", set by the registered subclasses

    def __init__(self, dims: Dims, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        text = self.modality == "text"
        width = dims.text_width if text else dims.image_channels
        self.embed = embedding(width, cfg.dim, cfg.dropout)
        self.classifier = classifier(cfg.dim, dims.n_classes, cfg.dropout)

    def forward(self, batch: Batch) -> HeadOutput:
        text = self.modality == "text"
        batch.require(text=text, image=not text)
        z = self.embed(pooled_text(batch) if text else pooled_image(batch))
        return HeadOutput(logits=self.classifier(z), fused=z, **{self.modality: z})


@register("text_only", config=TextOnlyConfig)
class TextOnly(_OneModality):
    """Pooled text -> D-dim embedding -> classifier."""

    modality = "text"


@register("image_only", config=ImageOnlyConfig)
class ImageOnly(_OneModality):
    """Pooled image map -> D-dim embedding -> classifier."""

    modality = "image"


@register("late_concat")
class LateConcat(Head):
    """[text embedding, image embedding] -> classifier: fusion with no interaction."""

    def __init__(self, dims: Dims, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_t = embedding(dims.text_width, cfg.dim, cfg.dropout)
        self.embed_i = embedding(dims.image_channels, cfg.dim, cfg.dropout)
        self.classifier = classifier(2 * cfg.dim, dims.n_classes, cfg.dropout)

    def forward(self, batch: Batch) -> HeadOutput:
        batch.require(text=True, image=True)
        t, i = self.embed_t(pooled_text(batch)), self.embed_i(pooled_image(batch))
        fused = torch.cat([i, t], dim=1)
        return HeadOutput(logits=self.classifier(fused), text=t, image=i, fused=fused)
