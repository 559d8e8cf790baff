"""parse_shard: --shard i/N, torchrun's RANK/WORLD_SIZE, Slurm job arrays, and both engines at once."""

from __future__ import annotations

import pytest

from core.errors import UserError
from core.shards import parse_shard

ENGINE_VARS = ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
               "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_JOB_ID")


@pytest.fixture
def env(monkeypatch):
    """A clean environment (the tests may themselves run inside a Slurm job); set(**vars) adds to it."""
    for name in ENGINE_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
    return set_


def slurm(task_id, count, low=0, step=None):
    out = {"SLURM_ARRAY_TASK_ID": task_id, "SLURM_ARRAY_TASK_COUNT": count, "SLURM_ARRAY_TASK_MIN": low}
    return out if step is None else {**out, "SLURM_ARRAY_TASK_STEP": step}


def test_whole_job_without_flag_or_engine(env):
    assert parse_shard(None) == (0, 1)
    assert parse_shard("") == (0, 1)


def test_flag(env):
    assert parse_shard("1/2") == (1, 2)
    for bad in ("2/2", "1-2", "x/2", "-1/2", "1/0"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


def test_torchrun(env):
    env(RANK=1, WORLD_SIZE=3)
    assert parse_shard(None) == (1, 3)
    assert parse_shard("0/2") == (0, 2)  # the flag wins


@pytest.mark.parametrize("array, expected", [
    (slurm(0, 8), (0, 8)),  # sbatch --array=0-7
    (slurm(7, 8), (7, 8)),
    (slurm(11, 8, low=8), (3, 8)),  # --array=8-15: SLURM_ARRAY_TASK_MIN offsets the index
    (slurm(1, 4, low=1), (0, 4)),  # --array=1-4
    (slurm(6, 4, low=0, step=2), (3, 4)),  # --array=0-6:2
])
def test_slurm_array(env, array, expected):
    env(**array)
    assert parse_shard(None) == expected


def test_every_slurm_task_gets_its_own_share(env):
    shares = set()
    for task in range(10, 14):  # --array=10-13
        env(**slurm(task, 4, low=10))
        shares.add(parse_shard(None))
    assert shares == {(0, 4), (1, 4), (2, 4), (3, 4)}


def test_flag_wins_over_slurm(env):
    env(**slurm(5, 8))
    assert parse_shard("1/2") == (1, 2)


def test_torchrun_inside_slurm_array_tasks(env):
    """2 array tasks x 3 ranks each: 6 processes, 6 different shares of 6."""
    shares = []
    for task in (0, 1):
        for rank in range(3):
            env(**slurm(task, 2), RANK=rank, WORLD_SIZE=3)
            shares.append(parse_shard(None))
    assert sorted(shares) == [(i, 6) for i in range(6)]


@pytest.mark.parametrize("values, message", [
    ({"SLURM_ARRAY_TASK_ID": 3}, "SLURM_ARRAY_TASK_COUNT is not"),
    (slurm("three", 4), "SLURM_ARRAY_TASK_ID='three': expected a whole number"),
    (slurm(5, 4), r"task 5 \(min 0, step 1, count 4\) is not one of an evenly spaced range"),  # --array=0,2,4,5
    (slurm(3, 3, low=0, step=2), "is not one of an evenly spaced range"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "need 0 <= RANK < WORLD_SIZE"),
    ({"RANK": "x"}, "RANK='x'"),
])
def test_bad_engine_variables_are_user_errors(env, values, message):
    env(**values)
    with pytest.raises(UserError, match=message):
        parse_shard(None)
    assert parse_shard("0/1") == (0, 1)  # an explicit --shard is always a way out
