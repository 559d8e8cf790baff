"""Head registry, timm style: a new head is one file with `@register("name", config=Cfg)`.

The trainer and the CLI only call `create`, `build_config`, `config_class`, `configs` and
`describe`, so adding a head, its hyper-parameters, their `train` shorthands (read from its
config by core/cli_fields.py) and its loss terms needs no edit anywhere else (docs/architecture.md,
rules 3 and 4). The registry only registers: it parses no command line.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Callable

from core.cli_fields import field_default, flag_decl
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


def configs() -> dict[str, type[HeadConfig]]:
    """Head name -> its config dataclass, in registration order."""
    return {name: config for name, (_, config) in _HEADS.items()}


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


def build_config(name: str, values: dict | None = None) -> HeadConfig:
    """Head `name`'s config with `values` set (from `--set`, a CLI flag or config.json)."""
    config = config_class(name)
    keys = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(values or {}) - keys)
    if unknown:
        raise UserError(f"head {name!r} has no field {', '.join(unknown)}; valid keys: {', '.join(sorted(keys))}")
    return config(**(values or {}))


def describe(name: str) -> list[tuple[str, str, str, str, str]]:
    """(field, type, default, help, train flag or "") per config field of head `name` (from `option(...)`)."""
    config = config_class(name)
    hints = typing.get_type_hints(config)
    rows = []
    for f in dataclasses.fields(config):
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        choices = " | ".join(f.metadata.get("choices", ()))
        help = f"{choices}: {f.metadata.get('help', '')}" if choices else f.metadata.get("help", "")
        default = field_default(f)
        shown = f"{default:.4g}" if isinstance(default, float) else repr(default)  # 2/3 -> 0.6667
        rows.append((f.name, kind, shown, help, flag_decl(f).replace("/", " / ") if "flag" in f.metadata else ""))
    return rows
