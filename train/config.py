"""Training configuration: one dataclass; `config.json` of a run is this, as written.

Fields left `None` take the per-data-set default of SPEC.md (`resolved()` fills them),
so `--dataset hfm` gets HFM's learning rate, batch size and StepLR step without the user
repeating them, and the run folder records the values actually used. The head's own
hyper-parameters live in its config dataclass (`head_config`, see heads/), not here.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import heads
from core.errors import UserError
from core.defaults import IMAGE_ENCODER, TEXT_ENCODER
from core.paths import DEFAULT_CACHE
from heads.base import HeadConfig
from train.defaults import DEFAULTS, FALLBACK


METRICS = ("accuracy", "weighted_f1", "macro_f1")
# `--official`: the authors' training step (SPEC.md "More behaviours of the official code");
# the head's part is its config's OFFICIAL.
OFFICIAL = {"lr_step": 10, "eval_batch_size": 64}


def family(dataset: str) -> str:
    """The built-in a data set name stands for: `hfm-first100` (a --limit'ed hfm) -> `hfm`;
    a user's own name -> MVSA-Single's defaults."""
    base = re.sub(r"-first\d+$", "", dataset)
    return base if base in DEFAULTS else FALLBACK


@dataclass
class TrainConfig:
    dataset: str = "mvsa_s"
    cache_dir: Path = DEFAULT_CACHE
    text_encoder: str = TEXT_ENCODER
    image_encoder: str = IMAGE_ENCODER
    head: str = "spp_scl"
    head_config: HeadConfig | None = None  # the head's own dataclass; None: its defaults
    epochs: int = 150
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 1e-6
    lr_step: int | None = None
    lr_gamma: float = 0.5
    balanced: bool = False  # cross-entropy weighted by inverse class frequency (not in the paper)
    text_views: bool = False  # train on the cached dropout views of the texts (extract --text-views K)
    select: str | None = None  # metric on dev that picks the epoch
    # stop a seed once dev `select` has not improved for this many epochs (0 or None: never). 10 by
    # default: on 20 full-length seeds it moved no test figure beyond noise and saved 71% of the
    # epochs (README, "Early stopping"); every evidence run in results/ uses it
    patience: int | None = 10
    # label-blind scoring: dev and test are scored in seeded random orders, never in the stored
    # (label-sorted) order; test is the mean over `eval_orders` of them (see scoring.eval_orders)
    eval_orders: int = 5
    eval_seed: int = 0
    eval_batch_size: int | None = None  # [default: batch_size]
    official: bool = False  # the authors' training step; see OFFICIAL and the head config's OFFICIAL
    # also score test in file order after every epoch (protocol.csv): what the authors' protocol
    # would have reported; never read by the epoch selection or --patience
    protocol_check: bool = False
    out: Path | None = None
    splits: Path | None = None  # folder of {train,dev,test}.txt id lists (audit --write-clean); None: the cache's splits

    def resolved(self) -> "TrainConfig":
        d = DEFAULTS[family(self.dataset)]
        head_cfg = self.head_config if self.head_config is not None else heads.build_config(self.head)
        over = dict(OFFICIAL) if self.official else {}
        if self.official:
            head_cfg = replace(head_cfg, **type(head_cfg).OFFICIAL)
        batch_size = self.batch_size if self.batch_size is not None else d.batch_size
        cfg = replace(
            self,
            head_config=head_cfg.resolved(family(self.dataset)),
            batch_size=batch_size,
            lr=self.lr if self.lr is not None else d.lr,
            lr_step=over.get("lr_step", self.lr_step if self.lr_step is not None else d.lr_step),
            eval_batch_size=over.get("eval_batch_size", self.eval_batch_size or batch_size),
            select=self.select or d.select,
            patience=self.patience or None,  # 0: no early stop, recorded as None
        )
        cfg.check()
        return cfg

    def official_changes(self) -> dict:
        """What `--official` set, field by field (written to config.json)."""
        if not self.official:
            return {}
        return {"train": dict(OFFICIAL), "head": dict(type(self.head_config or heads.build_config(self.head)).OFFICIAL),
                "zero_grad": "set_to_none=False: step two's AdamW step moves every parameter",
                "last_epoch_test": "test of the last epoch's weights reported beside the dev-selected one"}

    def check(self) -> None:
        if self.select not in METRICS:
            raise UserError(f"--select {self.select}: use one of {', '.join(METRICS)}")
        if self.batch_size < 2 or self.eval_batch_size < 1:
            raise UserError("--batch-size must be at least 2 (BatchNorm and SupCon need pairs)")
        if not self.lr > 0:
            raise UserError(f"--lr {self.lr}: the learning rate must be > 0")
        if self.patience is not None and self.patience < 1:
            raise UserError(f"--patience {self.patience}: give at least 1 epoch, or 0 for no early stop")
        if self.epochs < 1 or self.eval_orders < 1:
            raise UserError("--epochs and --eval-orders must be at least 1")
        if not self.seeds:
            raise UserError("--seeds: give at least one seed, e.g. 1,2,3")
        self.head_config.validate()
        if self.text_views and not self.head_config.uses_text:
            raise UserError("--text-views needs a head that reads text")

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "head_config":
                v = asdict(v) if v is not None else None
            out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        kw = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        for k in ("cache_dir", "out", "splits"):
            if kw.get(k) is not None:
                kw[k] = Path(kw[k])
        kw["seeds"] = tuple(kw.get("seeds", ()))
        if kw.get("head_config") is not None:
            kw["head_config"] = heads.build_config(kw.get("head", "spp_scl"), kw["head_config"])
        return cls(**kw)

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        return cls.from_json(json.loads(Path(path).read_text())["train"])
