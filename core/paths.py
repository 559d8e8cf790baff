"""Where things live by default. Every default can be overridden by a flag."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The shipped data sits beside the project, never inside it (it is not ours to copy).
DATA_ROOT_ENV = "SPP_DATA_ROOT"


def default_data_root() -> Path:
    """`$SPP_DATA_ROOT` if set, else `../shared/data` next to the repository."""
    return Path(os.environ.get(DATA_ROOT_ENV, REPO.parent / "shared" / "data"))


DEFAULT_CACHE = Path("cache")
DEFAULT_RUNS = Path("runs")
