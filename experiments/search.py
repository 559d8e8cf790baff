"""`pipeline.py search`: hyper-parameter search with Optuna, on top of any `train` settings.

A trial trains one seed (SEARCH_SEED, never one of the final run's) of the base settings with
the trial's values (experiments/search_space.py) into `<out>/trials/trial-<n>/`, an ordinary
run folder; its objective is the run's selection metric (`select`) on dev at the selected epoch.
Test is scored by the trainer as always, and never read here. Each epoch's dev score is
reported to Optuna, whose pruner (median by default) may stop the trial from the trainer's
`on_epoch` hook (a pruned trial's folder stays as it was cut: log.csv, config.json, its state).
Once `--trials` trials are COMPLETE or PRUNED (failed ones do not count), the best few
(`--rescore`) are trained again on RESCORE_SEEDS, and the one of highest mean dev is the choice:
best.json, and a run with the final seeds in `<out>/best/` (experiments/search_result.py; the
folder's files are named in experiments/search_folder.py).

The study lives in an Optuna JournalStorage (`<out>/study.journal`; `--storage URL` for a
database): `--jobs N` processes on one machine share it, each asking for its next trial under
a lock that counts the trials done and running, so the study ends at `--trials` exactly. A
trial records the process that runs it (host, pid, start time); one left RUNNING by a process
that is gone (Ctrl-C, SIGTERM, kill -9) is marked FAILED when the study is opened again, so the
same command continues the study and never counts a trial twice. A study records the numerics
version it ran with (train/numerics.py) and is never resumed by code of another version.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Optional

from rich.console import Console

from core import memory as core_memory
from core.cli_fields import option
from core import threads as core_threads
from core.errors import Interrupted, UserError
from core.paths import DEFAULT_RUNS, output_dir
from experiments import grid, search_space
from experiments.search_folder import SearchFolder
from experiments.search_space import Dim
from train import numerics, runs
from train.config import TrainConfig

SEARCH_SEED = 1001  # every trial's seed
RESCORE_SEEDS = (1002, 1003, 1004)  # the best trials trained again: their mean dev chooses
PRUNERS = ("median", "none")
STALE_UNNAMED = 60.0  # seconds after which a RUNNING trial that never named its process is taken as dead


@dataclass(frozen=True)
class SearchOptions:
    """What a search adds to `train`'s settings: `pipeline.py search`'s own options are made from
    these fields (core/cli_fields.py), checked by `plan` (bad values are one line)."""

    trials: int = option(20, "trials COMPLETE or PRUNED the study ends with (failed ones are not counted); the "
                         "same command with more continues the study")
    rescore: int = option(5, "the best trials trained again on seeds 1002-1004, the highest mean dev chosen (0: the "
                          "best trial as it is)")
    pruner: str = option("median", "median (Optuna's MedianPruner on each epoch's dev) or none")
    sampler_seed: int = option(0, "seed of the TPE sampler")
    storage: Optional[str] = option(None, "database URL of the study, e.g. postgresql://user@host/db [default: "
                                    "study.journal in the search folder]")


@dataclass(frozen=True, kw_only=True)
class Search(SearchOptions):
    """What every process of one search needs (picklable: `--jobs` workers get a copy)."""

    base: TrainConfig  # the train settings every trial starts from; its seeds are the final run's
    dims: dict[str, Dim]
    out: Path
    name: str  # the study's name, from the settings' hash
    settings: dict  # the base settings and the space: a study is resumed only with these
    jobs: int = 1
    threads: int | None = None
    memory: str | None = None
    report_to: tuple[str, ...] = field(default=())

    @property
    def select(self) -> str:
        return self.base.resolved().select

    @property
    def folder(self) -> SearchFolder:
        return SearchFolder(self.out)


def plan(base: TrainConfig, space: list[str], out: Path | None = None, runs_dir: Path = DEFAULT_RUNS,
         options: SearchOptions = SearchOptions(), jobs: int = 1, **process) -> Search:
    """The search of `base` over its default space and `space` (`--space` items), every input
    checked before anything is written; no more `jobs` than trials. `process`: Search's threads,
    memory and report_to."""
    if options.trials < 1:
        raise UserError(f"--trials {options.trials}: give at least 1 (the trials COMPLETE or PRUNED the study ends "
                        "with)")
    if options.rescore < 0:
        raise UserError(f"--rescore {options.rescore}: give 0 (choose the best trial as it is) or more")
    if options.pruner not in PRUNERS:
        raise UserError(f"--pruner {options.pruner}: use {' or '.join(PRUNERS)}")
    taken = sorted(set(base.seeds) & {SEARCH_SEED, *RESCORE_SEEDS})
    if taken:
        raise UserError(f"--seeds {','.join(map(str, taken))}: the search trains its trials on seed {SEARCH_SEED} "
                        f"and re-scores on {RESCORE_SEEDS[0]}-{RESCORE_SEEDS[-1]}; give the final run other seeds")
    resolved = base.resolved()  # a bad setting is one line now
    dims = search_space.space(base, space)
    if not dims:
        raise UserError("nothing to search: every field of the default space is set; add one with "
                        "--space field=low:high")
    settings = {"train": {k: v for k, v in resolved.to_json().items() if k not in ("out", "seeds")},
                "space": {name: dim.spec() for name, dim in dims.items()}}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    name = f"search-{base.dataset}-{base.head}-{digest}"
    return Search(**asdict(options), base=base, dims=dims, out=Path(out or Path(runs_dir) / name), name=name,
                  settings=json.loads(json.dumps(settings)), jobs=min(jobs, options.trials), **process)


# --- the study -------------------------------------------------------------------------------

def open_study(s: Search, worker: int = 0):
    """The study of `s` in its storage, made if new; its sampler seeded from `sampler_seed`, the
    worker and the trials so far (a resumed study draws new values, not the first trials' again)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = _storage(s)
        try:  # loaded first: create_study appends a line to the journal each time it finds the study
            study = optuna.load_study(study_name=s.name, storage=storage, pruner=make_pruner(s.pruner))
        except KeyError:
            study = optuna.create_study(storage=storage, study_name=s.name, direction="maximize",
                                        load_if_exists=True, pruner=make_pruner(s.pruner))
    except (UserError, OSError):
        raise
    except Exception as e:  # a database URL that cannot be reached or read
        if s.storage is None:
            raise
        raise UserError(f"--storage {shown(s.storage)}: cannot open the study there ({_first_line(e)})") from None
    # constant liar: with processes in parallel, a running trial counts as a poor one, so two do not draw alike
    study.sampler = optuna.samplers.TPESampler(seed=s.sampler_seed + 1000 * worker + len(study.trials),
                                               constant_liar=s.jobs > 1)
    return study


def make_pruner(name: str):
    import optuna

    return optuna.pruners.MedianPruner() if name == "median" else optuna.pruners.NopPruner()


def _storage(s: Search):
    """`--storage URL` (a database), else the journal file in the search folder."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if s.storage is None:
        path = s.folder.journal
        return JournalStorage(JournalFileBackend(str(path), lock_obj=_JournalLock(path)))
    try:
        return RDBStorage(s.storage)
    except Exception as e:  # sqlalchemy's: no such dialect, no driver, no server, no file
        raise UserError(f"--storage {shown(s.storage)}: cannot open it ({_first_line(e)}); give a database URL such "
                        "as postgresql://user@host/db, or leave --storage out for the journal file") from None


def shown(url: str | None) -> str | None:
    """A storage URL as it may be printed or written: its password masked."""
    return None if url is None else re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class _JournalLock:  # what optuna asks of a BaseJournalFileLock: acquire, release
    """The journal's append lock: flock, which the kernel drops when its holder dies however it
    dies (optuna's own lock files outlive a kill -9 for their grace period). Holding it, a line a
    killed writer left half-written is cut off, so the journal always reads whole."""

    def __init__(self, journal: Path):
        self.journal, self.path, self.fd = Path(journal), Path(f"{journal}.lock"), None

    def acquire(self) -> bool:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        _drop_cut_line(self.journal)
        return True

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock


def _drop_cut_line(journal: Path) -> None:
    """Cut a last line without its newline (a writer killed mid-append) off the journal."""
    try:
        with open(journal, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            if end == 0:
                return
            f.seek(end - 1)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)
    except FileNotFoundError:
        return


def check_study(study, s: Search) -> None:
    """A new study records its numerics version and settings; an old one must have both."""
    attrs = study.user_attrs
    if "numerics_version" not in attrs:
        study.set_user_attr("numerics_version", numerics.NUMERICS_VERSION)
        study.set_user_attr("settings", s.settings)
        return
    if attrs["numerics_version"] != numerics.NUMERICS_VERSION:
        raise UserError(f"{s.out}: the study ran with numerics version {attrs['numerics_version']} and this code "
                        f"computes version {numerics.NUMERICS_VERSION}, so it is never resumed: the same command "
                        "with --retrain-best trains its best settings (best.json) with this code, or give another "
                        "--out to search again")
    if json.dumps(attrs.get("settings"), sort_keys=True) != json.dumps(s.settings, sort_keys=True):
        raise UserError(f"{s.out}: study {s.name} holds a search of other settings or another space; give another "
                        "--out (or --storage), or the options that started it")


# --- which process runs which trial --------------------------------------------------------------

def _started(pid: int) -> str | None:
    """The start time of process `pid` (Linux: /proc; None when there is none): with the pid, it
    names the process even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _started(os.getpid())}


def _stale(trial) -> bool:
    """Whether a RUNNING trial's process is gone (a process of another machine is taken as alive)."""
    who = trial.user_attrs.get("process")
    if who is None:  # killed between asking for the trial and naming itself
        return (datetime.now() - trial.datetime_start).total_seconds() > STALE_UNNAMED
    if who.get("host") != socket.gethostname():
        return False
    if who.get("start") is None:  # no /proc here: the pid alone says
        return not _alive(who["pid"])
    return _started(int(who["pid"])) != who["start"]


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def fail_stale(study) -> list[int]:
    """Mark FAILED the RUNNING trials whose process is gone; their numbers."""
    from optuna.trial import TrialState

    stale = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if _stale(t)]
    for number in stale:
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    return stale


def counts(study) -> tuple[int, int]:
    """(trials COMPLETE or PRUNED, trials RUNNING)."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    return (sum(st in (TrialState.COMPLETE, TrialState.PRUNED) for st in states),
            sum(st == TrialState.RUNNING for st in states))


@contextmanager
def locked(path: Path, waiting: Callable[[], None] = lambda: None):
    """Hold the lock file `path` for the block (`SearchFolder.lock`: one process at a time counts the
    trials and asks for the next; `.finish_lock`: one finishes the study); `waiting()` first when
    another process holds it. flock: the kernel drops it when its holder dies, however it dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def next_trial(study, s: Search):
    """The next trial to run (its values drawn), or None once `trials` are COMPLETE or PRUNED. While
    the trials running elsewhere would complete the study, wait: one of them may still fail."""
    while True:
        with locked(s.folder.lock):
            fail_stale(study)
            done, running = counts(study)
            if done >= s.trials:
                return None
            if done + running < s.trials:
                trial = study.ask()
                trial.set_user_attr("process", me())
                for dim in s.dims.values():
                    dim.suggest(trial)
                return trial
        time.sleep(0.5)


# --- trials ------------------------------------------------------------------------------------

def run_trial(study, trial, s: Search) -> None:
    """Train the trial's run and tell the study: its dev score, PRUNED, or FAILED (then re-raised)."""
    import optuna
    from optuna.trial import TrialState

    cfg = replace(search_space.apply(s.base, trial.params, s.dims), seeds=(SEARCH_SEED,),
                  out=s.folder.trial(trial.number))
    select = s.select

    def report(log) -> None:
        trial.report(log.dev[select], log.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"epoch {log.epoch}")

    try:
        data = grid._data(cfg, core_memory.budget(s.memory, s.jobs))
        result = runs.train_run(cfg, data, report, report_to=s.report_to)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return
    except UserError as e:  # values the run refuses (text_layers beyond the cache's): the search stops here
        study.tell(trial, state=TrialState.FAIL)
        values = " ".join(f"{k}={v}" for k, v in trial.params.items())
        raise UserError(f"trial {trial.number} ({values}): {e}") from None
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    trial.set_user_attr("best_epoch", result.metrics["per_seed"][0]["best_epoch"])
    study.tell(trial, result.metrics["dev"][select]["mean"])


def work(s: Search, worker: int = 0) -> int:
    """One process's share: trials until the study has enough; how many it ran."""
    study = open_study(s, worker)
    n = 0
    while (trial := next_trial(study, s)) is not None:
        run_trial(study, trial, s)
        n += 1
    return n


def run_trials(s: Search, study, poll) -> None:
    """Every trial the study still needs, in this process (`jobs` 1) or `jobs` worker processes;
    `poll(study)` after each trial (and 4 times a second meanwhile) shows what finished."""
    try:
        if s.jobs <= 1:
            while (trial := next_trial(study, s)) is not None:
                run_trial(study, trial, s)
                poll(study)
            return
        with core_threads.worker_pool(s.jobs, s.threads) as pool:
            futures = [pool.submit(work, s, k) for k in range(s.jobs)]
            while not all(f.done() for f in futures):
                time.sleep(0.25)
                poll(study)
            for f in futures:
                f.result()
        poll(study)
    except KeyboardInterrupt:
        with locked(s.folder.lock):
            fail_stale(study)  # the workers' trials (they are gone now); this process's own was told FAIL
        done, _ = counts(study)
        raise Interrupted(f"{s.out}: {done} of {s.trials} trials done, a trial cut off is failed and not counted; run "
                          "the same command to continue the study") from None


def start(s: Search, console: Console):
    """Open (or make) the search folder and its study, checked, with the trials of dead processes failed."""
    if s.storage is None:
        output_dir(s.out, SearchFolder.OWNS, "--out")  # the journal's folder
    study = open_study(s)  # a database that cannot be opened: refused before a folder is made
    output_dir(s.out, SearchFolder.OWNS, "--out")
    check_study(study, s)
    with locked(s.folder.lock):
        failed = fail_stale(study)
    if failed:
        console.print(f"trial{'s' * (len(failed) > 1)} {', '.join(map(str, failed))} of a process that is gone: "
                      "marked failed, not counted", highlight=False)
    return study
