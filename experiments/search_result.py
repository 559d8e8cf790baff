"""What a search ends with (experiments/search.py runs its trials; `search` here runs the whole of
one), in the search folder (experiments/search_folder.py names its files): trials.csv, the figures,
the re-scored runs of the best `--rescore` trials, best.json (the chosen settings as a run's
config.json writes them, {"train": {...}}, which `train --config` reads, and "search": the trial,
its scores, the numerics version) and best/, the choice trained with the final seeds (a `results` row).

The choice is made on dev alone: the best trials by their seed's dev, then the highest mean dev
over the re-scoring seeds (winner's curse: the trial's own seed picked it, so it is left out).
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from core import memory as core_memory
from core.errors import UserError
from core.paths import make_dir, write_atomic, write_png
from experiments import grid, search_folder, search_space
from experiments.search import RESCORE_SEEDS, SEARCH_SEED, Search, counts, locked, run_trials, shown, start
from experiments.search_folder import SearchFolder
from train import numerics, runs
from train.config import TrainConfig
from train.run_folder import RunFolder


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _seconds(t) -> float | None:
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


class Progress:
    """One line per finished trial on the screen (`poll(study)` after each, or every second)."""

    def __init__(self, s: Search, console: Console):
        self.s, self.console, self.shown, self.best = s, console, set(), None

    def begin(self, study) -> None:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        self.shown = {t.number for t in trials if t.state.is_finished()}
        self.best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number),
                        default=None)
        done, _ = counts(study)
        where = shown(self.s.storage) or self.s.folder.journal
        space = ", ".join(f"{name}={dim.spec()}" for name, dim in self.s.dims.items())
        self.console.print(f"study {self.s.name} ({where}): {done} of {self.s.trials} trials done; objective dev "
                           f"{self.s.select} of seed {SEARCH_SEED}; space {space}", highlight=False, soft_wrap=True)

    def __call__(self, study) -> None:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in self.finished(trials))
        for t in sorted((t for t in trials if t.state.is_finished() and t.number not in self.shown),
                        key=lambda t: t.number):
            self.shown.add(t.number)
            done += t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            if t.state == TrialState.COMPLETE and (self.best is None or t.value > self.best.value):
                self.best = t
            params = " ".join(f"{k}={_short(v)}" for k, v in t.params.items())
            seconds = _seconds(t)
            self.console.print(f"trial {t.number}: {_outcome(t)} ({len(t.intermediate_values)} epochs"
                               + (f", {seconds:.0f} s" if seconds is not None else "") + f") {params} | best so far: "
                               + (f"trial {self.best.number} {self.best.value:.4f}" if self.best else "none")
                               + f" | {done}/{self.s.trials} trials", highlight=False, soft_wrap=True)

    def finished(self, trials: list) -> list:
        """The finished trials already shown."""
        return [t for t in trials if t.number in self.shown and t.state.is_finished()]


def _outcome(t) -> str:
    from optuna.trial import TrialState

    if t.state == TrialState.COMPLETE:
        return f"dev {t.value:.4f} @ epoch {t.user_attrs.get('best_epoch')}"
    if t.state == TrialState.PRUNED:
        return f"pruned after epoch {max(t.intermediate_values, default=0)}"
    return "failed (not counted)"


def write_trials(s: Search, trials: list, rescored: dict[int, float]) -> Path:
    """trials.csv: every trial of the study, by number."""
    select = s.select
    names = list(dict.fromkeys([*s.dims, *(k for t in trials for k in t.params)]))
    header = ["number", "state", f"dev_{select}", f"rescore_dev_{select}", "epochs", "best_epoch", "seconds", *names]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, header, restval="")
    w.writeheader()
    for t in sorted(trials, key=lambda t: t.number):
        seconds = _seconds(t)
        w.writerow({"number": t.number, "state": t.state.name, f"dev_{select}": "" if t.value is None else t.value,
                    f"rescore_dev_{select}": rescored.get(t.number, ""), "epochs": len(t.intermediate_values),
                    "best_epoch": t.user_attrs.get("best_epoch", ""),
                    "seconds": "" if seconds is None else f"{seconds:.1f}", **t.params})
    write_atomic(s.folder.trials_csv, text.getvalue())
    return s.folder.trials_csv


def write_figures(s: Search, study) -> list[Path]:
    """history.png and importance.png (Optuna's matplotlib plots); a plot Optuna cannot draw yet
    (one trial, one value) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    written = []
    for name, plot in zip(search_folder.FIGURES, (plots.plot_optimization_history, plots.plot_param_importances)):
        # Optuna sets its own style sheet: kept to these figures; its "experimental" notes are not the user's
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore")
            try:
                ax = plot(study, target_name=f"dev {s.select}")
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue
            fig = ax.figure
            fig.set_size_inches(7, 4.5)
            fig.tight_layout()
            written.append(write_png(s.folder.figure(name), fig, dpi=110))
            plt.close(fig)
    return written


def rescore(s: Search, complete: list, console: Console) -> dict[int, float]:
    """The best `s.rescore` trials trained again on RESCORE_SEEDS: trial number -> mean dev."""
    top = sorted(complete, key=lambda t: (-t.value, t.number))[: s.rescore]
    means = {}
    for k, t in enumerate(top, 1):
        cfg = replace(search_space.apply(s.base, t.params, s.dims), seeds=RESCORE_SEEDS,
                      out=s.folder.rescored(t.number))
        data = grid._data(cfg, core_memory.budget(s.memory, s.jobs))
        with console.status(f"re-scoring trial {t.number} ({k}/{len(top)}) on seeds {RESCORE_SEEDS}"):
            r = runs.train_run(cfg, data, jobs=min(s.jobs, len(RESCORE_SEEDS)), threads=s.threads,
                               report_to=s.report_to)
        dev = r.metrics["dev"][s.select]
        means[t.number] = dev["mean"]
        console.print(f"re-scored trial {t.number} on seeds {', '.join(map(str, RESCORE_SEEDS))}: dev {s.select} "
                      f"{dev['mean']:.4f} ± {dev['std']:.4f} (seed {SEARCH_SEED}: {t.value:.4f})", highlight=False,
                      soft_wrap=True)
    return means


def choose(complete: list, rescored: dict[int, float]):
    """The trial of highest re-scored mean dev (ties: its own dev, then the first); without
    re-scoring, the trial of highest dev."""
    if rescored:
        pool = [t for t in complete if t.number in rescored]
        return max(pool, key=lambda t: (rescored[t.number], t.value, -t.number))
    return max(complete, key=lambda t: (t.value, -t.number))


def best_config(s: Search, trial) -> TrainConfig:
    """The base settings (final seeds) with the chosen trial's values."""
    return replace(search_space.apply(s.base, trial.params, s.dims), out=None)


def write_best(s: Search, trial, rescored: dict[int, float], done: int) -> Path:
    saved = {"train": best_config(s, trial).to_json(),
             "search": {"study": s.name, "storage": shown(s.storage) or SearchFolder.JOURNAL, "trial": trial.number,
                        "params": trial.params, "select": s.select, f"dev_seed_{SEARCH_SEED}": trial.value,
                        "rescore_seeds": list(RESCORE_SEEDS) if rescored else [],
                        "rescore_dev": rescored.get(trial.number), "trials": done,
                        "numerics_version": numerics.NUMERICS_VERSION}}
    write_atomic(s.folder.best_json, json.dumps(saved, indent=1) + "\n")
    return s.folder.best_json


def train_best(s: Search, cfg: TrainConfig, console: Console) -> Path:
    """`cfg` trained with its seeds in `<out>/best/` (resumed if cut); a best/ of other settings
    (the choice moved as the study grew) or another numerics version is moved to superseded/ first."""
    target = s.folder.best
    cfg = replace(cfg, out=target)
    folder = RunFolder(target)
    if folder.is_run() and folder.mismatch(cfg.resolved()):
        aside = make_dir(s.folder.superseded) / f"best-{len(list(s.folder.superseded.iterdir())) + 1}"
        target.rename(aside)
        console.print(f"{target} held other settings or another numerics version: moved to {aside}", highlight=False,
                      soft_wrap=True)
    return runs.train(cfg, console, jobs=min(s.jobs, len(cfg.seeds)), threads=s.threads, memory=s.memory,
                      report_to=s.report_to)


def search(s: Search, console: Console) -> Path:
    """`pipeline.py search`: the study opened (or continued), its trials run with a line each, then `finish`."""
    study = start(s, console)
    progress = Progress(s, console)
    progress.begin(study)
    run_trials(s, study, progress)

    def waiting() -> None:
        console.print(f"{s.out}: another process is finishing this search (re-scoring, best/): waiting for it, "
                      "then taking up what is left", highlight=False, soft_wrap=True)

    with locked(s.folder.finish_lock, waiting):
        return finish(s, study, console)


def finish(s: Search, study, console: Console) -> Path:
    """The study is done: trials.csv, figures, re-scoring, the choice (best.json) and best/."""
    from optuna.trial import TrialState

    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise UserError(f"{s.out}: no trial completed (every one pruned or failed): search again with --pruner none, "
                        "or more --trials")
    write_trials(s, trials, {})
    write_figures(s, study)
    rescored = rescore(s, complete, console)
    chosen = choose(complete, rescored)
    write_trials(s, trials, rescored)
    write_best(s, chosen, rescored, counts(study)[0])
    params = " ".join(f"{k}={_short(v)}" for k, v in chosen.params.items())
    console.print(f"chosen: trial {chosen.number} ({params}); written: {s.folder.best_json}, {s.folder.trials_csv}",
                  highlight=False, soft_wrap=True)
    return train_best(s, best_config(s, chosen), console)


def retrain_best(s: Search, console: Console) -> Path:
    """`--retrain-best`: best.json's settings trained into best/ with this code, no search (after a
    numerics version bump the study's trials are not this code's numbers, its choice still stands)."""
    path = s.folder.best_json
    if not path.is_file():
        raise UserError(f"{path} is missing: the search never chose; search again (another --out after a numerics "
                        "version bump)")
    saved = json.loads(path.read_text())
    run = train_best(s, TrainConfig.from_json(saved["train"]), console)
    saved["search"]["trained_with_numerics_version"] = numerics.NUMERICS_VERSION
    write_atomic(path, json.dumps(saved, indent=1) + "\n")
    return run
