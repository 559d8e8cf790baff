"""Which share of a job this process does: `--shard i/N`, else torchrun's RANK/WORLD_SIZE.

Both stages split work the same way (extract: cache shards; ablate/sweep: grid cells), so a
job scales out on an existing engine (torchrun, or N hand-started processes) with no code
of ours for launching.
"""

from __future__ import annotations

import os

from core.errors import UserError


def parse_shard(spec: str | None) -> tuple[int, int]:
    """`--shard i/N`, else torchrun's RANK/WORLD_SIZE, else the whole job: (i, N)."""
    if spec:
        try:
            i, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise UserError(f"--shard {spec!r}: expected i/N, e.g. 0/2") from None
        if not 0 <= i < n:
            raise UserError(f"--shard {spec!r}: need 0 <= i < N")
        return i, n
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
