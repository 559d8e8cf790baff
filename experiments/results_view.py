"""How a results Table is shown: in markdown (`--out`'s results.md, ablate's table.md, the pages'
blocks), on the terminal (the least needed columns left out when it is narrow), as results.csv (every
figure) and as results.png. The markdown and the terminal share one layout (`_layout`: headers, cells,
notes), so a column reads the same in both, and `--columns` picks from its keys (docs/results.md's
legend names them).

What a table holds (its rows, which of them compare, their tests) is experiments/results.py's; this
module only reads a Table, so a new way to show one touches no statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from experiments import stats
from experiments.results import Row, Table, differ, search_record
from train.config import METRICS


def _ms(m: dict, n: int) -> str:
    """mean ± sample std over `n` seeds (one seed: the std is undefined, "n/a")."""
    from train.metrics import shown

    return shown(m, n)


def _settings(r: Row) -> str:
    """Floats to 4 significant digits (a searched lr=0.005066866825366567 reads lr=0.005067; config.json
    keeps it whole)."""
    shown = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.settings.items())
    return ", ".join(shown) or "defaults"


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
    return "\n".join(lines) + "\n\n" + (" ".join(notes) if legend is None else caption(table, legend, columns)) + "\n"


def caption(table: Table, legend: str, columns: list[str] | None = None) -> str:
    """One line under a table in a markdown page: what varies from table to table (how many tests each
    correction covers, warnings), for the p-values of the `columns` shown (None: every column); what
    every column means is on the `legend` page, said once."""
    def n(count: int, what: str) -> str:
        return f"{count} {what}{'s' * (count != 1)}"

    def shown(*keys: str) -> bool:
        return columns is None or any(k in columns for k in keys)

    bits = ["Test, dev-selected epoch, label-blind; mean ± sample std over seeds"]
    if table.reference is not None and shown("p", "beyond_noise"):
        bits.append(f"Holm over {n(len(table.comparisons), 'comparison')} with {table.reference.name}")
    if table.baseline and shown("gain"):
        some = next(iter(table.baseline.values()))
        bits.append(f"gains over {some.folder.parent.name}/, Holm over {n(len(table.gains), 'row')}")
    if table.baseline and table.reference is not None and shown("gain_minus_p", "gain_minus_beyond_noise"):
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
        cells.append(", ".join(k for k in table.mixed if differ(k, r.config, base.config)))
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
