"""The search space of `pipeline.py search`, declared once.

A dimension is written as on the command line: `field=lo:hi` (uniform), `field=lo:hi:log`
(log-uniform), or `field=a,b,c` (a choice; one value fixes the field). The trainer's part is
TRAINER_SPACE here; each head declares its own fields worth tuning as its config's `SEARCH`
(heads/*.py), so a new head brings its space along. `--space` adds a field or replaces a
default's range. A trainer or head setting the user gave (`--lr`, `--set dim=64`, a head's
flag) is kept fixed: the default space leaves it out.

Only settings a run is tuned by can be searched: the protocol (which data, which epochs, the
selection and scoring, the seeds) is what makes trials and runs comparable, and is refused.
Each value must be one its field takes (core/cli_fields.py min/max metadata for the trainer's
fields, the head config's `validate()` for the head's).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields, replace

import heads
from core.cli_fields import base_type, out_of_range, parse_value
from core.errors import UserError
from train.config import TrainConfig

# the trainer's fields worth tuning, and their default ranges
TRAINER_SPACE = {"lr": "1e-5:1e-2:log", "weight_decay": "1e-8:1e-2:log", "batch_size": "16,32,64,128"}
# the trainer's fields a search may vary at all; every other TrainConfig field is the protocol
TUNABLE = ("lr", "weight_decay", "batch_size", "lr_step", "lr_gamma", "balanced")


@dataclass(frozen=True)
class Dim:
    """One searched field: a range (`low`..`high`, `log` scale) or a list of `choices`."""

    name: str
    where: str  # "train": a TrainConfig field; "head": a field of the head's config
    kind: type  # int, float, bool or str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial):
        """This dimension's value for an Optuna trial."""
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def spec(self) -> str:
        """As the command line writes it: `1e-05:0.01:log`, `16,32`."""
        if self.choices:
            return ",".join("none" if c is None else str(c).lower() if isinstance(c, bool) else str(c)
                            for c in self.choices)
        return f"{self.low:g}:{self.high:g}" + (":log" if self.log else "")


def _field(name: str, head: str) -> tuple[str, type, dict]:
    """(where, base type, metadata) of field `name`; an unknown or protocol field is one line."""
    train = {f.name: f for f in fields(TrainConfig)}
    if name in TUNABLE:
        return "train", base_type(typing.get_type_hints(TrainConfig)[name]), train[name].metadata
    if name in train:
        raise UserError(f"--space {name}: {name} is part of the protocol (what makes trials and runs comparable), not "
                        f"a setting to tune; set it as for train, and search {', '.join(TUNABLE)} or the head's fields")
    config = heads.config_class(head)
    mine = {f.name: f for f in fields(config)}
    if name not in mine:
        raise UserError(f"--space {name}: no such field; search {', '.join(TUNABLE)} or a field of head {head!r}: "
                        f"{', '.join(mine)}")
    return "head", typing.get_type_hints(config)[name], mine[name].metadata


def parse(item: str, base: TrainConfig) -> Dim:
    """`lr=1e-5:1e-2:log`, `dropout=0:0.5`, `dim=32,64` -> a Dim, every value checked against its field."""
    name, eq, value = item.partition("=")
    name = name.strip().replace("-", "_")
    where, hint, meta = _field(name, base.head)
    if not eq or not value.replace(",", "").strip():
        raise UserError(f"--space {item!r}: give {name}=low:high[:log] or a choice list {name}=a,b,c")
    try:
        dim = _range(name, where, hint, value) if ":" in value else Dim(
            name, where, base_type(hint), choices=tuple(dict.fromkeys(_value(v, hint, name) for v in value.split(",")
                                                                  if v.strip())))
        for v in dim.choices or (dim.low, dim.high):
            why = _refused(dim, v, meta, base)
            if why:
                raise ValueError(f"{name}={v} is outside what {name} takes ({why})")
        if not dim.choices and not dim.low < dim.high:
            raise ValueError(f"low {dim.low} must be below high {dim.high}; one value is {name}={dim.low}")
        if dim.log and dim.low <= 0:
            raise ValueError("a log scale needs low > 0")
    except ValueError as e:
        raise UserError(f"--space {item!r}: {e}") from None
    return dim


def _value(text: str, hint, name: str):
    """One value of field `name` (type `hint`) as the command line writes it."""
    try:
        return parse_value(text.strip(), hint)
    except ValueError:
        kind = getattr(base_type(hint), "__name__", hint)
        raise ValueError(f"{name} takes {kind} values, not {text.strip()!r}") from None


def _range(name: str, where: str, hint, value: str) -> Dim:
    parts = value.split(":")
    log = len(parts) == 3 and parts[2].strip() == "log"
    if base_type(hint) not in (int, float):
        raise ValueError(f"a range needs a number field; give the choices as {name}=a,b")
    if len(parts) != 2 + log:
        raise ValueError("write low:high or low:high:log")
    return Dim(name, where, base_type(hint), _value(parts[0], base_type(hint), name), _value(parts[1], base_type(hint), name), log)


def _refused(dim: Dim, value, meta, base: TrainConfig) -> str | None:
    """Why `value` is no value of the field (None: it is one)."""
    if dim.where == "train":
        return out_of_range(value, meta)
    head_cfg = base.head_config or heads.build_config(base.head)
    try:
        replace(head_cfg, **{dim.name: value}).validate()
    except UserError as e:
        return str(e)
    return None


def space(base: TrainConfig, items: list[str]) -> dict[str, Dim]:
    """The search space of a search from `base`: TRAINER_SPACE and the head's SEARCH, less what the
    user set, then each `--space` item (which adds a field or replaces its default range)."""
    given = set_by_user(base)
    defaults = {**TRAINER_SPACE, **heads.config_class(base.head).SEARCH}
    dims = {name: parse(f"{name}={spec}", base) for name, spec in defaults.items() if name not in given}
    named: list[str] = []
    for item in items:
        dim = parse(item, base)
        if dim.name in named:
            raise UserError(f"--space {item!r}: {dim.name} is given twice; give it once")
        named.append(dim.name)
        dims[dim.name] = dim
    return dims


def set_by_user(base: TrainConfig) -> set[str]:
    """The tunable trainer fields and the head fields `base` holds at other than their defaults."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    given = {name for name in TUNABLE if getattr(base, name) != defaults[name]}
    if base.head_config is not None:
        default = heads.build_config(base.head)
        given |= {k for k, v in dataclasses.asdict(base.head_config).items() if getattr(default, k) != v}
    return given


def apply(base: TrainConfig, params: dict, dims: dict[str, Dim]) -> TrainConfig:
    """`base` with a trial's values: trainer fields set, head fields set on its head config. The
    scoring batch stays the base's (`eval_batch_size` is the protocol: a batch-scope head attends over
    its scoring batch), so a searched `batch_size` moves training alone and every trial, re-score and
    final run is scored like the untuned runs it is compared with."""
    train = {k: v for k, v in params.items() if dims[k].where == "train"}
    head = {k: v for k, v in params.items() if dims[k].where == "head"}
    head_cfg = base.head_config or heads.build_config(base.head)
    return replace(base, **train, head_config=replace(head_cfg, **head),
                   eval_batch_size=base.resolved().eval_batch_size)
