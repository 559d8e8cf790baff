"""A fingerprint of the code that trains and scores, recorded in every run's config.json.

Why not the git commit: a commit changes with every README edit, so evidence made
before a typo fix would look stale. What decides a number is the code that loads the
cache, builds the heads, trains and scores: `core/store.py`, `heads/` and `train/`.
`pipeline.py results` refuses to compare rows whose fingerprints differ.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from core.paths import REPO

SOURCES = ("core/store.py", "heads/*.py", "train/*.py")


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """12 hex digits over the paths and bytes of SOURCES (line endings normalised)."""
    h = hashlib.sha256()
    for path in sorted({p for pattern in SOURCES for p in REPO.glob(pattern)}):
        h.update(path.relative_to(REPO).as_posix().encode() + b"\0")
        h.update(path.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()[:12]
