"""A run folder, read and written here only (docs/architecture.md rule 4): what `train` writes and what
`eval`, `report`, `predict`, `replay`, `results` and the grids read back, all through one object,
`RunFolder`, opened once per command.

    runs/<name>/config.json    the TrainConfig as used (with the head's own config), cache provenance,
                               dims, classes, the numerics version (train/numerics.py: what `results`,
                               resume and the grids check), and as a record the git commit, whether
                               the working tree was dirty, and the machine
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
    runs/<name>/report.txt     per-class report and confusion matrix of each seed on test, in the first
                               label-blind order (metrics.json: the mean over the orders)
    runs/<name>/writer.lock    while a train or grid cell writes the folder, or a replay compares with it:
                               who (pid, host); held with flock, so a leftover of a process that died
                               blocks nothing

Trust (docs/architecture.md rule 9): one writer at a time (`RunFolder.writer`), every file a reader may
see written to a temporary file and renamed, `train --out` never writes into a folder of other
files (`check_out`), and `results` reads a run only when its files agree (experiments/evidence.py).
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import pickle
import socket
import subprocess
import time
import zipfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch

import heads
from core.device import device
from core.errors import UserError
from core.paths import DEFAULT_RUNS, REPO, make_dir, write_atomic
from heads.base import Dims
from train import data as cache
from train.config import METRICS, TrainConfig
from train import fingerprint, numerics
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


SEED_FIELDS = ("seed", "best_epoch", "dev", "test", "step_two_rate", "test_pred", "leak_check", "last_epoch_test",
               "protocol_check")


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: Ctrl-C never leaves half a file. Serialized in
    memory first: torch writing to a full disk says only "unexpected pos", Python's write names it.
    The temp file is `<file>.tmp`, not one per process: the folder has one writer at a time, so the
    megabytes a killed one left are overwritten by the next save, never piled up."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue(), tmp=path.with_name(path.name + ".tmp"))


class LogCsv:
    """log.csv: one row per seed and epoch, a `loss_<name>` column per term the head returned.

    A head's terms are known only as it trains (a gated step may first fire in epoch 7), so the
    header is made from every row so far. Each epoch rewrites the whole file to a temporary one and
    renames it (a few hundred rows): a grid following the run from another process never reads
    half a row.
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
        self._rewrite()

    @staticmethod
    def _row(log) -> dict:
        return {"seed": log.seed, "epoch": log.epoch, "lr": f"{log.lr:.3g}",
                **{f"loss_{k}": f"{v:.4f}" for k, v in log.losses.items()},
                "step_two_rate": f"{log.step_two_rate:.3f}", "seconds": f"{log.seconds:.2f}",
                **{f"dev_{m}": f"{log.dev[m]:.4f}" for m in METRICS}}

    def add(self, log) -> None:
        self.rows.append(self._row(log))
        self._rewrite()

    @staticmethod
    def _header(keys: set[str]) -> list[str]:
        losses = sorted(k for k in keys if k.startswith("loss_"))
        return ["seed", "epoch", "lr", *losses, "step_two_rate", "seconds", *(f"dev_{m}" for m in METRICS)]

    def _rewrite(self) -> None:
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, self._header({k for r in self.rows for k in r}), restval="")
        w.writeheader()
        w.writerows(self.rows)
        write_atomic(self.path, text.getvalue())


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


class RunFolder:
    """One run folder and every read and write of its files (the names are known here alone).

    Opened once per command and passed along: `train` plans and writes through it, `eval`,
    `report`, `predict`, `replay`, `results` and the grids read through it. Cheap to make (a path;
    config.json is read on first use and kept), and picklable, so a worker process gets it too.
    """

    CONFIG, METRICS, LOG, PROTOCOL = "config.json", "metrics.json", "log.csv", "protocol.csv"
    REPORT, LOCK, ROBUSTNESS = "report.txt", "writer.lock", "robustness.json"

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._saved: dict | None = None  # config.json, once read or written

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @staticmethod
    def seed_file(seed: int) -> str:
        """The name of a seed's scores, the mark of a finished seed (for messages that name it)."""
        return f"seed-{seed}.json"

    def _weights(self, seed: int) -> Path:
        return self.path / f"seed-{seed}.pt"

    def _state(self, seed: int) -> Path:
        """A seed's resumable state after its last finished epoch (deleted once the seed is done)."""
        return self.path / f"seed-{seed}.state.pt"

    @classmethod
    def under(cls, parent: Path, depth: int = 1) -> list[RunFolder]:
        """The run folders `depth` levels below `parent` (a set of runs, or results/<set>/<run>), by name."""
        return [cls(p.parent) for p in sorted(Path(parent).glob("*/" * depth + cls.CONFIG))]

    # --- config.json ------------------------------------------------------------------------

    def is_run(self) -> bool:
        return (self.path / self.CONFIG).is_file()

    def config(self) -> dict:
        """config.json, refused in one line if it is missing or not JSON."""
        if self._saved is None:
            path = self.path / self.CONFIG
            if not path.is_file():
                raise UserError(f"{self.path} is not a run folder (no config.json): give one that train wrote, e.g. runs/<name>")
            try:
                saved = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{path} is corrupt ({e}): restore it, or delete the run folder and train again") from None
            if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict):
                raise UserError(f"{path} is not a run's config (no 'train' settings): delete the run folder and "
                                "train again")
            self._saved = saved
        return self._saved

    def read_run(self) -> tuple[dict, TrainConfig]:
        """config.json and the TrainConfig rebuilt from it, without touching the cache."""
        saved = self.config()
        return saved, TrainConfig.from_json(saved["train"])

    def write_config(self, cfg: TrainConfig, data: cache.Data) -> None:
        """config.json: enough to rebuild the run (settings, cache provenance, dims, classes, code)."""
        sizes = {s: len(v) for s, v in data.splits.items()}
        saved = {
            "train": cfg.to_json(), "official_changes": cfg.official_changes(), "provenance": data.provenance.to_json(),
            "dims": asdict(data.dims), "classes": data.classes, "sizes": sizes, "git_commit": git_commit(),
            "git_dirty": git_dirty(), "numerics_version": numerics.NUMERICS_VERSION, "device": str(device()),
            "machine": fingerprint.machine(),
        }
        write_atomic(self.path / self.CONFIG, json.dumps(saved, indent=1))
        self._saved = json.loads(json.dumps(saved))  # as a reader would see it

    def open(self, cache_dir: Path | None = None) -> tuple[dict, TrainConfig, cache.Data]:
        """config.json, the TrainConfig rebuilt from it and the cache it was trained on, refused with
        the difference spelled out if the cache was rebuilt since (eval, report and predict read runs so)."""
        saved, cfg = self.read_run()
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

    def mismatch(self, cfg: TrainConfig, provenance: cache.CacheProvenance | None = None) -> list[str]:
        """What differs between the run already here and `cfg` (settings, numerics version and, given the
        loaded cache's provenance, the cache): a run is only ever resumed by what started it."""
        if not self.is_run():
            return []
        saved = self.config()
        before, now = saved["train"], cfg.to_json()
        diff = [k for k in now if k != "out" and before.get(k) != now[k]]
        if provenance is not None:
            recorded = cache.CacheProvenance.from_json(saved.get("provenance", {}))
            diff += [f"{kind} cache ({'; '.join(d)})" for kind, d in recorded.differences(provenance).items()]
        # the arithmetic that trains and scores: the numerics version, not the commit (a record only)
        if (made := numerics.made_by(saved)) is not None:
            diff.append(f"numerics version ({made}, now {numerics.NUMERICS_VERSION})")
        return diff

    # --- seeds: seed-<s>.json, seed-<s>.pt ---------------------------------------------------

    def finished(self, seed: int) -> bool:
        """Whether seed `seed` is done: its seed-<s>.json (written after its weights) exists."""
        return (self.path / self.seed_file(seed)).is_file()

    def seed_record(self, seed: int) -> dict:
        """A finished seed's scores (seed-<s>.json), refused in one line if missing or corrupt."""
        path = self.path / self.seed_file(seed)
        if not path.is_file():
            raise UserError(f"{path} is missing: seed {seed} did not finish or the file was removed; "
                            "run the command that started the run again")
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is corrupt ({e}): restore it, or delete it to train seed {seed} again") from None
        if not isinstance(record, dict) or set(record) - set(SEED_FIELDS) or "best_epoch" not in record:
            raise UserError(f"{path} is not a seed's scores: restore it, or delete it to train seed {seed} again")
        return record

    def finished_seeds(self, cfg: TrainConfig, provenance: cache.CacheProvenance) -> dict[int, SeedResult]:
        """Seeds a previous, interrupted run of the same configuration completed.

        Resuming is per seed: a seed is done once its `seed-<s>.json` exists (written after its
        weights, so it is the mark of a finished seed; evidence in `results/` keeps the JSON and
        not the weights, and is never trained again). A folder that holds another configuration,
        features from a rebuilt cache or another numerics version is refused rather than mixed.
        """
        if self.is_run() and (line := numerics.refusal(self.path, self.config())):
            raise UserError(line)
        diff = self.mismatch(cfg, provenance)
        if diff:
            raise UserError(f"{self.path} holds a run with other settings ({'; '.join(diff)}): "
                            "pass another --out, or the same options and cache to resume it")
        return {seed: SeedResult(state={}, log=[], **self.seed_record(seed)) for seed in cfg.seeds
                if self.finished(seed)}

    def save_seed(self, r: SeedResult) -> None:
        """The seed's weights, then its scores: the scores last, since they mark the seed done."""
        save_atomic(r.state, self._weights(r.seed))
        write_atomic(self.path / self.seed_file(r.seed), json.dumps({k: getattr(r, k) for k in SEED_FIELDS}))

    def has_weights(self, seed: int) -> bool:
        return self._weights(seed).is_file()

    def _load(self, path: Path):
        """torch.load of plain tensors and numbers only (weights_only); anything else is refused in
        one line naming the file: a file that needs more than that to load is not one we wrote."""
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; torch's own error would say otherwise
            raise UserError(f"{path} is corrupt (not a checkpoint torch.save wrote): replace it with the run's own, or "
                            "train again")
        try:
            return torch.load(path, map_location=device(), weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(f"{path} holds more than plain tensors and numbers, so it is not loaded: it is not a "
                            "file train wrote; replace it with the run's own, or train again") from None
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            raise UserError(f"{path} is corrupt ({type(e).__name__}): replace it with the run's own, or train "
                            "again") from None

    def load_head(self, cfg: TrainConfig, dims: Dims, seed: int) -> heads.Head:
        """Seed `seed`'s dev-selected head, in eval mode."""
        path = self._weights(seed)
        if not path.is_file():
            done = [s for s in cfg.seeds if self.has_weights(s)]
            raise UserError(f"{path} missing: the run was interrupted, is still training or files were removed; "
                            + (f"pick a finished seed with --seed {done[0]}" if done else "train again"))
        state = self._load(path)
        if not isinstance(state, dict):
            raise UserError(f"{path} is not a state dict of weights: replace it with the run's own, or train again")
        # in the dtype the run trained in (float32; float64 in the numerics tests)
        dtype = next((v.dtype for v in state.values() if torch.is_tensor(v) and v.is_floating_point()), torch.float32)
        head = heads.create(cfg.head, dims, cfg.head_config).to(device(), dtype)
        try:
            head.load_state_dict(state)
        except RuntimeError:
            raise UserError(f"{path} does not fit the {cfg.head} head that config.json describes (other weights "
                            "names or shapes): replace it with the run's own, or train again") from None
        return head.eval()

    # --- seed-<s>.state.pt: the resumable state of a seed cut off mid-way ---------------------

    def save_state(self, seed: int, state: dict) -> None:
        save_atomic(state, self._state(seed))

    def drop_state(self, seed: int) -> None:
        self._state(seed).unlink(missing_ok=True)

    def has_state(self, seed: int) -> bool:
        return self._state(seed).is_file()

    def load_states(self, cfg: TrainConfig, done: dict) -> dict[int, dict]:
        """The saved states of seeds that were cut off mid-way (checked like finished seeds, by
        `finished_seeds`, whose settings check covers the whole folder)."""
        return {seed: self._load(self._state(seed)) for seed in cfg.seeds if seed not in done and self.has_state(seed)}

    def kept_epochs(self, seeds: list[int]) -> dict[int, int]:
        """The epoch each seed's saved state holds, read from the files (0: none): what an interrupted
        run really kept, whatever the process that saved it managed to report."""
        return {seed: int(self._load(self._state(seed))["epoch"]) if self.has_state(seed) else 0 for seed in seeds}

    # --- log.csv, protocol.csv ---------------------------------------------------------------

    def logs(self, done: dict, resumed: list, protocol: bool) -> list[LogCsv]:
        """The writers of log.csv (and protocol.csv with --protocol-check), rebuilt for a resumed run."""
        logs = [LogCsv(self.path / self.LOG, done, resumed)]
        if protocol:
            logs.append(ProtocolCsv(self.path / self.PROTOCOL, done, resumed))
        return logs

    def _rows(self, name: str, seed: int | None = None) -> list[dict]:
        path = self.path / name
        if not path.is_file():
            raise UserError(f"{path} is missing: the run folder is incomplete (no epoch finished, or the file was "
                            "removed); train it again")
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if seed is None or r.get("seed") == str(seed)]
        try:
            return sorted(rows, key=lambda r: (int(r["seed"]), int(r["epoch"])))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} is not a run's log (a row without seed or epoch): restore it or train "
                            "again") from None

    def log_rows(self, seed: int | None = None) -> list[dict]:
        """The log.csv rows of one seed (None: every seed), in epoch order, as the strings written."""
        return self._rows(self.LOG, seed)

    def protocol_rows(self, seed: int) -> list[dict]:
        """The protocol.csv rows of one seed, in epoch order, as the strings written."""
        return self._rows(self.PROTOCOL, seed)

    def log_frame(self):
        """log.csv as a pandas DataFrame (numbers parsed), for plots."""
        import pandas as pd

        self._rows(self.LOG)  # refused in one line if missing or not a log
        return pd.read_csv(self.path / self.LOG)

    def epochs_done(self, cfg: TrainConfig) -> tuple[int, int]:
        """(epochs trained, epochs `--patience` skipped) of the run, from its files alone, so a grid
        can follow runs in other processes: log.csv rows of finished seeds and of a seed with a
        saved state."""
        path = self.path / self.LOG
        if not path.is_file():
            return 0, 0
        with open(path, newline="") as f:
            rows = Counter(r["seed"] for r in csv.DictReader(f))
        trained = skipped = 0
        for seed in cfg.seeds:
            n = rows[str(seed)]
            if self.finished(seed):
                trained, skipped = trained + n, skipped + cfg.epochs - n
            elif self.has_state(seed):
                trained += n
        return trained, skipped

    # --- metrics.json, report.txt ------------------------------------------------------------

    def is_finished(self) -> bool:
        """Every seed done and summed up: metrics.json exists (written last)."""
        return (self.path / self.METRICS).is_file()

    def metrics(self) -> dict:
        """metrics.json, refused in one line if the run is not finished or the file is not JSON."""
        path = self.path / self.METRICS
        try:
            metrics = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.path} is not finished (no metrics.json): finish it with the command that "
                            "started it") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is corrupt ({e}): restore it or train again") from None
        if not isinstance(metrics, dict) or not isinstance(metrics.get("per_seed"), list):
            raise UserError(f"{path} is not a run's metrics (no per_seed list): restore it or train again")
        return metrics

    def write_metrics(self, metrics: dict) -> None:
        write_atomic(self.path / self.METRICS, json.dumps(metrics, indent=1))

    def write_report(self, text: str) -> None:
        write_atomic(self.path / self.REPORT, text)

    # --- robustness.json --------------------------------------------------------------------

    def robustness(self) -> dict:
        """robustness.json ({} when the run was never scored so): `eval --drop/--noise`, `train --robustness`."""
        path = self.path / self.ROBUSTNESS
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is corrupt ({e}): delete it and score again with `pipeline.py eval "
                            f"{self.path} --drop image`") from None

    def write_robustness(self, result: dict) -> None:
        write_atomic(self.path / self.ROBUSTNESS, json.dumps(result, indent=1) + "\n")

    # --- trust: one writer, our own folder, files that agree ---------------------------------

    @contextmanager
    def writer(self):
        """Hold the folder's writer lock for the block (a train, a grid cell, a replay): a second
        writer is refused in one line naming the holder (pid and host, in the lock file).

        `fcntl.flock` on writer.lock: the kernel drops it when its process ends, however it ends, so
        the lock of a dead process never blocks. The file is removed on release while still held;
        a process that opened the removed file before then finds it is no longer the folder's lock
        file and opens the new one (so two processes can never hold two different files).
        """
        make_dir(self.path)
        path = self.path / self.LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 400, 0).decode(errors="replace").strip()
                os.close(fd)
                raise UserError(f"{self.path} is being written by another process ({holder or 'starting'}): wait "
                                "for it to end, or use another folder") from None
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the previous holder removed this file as it let go: take the folder's current one
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                      .encode(), 0)
            yield self
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)

    def check_out(self) -> None:
        """`train --out` writes only into a folder that is absent, empty, or holds a run (whose
        settings `finished_seeds` then checks): never into the root, or among someone's own files."""
        path = self.path
        if path.resolve() == Path(path.resolve().anchor):
            raise UserError(f"--out {path} is the root folder: give a folder of its own, e.g. runs/<name>")
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path} is a file, not a folder: give a folder path (or move the file)")
        if not path.is_dir() or self.is_run():
            return
        others = sorted(p.name for p in path.iterdir() if p.name != self.LOCK)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise UserError(f"--out {path} holds other files ({shown}) and no run (no config.json): train writes "
                            "only into an empty folder or its own run; give another --out")
