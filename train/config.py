"""Training configuration: one dataclass; `config.json` of a run is this, as written.

Fields left `None` take the per-data-set default of docs/method.md, "Training" (`resolved()` fills them),
so `--dataset hfm` gets HFM's learning rate, batch size and StepLR step without the user
repeating them, and the run folder records the values actually used. The head's own
hyper-parameters live in its config dataclass (`head_config`, see heads/), not here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterable

import heads
from core import store
from core.cli_fields import Flag, build, check_fields, flag_values, flags, option, parse_sets
from core.errors import UserError
from core.defaults import DATASET, IMAGE_ENCODER, TEXT_ENCODER
from core.paths import DEFAULT_CACHE, REPO
from heads.base import HeadConfig
from train import settings_file
from train.defaults import DEFAULTS, FALLBACK, default_help


METRICS = ("accuracy", "weighted_f1", "macro_f1")
# `--official`: the authors' training step (docs/method.md, "More behaviours of the official code");
# the head's part is its config's OFFICIAL.
OFFICIAL = {"lr_step": 10, "eval_batch_size": 64}


def family(dataset: str) -> str:
    """The built-in a data set name stands for: `hfm-first100` (a --limit'ed hfm) -> `hfm`;
    a user's own name -> MVSA-Single's defaults."""
    base = store.split_limit(dataset)[0]
    return base if base in DEFAULTS else FALLBACK


SEEDS = range(2**32)  # what numpy (and so the trainer) takes as a seed


def parse_seeds(text: str) -> tuple[int, ...]:
    """`--seeds 1,2,3` -> (1, 2, 3). A seed given twice is refused: it would count one run twice in the
    mean and std, and in the paired tests."""
    try:
        seeds = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{text!r}: give seeds as 1,2,3") from None
    wrong = [s for s in seeds if s not in SEEDS]
    if wrong:
        raise ValueError(f"{text!r}: seed {wrong[0]}: give seeds from 0 to {SEEDS[-1]}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"{text!r}: seed {', '.join(map(str, twice))} given twice; give each seed once")
    return seeds


def _split_folder(text: str) -> Path:
    """A folder inside the repository relative to it (`splits/mvsa_s_clean`), any other folder
    absolute: config.json (and a grid cell's name, hashed from it) then names the same split files
    whatever folder a command ran in, and a committed run carries no path of the machine it ran on,
    so another clone resumes or replays it as it is. `splits_path` reads it back."""
    path = Path(text).resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def splits_path(folder: Path) -> Path:
    """The split folder a config names, on this machine: a relative one is inside the repository."""
    return REPO / folder


def head_flags() -> list[Flag]:
    """The options of `train` that the registered heads declare on their config fields (`--alpha`)."""
    return flags(heads.configs())


def head_values(head: str, values: dict, sets: Iterable[str] = ()) -> dict:
    """Head `head`'s field values from the heads' flags given in `values` (None: not given) and
    `--set key=value` items (which win over a flag)."""
    config = heads.config_class(head)  # an unknown head is its own error
    return {**flag_values(head, heads.configs(), values),
            **parse_sets(config, sets, owner=f"head {head!r}")}


@dataclass
class TrainConfig:
    """What `train` (and every cell of `ablate` and `sweep`) trains; each `option(...)` field is
    also a command-line option of those commands (core/cli_fields.py)."""

    dataset: str = option(DATASET, "data set name in the cache (built-in or --name of a manifest)", short="-d")
    cache_dir: Path = option(DEFAULT_CACHE, "where caches live")
    text_encoder: str = option(TEXT_ENCODER, "which text cache to read")
    image_encoder: str = option(IMAGE_ENCODER, "which image cache to read")
    head: str = option("spp_scl", "registered head (see `pipeline.py heads`)")
    head_config: HeadConfig | None = None  # the head's own dataclass (--set, a head's flags); None: its defaults
    epochs: int = option(150, "epochs per seed (fewer with --patience)", min=1)
    seeds: tuple[int, ...] = option((1, 2, 3, 4, 5), "comma-separated, each once; results are mean/std over them "
                                    "(a grid trains the same seeds in every cell: the paired test needs them)",
                                    parse=parse_seeds)
    batch_size: int | None = option(None, default_help("batch_size"), min=2)
    lr: float | None = option(None, default_help("lr"), min=0, min_open=True)
    weight_decay: float = option(1e-6, "AdamW weight decay", min=0)
    lr_step: int | None = option(None, f"StepLR step {default_help('lr_step')}", min=1)
    lr_gamma: float = field(default=0.5, metadata={"min": 0, "min_open": True, "max": 1})  # StepLR's decay factor
    balanced: bool = option(False, "weight cross-entropy by inverse class frequency (not in the paper)")
    text_views: bool = option(False, "train on the cached dropout views of the texts (extract --cache-text-views K)")
    select: str | None = option(None, f"dev metric that picks the epoch {default_help('select')}", choices=METRICS)
    # 0 (None once resolved): never. 10 by default: on 20 full-length seeds it moved no test figure beyond noise and saved 71% of the
    # epochs (docs/training.md, "Early stopping"); every evidence run in results/ uses it
    patience: int | None = option(10, "stop a seed once dev has not improved for P epochs; 0: train every epoch",
                                  min=0)
    # label-blind scoring: dev and test are scored in seeded random orders, never in the stored
    # (label-sorted) order; test is the mean over `eval_orders` of them (see scoring.eval_orders)
    eval_orders: int = option(5, "test is the mean over this many seeded random orders (label-blind)", min=1)
    eval_seed: int = 0
    eval_batch_size: int | None = None  # [default: batch_size]
    # see OFFICIAL and the head config's OFFICIAL
    official: bool = option(False, "the authors' training step exactly (docs/method.md; listed in config.json)")
    # never read by the epoch selection or --patience
    protocol_check: bool = option(False, "also score test in file order after every epoch (protocol.csv): "
                                  "what the authors' protocol would report; never selects")
    out: Path | None = option(None, "run folder [default: <runs-dir>/<dataset>-<head>-<hash of the settings>: the same "
                              "settings find their folder again and resume it]")
    splits: Path | None = option(None, "folder of split files {train,dev,test}.txt (ids) from `audit --write-clean` "
                                 "[default: the cache's splits]",
                                 parse=_split_folder)

    @classmethod
    def from_cli(cls, values: dict, sets: Iterable[str] = (), file: Path | None = None,
                 given: Iterable[str] = ()) -> "TrainConfig":
        """The config a command's options give: its fields, a head's shorthand flags (`head_flags()`)
        and `--set key=value` (which wins over a flag). With `file` (`--config`), the settings in it,
        with only the options `given` on the command line over them (train/settings_file.py)."""
        if file is not None:
            return cls._from_file(file, values, set(given), sets)
        head = values.get("head") or cls.head
        return build(cls, values, head_config=heads.build_config(head, head_values(head, values, sets)))

    @classmethod
    def _from_file(cls, path: Path, values: dict, given: set[str], sets: Iterable[str]) -> "TrainConfig":
        """FILE's settings (read and checked by train/settings_file.py) with the options `given` over them."""
        saved = settings_file.read(path, cls)
        settings_file.refuse_other(path, saved, values, given)
        cfg = cls.from_json({k: v for k, v in saved.items() if k != "head_config"})
        options = {f.name for f in fields(cls) if "help" in f.metadata}
        cfg = replace(cfg, **{k: values[k] for k in given if k in options and k in values})
        head_config = settings_file.head_fields(path, cfg.head, saved)
        return replace(cfg, head_config=heads.build_config(cfg.head, {**head_config,
                                                                      **head_values(cfg.head, values, sets)}))

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
        if self.patience is not None and self.patience < 1:
            raise UserError(f"--patience {self.patience}: give at least 1 epoch, or 0 for no early stop")
        check_fields(self)  # each number finite and in its field's range (--lr > 0, --epochs >= 1, ...)
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
        if "seeds" in kw:
            kw["seeds"] = tuple(kw["seeds"])
        if kw.get("head_config") is not None:
            kw["head_config"] = heads.build_config(kw.get("head", "spp_scl"), kw["head_config"])
        return cls(**kw)

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        return cls.from_json(json.loads(Path(path).read_text())["train"])
