"""A run's record of the code and machine that made it, in its config.json.

The fingerprint (a hash of `core/store/`, `heads/` and `train/`) is a record, not a verdict:
whether a run's numbers are the current code's is decided by replaying it (`train/replay.py`),
so a refactor that keeps the numbers keeps the evidence. The machine is recorded because float
kernels, and so the last bits of a number, differ between CPUs and thread counts.
"""

from __future__ import annotations

import hashlib
import platform
from functools import lru_cache

import torch

from core.paths import REPO

SOURCES = ("core/store/*.py", "heads/*.py", "train/*.py")


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """12 hex digits over the paths and bytes of SOURCES (line endings normalised)."""
    h = hashlib.sha256()
    for path in sorted({p for pattern in SOURCES for p in REPO.glob(pattern)}):
        h.update(path.relative_to(REPO).as_posix().encode() + b"\0")
        h.update(path.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()[:12]


def machine() -> dict:
    """What float kernels depend on besides the code: the CPU, torch and the thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads()}
