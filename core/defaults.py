"""Defaults that several stages share, each stated once.

The encoder names are the cache's default key in `extract`, `train`, `audit`, `ablate`
and `sweep` alike; the built-in data set names are what stage one reads and stage two names
in its hints; `per_data_set` writes a table of per-data-set defaults into a help text,
so a `--help` line never restates a number that lives in a table.
"""

TEXT_ENCODER = "minilm"  # the packaged offline MiniLM-L6 (extract/encoders.py)
IMAGE_ENCODER = "efficientnet-lite0"
# `--dataset NAME`, in the order messages list them. Here, not in extract/datasets.py (which pairs each
# with its reader): stage two words its `extract` hints with them and never imports stage one.
BUILTIN_DATASETS = ("mvsa_s", "mvsa_m", "hfm", "tumemo", "mmsd2")
DATASET = "mvsa_s"  # `--dataset` not given: extract (without --manifest), train, ablate, sweep and audit alike


def per_data_set(table: dict[str, object], fallback: str = "mvsa_s") -> str:
    """`{"mvsa_s": 5.0, "mvsa_m": 5.0, "hfm": 10.0}` -> '(default: 5 mvsa_s, mvsa_m; 10 hfm; other data sets as mvsa_s)'.

    Parentheses, not brackets: rich (typer's help, the `heads` table) reads `[...]` as markup."""
    groups: dict[str, list[str]] = {}
    for name, value in table.items():
        groups.setdefault(f"{value:g}" if isinstance(value, float) else str(value), []).append(name)
    values = "; ".join(f"{value} {', '.join(names)}" for value, names in groups.items())
    return f"(default: {values}; other data sets as {fallback})"
