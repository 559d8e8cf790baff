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

The result tables of the README and docs/*.md are this module's output between markers
(`<!-- results: ARGS -->` ... `<!-- results:end -->`, ARGS naming repository-relative run folders and
`--columns` choosing the columns); `refresh_markdown` regenerates them, each under a one-line caption
that links to the one legend (docs/results.md), and a test fails when a page and `results/` disagree.
"""

from __future__ import annotations

import glob
import json
import math
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import UserError
from experiments import stats
from experiments.search_folder import SearchFolder
from train.config import METRICS, family

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
    and the lane-hours the search took (every trial's wall seconds in trials.csv, the re-scores' and
    best/'s own wall seconds); None for any other run. Read from the files, so a table says it again."""
    search = SearchFolder.of_best(folder)
    trials = search and search.trial_rows()
    if not trials:
        return None
    from train.run_folder import RunFolder

    seconds = sum(float(t["seconds"] or 0) for t in trials)
    for run in [*RunFolder.under(search.rescored()), RunFolder(folder)]:
        seconds += run.metrics().get("wall_seconds", 0.0) if run.is_finished() else 0.0
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


def _differ(kind: str, a: dict, b: dict) -> bool:
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


def _ms(m: dict, n: int) -> str:
    """mean ± sample std over `n` seeds (one seed: the std is undefined, "n/a")."""
    from train.metrics import shown

    return shown(m, n)


def _settings(r: Row) -> str:
    return ", ".join(f"{k}={v}" for k, v in r.settings.items()) or "defaults"


def _protocol(r: Row) -> list[str]:
    """`--protocol-check` figures: test accuracy in file order at the best and at the last epoch (what
    the authors' protocol reports), and how far the best overstates the label-blind number."""
    p = r.metrics.get("protocol_check")
    if p is None:
        return ["", ""]
    n = len(r.seeds)
    return [f"{_ms(p['best_epoch']['accuracy'], n)} / {_ms(p['last_epoch']['accuracy'], n)}", f"{p['inflation']['mean']:+.4f}"]


COST_HEAD = ["s/epoch (median)", "peak RSS", "trainable parameters", "device"]


def _cost(r: Row) -> list[str]:
    """The optional cost columns (metrics.json `cost`; runs trained before it have none)."""
    c = r.metrics.get("cost")
    if not c:
        return [""] * len(COST_HEAD)
    sec, params = c.get("seconds_per_epoch_median"), c.get("trainable_parameters")
    return ["" if sec is None else f"{sec:.2f}", f"{c['peak_rss_bytes'] / 2**30:.2f} GiB",
            "" if params is None else f"{params:,}", c.get("device", "")]


def markdown(table: Table, columns: list[str] | None = None, legend: str | None = None) -> str:
    """The table in markdown, then its notes: every note (results.md of `--out`, ablate's table.md), or,
    with `legend` (a link to the page that explains every column), one line that links there."""
    head, _, rows, notes = _layout(table, columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n\n" + (" ".join(notes) if legend is None else caption(table, legend)) + "\n"


def caption(table: Table, legend: str) -> str:
    """One line under a table in a markdown page: what varies from table to table (how many tests each
    correction covers, warnings); what every column means is on the `legend` page, said once."""
    def n(count: int, what: str) -> str:
        return f"{count} {what}{'s' * (count != 1)}"

    bits = ["Test, dev-selected epoch, label-blind; mean ± sample std over seeds"]
    if table.reference is not None:
        bits.append(f"Holm over {n(len(table.comparisons), 'comparison')} with {table.reference.name}")
    if table.baseline:
        some = next(iter(table.baseline.values()))
        bits.append(f"gains over {some.folder.parent.name}/, Holm over {n(len(table.gains), 'row')}")
        if table.reference is not None:
            k = sum("p_minus_ref_holm" in g for g in table.gains.values())
            bits.append(f"gain minus {table.reference.name}'s, Holm over {n(k, 'row')}")
    if table.paper:
        bits.append(f"paper numbers from {table.paper}'s PAPER table")
    if table.reference is not None and any(len(r.seeds) <= 2 for r in table.rows):
        bits.append("warning: a row of 1 or 2 seeds has no or a weak test")
    return "; ".join(bits) + f". Columns: [legend]({legend})."


def screen_table(table: Table, width: int, columns: list[str] | None = None):
    """The table for the terminal (a rich Table at most `width` columns wide): the same cells as the
    markdown, with the least needed columns left out when they do not fit (the caption names them;
    `--out` and --markdown write every column, or those of `columns`)."""
    import io

    from rich.console import Console
    from rich.table import Table as RichTable

    head, rank, rows, notes = _layout(table, columns)

    def cell(k: int) -> int:  # the widest cell (settings wrap beyond 24 columns); headers wrap
        widest = max((len(r[k]) for r in rows), default=0)
        return min(widest, 24) if head[k] == "settings" else widest

    def make(shown: list[int]) -> RichTable:
        left_out = [head[k] for k in range(len(head)) if k not in shown]
        out = RichTable(caption=" ".join(notes) + (f" Left out at this width: {', '.join(left_out)} (a wider "
                                                   "terminal, or --out DIR, shows them)." if left_out else ""),
                        caption_justify="left")
        for k in sorted(shown):
            out.add_column(head[k], overflow="fold", min_width=max(cell(k), max(len(w) for w in head[k].split())))
        for cells in rows:
            out.add_row(*(cells[k] for k in sorted(shown)))
        return out

    def fits(t: RichTable) -> bool:  # drawn at `width`, the right border is there: nothing was cut
        console = Console(width=width, file=io.StringIO(), legacy_windows=False)
        console.print(t)
        return console.file.getvalue().splitlines()[0].rstrip().endswith("┓")

    by_rank = sorted(range(len(head)), key=lambda k: rank[k])
    shown = by_rank[:1]
    for k in by_rank[1:]:  # the most needed columns first, as many as fit without cutting a cell
        if not fits(make(shown + [k])):
            break  # a less needed column never shows when a more needed one does not
        shown.append(k)
    return make(shown)


def parse_columns(text: str | None) -> list[str] | None:
    """`--columns run,accuracy,delta` as a list of keys (None: every column); a key given twice is refused."""
    if text is None:
        return None
    keys = [k.strip() for k in text.split(",")]
    if not all(keys):
        raise UserError(f"--columns {text!r}: an empty name; give keys separated by commas, e.g. run,accuracy,delta")
    if len(set(keys)) < len(keys):
        raise UserError(f"--columns {text!r}: {sorted(k for k in keys if keys.count(k) > 1)[0]} is given twice")
    return keys


def _layout(table: Table, columns: list[str] | None = None) -> tuple[list[str], list[int], list[list[str]], list[str]]:
    """(headers, each column's rank: 0 is kept longest on a narrow terminal, rows of cells, notes); with
    `columns` (keys: docs/results.md#legend), only those columns, in that order."""
    shown = _Shown(protocol=any("protocol_check" in r.metrics for r in table.rows),
                   cost=any(r.metrics.get("cost") for r in table.rows),
                   robust=list(dict.fromkeys(c for r in table.rows for c in r.robustness)),
                   search=any(search_record(r.folder) for r in table.rows))
    cols = _columns(table, shown)
    keys, head = [k for k, _ in cols], [h for _, h in cols]
    rank, rows = _rank(head), [_cells(table, r, shown) for r in table.rows]
    if columns is not None:
        missing = [c for c in columns if c not in keys]
        if missing:
            raise UserError(f"--columns: no column {missing[0]!r} in this table; it has {', '.join(keys)}")
        pick = [keys.index(c) for c in columns]
        head, rank, rows = [head[k] for k in pick], [rank[k] for k in pick], [[r[k] for k in pick] for r in rows]
    return head, rank, rows, _notes(table, shown)


@dataclass
class _Shown:
    """The optional columns a table has, decided by its rows."""
    protocol: bool  # `--protocol-check` runs: the file-order columns
    cost: bool  # runs that recorded their cost
    robust: list[str]  # robustness.json conditions (`train --robustness`, `eval --drop/--noise`)
    search: bool = False  # rows chosen by `search`: its trials and lane-hours


def _columns(table: Table, shown: _Shown) -> list[tuple[str, str]]:
    """(key, header) of every column of the table, in order."""
    cols = [("run", "run"), ("head", "head"), ("settings", "settings"), ("seeds", "seeds"), ("accuracy", "accuracy"),
            ("weighted_f1", "weighted F1"), ("macro_f1", "macro F1"), *([("paper", "paper acc / F1")] if table.paper else []),
            ("epochs", "selected epochs"), ("dev_accuracy", "dev acc")]
    if shown.protocol:
        cols += [("file_order", "file-order test acc, best / last epoch"), ("inflation", "best minus label-blind")]
    if table.reference is not None:
        cols += [("delta", f"Δacc vs {table.reference.name}"), ("p", "p (Holm)"), ("test", "test"),
                 ("beyond_noise", "beyond noise")]
    if table.baseline:
        cols += [("baseline", "baseline acc"), ("gain", "gain, p (Holm)")]
        if table.reference is not None:
            cols += [("gain_minus", f"gain minus {table.reference.name}'s"), ("gain_minus_p", "p (Holm)"),
                     ("gain_minus_beyond_noise", "beyond noise")]
    cols += [(f"acc_{c}", f"acc {c.replace('_', ' ')}") for c in shown.robust]  # test accuracy under each condition
    if shown.search:
        cols += [("trials", "trials"), ("lane_hours", "lane-hours")]
    if shown.cost:
        cols += list(zip(("seconds_per_epoch", "peak_rss", "parameters", "device"), COST_HEAD))
    if table.mixed:
        cols.append(("differs", "differs in"))
    return cols


def _cells(table: Table, r: Row, shown: _Shown) -> list[str]:
    """Row `r`'s cells, one per column of `_columns`."""
    epochs = ", ".join(str(p["best_epoch"]) for p in r.metrics["per_seed"])
    cells = [r.name, r.head, _settings(r), str(len(r.seeds)), *(_ms(r.metrics["test"][m], len(r.seeds)) for m in METRICS)]
    if table.paper:
        cells.append("{:.4f} / {:.4f}".format(*table.paper_numbers[r.name]) if r.name in table.paper_numbers else "")
    cells += [epochs, _ms(r.metrics["dev"]["accuracy"], len(r.seeds))]
    if shown.protocol:
        cells += _protocol(r)
    if table.reference is not None:
        c = table.comparisons.get(r.name)
        if c is None:
            cells += ["(reference)" if r is table.reference else "(the reference's run)", "", "", ""]
        else:
            p = "" if math.isnan(c["p_holm"]) else f"{c['p_holm']:.3f}"
            cells += [f"{c['delta_accuracy']:+.4f}", p, c["test"], stats.beyond_noise(c["p_holm"])]
    if table.baseline:
        cells += _gain_cells(table, r)
    cells += [_ms(r.robustness[c]["accuracy"], len(r.seeds)) if c in r.robustness else "" for c in shown.robust]
    if shown.search:
        rec = search_record(r.folder)
        cells += [str(rec["trials"]), f"{rec['hours']:.2f}"] if rec else ["", ""]
    if shown.cost:
        cells += _cost(r)
    if table.mixed:
        base = table.reference or table.rows[0]
        cells.append(", ".join(k for k in table.mixed if _differ(k, r.config, base.config)))
    return cells


def _notes(table: Table, shown: _Shown) -> list[str]:
    notes = ["Test, dev-selected epoch, label-blind; mean ± sample std over seeds. Dev acc: dev accuracy at the "
             "selected epoch, beside test so that a setting chosen on dev can be read as it was chosen."]
    if shown.robust:
        notes.append("acc drop text / drop image: test accuracy with that modality replaced by its train mean; acc "
                     "noise S: with Gaussian noise of S train stds on every feature (robustness.json, train/robustness.py).")
    if table.paper:
        notes.append(f"Paper acc / F1: the paper's test numbers of the row ({table.paper}'s PAPER table, "
                     "matched by row or folder name).")
    if shown.protocol:
        notes.append("File-order columns (`--protocol-check`): test scored in the stored (label-sorted) order after "
                     "every epoch, the best epoch on test and the last, as the authors' protocol reports; "
                     "nothing is selected on them.")
    if table.reference is not None:
        notes.append("Δacc and p: paired t-test over seeds where both rows share seeds, split and scoring orders, "
                     f"Welch otherwise; Holm-corrected over {len(table.comparisons)} comparisons; 'yes' when p < {stats.P_NOISE}.")
    if table.baseline:
        some = next(iter(table.baseline.values()))
        notes.append(f"Baseline: the row of the same name in {some.folder.parent.name}/; gain = accuracy minus "
                     "the baseline's, paired t-test over seeds where possible (else Welch), Holm-corrected over "
                     f"{len(table.gains)} rows.")
        if table.reference is not None:
            notes.append(f"Gain minus {table.reference.name}'s: the per-seed difference of differences, one-sample "
                         f"t-test, Holm-corrected over {sum('p_minus_ref_holm' in g for g in table.gains.values())} rows.")
    if table.reference is not None:
        if any(len(r.seeds) == 2 for r in table.rows):
            notes.append("Warning: a row with 2 seeds gives its t-test 1 degree of freedom: its p-value says little.")
        if any(len(r.seeds) == 1 for r in table.rows):
            notes.append("Warning: a row with 1 seed cannot be tested (no p): use 5 seeds.")
    return notes


# the columns a narrow terminal keeps longest first (by the start of their header)
RANK = ["run", "accuracy", "Δacc", "p (Holm)", "beyond noise", "acc drop", "weighted F1", "macro F1", "seeds", "settings",
        "acc noise", "gain, p (Holm)", "gain minus", "differs in", "baseline acc", "dev acc", "selected epochs", "head",
        "test", "file-order", "best minus"]


def _rank(head: list[str]) -> list[int]:
    rank = [next((i for i, name in enumerate(RANK) if h.startswith(name)), len(RANK)) for h in head]
    gain = next((k for k, h in enumerate(head) if h.startswith("gain minus")), len(head))
    return [rank[gain] if k > gain else r for k, r in enumerate(rank)]  # its p and verdict go with it


def _gain_cells(table: Table, r: Row) -> list[str]:
    n = 2 + (3 if table.reference is not None else 0)
    g, b = table.gains.get(r.name), table.baseline.get(r.name)
    if g is None:
        return ["(none)"] + [""] * (n - 1)
    p = "" if math.isnan(g["p_gain_holm"]) else f", p {g['p_gain_holm']:.3f}"
    cells = [_ms(b.metrics["test"]["accuracy"], len(b.seeds)), f"{g['gain']:+.4f}{p}"]
    if table.reference is not None:
        if r is table.reference:
            cells += ["(reference)", "", ""]
        else:
            ph = g.get("p_minus_ref_holm")
            cells += [f"{g['minus_ref']:+.4f}", "" if ph is None else f"{ph:.3f}",
                      "" if ph is None else stats.beyond_noise(ph)]
    return cells


def csv_frame(table: Table):
    import pandas as pd

    records = []
    for r in table.rows:
        rec = {"run": r.name, "folder": str(r.folder), "head": r.head, "settings": _settings(r), "seeds": len(r.seeds),
               "selected_epochs": " ".join(str(p["best_epoch"]) for p in r.metrics["per_seed"])}
        for m in METRICS:
            rec[f"{m}_mean"], rec[f"{m}_std"] = r.metrics["test"][m]["mean"], r.metrics["test"][m]["std"]
        rec["dev_accuracy_mean"], rec["dev_accuracy_std"] = r.metrics["dev"]["accuracy"]["mean"], r.metrics["dev"]["accuracy"]["std"]
        if table.paper:
            rec["paper_accuracy"], rec["paper_f1"] = table.paper_numbers.get(r.name, (None, None))
        rec.update(table.comparisons.get(r.name, {}))
        rec.update(table.gains.get(r.name, {}))
        for k, v in (r.metrics.get("cost") or {}).items():  # optional: runs trained before it have none
            rec[f"cost_{k}"] = v
        records.append(rec)
    return pd.DataFrame(records)


def plot(table: Table, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.paths import write_png

    names = [r.name for r in table.rows]
    means = [r.metrics["test"]["accuracy"]["mean"] for r in table.rows]
    stds = [r.metrics["test"]["accuracy"]["std"] for r in table.rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.4))
    ax.errorbar(range(len(names)), means, yerr=stds, fmt="o", capsize=4)
    if table.reference is not None:
        ax.axhline(table.reference.metrics["test"]["accuracy"]["mean"], linestyle="--", alpha=0.5,
                   label=f"{table.reference.name} (reference)")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_png(path, fig, dpi=110)
    plt.close(fig)
    return path


def write(table: Table, out: Path, columns: list[str] | None = None) -> list[Path]:
    """results.md (the `columns`, or every column), results.csv (every figure) and results.png in `out`."""
    from core.paths import output_dir, write_atomic

    output_dir(out, ("results.md", "results.csv", "results.png"), "--out")
    write_atomic(out / "results.md", markdown(table, columns))
    write_atomic(out / "results.csv", csv_frame(table).to_csv(index=False))
    return [out / "results.md", out / "results.csv", plot(table, out / "results.png")]


# --- tables in markdown pages (README.md, docs/*.md) -----------------------------------------

# a marker starts its line, so a page may quote one in running text
BLOCK = re.compile(r"^(<!-- results: (?P<args>.+?) -->\n)(?P<body>.*?)^(<!-- results:end -->)", re.S | re.M)
LEGEND = "docs/results.md#legend"  # repository-relative: the one page that says what every column means


def _block_table(args: str, root: Path, legend: str | None = None) -> str:
    """The table a block's arguments (`results/x --against probe --columns run,accuracy`) make, paths
    relative to `root` (the repository); with `legend`, a one-line caption linking there."""
    words = shlex.split(args)
    against = allow = paper = columns = None
    paths, baseline = [], []
    it = iter(words)
    for w in it:
        if w == "--against":
            against = next(it)
        elif w == "--paper":
            paper = next(it)
        elif w == "--baseline":
            baseline.append(str(root / next(it)))
        elif w == "--columns":
            columns = parse_columns(next(it))
        elif w == "--allow-mixed":
            allow = True
        elif w.startswith("-"):
            raise UserError(f"results block `{args}`: unknown option {w} (--against, --paper, --baseline, --columns, "
                            "--allow-mixed)")
        else:
            paths.append(str(root / w))
    return markdown(build(paths, against, bool(allow), baseline or None, paper), columns, legend)


def markdown_root(page: Path) -> Path:
    """Where a page's block paths start: the repository for a page inside it (README.md, docs/*.md name
    `results/...` alike), else the page's own folder."""
    from core.paths import REPO

    page = page.resolve()
    return REPO if page.is_relative_to(REPO) else page.parent


def refresh_markdown(page: Path, check: bool = False, root: Path | None = None) -> list[str]:
    """Regenerate every results block of the markdown file `page` from the run folders it names
    (repository-relative), each captioned in one line that links to the legend; with `check`, change
    nothing and return the arguments of the blocks that differ."""
    import os

    page = Path(page)
    if not page.is_file():
        raise UserError(f"{page}: no such markdown file")
    root = markdown_root(page) if root is None else root
    target = root / LEGEND.partition("#")[0]
    here = page.resolve() == target.resolve()
    legend = "#legend" if here else os.path.relpath(target, page.resolve().parent) + "#legend"
    text = page.read_text()
    stale: list[str] = []

    def redo(m: re.Match) -> str:
        body = _block_table(m.group("args"), root, legend)
        if body != m.group("body"):
            stale.append(m.group("args"))
        return m.group(1) + body + m.group(4)

    new = BLOCK.sub(redo, text)
    if not check and new != text:
        from core.paths import write_atomic

        write_atomic(page, new)
    return stale

