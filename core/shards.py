"""Which share of a job this process does: `--shard i/N`, else the engine that started it.

Both stages split work the same way (extract: cache shards; ablate/sweep: grid cells), so a
job scales out on an existing engine with no code of ours for launching: torchrun (RANK,
WORLD_SIZE), a Slurm job array (`sbatch --array=0-7`: SLURM_ARRAY_TASK_ID, _COUNT, _MIN,
_STEP), both at once (torchrun inside each array task), or N hand-started processes.
"""

from __future__ import annotations

import os

from core.errors import UserError


def parse_shard(spec: str | None) -> tuple[int, int]:
    """`--shard i/N`, else the Slurm array task and torchrun rank combined, else the whole job: (i, N).

    An explicit --shard wins. Array task t of T running torchrun rank r of W does share
    t * W + r of T * W, so every process of every task gets its own share."""
    if spec:
        try:
            i, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise UserError(f"--shard {spec!r}: expected i/N, e.g. 0/2") from None
        if not 0 <= i < n:
            raise UserError(f"--shard {spec!r}: need 0 <= i < N")
        return i, n
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE (or pass --shard i/N)")
    task, tasks = _slurm_array()
    return task * world + rank, tasks * world


def _slurm_array() -> tuple[int, int]:
    """(index, count) of this Slurm array task; (0, 1) outside an array job.

    Slurm numbers tasks as the --array range says (`--array=8-15`, `--array=0-14:2`): the index is
    (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP, out of SLURM_ARRAY_TASK_COUNT."""
    if os.environ.get("SLURM_ARRAY_TASK_ID", "").strip() == "":
        return 0, 1
    task_id = _env_int("SLURM_ARRAY_TASK_ID", 0)
    count = _env_int("SLURM_ARRAY_TASK_COUNT", 0)
    low, step = _env_int("SLURM_ARRAY_TASK_MIN", 0), _env_int("SLURM_ARRAY_TASK_STEP", 1)
    if count < 1:
        raise UserError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: run under "
                        "`sbatch --array=0-N`, or pass --shard i/N")
    index, off = divmod(task_id - low, max(step, 1))
    if off or not 0 <= index < count:
        raise UserError(f"Slurm array task {task_id} (min {low}, step {step}, count {count}) is not one of an "
                        "evenly spaced range: use --array=A-B or A-B:S, or pass --shard i/N")
    return index, count


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r}: expected a whole number (or pass --shard i/N)") from None
