"""Head registry, timm style: a new head is one file with `@register("name")`.

The trainer and the CLI only ever call `create(name, dims, cfg)`, so adding a head
needs no edit anywhere else (ARCHITECTURE.md, rule 3).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from core.errors import UserError

from .base import Dims, HeadConfig

_HEADS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make the head constructible as `create(name, dims, cfg)`."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _HEADS and _HEADS[name] is not cls:
            raise ValueError(f"head name {name!r} is registered twice")
        _HEADS[name] = cls
        return cls

    return add


def available() -> list[str]:
    """Registered head names, sorted."""
    return sorted(_HEADS)


def create(name: str, dims: Dims, cfg: HeadConfig | None = None) -> nn.Module:
    """Build head `name` for cached features of size `dims` (unknown name: UserError)."""
    if name not in _HEADS:
        raise UserError(f"unknown head {name!r}; available heads: {', '.join(available())}")
    cfg = cfg if cfg is not None else HeadConfig()
    cfg.validate()  # the head itself checks dims against what it reads
    return _HEADS[name](dims, cfg)
