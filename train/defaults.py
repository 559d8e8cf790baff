"""Per-data-set training defaults (docs/method.md, "Training"), in a module light enough for the CLI to
import at start-up: `train --help` prints them from this table, never from a copy."""

from __future__ import annotations

from dataclasses import dataclass

from core.defaults import per_data_set


@dataclass(frozen=True)
class DatasetDefaults:
    batch_size: int
    lr: float
    lr_step: int
    select: str


# docs/method.md, "Training": paper values (the official code uses StepLR step 10 everywhere).
DEFAULTS = {
    "mvsa_s": DatasetDefaults(64, 1e-4, 10, "weighted_f1"),
    "mvsa_m": DatasetDefaults(128, 1e-4, 15, "weighted_f1"),
    "hfm": DatasetDefaults(256, 5e-5, 5, "macro_f1"),
}
FALLBACK = "mvsa_s"  # a user's own manifest trains like MVSA-Single


def default_help(field: str) -> str:
    """'(default: 64 mvsa_s; 128 mvsa_m; ...)' for a field of DatasetDefaults."""
    return per_data_set({name: getattr(d, field) for name, d in DEFAULTS.items()}, FALLBACK)
