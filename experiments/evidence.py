"""Finished runs as evidence: whether a run's files agree (`check_evidence`, before `results` reads
it), and which committed evidence runs a new run repeats (`evidence_twins`, after `train`).

The run folder itself is train/run_folder.py's (every file is read through `RunFolder`); these
checks are of the layer that uses finished runs, as `results` and the grids do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from core.errors import UserError
from core.paths import REPO
from train.config import METRICS
from train.metrics import mean_std
from train.run_folder import RunFolder


def _refuse(path: Path, what: str, other: Path) -> UserError:
    return UserError(f"{path} disagrees with {other.name} ({what}): the run folder was edited or mixed from two "
                     "runs; restore it from the run that wrote it, or train again")


def check_evidence(run: RunFolder, metrics: dict) -> None:
    """`results` reads a run only when its files agree: metrics.json with every seed-<s>.json (the
    same selected epoch and scores, and the mean/std it holds), and each seed file with log.csv (its
    best_epoch is an argmax row of the dev `select` column, whose dev values it holds to 4 digits).
    A hand-edited or half-copied run is refused naming the file that disagrees."""
    select = metrics.get("select") or run.config()["train"].get("select")
    records = _seeds_agree(run, metrics)
    _summary_agrees(run, metrics, records)
    for seed, record in records.items():
        _log_agrees(run, seed, record, select)


def _seeds_agree(run: RunFolder, metrics: dict) -> dict[int, dict]:
    """Each seed of metrics.json against its seed-<s>.json; returns the seed files' records."""
    records = {}
    for p in metrics["per_seed"]:
        seed = p.get("seed")
        record = records[seed] = run.seed_record(seed)
        path, there = run.path / run.seed_file(seed), run.path / run.METRICS
        if record.get("seed", seed) != seed or record["best_epoch"] != p.get("best_epoch"):
            raise _refuse(path, f"best_epoch {record['best_epoch']} here, {p.get('best_epoch')} there", there)
        for split in ("dev", "test"):
            for m in METRICS:
                a, b = (record.get(split) or {}).get(m), (p.get(split) or {}).get(m)
                if a != b:
                    raise _refuse(path, f"{split} {m} {a} here, {b} there", there)
    return records


def _summary_agrees(run: RunFolder, metrics: dict, records: dict[int, dict]) -> None:
    """metrics.json's mean/std of each split and metric against those of the seed files."""
    for split in ("dev", "test"):
        for m in METRICS:
            recorded = (metrics.get(split) or {}).get(m) or {}
            now = mean_std([r[split][m] for r in records.values()])
            if not all(_close(recorded.get(k), now[k]) for k in ("mean", "std")):
                raise UserError(f"{run.path / run.METRICS} disagrees with its seed files ({split} {m} mean/std "
                                f"{recorded.get('mean')}/{recorded.get('std')}, the seeds give {now['mean']}/"
                                f"{now['std']}): restore it from the run that wrote it, or train again")


def _log_agrees(run: RunFolder, seed: int, record: dict, select: str) -> None:
    """A seed file's selected epoch and dev values against its rows of log.csv."""
    path, log, best = run.path / run.seed_file(seed), run.path / run.LOG, record["best_epoch"]
    rows = run.log_rows(seed)
    try:
        column = [float(r[f"dev_{select}"]) for r in rows]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{log} has no dev_{select} values for seed {seed}: restore it or train again") from None
    if not 1 <= best <= len(rows) or int(rows[best - 1]["epoch"]) != best:
        raise _refuse(path, f"best_epoch {best}, log.csv has epochs 1-{len(rows)} of seed {seed}", log)
    # The trainer selects the first epoch of the highest exact dev value; log.csv holds the values
    # rounded to 4 digits, which can tie epochs that differed: any row of the rounded maximum is
    # accepted (an argmax row), not only the first.
    if column[best - 1] != max(column):
        raise _refuse(path, f"best_epoch {best}, but dev {select} of seed {seed} is higher in epoch "
                            f"{column.index(max(column)) + 1}", log)
    for m in METRICS:
        if f"{record['dev'][m]:.4f}" != rows[best - 1][f"dev_{m}"]:
            raise _refuse(path, f"dev {m} {record['dev'][m]:.4f}, log.csv epoch {best} of seed {seed} holds "
                                f"{rows[best - 1][f'dev_{m}']}", log)


def _close(recorded, now: float) -> bool:
    """A recorded summary number against the one recomputed from the seeds (NaN equals NaN)."""
    if not isinstance(recorded, (int, float)):
        return False
    return (math.isnan(recorded) and math.isnan(now)) or math.isclose(recorded, now, rel_tol=1e-9, abs_tol=1e-12)


# --- the same configuration among the committed evidence ---------------------------------------

EVIDENCE = REPO / "results"
NUMBERLESS = ("out", "cache_dir", "protocol_check", "seeds")  # settings that change no seed's numbers


def _numbers_key(saved: dict) -> str:
    """What decides a seed's numbers: the settings that do, the cache, and the numerics version."""
    train = {k: v for k, v in saved.get("train", {}).items() if k not in NUMBERLESS}
    return json.dumps({"train": train, "provenance": saved.get("provenance"),
                       "numerics_version": saved.get("numerics_version")}, sort_keys=True)


def evidence_twins(out: Path) -> list[str]:
    """One line for each evidence run in results/ (EVIDENCE) trained with the configuration of the
    finished run in `out`: whether the seeds they share have the same numbers (selected epoch, test
    metrics)."""
    run = RunFolder(out)
    key = _numbers_key(run.config())
    mine = {p["seed"]: p for p in run.metrics()["per_seed"]}
    lines = []
    for folder in RunFolder.under(EVIDENCE, depth=2):
        other = folder.path
        if other.resolve() == Path(out).resolve() or not folder.is_finished():
            continue
        try:
            if _numbers_key(folder.config()) != key:
                continue
            theirs = {p["seed"]: p for p in folder.metrics()["per_seed"]}
        except (UserError, KeyError, TypeError):
            continue
        common = sorted(set(mine) & set(theirs))
        if common:
            lines.append(_twin_line(other.relative_to(REPO) if other.is_relative_to(REPO) else other, mine, theirs,
                                    common))
    return lines


def _twin_line(name: Path, mine: dict, theirs: dict, common: list[int]) -> str:
    differ = {s: max(abs(mine[s]["test"][m] - theirs[s]["test"][m]) for m in METRICS) for s in common
              if (mine[s]["test"], mine[s]["best_epoch"]) != (theirs[s]["test"], theirs[s]["best_epoch"])}
    seeds = "" if set(common) == set(theirs) == set(mine) else f" (seeds {', '.join(map(str, common))})"
    if not differ:
        return f"matches {name}: identical{seeds}"
    return (f"compared with {name}{seeds}: seed{'s' * (len(differ) > 1)} {', '.join(map(str, differ))} differ, "
            f"test metrics by up to {max(differ.values()):.4f} (numbers depend on the CPU and the threads per "
            "process; `pipeline.py replay` retrains a seed of it with the current code)")
