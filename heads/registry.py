"""Head registry, timm style: a new head is one file with `@register("name", config=Cfg)`.

The trainer and the CLI only call `create`, `build_config`, `config_class`, `parse_sets`,
`describe` and `flags`/`flag_values`, so adding a head, its hyper-parameters, their `train`
shorthands and its loss terms needs no edit anywhere else (ARCHITECTURE.md, rules 3 and 4).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Callable

from core.errors import UserError

from .base import Dims, Head, HeadConfig

_HEADS: dict[str, tuple[type[Head], type[HeadConfig]]] = {}


def register(name: str, config: type[HeadConfig] = HeadConfig) -> Callable[[type[Head]], type[Head]]:
    """Class decorator: make the head constructible as `create(name, dims, cfg)`, with `config` as its
    hyper-parameter dataclass (a HeadConfig subclass)."""

    def add(cls: type[Head]) -> type[Head]:
        if name in _HEADS and _HEADS[name][0] is not cls:
            raise ValueError(f"head name {name!r} is registered twice")
        if not (isinstance(config, type) and issubclass(config, HeadConfig)):
            raise TypeError(f"head {name!r}: config must be a HeadConfig subclass")
        _HEADS[name] = (cls, config)
        return cls

    return add


def available() -> list[str]:
    """Registered head names, sorted."""
    return sorted(_HEADS)


def _entry(name: str) -> tuple[type[Head], type[HeadConfig]]:
    if name not in _HEADS:
        raise UserError(f"unknown head {name!r}; available heads: {', '.join(available())}")
    return _HEADS[name]


def config_class(name: str) -> type[HeadConfig]:
    """The config dataclass head `name` registered with."""
    return _entry(name)[1]


def create(name: str, dims: Dims, cfg: HeadConfig | None = None) -> Head:
    """Build head `name` for cached features of size `dims` (unknown name: UserError)."""
    cls, config = _entry(name)
    cfg = cfg if cfg is not None else config()
    if not isinstance(cfg, config):
        raise UserError(f"head {name!r} takes a {config.__name__}, got a {type(cfg).__name__}")
    cfg.check(dims)
    return cls(dims, cfg)


def _hints(config: type[HeadConfig]) -> dict[str, object]:
    return typing.get_type_hints(config)


def _base_kind(kind: object) -> object:
    """`float | None` -> float."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def _default(f: dataclasses.Field) -> object:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


@dataclasses.dataclass(frozen=True)
class Flag:
    """A shorthand option of `pipeline.py train` that heads declare on a config field (`opt(flag=...)`)."""

    flag: str  # "--alpha", "--no-clm"
    field: str  # the config field it sets
    kind: type  # bool: a switch (no value on the command line); else the value's type
    switch_to: object  # the value a switch sets (None for a value flag)
    choices: tuple[str, ...]
    help: str
    heads: tuple[str, ...]  # the heads that declare it

    @property
    def name(self) -> str:
        """The flag as an identifier: "--no-clm" -> "no_clm"."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def summary(self) -> str:
        """What the flag does and the field it sets, for `train --help`. A bool field's help reads
        "false: what false means"; a switch to false says what it does without that prefix."""
        if self.kind is not bool:
            return f"{self.help} ({', '.join(self.heads)}: {self.field})"  # no [...]: rich reads it as markup
        value = str(self.switch_to).lower()
        sets = f"{', '.join(self.heads)}: {self.field}={value}"
        said, colon, does = self.help.partition(": ")
        if colon and said == value:
            return f"{does} ({sets})"
        if colon and said in ("true", "false"):  # the help tells the other value: say the value first
            return f"sets {self.field}={value}; {self.help} ({', '.join(self.heads)})"
        return f"{self.help} ({sets})"


def flags() -> list[Flag]:
    """Every `train` shorthand of every registered head, one per flag name, in registration order.
    A flag several heads declare must set the same field the same way (else ValueError: a coding bug)."""
    found: dict[str, Flag] = {}
    for name, (_, config) in _HEADS.items():
        hints = _hints(config)
        for f in dataclasses.fields(config):
            if "flag" not in f.metadata:
                continue
            kind = _base_kind(hints[f.name])
            switch_to = (not _default(f)) if kind is bool else None
            new = Flag(f.metadata["flag"], f.name, kind, switch_to, f.metadata.get("choices", ()),
                       f.metadata["help"], (name,))
            old = found.get(new.flag)
            if old is None:
                found[new.flag] = new
            elif (old.field, old.kind, old.switch_to, old.choices) != (new.field, new.kind, new.switch_to, new.choices):
                raise ValueError(f"flag {new.flag} of head {name!r} sets {new.field} otherwise than on {old.heads}")
            else:
                found[new.flag] = dataclasses.replace(old, heads=old.heads + (name,))
    return list(found.values())


def flag_values(name: str, given: dict[str, object]) -> dict[str, object]:
    """Field values of head `name` from the shorthands given on the command line.

    `given` maps `Flag.name` to its parsed value (None, or False for a switch: not given).
    A flag that head `name` does not declare is one UserError naming the heads that do.
    """
    config_class(name)  # an unknown head is its own error
    values, wrong = {}, []
    for f in flags():
        value = given.get(f.name)
        if value is None or (value is False and f.kind is bool):
            continue
        if name not in f.heads:
            wrong.append(f"{f.flag} (a flag of {', '.join(f.heads)})")
            continue
        values[f.field] = f.switch_to if f.kind is bool else value
    if wrong:
        keys = sorted(f.name for f in dataclasses.fields(config_class(name)))
        raise UserError(f"head {name!r} has no option {'; '.join(wrong)}: its fields are {', '.join(keys)} "
                        f"(set them with --set key=value)")
    return values


def _parse(value: str, kind: object, key: str):
    """`value` as the field's type: bool, int, float, str, or an optional of one ('none')."""
    if _base_kind(kind) is not kind:  # X | None
        if value.lower() in ("none", "null", ""):
            return None
        kind = _base_kind(kind)
    if kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("a boolean: true or false")
    if kind in (int, float, str):
        return kind(value)
    raise ValueError(f"a {kind}: this field cannot be set from the command line")


def parse_sets(name: str, sets: typing.Iterable[str], option: str = "--set") -> dict[str, object]:
    """`["alpha=0.5", "cmf=false"]` -> typed field values of head `name`'s config (`option`: the flag
    that gave them, for the error).

    An unknown key or a value of the wrong type is one UserError listing the valid keys.
    """
    config = config_class(name)
    hints = _hints(config)
    keys = [f.name for f in dataclasses.fields(config)]
    out = {}
    for item in sets:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in keys:
            raise UserError(f"{option} {item!r}: head {name!r} has no field {key!r}; valid keys: {', '.join(keys)}")
        try:
            out[key] = _parse(value.strip(), hints[key], key)
        except ValueError as e:
            kind = getattr(hints[key], "__name__", str(hints[key]))
            several = "; one value (`sweep --vary key=v1,v2` tries several)" if "," in value else ""
            raise UserError(f"{option} {item!r}: {key} takes a {kind} value{several}; valid keys: {', '.join(keys)}") from None
    return out


def build_config(name: str, values: dict | None = None) -> HeadConfig:
    """Head `name`'s config with `values` set (from `--set`, a CLI flag or config.json)."""
    config = config_class(name)
    keys = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(values or {}) - keys)
    if unknown:
        raise UserError(f"head {name!r} has no field {', '.join(unknown)}; valid keys: {', '.join(sorted(keys))}")
    return config(**(values or {}))


def describe(name: str) -> list[tuple[str, str, str, str, str]]:
    """(field, type, default, help, train flag or "") per config field of head `name` (from `base.opt`)."""
    config = config_class(name)
    hints = _hints(config)
    rows = []
    for f in dataclasses.fields(config):
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        choices = " | ".join(f.metadata.get("choices", ()))
        help = f"{choices}: {f.metadata.get('help', '')}" if choices else f.metadata.get("help", "")
        default = _default(f)
        shown = f"{default:.4g}" if isinstance(default, float) else repr(default)  # 2/3 -> 0.6667
        rows.append((f.name, kind, shown, help, f.metadata.get("flag", "")))
    return rows
