"""The contract between the trainer and every head.

The trainer builds a `Batch` from the in-memory cache, calls `head(batch)` and gets a
`HeadOutput`. It adds cross-entropy on `logits`, the SupCon terms on `text` / `image`
(when present) and every tensor in `extra_losses`; heads never compute SupCon
themselves, so one trainer serves them all (ARCHITECTURE.md, rule 3).
`Dims` is read from the cache, so a head adapts to whatever encoders stage one used.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from torch import Tensor

from core.errors import UserError


@dataclass
class Dims:
    """Sizes of the cached features (read from the cache, so any encoder works)."""

    text_layers: int  # L cached layers (e.g. 4)
    text_width: int  # H (384 MiniLM, 768 bert-base)
    image_channels: int  # C (1280 EfficientNet-lite0, 2048 ResNet-50)
    n_classes: int


@dataclass
class HeadConfig:
    """Head hyper-parameters; every paper ablation is a field, not a code edit."""

    dim: int = 32  # D, the shared embedding width
    dropout: float = 0.2
    text_layers: int = 4  # use the last k of the L cached layers (k <= L), Table 6
    hierarchical_attention: bool = True  # False: plain last cached layer (text_layers unused)
    cmf: bool = True  # False: concatenate I_a, T_a (no cross-modal fusion)
    cmf_scope: str = "batch"  # "batch" (paper): BxB attention; "sample": 2 tokens each
    modalities: str = "both"  # "text" | "image" | "both"

    def validate(self) -> None:
        """Raise UserError naming the field and the fix if a field has no meaning."""
        if self.modalities not in ("text", "image", "both"):
            raise UserError(f"modalities={self.modalities!r}: use 'text', 'image' or 'both'")
        if self.cmf_scope not in ("batch", "sample"):
            raise UserError(f"cmf_scope={self.cmf_scope!r}: use 'batch' or 'sample'")
        if self.dim < 1 or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dim={self.dim}, dropout={self.dropout}: need dim >= 1, 0 <= dropout < 1")

    def check(self, dims: Dims) -> None:
        """validate(), plus: the cache holds the modalities and layers this config reads."""
        self.validate()
        require_cached(dims, text=self.uses_text, image=self.uses_image)
        if self.uses_text and not 1 <= self.text_layers <= dims.text_layers:
            raise UserError(
                f"text_layers={self.text_layers}: the cache holds {dims.text_layers} text "
                f"layers; choose 1..{dims.text_layers} or rebuild the cache with more layers"
            )

    @property
    def uses_text(self) -> bool:
        return self.modalities in ("text", "both")

    @property
    def uses_image(self) -> bool:
        return self.modalities in ("image", "both")


def require_cached(dims: Dims, text: bool, image: bool) -> None:
    """Raise UserError if the cache lacks a modality the head reads (its size in Dims is 0)."""
    if text and dims.text_layers == 0:
        raise UserError("this cache has no text features: train with modalities='image' "
                        "(or an image head), or extract the data set with a text encoder")
    if image and dims.image_channels == 0:
        raise UserError("this cache has no image features: train with modalities='text' "
                        "(or a text head), or extract the data set with its images")


@dataclass
class Batch:
    """One training batch as float32 tensors, text kept ragged (no padding anywhere).

    `tokens` holds the real tokens of all samples back to back, so a tweet of 20 tokens
    costs 20 rows whatever else is in the batch; `lengths` says where each one ends.
    """

    labels: Tensor  # (B,) int64
    cls: Tensor | None  # (B, L, H) CLS vectors of the cached layers, oldest first
    tokens: Tensor | None  # (T, L, H) real tokens of all samples (no CLS, SEP last)
    lengths: Tensor | None  # (B,) int64 tokens per sample, sum == T, each >= 1
    maps: Tensor | None  # (B, C, h, w) image feature maps

    def to(self, device) -> "Batch":
        """A Batch with every tensor moved to `device` (None stays None)."""
        return replace(self, **{
            f.name: getattr(self, f.name).to(device=device)  # device only: labels stay int64
            for f in fields(self) if getattr(self, f.name) is not None
        })

    def require(self, text: bool, image: bool) -> None:
        """Raise UserError if a modality the head needs is missing from the cache."""
        if text and (self.tokens is None or self.cls is None or self.lengths is None):
            raise UserError("the batch has no text features: build the cache with a text "
                            "encoder or train with modalities='image'")
        if image and self.maps is None:
            raise UserError("the batch has no image maps: build the cache with an image "
                            "encoder or train with modalities='text'")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class HeadOutput:
    """What a head hands back; the trainer turns it into loss terms."""

    logits: Tensor  # (B, n_classes)
    text: Tensor | None = None  # T_a (B, D): embedding for intra/cross-modal SupCon
    image: Tensor | None = None  # I_a (B, D)
    extra_losses: dict[str, Tensor] = field(default_factory=dict)  # added to step one as-is
