"""A run folder, read and written here only: what `train` writes and what `eval`, `report`,
`predict` and the grids read back.

    runs/<name>/config.json    the TrainConfig as used (with the head's own config), cache provenance,
                               dims, classes, git commit and whether the working tree was dirty
    runs/<name>/metrics.json   dev/test accuracy, weighted F1, macro F1 as mean/std (sample std, ddof=1)
                               over seeds + per seed; test is label-blind (mean over eval orders);
                               leak_check: the same weights scored in file order (batch-scope heads)
    runs/<name>/log.csv        one row per seed and epoch: lr, each loss term by name, step-two rate, dev
    runs/<name>/protocol.csv   --protocol-check: one row per seed and epoch, test scored in file order
                               (never used for selection; summed up in metrics.json protocol_check)
    runs/<name>/seed-<s>.pt    the dev-selected weights (a plain state dict: loads with weights_only)
    runs/<name>/seed-<s>.json  the seed's scores, written last: the seed is done once it exists
    runs/<name>/seed-<s>.state.pt  while seed s trains: its resumable state after the last finished epoch
                               (weights, optimizer, scheduler, random streams, best epoch, logs; plain
                               tensors and numbers, loads with weights_only); deleted when the seed ends
    runs/<name>/replay.json    `pipeline.py replay`: which code reproduced which seed of the run (train/replay.py)
    runs/<name>/report.txt     per-class report and confusion matrix of each seed on test, in the first
                               label-blind order (metrics.json: the mean over the orders)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import torch

import heads
from core.device import device
from core.errors import UserError
from core.paths import DEFAULT_RUNS, REPO
from core.paths import write_atomic as write_atomic_bytes
from heads.base import Dims
from train import data as cache
from train.config import METRICS, TrainConfig
from train import fingerprint
from train.trainer import SeedResult


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> bool:
    """Uncommitted changes to tracked code: the commit alone does not say what ran."""
    return bool(_git("status", "--porcelain", "--untracked-files=no"))


def config_hash(cfg: TrainConfig) -> str:
    """8 hex digits naming a configuration (the output folder aside): two grid cells started in
    the same second never collide, and the same configuration finds its folder again to resume."""
    body = {k: v for k, v in cfg.to_json().items() if k != "out"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]


def default_out(cfg: TrainConfig, runs_dir: Path = DEFAULT_RUNS) -> Path:
    return Path(runs_dir) / f"{cfg.dataset}-{cfg.head}-{config_hash(cfg)}"


def write_config(out: Path, cfg: TrainConfig, data: cache.Data) -> None:
    """config.json: enough to rebuild the run (settings, cache provenance, dims, classes, code)."""
    sizes = {s: len(v) for s, v in data.splits.items()}
    (out / "config.json").write_text(json.dumps({
        "train": cfg.to_json(), "official_changes": cfg.official_changes(), "provenance": data.provenance.to_json(),
        "dims": asdict(data.dims), "classes": data.classes, "sizes": sizes, "git_commit": git_commit(),
        "git_dirty": git_dirty(), "code_fingerprint": fingerprint.code_fingerprint(), "device": str(device()),
        "machine": fingerprint.machine(),
    }, indent=1))


def save_seed(out: Path, r: SeedResult) -> None:
    save_atomic(r.state, out / f"seed-{r.seed}.pt")
    (out / f"seed-{r.seed}.json").write_text(json.dumps({k: getattr(r, k) for k in SEED_FIELDS}))  # last: done


SEED_FIELDS = ("seed", "best_epoch", "dev", "test", "step_two_rate", "test_pred", "leak_check", "last_epoch_test",
               "protocol_check")


class LogCsv:
    """log.csv: one row per seed and epoch, a `loss_<name>` column per term the head returned.

    A head's terms are known only as it trains (a gated step may first fire in epoch 7), so a
    new column rewrites the file with the wider header; otherwise a row is appended and flushed.
    """

    def __init__(self, path: Path, done: dict, resumed: list):
        """Keeps the finished seeds' rows; an unfinished seed's rows are rewritten from the
        `resumed` epoch logs of its saved state (the file may hold an epoch the state does not)."""
        self.path = path
        self.rows: list[dict] = []
        if done and path.is_file():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if r["seed"] and int(r["seed"]) in done]
        self.rows += [self._row(log) for log in resumed]
        self.header: list[str] = []
        self._rewrite()

    @staticmethod
    def _row(log) -> dict:
        return {"seed": log.seed, "epoch": log.epoch, "lr": f"{log.lr:.3g}",
                **{f"loss_{k}": f"{v:.4f}" for k, v in log.losses.items()},
                "step_two_rate": f"{log.step_two_rate:.3f}", "seconds": f"{log.seconds:.2f}",
                **{f"dev_{m}": f"{log.dev[m]:.4f}" for m in METRICS}}

    def add(self, log) -> None:
        row = self._row(log)
        self.rows.append(row)
        if set(row) - set(self.header):
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.header, restval="").writerow(row)

    @staticmethod
    def _header(keys: set[str]) -> list[str]:
        losses = sorted(k for k in keys if k.startswith("loss_"))
        return ["seed", "epoch", "lr", *losses, "step_two_rate", "seconds", *(f"dev_{m}" for m in METRICS)]

    def _rewrite(self) -> None:
        self.header = self._header({k for r in self.rows for k in r})
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.header, restval="")
            w.writeheader()
            w.writerows(self.rows)
        tmp.replace(self.path)


class ProtocolCsv(LogCsv):
    """protocol.csv (`--protocol-check`): test scored in file order after every epoch, one row per
    seed and epoch, kept and rebuilt on resume as log.csv is. Nothing reads it to select."""

    @staticmethod
    def _row(log) -> dict:
        return {"seed": log.seed, "epoch": log.epoch,
                **{f"test_file_order_{m}": f"{log.test_file_order[m]:.4f}" for m in METRICS}}

    @staticmethod
    def _header(keys: set[str]) -> list[str]:
        return ["seed", "epoch", *(f"test_file_order_{m}" for m in METRICS)]


def finished_seeds(out: Path, cfg: TrainConfig, provenance: cache.CacheProvenance) -> dict[int, SeedResult]:
    """Seeds a previous, interrupted `train --out` of the same configuration completed.

    Resuming is per seed: a seed is done once its `seed-<s>.json` exists (written after its
    weights, so it is the mark of a finished seed; evidence in `results/` keeps the JSON and
    not the weights, and is never trained again). A folder that holds another configuration,
    features from a rebuilt cache or other code (fingerprint) is refused rather than mixed.
    """
    diff = mismatch(out, cfg, provenance)
    if diff:
        raise UserError(f"{out} holds a run with other settings ({'; '.join(diff)}): "
                        "pass another --out, or the same options, cache and code to resume it")
    done = {}
    for seed in cfg.seeds:
        js = out / f"seed-{seed}.json"
        if js.is_file():
            done[seed] = SeedResult(state={}, log=[], **json.loads(js.read_text()))
    return done


def state_path(out: Path, seed: int) -> Path:
    """A seed's resumable state after its last finished epoch (deleted once the seed is done)."""
    return out / f"seed-{seed}.state.pt"


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: Ctrl-C never leaves half a file. Serialized in
    memory first: torch writing to a full disk says only "unexpected pos", Python's write names it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic_bytes(path, buf.getvalue(), tmp=path.with_name(path.name + ".tmp"))


def unfinished_seeds(out: Path, cfg: TrainConfig, done: dict) -> dict[int, dict]:
    """The saved states of seeds that were cut off mid-way (checked like finished seeds, by
    `finished_seeds`, whose settings check covers the whole folder)."""
    return {seed: torch.load(state_path(out, seed), map_location=device(), weights_only=True)
            for seed in cfg.seeds if seed not in done and state_path(out, seed).is_file()}


def epochs_done(out: Path, cfg: TrainConfig) -> tuple[int, int]:
    """(epochs trained, epochs `--patience` skipped) of the run in `out`, from its files alone,
    so a grid can follow runs in other processes: log.csv rows of finished seeds and of a seed
    with a saved state."""
    if not (out / "log.csv").is_file():
        return 0, 0
    with open(out / "log.csv", newline="") as f:
        rows = Counter(r["seed"] for r in csv.DictReader(f))
    trained = skipped = 0
    for seed in cfg.seeds:
        n = rows[str(seed)]
        if (out / f"seed-{seed}.json").is_file():
            trained, skipped = trained + n, skipped + cfg.epochs - n
        elif state_path(out, seed).is_file():
            trained += n
    return trained, skipped


def mismatch(out: Path, cfg: TrainConfig, provenance: cache.CacheProvenance | None = None) -> list[str]:
    """What differs between the run already in `out` and `cfg` (settings, code commit and, given
    the loaded cache's provenance, the cache): a run is only ever resumed by what started it."""
    if not (out / "config.json").is_file():
        return []
    saved = read_config(out)
    before, now = saved.get("train", {}), cfg.to_json()
    diff = [k for k in now if k != "out" and before.get(k) != now[k]]
    if provenance is not None:
        recorded = cache.CacheProvenance.from_json(saved.get("provenance", {}))
        diff += [f"{kind} cache ({'; '.join(d)})" for kind, d in recorded.differences(provenance).items()]
    # the code that trains and scores, decided by what it computes (a replay), not the commit
    if "code_fingerprint" in saved:
        if not vouched(out, saved):
            diff.append(f"code (fingerprint {saved['code_fingerprint']}, now {fingerprint.code_fingerprint()}; "
                        f"commit {str(saved.get('git_commit'))[:10]}: if the code still computes its numbers, "
                        f"`python pipeline.py replay {out}` says so)")
    elif saved.get("git_commit") not in (None, git_commit()):
        diff.append(f"code (commit {saved['git_commit'][:10]}, now {git_commit()[:10]})")
    return diff


def vouched(run: Path, saved: dict | None = None) -> bool:
    """Whether a run's numbers are the current code's: it was trained by code of the current
    fingerprint, or a complete replay by such code is recorded in its replay.json."""
    saved = saved if saved is not None else read_config(run)
    now = fingerprint.code_fingerprint()
    return saved.get("code_fingerprint") == now or any(
        r.get("complete") and r.get("code_fingerprint") == now for r in read_replays(run))


def read_replays(run: Path) -> list[dict]:
    """The replays recorded in a run's replay.json, oldest first ([] when there is none)."""
    path = Path(run) / "replay.json"
    if not path.is_file():
        return []
    try:
        replays = json.loads(path.read_text()).get("replays", [])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"{path} is corrupt ({e}): delete it and run `python pipeline.py replay {run}` again") from None
    return [r for r in replays if isinstance(r, dict)]


def record_replay(run: Path, entry: dict) -> None:
    """Add a replay to replay.json (one entry per code fingerprint and seed: a newer one replaces it)."""
    keep = [r for r in read_replays(run) if (r.get("code_fingerprint"), r.get("seed"), r.get("complete"))
            != (entry["code_fingerprint"], entry["seed"], entry["complete"])]
    write_atomic(Path(run) / "replay.json", json.dumps({"replays": keep + [entry]}, indent=1) + "\n")


def read_csv_rows(path: Path, seed: int) -> list[dict]:
    """The rows of one seed in log.csv or protocol.csv, in epoch order, as the strings written."""
    if not path.is_file():
        raise UserError(f"{path} is missing: the run folder is incomplete")
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("seed") == str(seed)]
    return sorted(rows, key=lambda r: int(r["epoch"]))


def write_atomic(path: Path, text: str) -> None:
    """Write text to a temporary file, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_config(run: Path) -> dict:
    """A run folder's config.json, refused in one line if it is missing or not JSON."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise UserError(f"{run} is not a run folder (no config.json): pass --run runs/<name>")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}): restore it, or delete the run folder and train again") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict):
        raise UserError(f"{path} is not a run's config (no 'train' settings): delete the run folder and train again")
    return saved


def read_run(run: Path) -> tuple[dict, TrainConfig]:
    """config.json and the TrainConfig rebuilt from it, without touching the cache."""
    saved = read_config(run)
    return saved, TrainConfig.from_json(saved["train"])


def load_head(run: Path, cfg: TrainConfig, dims: Dims, seed: int) -> heads.Head:
    """Seed `seed`'s dev-selected head of run folder `run`, in eval mode."""
    path = Path(run) / f"seed-{seed}.pt"
    if not path.is_file():
        done = [s for s in cfg.seeds if (Path(run) / f"seed-{s}.pt").is_file()]
        raise UserError(f"{path} missing: the run was interrupted, is still training or files were removed; "
                        + (f"pick a finished seed with --seed {done[0]}" if done else "train again"))
    head = heads.create(cfg.head, dims, cfg.head_config).to(device())
    head.load_state_dict(torch.load(path, map_location=device(), weights_only=True))
    return head.eval()


def open_run(run: Path, cache_dir: Path | None = None) -> tuple[dict, TrainConfig, cache.Data]:
    """config.json, the TrainConfig rebuilt from it and the cache it was trained on, refused with
    the difference spelled out if the cache was rebuilt since (eval, report and predict read runs so)."""
    saved, cfg = read_run(run)
    if cache_dir is not None:
        cfg.cache_dir = Path(cache_dir)
    data = cache.load_data(replace(cfg, text_views=False))  # test is scored on the clean states only
    recorded = cache.CacheProvenance.from_json(saved["provenance"])
    # the views the run trained on are not loaded, so not compared
    differs = replace(recorded, text_views=0).differences(data.provenance)
    if differs:
        kind, diff = next(iter(differs.items()))
        raise UserError(
            f"the {kind} cache in {cfg.cache_dir} differs from the one this run was trained on "
            f"({'; '.join(diff)}): re-extract with `python pipeline.py extract {cache.extract_source(cfg.dataset)} "
            f"--{kind}-encoder {getattr(recorded, kind).encoder}` or pass the right --cache-dir"
        )
    return saved, cfg, data


# --- the same configuration among the committed evidence ---------------------------------------

EVIDENCE = REPO / "results"
NUMBERLESS = ("out", "cache_dir", "protocol_check", "seeds")  # settings that change no seed's numbers


def _numbers_key(saved: dict) -> str:
    train = {k: v for k, v in saved.get("train", {}).items() if k not in NUMBERLESS}
    return json.dumps({"train": train, "provenance": saved.get("provenance")}, sort_keys=True)


def evidence_twins(out: Path, evidence: Path = EVIDENCE) -> list[str]:
    """One line for each evidence run in `evidence` trained with the configuration of the finished
    run in `out`: whether the seeds they share have the same numbers (selected epoch, test metrics)."""
    saved = read_config(out)
    key = _numbers_key(saved)
    mine = {p["seed"]: p for p in json.loads((Path(out) / "metrics.json").read_text())["per_seed"]}
    lines = []
    for path in sorted(Path(evidence).glob("*/*/config.json")):
        other = path.parent
        if other.resolve() == Path(out).resolve() or not (other / "metrics.json").is_file():
            continue
        try:
            if _numbers_key(json.loads(path.read_text())) != key:
                continue
            theirs = {p["seed"]: p for p in json.loads((other / "metrics.json").read_text())["per_seed"]}
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        common = sorted(set(mine) & set(theirs))
        if not common:
            continue
        name = other.relative_to(REPO) if other.is_relative_to(REPO) else other
        differ = {s: max(abs(mine[s]["test"][m] - theirs[s]["test"][m]) for m in METRICS) for s in common
                  if (mine[s]["test"], mine[s]["best_epoch"]) != (theirs[s]["test"], theirs[s]["best_epoch"])}
        seeds = "" if set(common) == set(theirs) == set(mine) else f" (seeds {', '.join(map(str, common))})"
        if not differ:
            lines.append(f"matches {name}: identical{seeds}")
        else:
            lines.append(f"compared with {name}{seeds}: seed{'s' * (len(differ) > 1)} "
                         f"{', '.join(map(str, differ))} differ, test metrics by up to {max(differ.values()):.4f}"
                         " (numbers depend on the CPU and the threads per process; `pipeline.py replay` checks the code)")
    return lines
