"""The contract between the trainer and every head.

The trainer builds a `Batch` from the in-memory cache, calls `head(batch)` and gets a
`HeadOutput`; the head's own `objective` turns it into named loss terms, and a head may
declare a gated second step. So a head owns its objective and one trainer serves every
head (docs/architecture.md, rule 3). Each head has its own config dataclass, a subclass of
`HeadConfig`. `Dims` is read from the cache, so a head adapts to whatever encoders
stage one used.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.cli_fields import check_fields, option
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
    """Fields every head has. A head subclasses it with its own hyper-parameters and
    registers the subclass with it (`@register("name", config=MyConfig)`): `--set k=v`,
    `pipeline.py heads` and `config.json` then know the new fields with no edit elsewhere."""

    dim: int = option(32, "D, the width of the embeddings the losses see")
    dropout: float = option(0.2, "dropout probability everywhere in the head")

    # Fields that `train --official` sets (the authors' training step); none by default.
    OFFICIAL: ClassVar[dict] = {}
    # `pipeline.py ablate` rows: name -> field values (or {"head": other head, ...} for a row
    # of another head); the full model is always the first row. A row's folder name (results/*-ablate.sh,
    # `results --paper`) is its name in lower case, 'w/o ' -> 'wo-', spaces and commas -> '-', unless
    # the row gives a better one ({"slug": "wo-intra"}).
    ABLATIONS: ClassVar[dict[str, dict]] = {}
    # The paper's own test numbers per data set and row: {"mvsa_s": {"full": (acc, f1)}}.
    PAPER: ClassVar[dict[str, dict[str, tuple[float, float]]]] = {}
    # `pipeline.py search`: the fields worth tuning and their ranges, as `--space` writes them
    # (`low:high`, `low:high:log`, or choices `a,b,c`; experiments/search_space.py).
    SEARCH: ClassVar[dict[str, str]] = {"dim": "32,64,128", "dropout": "0:0.5"}

    def reads(self) -> tuple[str, ...]:
        """The modalities this head reads: the trainer loads only those caches."""
        return ("text", "image")

    def resolved(self, dataset: str) -> "HeadConfig":
        """Fill per-data-set defaults (`dataset` is the built-in family: mvsa_s, mvsa_m, hfm, or a
        user's name); the base has none."""
        return self

    def validate(self) -> None:
        """Raise UserError naming the field and the fix if a value has no meaning."""
        check_fields(self, as_options=False)  # every float finite: nan or inf is no weight, rate or temperature
        if self.dim < 1 or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dim={self.dim}, dropout={self.dropout}: need dim >= 1, 0 <= dropout < 1")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"{f.name}={getattr(self, f.name)!r}: use "
                                f"{', '.join(repr(c) for c in choices[:-1])} or {choices[-1]!r}")

    def check(self, dims: "Dims") -> None:
        """validate(), plus: the cache holds the modalities this config reads."""
        self.validate()
        require_cached(dims, text="text" in self.reads(), image="image" in self.reads())

    @property
    def uses_text(self) -> bool:
        return "text" in self.reads()

    @property
    def uses_image(self) -> bool:
        return "image" in self.reads()


READS = {"text": ("text",), "image": ("image",), "both": ("text", "image")}  # modalities -> caches read


@dataclass
class ModalitiesConfig(HeadConfig):
    """Base of a head that reads text, image or both as the user picks (SPP-SCL, the probe)."""

    modalities: str = option("both", "which cached features the head reads (the text-only and image-only rows)",
                          flag="--modalities", choices=tuple(READS))

    def reads(self) -> tuple[str, ...]:
        return READS.get(self.modalities, ())


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
    """One training batch, float features (float32 from the cache), text kept ragged (no padding anywhere).

    `tokens` holds the real tokens of all samples back to back, so a tweet of 20 tokens
    costs 20 rows whatever else is in the batch; `lengths` says where each one ends.
    """

    labels: Tensor  # (B,) int64
    cls: Tensor | None  # (B, L, H) CLS vectors of the cached layers, oldest first
    tokens: Tensor | None  # (T, L, H) real tokens of all samples (no CLS, SEP last)
    lengths: Tensor | None  # (B,) int64 tokens per sample, sum == T, each >= 1
    maps: Tensor | None  # (B, C, h, w) image feature maps

    def to(self, device, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "Batch":
        """A Batch with every tensor moved to `device` (None stays None), the float features in
        `dtype` (the run's training dtype; labels and lengths stay int64); `non_blocking` copies
        from pinned memory without waiting (the trainer's batches on a GPU)."""
        return replace(self, **{
            f.name: getattr(self, f.name).to(device=device, non_blocking=non_blocking,
                                             dtype=dtype if getattr(self, f.name).is_floating_point() else None)
            for f in fields(self) if getattr(self, f.name) is not None
        })

    def pin(self) -> "Batch":
        """The Batch in pinned (page-locked) host memory, for a non-blocking copy to a GPU."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory()
                                for f in fields(self) if getattr(self, f.name) is not None})

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
    """What a head's forward hands back: logits, and the embeddings its objective and
    `pipeline.py report` read (T_a, I_a and the fused vector for SPP-SCL)."""

    logits: Tensor  # (B, n_classes)
    text: Tensor | None = None  # text embedding (B, D), e.g. T_a
    image: Tensor | None = None  # image embedding (B, D), e.g. I_a
    fused: Tensor | None = None  # the vector the classifier reads (B, F), for t-SNE plots
    extras: dict[str, Tensor] = field(default_factory=dict)  # anything else the head's own objective needs


class Head(nn.Module):
    """Base of every head: the forward pass and the objective that trains it.

    The trainer sums `objective(...)`'s named terms for step one (and logs each by name),
    and, when `has_second_step` is true, forwards the batch again after step one's update
    and takes a second optimizer step on `second_step(...)`'s terms unless it returns None
    (a gate). It never names a loss or a head (docs/architecture.md rule 3).
    """

    cfg: HeadConfig

    def objective(self, out: HeadOutput, labels: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
        """Step one's named loss terms; the base is plain cross-entropy (`weight`: per-class, or None)."""
        return {"ce": F.cross_entropy(out.logits, labels, weight=weight)}

    @property
    def has_second_step(self) -> bool:
        return False

    @property
    def batch_dependent(self) -> bool:
        """Whether an eval-mode prediction depends on the other items of its batch; the
        trainer then also reports the file-order score (`leak_check`)."""
        return False

    def second_step(self, out: HeadOutput, labels: Tensor) -> dict[str, Tensor] | None:
        """Terms of a second, gated optimizer step on a fresh forward of the same batch; None skips it."""
        return None
