"""Head registry, timm style: a new head is one file with `@register("name", config=Cfg)`.

The trainer and the CLI only call `create`, `build_config`, `config_class`, `parse_sets`
and `describe`, so adding a head, its hyper-parameters and its loss terms needs no edit
anywhere else (ARCHITECTURE.md, rule 3).
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


def _parse(value: str, kind: object, key: str):
    """`value` as the field's type: bool, int, float, str, or an optional of one ('none')."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if args:  # X | None
        if value.lower() in ("none", "null", ""):
            return None
        kind = args[0]
    if kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("a boolean: true or false")
    if kind in (int, float, str):
        return kind(value)
    raise ValueError(f"a {kind}: this field cannot be set from the command line")


def parse_sets(name: str, sets: typing.Iterable[str]) -> dict[str, object]:
    """`["alpha=0.5", "cmf=false"]` -> typed field values of head `name`'s config.

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
            raise UserError(f"--set {item!r}: head {name!r} has no field {key!r}; valid keys: {', '.join(keys)}")
        try:
            out[key] = _parse(value.strip(), hints[key], key)
        except ValueError as e:
            kind = getattr(hints[key], "__name__", str(hints[key]))
            raise UserError(f"--set {item!r}: {key} takes a {kind} value; valid keys: {', '.join(keys)}") from None
    return out


def build_config(name: str, values: dict | None = None) -> HeadConfig:
    """Head `name`'s config with `values` set (from `--set`, a CLI flag or config.json)."""
    config = config_class(name)
    keys = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(values or {}) - keys)
    if unknown:
        raise UserError(f"head {name!r} has no field {', '.join(unknown)}; valid keys: {', '.join(sorted(keys))}")
    return config(**(values or {}))


def describe(name: str) -> list[tuple[str, str, str, str]]:
    """(field, type, default, help) per config field of head `name` (help: `base.opt`'s text)."""
    config = config_class(name)
    hints = _hints(config)
    rows = []
    for f in dataclasses.fields(config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        rows.append((f.name, kind, repr(default), f.metadata.get("help", "")))
    return rows
