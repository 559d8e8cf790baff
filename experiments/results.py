"""`pipeline.py results RUN...`: one table from finished run folders, with honest comparisons.

A row per run: its head, the settings that set it apart, its seeds, test accuracy /
weighted F1 / macro F1 as mean ± sample std, the dev-selected epochs, and, against a
reference row (`--against`), the difference in accuracy with its p-value:

- a **paired t-test** over seeds when both rows trained the same seeds on the same split
  and were scored in the same orders (the seed then pairs like with like);
- **Welch's t-test** otherwise; the table says which;
- p-values **Holm-corrected** across the rows compared (several rows against one reference
  are several tests).

The tests themselves are experiments/stats.py, the one home of every comparison's statistics;
`ablate`'s table is this table of its cells (experiments/grid.py), so the two cannot disagree.
With `--paper HEAD` the rows are taken for that head's ablation rows (by name, or by folder
name as results/*-ablate.sh writes it) and the paper's numbers stand beside them.

With `--baseline RUNS` each row is also set against the row of the same name in another set of runs
(the same heads on other encoders, say): its **gain** from that change, and, with `--against`, that gain
minus the reference's gain, tested over seeds (a paired test of per-seed differences of differences):
does a head gain more from better features than the probe does?

Rows trained on different caches, splits or scoring protocols are refused with the difference
named: such numbers do not compare; `--allow-mixed` compares them anyway and adds a column that
shows what differs. A row of another numerics version than the current code's (train/numerics.py)
is refused with or without it, naming what remakes it: its numbers are not this code's.

How a table is shown (markdown, the terminal, results.csv, the plot) is experiments/results_view.py's;
the tables inside the README and docs/*.md are experiments/results_pages.py's.
"""

from __future__ import annotations

import glob
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import UserError
from experiments import stats
from experiments.search_folder import SearchFolder
from train.config import family

# what must agree for two rows to compare: name -> how to read it from config.json
COMPARABLE = {
    "cache": lambda c: json.dumps(_parts("cache", c), sort_keys=True),
    "split": lambda c: json.dumps([str(c["train"].get("splits")), c.get("sizes")], sort_keys=True),
    "protocol": lambda c: json.dumps({k: c["train"].get(k) for k in
                                      ("eval_orders", "eval_seed", "eval_batch_size", "select")}, sort_keys=True),
    "numerics version": lambda c: str(c.get("numerics_version")),  # never mixed, --allow-mixed or not
}
# config fields that never set a row apart in the table (paths, the seeds have their own column)
NOT_SETTINGS = {"out", "cache_dir", "seeds", "splits"}


@dataclass
class Row:
    name: str
    folder: Path
    config: dict
    metrics: dict
    settings: dict = field(default_factory=dict)  # filled by `settings_apart`
    robustness: dict = field(default_factory=dict)  # robustness.json's summary: condition -> metric -> mean/std

    @property
    def head(self) -> str:
        return self.config["train"]["head"]

    @property
    def seeds(self) -> list[int]:
        return [p["seed"] for p in self.metrics["per_seed"]]

    def per_seed(self, metric: str = "accuracy") -> dict[int, float]:
        return {p["seed"]: p["test"][metric] for p in self.metrics["per_seed"]}


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders from folders, parents of run folders (sorted by name) or glob patterns, in the order given."""
    from train.run_folder import RunFolder

    found: list[Path] = []
    for item in paths:
        matches = sorted(glob.glob(str(item))) if glob.has_magic(str(item)) else [str(item)]
        if not matches or not all(Path(m).exists() for m in matches):
            raise UserError(f"{item}: no such file or folder")
        for m in map(Path, matches):
            if RunFolder(m).is_run():
                found.append(m)
            elif m.is_dir() and (kids := [f.path for f in RunFolder.under(m)]):
                found.extend(kids)
            else:
                raise UserError(f"{m} is neither a run folder (config.json) nor a folder of run folders")
    return list(dict.fromkeys(found))


def load_row(folder: Path) -> Row:
    """A finished run of the current numerics version as a row, read only when its files agree
    (metrics.json with each seed-<s>.json, each seed file with log.csv: `evidence.check_evidence`):
    a table never shows a hand-edited number, nor one of other arithmetic."""
    from experiments.evidence import check_evidence
    from train import numerics
    from train.run_folder import RunFolder

    run = RunFolder(folder)
    config = run.config()
    if line := numerics.refusal(folder, config):
        raise UserError(line)
    metrics = run.metrics()
    check_evidence(run, metrics)
    return Row(row_name(folder), folder, config, metrics, robustness=run.robustness().get("summary", {}))


def row_name(folder: Path) -> str:
    """A run's row is named by its folder; a search's chosen run (`<search>/best`) by its search
    folder, so `results/mvsa_s-tuned/*/best` gives one row per head, each matching its untuned row
    of the same name (`--baseline`)."""
    search = SearchFolder.of_best(folder)
    return search.path.name if search else Path(folder).name


def search_record(folder: Path) -> dict | None:
    """For a search's chosen run (`<search>/best`): the trials its study counted (COMPLETE or PRUNED)
    and the lane-hours the search took: each trial's wall seconds (trials.csv; a failed trial's: the
    seconds of its epochs, not the time until a later process found it dead), and each re-score's and
    best/'s wall seconds (metrics.json) or, when more, the seconds of its epochs (log.csv; a run resumed
    by a later process records that process's time alone). None for any other run. Read from the
    files, so a table says it again."""
    search = SearchFolder.of_best(folder)
    trials = search and search.trial_rows()
    if not trials:
        return None
    from train.run_folder import RunFolder

    def epoch_seconds(run: RunFolder) -> float:
        try:
            return sum(float(r["seconds"]) for r in run.log_rows())
        except UserError:  # no epoch finished
            return 0.0

    seconds = sum(epoch_seconds(RunFolder(search.trial(int(t["number"])))) if t["state"] == "FAIL"
                  else float(t["seconds"] or 0) for t in trials)
    for run in [*RunFolder.under(search.rescored()), RunFolder(folder)]:
        if run.is_finished():
            seconds += max(run.metrics().get("wall_seconds", 0.0), epoch_seconds(run))
    return {"trials": sum(t["state"] in ("COMPLETE", "PRUNED") for t in trials), "hours": seconds / 3600}


def _flat(config: dict) -> dict:
    train = config["train"]
    out = {k: v for k, v in train.items() if k not in NOT_SETTINGS and k != "head_config"}
    for k, v in (train.get("head_config") or {}).items():
        out[f"{k}"] = v
    return out


def _defaults(config: dict) -> dict:
    """The settings a run of this data set and head has when nothing is set (resolved as a run's
    are), flattened as `_flat` does; {} when they cannot be built (a head no longer registered)."""
    from train.config import TrainConfig

    try:
        train = config["train"]
        return _flat({"train": TrainConfig(dataset=train["dataset"], head=train["head"]).resolved().to_json()})
    except Exception:  # an old or foreign config: every setting may then show
        return {}


def settings_apart(rows: list[Row]) -> None:
    """Each row's settings that set it apart: a value other than the one most rows share (among the
    rows that have the field at all, so a head's own fields compare within that head), or, where
    no two rows share a value (a sweep), every row's. A value equal to the default of the row's
    head and data set never sets it apart (a row of defaults reads `defaults`), and a head field
    off its default always does."""
    flats = [_flat(r.config) for r in rows]
    for r, flat in zip(rows, flats):
        apart = {}
        default = _defaults(r.config)
        own = set(r.config["train"].get("head_config") or {})
        for k, v in flat.items():
            if k == "head" or (k in default and json.dumps(default[k], sort_keys=True) == json.dumps(v, sort_keys=True)):
                continue
            if k in own and k in default:  # a head's field off its default sets the row apart, alone or not
                apart[k] = v
                continue
            counts = Counter(json.dumps(f[k], sort_keys=True) for f in flats if k in f)
            common, n = counts.most_common(1)[0]  # ties: the first row's value
            if len(counts) > 1 and (n == 1 or json.dumps(v, sort_keys=True) != common):
                apart[k] = v
        r.settings = apart


def _parts(kind: str, c: dict) -> dict[str, str]:
    """What must agree, part by part: the cache per modality (a text-only row and a two-modality
    row compare when their text caches agree), every other kind as one value."""
    if kind != "cache":
        return {kind: COMPARABLE[kind](c)}
    from train.data import CacheProvenance

    prov = CacheProvenance.from_json(c.get("provenance") or {}).to_json()
    return {"dataset": str(c["train"].get("dataset")),
            **{k: json.dumps(v, sort_keys=True) for k, v in prov.items() if k in ("text", "image")}}


def differ(kind: str, a: dict, b: dict) -> bool:
    """Whether two runs' configs differ in a part of `kind` (COMPARABLE) that both record."""
    pa, pb = _parts(kind, a), _parts(kind, b)
    return any(pa[k] != pb[k] for k in pa.keys() & pb.keys())


def differences(rows: list[Row]) -> dict[str, list[str]]:
    """What kind of difference (cache, split, protocol, numerics version) separates rows: kind -> row names
    per variant."""
    out = {}
    for kind in COMPARABLE:
        for part in dict.fromkeys(k for r in rows for k in _parts(kind, r.config)):
            variants: dict[str, list[str]] = {}
            for r in rows:
                if (v := _parts(kind, r.config).get(part)) is not None:
                    variants.setdefault(v, []).append(r.name)
            if len(variants) > 1:
                out[kind] = [", ".join(names) for names in variants.values()]
    return out


def _paired(rows: list[Row]) -> bool:
    """Whether per-seed values of these rows pair up (stats.pairs): the same seeds, split and scoring orders."""
    first = rows[0]
    same = all(COMPARABLE[k](r.config) == COMPARABLE[k](first.config) for r in rows[1:] for k in ("split", "protocol"))
    return stats.pairs([r.per_seed() for r in rows], same)


def t_test(a: Row, ref: Row) -> tuple[float, float, str]:
    """(Δ accuracy, p, kind): paired over seeds when the rows share seeds, split and orders, else Welch."""
    return stats.t_test(a.per_seed(), ref.per_seed(), _paired([a, ref]))


@dataclass
class Table:
    rows: list[Row]
    reference: Row | None
    mixed: dict[str, list[str]]
    comparisons: dict[str, dict] = field(default_factory=dict)  # row name -> delta, p, p_holm, test
    baseline: dict[str, Row] = field(default_factory=dict)  # row name -> the same-named row of --baseline
    gains: dict[str, dict] = field(default_factory=dict)  # row name -> gain, its p, gain minus reference's, p_holm
    paper: str | None = None  # the head whose PAPER numbers stand beside the rows
    paper_numbers: dict[str, tuple[float, float]] = field(default_factory=dict)  # row name -> (accuracy, F1)


def slug(name: str) -> str:
    """A row name as results/*-ablate.sh names its folder ('w/o CMF' -> 'wo-cmf', 'HA last 1' -> 'ha-last-1'),
    so that a folder of ablation runs finds the paper's numbers by its folder names."""
    return re.sub(r"[ ,]+", "-", name.lower().replace("w/o ", "wo-"))


def row_slug(config: type, name: str) -> str:
    """The folder name of ablation row `name` of a head config (`config.ABLATIONS`): its own "slug" when
    its name makes no good folder name ('w/o L_cli,L_clt' -> 'wo-intra'), else `slug(name)`."""
    return config.ABLATIONS.get(name, {}).get("slug") or slug(name)


def paper_numbers(head: str, dataset: str, row: str) -> tuple[float, float] | None:
    """The paper's (accuracy, F1) of `head`'s ablation row `row` (its name or its folder's) on `dataset`."""
    import heads

    cls = heads.config_class(head)
    return {row_slug(cls, k): v for k, v in cls.PAPER.get(family(dataset), {}).items()}.get(row_slug(cls, row))


def add_gains(table: Table, baseline_paths: list[str | Path], allow_mixed: bool = False) -> None:
    """Set each row against the same-named row of the baseline runs: the gain, and the gain minus the
    reference row's gain (paired over seeds; Holm-corrected across rows). The two sets may differ in
    cache (that is the point); split and protocol must agree unless `allow_mixed` (the numerics version
    always: `load_row`)."""
    base = {r.name: r for r in (load_row(f) for f in find_runs(baseline_paths))}
    table.baseline = {r.name: base[r.name] for r in table.rows if r.name in base}
    if not table.baseline:
        raise UserError(f"--baseline: no run there has the name of a row here ({', '.join(r.name for r in table.rows)})")
    if table.reference is not None and table.reference.name not in table.baseline:
        raise UserError(f"--baseline holds no run named {table.reference.name!r}, the reference row")
    by_name = {r.name: r for r in table.rows}
    for name, b in table.baseline.items():
        for kind in ("split", "protocol"):
            if COMPARABLE[kind](by_name[name].config) != COMPARABLE[kind](b.config) and not allow_mixed:
                raise UserError(f"{by_name[name].folder} and its baseline {b.folder}: {kind} differs. Re-run them "
                                "alike, or pass --allow-mixed")
    ref = table.reference
    ref_gain = t_test(ref, table.baseline[ref.name])[0] if ref is not None else float("nan")
    for name, b in table.baseline.items():
        row = by_name[name]
        gain, p, kind = t_test(row, b)
        entry = {"gain": gain, "p_gain": p, "test_gain": kind, "minus_ref": float("nan"), "p_minus_ref": float("nan")}
        if ref is not None and row is not ref:
            quad = [row, b, ref, table.baseline[ref.name]]
            if _paired(quad):
                x, y, z, w = (q.per_seed() for q in quad)
                diffs = np.array([(x[s] - y[s]) - (z[s] - w[s]) for s in sorted(x)])
                entry["minus_ref"], entry["p_minus_ref"] = float(diffs.mean()), stats.one_sample(diffs)
            else:
                entry["minus_ref"] = gain - ref_gain
        table.gains[name] = entry
    for g, ph in zip(table.gains.values(), stats.holm([g["p_gain"] for g in table.gains.values()])):
        g["p_gain_holm"] = ph
    named = [n for n, g in table.gains.items() if not math.isnan(g["p_minus_ref"])]
    for n, ph in zip(named, stats.holm([table.gains[n]["p_minus_ref"] for n in named])):
        table.gains[n]["p_minus_ref_holm"] = ph


def build(paths: list[str | Path], against: str | None = None, allow_mixed: bool = False,
          baseline: list[str | Path] | None = None, paper: str | None = None) -> Table:
    rows = [load_row(f) for f in find_runs(paths)]
    if not rows:
        raise UserError("no run folders given")
    names = [r.name for r in rows]
    if len(set(names)) < len(names):  # two folders of the same name in different places
        for r in rows:
            r.name = f"{r.folder.parent.name}/{r.folder.name}"
    return compare(rows, against, allow_mixed, baseline, paper)


def compare(rows: list[Row], against: str | None = None, allow_mixed: bool = False,
            baseline: list[str | Path] | None = None, paper: str | None = None) -> Table:
    """The table of `rows` (named as they should appear): refused unless they compare, each row against
    `against` and `baseline`, and with `paper` (a head) the paper's numbers of each row beside it."""
    settings_apart(rows)
    mixed = differences(rows)
    if "numerics version" in mixed:  # rows read by `load_row` never get here: it refuses them one by one
        raise UserError(f"these runs are of other numerics versions ({') and ('.join(mixed['numerics version'])}): "
                        "numbers of other arithmetic never share a table, --allow-mixed or not; remake the old ones")
    if mixed and not allow_mixed:
        what = "; ".join(f"{kind} differs between ({') and ('.join(v)})" for kind, v in mixed.items())
        raise UserError(f"these runs do not compare: {what}. Re-run them alike, or pass --allow-mixed to show "
                        "them side by side with the difference in a column")
    ref = None
    if against is not None:
        matches = [r for r in rows if r.name == against] or [r for r in rows if r.head == against]
        if len(matches) != 1:
            raise UserError(f"--against {against!r} names {len(matches)} rows: give one of {', '.join(r.name for r in rows)}")
        ref = matches[0]
    table = Table(rows, ref, mixed, paper=paper)
    if paper is not None:
        table.paper_numbers = {r.name: n for r in rows if (n := paper_numbers(paper, r.config["train"]["dataset"], r.name))}
    if ref is not None:
        others = [r for r in rows if r.folder != ref.folder]  # a row that is the reference's run is no test
        tests = [t_test(r, ref) for r in others]
        for r, (delta, p, kind), ph in zip(others, tests, stats.holm([t[1] for t in tests])):
            table.comparisons[r.name] = {"delta_accuracy": delta, "p": p, "p_holm": ph, "test": kind}
    if baseline:
        add_gains(table, baseline, allow_mixed)
    return table
