"""A search folder's files, named in this module alone (as train/run_folder.py names a run's):
experiments/search.py writes the study's, experiments/search_result.py what a search ends with,
and `results` reads a searched row's record (trials, lane-hours) through here.

    study.journal   the Optuna study (JournalStorage; `.lock` beside it), unless `--storage URL`
    search.lock     one process at a time counts the trials and asks for the next
    finish.lock     one process at a time finishes the study (re-scoring, best.json, best/); others wait
    trials/         trial-<n>/: each trial's run folder (one seed)
    trials.csv      one row per trial: number, state, dev score, re-scored mean dev, epochs, seconds, values
    history.png     Optuna's optimisation history; importance.png: its parameter importances
    rescore/        trial-<n>/: the best trials trained again on the re-scoring seeds
    best.json       the chosen settings (`train --config` reads it) and how they were chosen
    best/           the chosen settings trained with the final seeds: an ordinary run folder
    superseded/     best-<k>/: a best/ of an earlier choice or numerics version, kept aside
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

FIGURES = ("history.png", "importance.png")


def _file(name: str) -> property:
    """A file of the search folder by its name, read as `folder.<attribute>`."""
    return property(lambda self: self.path / name, doc=name)


@dataclass(frozen=True)
class SearchFolder:
    path: Path

    JOURNAL = "study.journal"
    OWNS = (JOURNAL, f"{JOURNAL}.lock", "search.lock", "finish.lock", "trials", "rescore", "best", "superseded",
            "trials.csv", "best.json", *FIGURES)  # what a search folder holds, and nothing else
    journal, lock, finish_lock = _file(JOURNAL), _file("search.lock"), _file("finish.lock")
    trials_csv, best_json, best, superseded = _file("trials.csv"), _file("best.json"), _file("best"), _file("superseded")

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def figure(self, name: str) -> Path:
        assert name in FIGURES, name
        return self.path / name

    def trial(self, number: int) -> Path:
        return self.path / "trials" / f"trial-{number:04d}"

    def rescored(self, number: int | None = None) -> Path:
        """rescore/ (number None) or the re-scored run of trial `number`."""
        return self.path / "rescore" if number is None else self.path / "rescore" / f"trial-{number:04d}"

    @classmethod
    def of_best(cls, run: Path) -> SearchFolder | None:
        """The search whose chosen run `run` is (`<search>/best`, beside its best.json), else None."""
        run = Path(run)
        search = cls(run.parent)
        return search if run.name == "best" and search.best_json.is_file() else None

    def trial_rows(self) -> list[dict] | None:
        """trials.csv's rows (strings, as written), None before the search has written it."""
        if not self.trials_csv.is_file():
            return None
        with open(self.trials_csv, newline="") as f:
            return list(csv.DictReader(f))
