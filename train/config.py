"""Training configuration: one dataclass; `config.json` of a run is this, as written.

Fields left `None` take the per-data-set default of SPEC.md (`resolved()` fills them),
so `--dataset hfm` gets HFM's learning rate, batch size, StepLR step and lambda_ce
without the user repeating them, and the run folder records the values actually used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from core.errors import UserError
from core.paths import DEFAULT_CACHE


@dataclass(frozen=True)
class DatasetDefaults:
    batch_size: int
    lr: float
    lr_step: int
    lambda_ce: float
    select: str


# SPEC.md "Training": paper values (the official code uses lambda_ce 5 and step 10 everywhere).
DEFAULTS = {
    "mvsa_s": DatasetDefaults(64, 1e-4, 10, 5.0, "weighted_f1"),
    "mvsa_m": DatasetDefaults(128, 1e-4, 15, 5.0, "weighted_f1"),
    "hfm": DatasetDefaults(256, 5e-5, 5, 10.0, "macro_f1"),
}
FALLBACK = DEFAULTS["mvsa_s"]  # a user's own manifest trains like MVSA-Single
METRICS = ("accuracy", "weighted_f1", "macro_f1")


@dataclass
class TrainConfig:
    dataset: str = "mvsa_s"
    cache_dir: Path = DEFAULT_CACHE
    text_encoder: str = "minilm"
    image_encoder: str = "efficientnet-lite0"
    head: str = "spp_scl"
    modalities: str = "both"  # text | image | both
    epochs: int = 150
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 1e-6
    lr_step: int | None = None
    lr_gamma: float = 0.5
    lambda_ce: float | None = None
    alpha: float = 2 / 3  # step-two gate
    temperature: float = 0.07
    # ablations (paper tables): each one flag, never a code edit
    two_step: bool = True  # False with --one-step: L_clm joins step one, no gated step
    clm: bool = True  # cross-modal loss at all
    intra: bool = True  # SupCon within each modality (L_cli, L_clt)
    supcon_official: bool = False
    balanced: bool = False  # cross-entropy weighted by inverse class frequency (not in the paper)
    text_views: bool = False  # train on the cached dropout views of the texts (extract --text-views K)
    text_layers: int = 4
    hierarchical_attention: bool = True
    cmf: bool = True
    cmf_scope: str = "batch"
    dim: int = 32
    dropout: float = 0.2
    select: str | None = None  # metric on dev that picks the epoch
    out: Path | None = None

    def resolved(self) -> "TrainConfig":
        d = DEFAULTS.get(self.dataset, FALLBACK)
        cfg = replace(
            self,
            batch_size=self.batch_size or d.batch_size,
            lr=self.lr or d.lr,
            lr_step=self.lr_step or d.lr_step,
            lambda_ce=d.lambda_ce if self.lambda_ce is None else self.lambda_ce,
            select=self.select or d.select,
        )
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.select not in METRICS:
            raise UserError(f"--select {self.select}: use one of {', '.join(METRICS)}")
        if self.modalities not in ("text", "image", "both"):
            raise UserError(f"--modalities {self.modalities}: use text, image or both")
        if self.batch_size < 2:
            raise UserError("--batch-size must be at least 2 (BatchNorm and SupCon need pairs)")
        if not self.seeds:
            raise UserError("--seeds: give at least one seed, e.g. 1,2,3")
        if self.text_views and self.modalities == "image":
            raise UserError("--text-views needs text: use --modalities text or both")

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        kw = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        for k in ("cache_dir", "out"):
            if kw.get(k) is not None:
                kw[k] = Path(kw[k])
        kw["seeds"] = tuple(kw.get("seeds", ()))
        return cls(**kw)

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        return cls.from_json(json.loads(Path(path).read_text())["train"])
