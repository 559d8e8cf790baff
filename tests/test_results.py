"""experiments/results.py (and the table shown, results_view.py, and in pages, results_pages.py) on synthetic
run folders: which test, Holm, refusing runs that do not compare."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import re

import pytest
from scipy.stats import ttest_ind, ttest_rel

from core.errors import UserError
from experiments import results, results_pages, results_view, stats
from train.config import METRICS
from train.numerics import NUMERICS_VERSION

def _prov(kind: str, encoder: str, fingerprint: str) -> dict:
    return {"kind": kind, "encoder": encoder, "fingerprint": fingerprint, "preprocessing": "{}", "dataset": "mvsa_s",
            "data_hash": "d", "n_shards": 1}


PROV = {"text": _prov("text", "minilm", "aaa"), "image": _prov("image", "efficientnet-lite0", "bbb")}


def make_run(root: Path, name: str, accs: dict[int, float], head: str = "spp_scl", head_config: dict | None = None,
             **train) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    cfg = {"dataset": "mvsa_s", "head": head, "head_config": head_config or {"alpha": 0.667}, "epochs": 150,
           "seeds": sorted(accs), "eval_orders": 5, "eval_seed": 0, "eval_batch_size": 64, "select": "weighted_f1",
           "splits": None, "official": False, "out": str(folder), **train}
    config = {"train": cfg, "provenance": train.pop("provenance", PROV), "sizes": {"train": 10, "dev": 5, "test": 5},
              "numerics_version": NUMERICS_VERSION, "git_commit": "0" * 40}
    (folder / "config.json").write_text(json.dumps(config))
    dev = dict.fromkeys(METRICS, 0.6)
    per_seed = [{"seed": s, "best_epoch": 10 + s, "dev": dev,
                 "test": {"accuracy": a, "weighted_f1": a - 0.01, "macro_f1": a - 0.1}} for s, a in accs.items()]

    def ms(split, key):
        import numpy as np

        v = [p[split][key] for p in per_seed]
        return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}

    # the files `results` checks metrics.json against: each seed's scores, and log.csv (best dev at best_epoch)
    rows = []
    for p in per_seed:
        (folder / f"seed-{p['seed']}.json").write_text(json.dumps({k: p[k] for k in ("seed", "best_epoch", "dev", "test")}))
        rows += [[p["seed"], e, *(["0.6000"] * 3 if e == p["best_epoch"] else ["0.5000"] * 3)]
                 for e in range(1, p["best_epoch"] + 3)]
    with open(folder / "log.csv", "w", newline="") as f:
        csv.writer(f).writerows([["seed", "epoch", *(f"dev_{m}" for m in METRICS)], *rows])
    (folder / "metrics.json").write_text(json.dumps({split: {m: ms(split, m) for m in METRICS}
                                                     for split in ("dev", "test")} | {"per_seed": per_seed}))
    return folder


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


REF = {1: 0.70, 2: 0.71, 3: 0.69, 4: 0.72, 5: 0.70}
OTHER = {1: 0.66, 2: 0.69, 3: 0.66, 4: 0.70, 5: 0.67}


def test_same_seeds_split_and_orders_are_compared_paired(tmp_path):
    make_run(tmp_path, "probe", REF, head="probe", head_config={"modalities": "both"})
    make_run(tmp_path, "spp", OTHER)
    t = results.build([tmp_path], against="probe")
    c = t.comparisons["spp"]
    assert c["test"] == "paired"
    assert c["p"] == pytest.approx(ttest_rel(list(OTHER.values()), list(REF.values())).pvalue)
    assert c["delta_accuracy"] == pytest.approx(sum(OTHER.values()) / 5 - sum(REF.values()) / 5)


def test_other_seeds_fall_back_to_welch(tmp_path):
    make_run(tmp_path, "probe", REF, head="probe", head_config={"modalities": "both"})
    other = {s + 5: a for s, a in OTHER.items()}
    make_run(tmp_path, "spp", other)
    c = results.build([tmp_path], against="probe").comparisons["spp"]
    assert c["test"] == "welch"
    assert c["p"] == pytest.approx(ttest_ind(list(other.values()), list(REF.values()), equal_var=False).pvalue)


def test_holm_correction():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, float("nan")])[0] == 0.5  # a NaN is not a test


def test_a_constant_difference_over_seeds_is_certain_not_undefined(tmp_path):
    """The paired statistic is 0/0 there: a constant non-zero difference gives p 0, a zero one p 1."""
    make_run(tmp_path, "probe", REF, head="probe", head_config={"modalities": "both"})
    make_run(tmp_path, "up", {s: a + 0.01 for s, a in REF.items()})
    make_run(tmp_path, "same", dict(REF))
    t = results.build([tmp_path], against="probe")
    assert t.comparisons["up"]["p"] == 0.0 and t.comparisons["up"]["p_holm"] == 0.0
    assert t.comparisons["same"]["p"] == 1.0
    assert stats.one_sample([0.01, 0.01, 0.01]) == 0.0 and stats.one_sample([0.0, 0.0]) == 1.0


def test_p_values_in_the_table_are_holm_corrected(tmp_path):
    make_run(tmp_path, "a-probe", REF, head="probe", head_config={"modalities": "both"})
    make_run(tmp_path, "b", OTHER)
    make_run(tmp_path, "c", {s: a + 0.005 * s for s, a in REF.items()})
    t = results.build([tmp_path], against="a-probe")
    raw = [t.comparisons[n]["p"] for n in ("b", "c")]
    assert [t.comparisons[n]["p_holm"] for n in ("b", "c")] == pytest.approx(stats.holm(raw))
    assert "Holm-corrected over 2 comparisons" in results_view.markdown(t)


@pytest.mark.parametrize("kind, change", [
    ("cache", lambda c: c["provenance"]["text"].update(fingerprint="zzz")),
    ("split", lambda c: c["train"].update(splits="splits/mvsa_s_clean")),
    ("protocol", lambda c: c["train"].update(eval_seed=7)),
])
def test_runs_that_do_not_compare_are_refused_with_the_difference_named(tmp_path, kind, change):
    make_run(tmp_path, "probe", REF, head="probe", head_config={"modalities": "both"})
    edit_config(make_run(tmp_path, "spp", OTHER), change)
    with pytest.raises(UserError, match=f"{kind} differs"):
        results.build([tmp_path], against="probe")
    t = results.build([tmp_path], against="probe", allow_mixed=True)
    md = results_view.markdown(t)
    assert "differs in" in md and f"| {kind} |" in md


def test_settings_column_shows_what_sets_a_row_apart(tmp_path):
    make_run(tmp_path, "a", REF, head_config={"alpha": 2 / 3, "cmf": True})
    make_run(tmp_path, "b", OTHER, head_config={"alpha": 2 / 3, "cmf": False})
    make_run(tmp_path, "c", OTHER, head_config={"alpha": 2 / 3, "cmf": True}, official=True)
    t = results.build([tmp_path])
    assert [r.settings for r in t.rows] == [{}, {"cmf": False}, {"official": True}]
    make_run(tmp_path, "d", OTHER, head_config={"alpha": 0.5066866825366567, "cmf": True, "temperature": 1.988624872951696e-08})
    d = results.build([tmp_path]).rows[-1]
    assert results_view._settings(d) == "alpha=0.5067, temperature=1.989e-08"  # 4 digits; config.json keeps them whole


def test_unfinished_and_unknown_folders_are_one_clear_error(tmp_path):
    run = make_run(tmp_path, "x", REF)
    (run / "metrics.json").unlink()
    with pytest.raises(UserError, match="not finished"):
        results.build([run])
    with pytest.raises(UserError, match="no such file"):
        results.build([tmp_path / "nope"])


def test_readme_blocks_are_regenerated_and_checked(tmp_path):
    make_run(tmp_path / "results" / "heads", "probe", REF, head="probe", head_config={"modalities": "both"})
    make_run(tmp_path / "results" / "heads", "spp", OTHER)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results: results/heads --against probe -->\nold table\n<!-- results:end -->\nend\n")
    assert results_pages.refresh_markdown(readme, check=True) == ["results/heads --against probe"]
    assert "old table" in readme.read_text()  # check changes nothing
    results_pages.refresh_markdown(readme)
    assert "old table" not in readme.read_text() and "| spp | spp_scl |" in readme.read_text()
    assert results_pages.refresh_markdown(readme, check=True) == []


def _pages() -> list[str]:
    from conftest import REPO

    return ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]


def test_the_pages_with_tables_are_the_readme_and_docs_results():
    from conftest import REPO

    with_tables = [p for p in _pages() if results_pages.BLOCK.search((REPO / p).read_text())]
    assert "README.md" in with_tables and "docs/results.md" in with_tables


@pytest.mark.parametrize("page", _pages())
def test_a_table_on_a_page_has_a_one_line_caption_and_the_legend_is_said_once(page):
    """The legend of every column lives on docs/results.md; under each table one short line links there."""
    from conftest import REPO

    for m in results_pages.BLOCK.finditer((REPO / page).read_text()):
        caption = m.group("body").rstrip("\n").split("\n\n")[-1]
        assert "\n" not in caption and len(caption) <= 300 and "[legend](" in caption, caption


def test_every_column_key_a_page_picks_is_in_the_legend():
    """The legend (docs/results.md) names the `--columns` key of each column the pages' tables show."""
    from conftest import REPO

    legend = (REPO / "docs" / "results.md").read_text().split("## Legend", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z0-9_]+)`", legend))
    for page in _pages():
        for m in results_pages.BLOCK.finditer((REPO / page).read_text()):
            keys = re.search(r"--columns (\S+)", m.group("args"))
            missing = set(keys.group(1).split(",")) - named if keys else set()
            assert not missing, f"{page}: columns {sorted(missing)} are not in the legend of docs/results.md"


@pytest.mark.parametrize("page", _pages())
def test_every_table_of_the_readme_and_docs_is_what_results_prints_from_the_committed_evidence(page):
    """Every `<!-- results: ... -->` block of README.md and docs/*.md equals `pipeline.py results` over results/."""
    from conftest import REPO

    assert results_pages.refresh_markdown(REPO / page, check=True) == []


def test_columns_choose_and_order_the_columns_of_screen_markdown_and_blocks(tmp_path):
    make_run(tmp_path / "results" / "heads", "probe", REF, head="probe", head_config={"modalities": "both"})
    make_run(tmp_path / "results" / "heads", "spp", OTHER)
    t = results.build([tmp_path / "results" / "heads"], against="probe")
    keys = results_view.parse_columns("run, accuracy,macro_f1,delta,beyond_noise")
    md = results_view.markdown(t, keys)
    assert md.splitlines()[0] == "| run | accuracy | macro F1 | Δacc vs probe | beyond noise |"
    assert md.splitlines()[2].startswith("| probe | 0.7040 ± 0.0114 | ") and "(reference)" in md
    assert results_view.markdown(t, ["delta", "run"]).splitlines()[0] == "| Δacc vs probe | run |"  # in the order given
    with pytest.raises(UserError, match="no column 'gain'.*it has run, head"):
        results_view.markdown(t, ["run", "gain"])
    with pytest.raises(UserError, match="run is given twice"):
        results_view.parse_columns("run,accuracy,run")
    with pytest.raises(UserError, match="an empty name"):
        results_view.parse_columns("run,,accuracy")
    # a block: its own --columns, a one-line caption that links to the legend, relative to the page
    block = "<!-- results: results/heads --against probe --columns run,accuracy,delta -->\nold\n<!-- results:end -->\n"
    quoted = "A marker (`<!-- results: ARGS -->`) quoted in running text is no block.\n\n"
    for page, link in [(tmp_path / "README.md", "docs/results.md#legend"),
                       (tmp_path / "docs" / "other.md", "results.md#legend"), (tmp_path / "docs" / "results.md", "#legend")]:
        page.parent.mkdir(exist_ok=True)
        page.write_text(block)
        assert results_pages.refresh_markdown(page, root=tmp_path) == ["results/heads --against probe --columns run,accuracy,delta"]
        body = page.read_text().split("\n")
        page.write_text(quoted + page.read_text())
        assert results_pages.refresh_markdown(page, root=tmp_path, check=True) == []
        assert body[1] == "| run | accuracy | Δacc vs probe |"
        caption = body[body.index("") + 1]
        assert caption.endswith(f"Columns: [legend]({link}).") and "Holm" not in caption  # no p column shown
        assert results_pages.refresh_markdown(page, root=tmp_path, check=True) == []
    page.write_text(block.replace("--columns", "--colums"))
    with pytest.raises(UserError, match="unknown option --colums"):
        results_pages.refresh_markdown(page, root=tmp_path)


def test_results_refreshes_several_markdown_files_and_check_changes_nothing(tmp_path, run_main, monkeypatch):
    make_run(tmp_path / "results" / "heads", "probe", REF, head="probe", head_config={"modalities": "both"})
    make_run(tmp_path / "results" / "heads", "spp", OTHER)
    block = "<!-- results: results/heads --against probe --columns run,delta -->\nold\n<!-- results:end -->\n"
    pages = [tmp_path / "README.md", tmp_path / "more.md"]
    for page in pages:
        page.write_text(block)
    monkeypatch.chdir(tmp_path)
    r = run_main("results", "--check", "--markdown", "README.md", "more.md")
    assert r.code == 1 and "README.md, more.md: tables differ" in r.err and "1 table(s) differ" in r.out
    assert all(p.read_text() == block for p in pages)  # --check changes nothing
    r = run_main("results", "--readme", "README.md", "--markdown", "more.md")  # the old name still works
    assert r.code == 0 and "README.md: 1 table(s) regenerated" in r.out and "more.md: 1 table(s) regenerated" in r.out
    assert all("| spp | -0.0280 |" in p.read_text() for p in pages)
    r = run_main("results", "--markdown", "README.md", "--check")
    assert r.code == 0 and "README.md: 0 table(s) differ" in r.out
    assert run_main("results", "--check", "results/heads").code == 1
    r = run_main("results", "results/heads", "--against", "probe", "--columns", "run,nope")
    assert r.code == 1 and "no column 'nope'" in r.err


# --- numerics versions: never mixed, and what remakes a run of another one ---------------------------

def _no_version(c: dict) -> None:
    del c["numerics_version"]


@pytest.mark.parametrize("change, made", [(lambda c: c.update(numerics_version=0), "made by numerics version 0"),
                                          (_no_version, "made before numerics versions")])
def test_a_committed_run_of_another_numerics_version_is_refused_naming_the_script_that_remakes_it(
        tmp_path, run_main, change, made):
    """With --allow-mixed too: it mixes settings, never arithmetic. A copy of the committed evidence (the run
    and the results/*.sh scripts) stands in for it."""
    import shutil

    from conftest import REPO

    run = tmp_path / "results" / "mvsa_s-heads" / "probe"
    shutil.copytree(REPO / "results" / "mvsa_s-heads" / "probe", run)
    for script in (REPO / "results").glob("*.sh"):
        shutil.copy(script, tmp_path / "results")
    assert run_main("results", run.parent).code == 0
    edit_config(run, change)
    for mixed in ([], ["--allow-mixed"]):
        r = run_main("results", run.parent, *mixed)
        assert r.code == 1 and "Traceback" not in r.err, r.err
        [line] = r.err.strip().splitlines()
        assert line == (f"error: {run} was {made}, the current code is version {NUMERICS_VERSION}: its numbers are "
                        "not this code's; delete it and run `bash results/mvsa_s-heads.sh`, which trains the runs "
                        "that are missing")


def test_a_run_of_another_numerics_version_elsewhere_is_to_be_trained_again(tmp_path):
    make_run(tmp_path, "probe", REF, head="probe", head_config={"modalities": "both"})
    edit_config(make_run(tmp_path, "spp", OTHER), lambda c: c.update(numerics_version=NUMERICS_VERSION + 1))
    for mixed in (False, True):
        with pytest.raises(UserError, match=f"{tmp_path / 'spp'} was made by numerics version {NUMERICS_VERSION + 1}, "
                                            ".*; delete it and train it again with the command that made it$"):
            results.build([tmp_path], allow_mixed=mixed)


def test_every_committed_run_is_remade_by_the_script_that_writes_its_folder():
    from conftest import REPO
    from train import numerics
    from train.run_folder import RunFolder

    scripts = {"hfm-text": "text-caches.sh", "mvsa_m-text": "text-caches.sh", "mvsa_s-ablate": "mvsa_s-ablate.sh",
               "mvsa_s-full": "mvsa_s-full.sh", "mvsa_s-heads": "mvsa_s-heads.sh", "mvsa_s-strong": "mvsa_s-strong.sh"}
    folders = RunFolder.under(REPO / "results", depth=2)
    assert len(folders) > 40
    for folder in folders:
        table = folder.path.parent.name
        script = numerics.remaking_script(folder.path)
        assert script is not None and script.name == next(v for k, v in scripts.items() if table.startswith(k)), folder
    assert numerics.remaking_script(REPO / "runs" / "x") is None


def test_no_source_file_is_hashed_a_comment_in_the_trainer_changes_nothing(tmp_path, cli):
    """A run's identity is its numerics version, never the bytes of the code: `results` over the committed
    evidence works as well from a copy of the project whose train/trainer.py gained a comment."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()  # the working tree's files
    for name in listed:
        if name.startswith(("tests/", "bench/", "docs/")) or (name.startswith("results/")
                                                              and not name.startswith("results/mvsa_s-heads/")):
            continue
        if (REPO / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, tmp_path / name)
    with open(tmp_path / "train" / "trainer.py", "a") as f:
        f.write("# a comment: the code's bytes change, its numbers do not\n")
    r = subprocess.run([sys.executable, "pipeline.py", "results", "results/mvsa_s-heads", "--against", "probe"],
                       cwd=tmp_path, env=cli.env(COLUMNS="200"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "spp_scl-official" in r.stdout and "(reference)" in r.stdout


def test_protocol_check_columns_show_best_and_last_file_order_epochs(tmp_path):
    run = make_run(tmp_path, "spp", OTHER)
    m = json.loads((run / "metrics.json").read_text())
    ms = lambda v: {"mean": v, "std": 0.01}  # noqa: E731
    m["protocol_check"] = {"best_epoch": {"accuracy": ms(0.72)}, "last_epoch": {"accuracy": ms(0.70)},
                           "inflation": ms(0.044)}
    (run / "metrics.json").write_text(json.dumps(m))
    make_run(tmp_path, "probe", REF, head="probe", head_config={"modalities": "both"})
    md = results_view.markdown(results.build([tmp_path], against="probe"))
    assert "0.7200 ± 0.0100 / 0.7000 ± 0.0100 | +0.0440" in md


def _strong_and_base(tmp_path, head_gain: dict[int, float], probe_gain: dict[int, float]):
    """The same two heads on two caches: `base` (baseline encoders) and `strong`."""
    strong_prov = {"text": _prov("text", "mpnet", "ccc"), "image": _prov("image", "efficientnet-lite2", "ddd")}
    make_run(tmp_path / "base", "probe", REF, head="probe", head_config={"modalities": "both"})
    make_run(tmp_path / "base", "spp", OTHER)
    make_run(tmp_path / "strong", "probe", {s: a + probe_gain[s] for s, a in REF.items()}, head="probe",
             head_config={"modalities": "both"}, provenance=strong_prov)
    make_run(tmp_path / "strong", "spp", {s: a + head_gain[s] for s, a in OTHER.items()}, provenance=strong_prov)


def test_baseline_gives_each_rows_gain_and_the_difference_of_differences_paired_over_seeds(tmp_path):
    from scipy.stats import ttest_1samp

    head_gain = {1: 0.03, 2: 0.05, 3: 0.02, 4: 0.04, 5: 0.06}
    probe_gain = {1: 0.01, 2: 0.00, 3: 0.02, 4: 0.01, 5: 0.00}
    _strong_and_base(tmp_path, head_gain, probe_gain)
    t = results.build([tmp_path / "strong"], against="probe", baseline=[tmp_path / "base"])
    g = t.gains["spp"]
    assert g["gain"] == pytest.approx(sum(head_gain.values()) / 5) and g["test_gain"] == "paired"
    did = [head_gain[s] - probe_gain[s] for s in range(1, 6)]
    assert g["minus_ref"] == pytest.approx(sum(did) / 5)
    assert g["p_minus_ref"] == pytest.approx(ttest_1samp(did, 0.0).pvalue)
    assert g["p_minus_ref_holm"] == pytest.approx(g["p_minus_ref"])  # one row tested: Holm changes nothing
    assert t.gains["probe"]["gain"] == pytest.approx(0.008)
    md = results_view.markdown(t)
    assert "gain minus probe's" in md and "Baseline: the row of the same name in base/" in md
    p_gains = stats.holm([ttest_rel([a + head_gain[s] for s, a in OTHER.items()], list(OTHER.values())).pvalue,
                            ttest_rel([a + probe_gain[s] for s, a in REF.items()], list(REF.values())).pvalue])
    assert [t.gains[n]["p_gain_holm"] for n in ("spp", "probe")] == pytest.approx(p_gains)
    assert f"| {sum(head_gain.values()) / 5:+.4f}, p {p_gains[0]:.3f} | {sum(did) / 5:+.4f} |" in md
    assert results_pages._block_table("strong --against probe --baseline base", tmp_path) == md  # a README block
    # a caption names the corrections of the p-values its columns show, no other
    caption = lambda keys: results_view.caption(t, "#legend", keys)  # noqa: E731
    assert "gain minus probe's, Holm over 1 row" in caption(None) and "Holm over 1 comparison" in caption(None)
    assert "gain minus" not in caption(["run", "gain"]) and "gains over base/, Holm over 2 rows" in caption(["gain"])
    assert "Holm" not in caption(["run", "accuracy"])
    assert "Holm over 1 comparison" in caption(["beyond_noise"]) and "gain minus" in caption(["gain_minus_beyond_noise"])


def test_baseline_of_another_split_or_numerics_version_is_refused_and_a_missing_reference_named(tmp_path):
    zero = dict.fromkeys(range(1, 6), 0.0)
    _strong_and_base(tmp_path, zero, zero)
    edit_config(tmp_path / "base" / "spp", lambda c: c["train"].update(splits="splits/mvsa_s_clean"))
    with pytest.raises(UserError, match="split differs"):
        results.build([tmp_path / "strong"], against="probe", baseline=[tmp_path / "base"])
    assert results.build([tmp_path / "strong"], against="probe", baseline=[tmp_path / "base"], allow_mixed=True).gains
    edit_config(tmp_path / "base" / "spp", lambda c: c.update(numerics_version=NUMERICS_VERSION + 1))
    for mixed in (False, True):
        with pytest.raises(UserError, match=f"{tmp_path / 'base' / 'spp'} was made by numerics version"):
            results.build([tmp_path / "strong"], against="probe", baseline=[tmp_path / "base"], allow_mixed=mixed)
    edit_config(tmp_path / "base" / "spp", lambda c: c.update(numerics_version=NUMERICS_VERSION))
    import shutil

    shutil.rmtree(tmp_path / "base" / "probe")
    with pytest.raises(UserError, match="no run named 'probe'"):
        results.build([tmp_path / "strong"], against="probe", baseline=[tmp_path / "base"], allow_mixed=True)


def test_paper_numbers_stand_beside_ablation_rows_named_by_row_or_folder(tmp_path):
    """`--paper HEAD`: each row's paper accuracy / F1 from HEAD's PAPER table, found by the row's name or by
    the folder name results/*-ablate.sh gives it (a row may carry its own, 'w/o L_cli,L_clt' -> wo-intra)."""
    for name in ("full", "wo-clm", "wo-intra", "ha-last-1", "text-only", "linear-probe"):
        make_run(tmp_path / "ablate", name, REF)
    t = results.build([tmp_path / "ablate"], against="full", paper="spp_scl")
    assert t.paper_numbers == {"full": (0.8133, 0.8015), "wo-clm": (0.7289, 0.7040), "wo-intra": (0.7244, 0.7170),
                               "ha-last-1": (0.7133, 0.7025), "text-only": (0.7111, 0.6970)}
    md = results_view.markdown(t)
    assert "| macro F1 | paper acc / F1 | selected epochs |" in md and "0.7244 / 0.7170" in md
    assert "spp_scl's PAPER table" in md
    assert results_pages._block_table("ablate --against full --paper spp_scl", tmp_path) == md  # a README block
    assert results.paper_numbers("spp_scl", "mvsa_s", "w/o L_cli,L_clt") == (0.7244, 0.7170)
    assert results.paper_numbers("hybrid_fusion", "mvsa_s", "wo-birau") is None  # no paper numbers: empty
    for folder, row in [("wo-ca", "w/o CA"), ("wo-clip", "w/o CLIP"), ("full", "full")]:
        assert results.paper_numbers("clip_ca_cg", "mvsa_s", folder) == results.paper_numbers("clip_ca_cg", "mvsa_s", row)
    assert "paper acc" not in results_view.markdown(results.build([tmp_path / "ablate"], against="full"))  # only when asked
    with pytest.raises(UserError, match="unknown head 'nope'"):
        results.build([tmp_path / "ablate"], paper="nope")


def test_the_slugs_of_every_ablation_row_are_the_folder_names_of_the_ablation_evidence():
    """results/mvsa_s-ablate.sh names its folders by these slugs; a new row must get one that fits."""
    import heads

    expect = {"spp_scl": ["full", "one-step", "wo-clm", "wo-intra", "ha-last-1", "ha-last-2", "ha-last-3", "ha-last-4",
                          "no-ha", "wo-cmf", "text-only", "image-only", "linear-probe"],
              "clip_ca_cg": ["full", "wo-clip", "wo-ca", "wo-cg", "linear-probe"],
              "hybrid_fusion": ["full", "wo-self-attention", "wo-cross-attention", "wo-birau", "equal-decision-weights",
                                "wo-decision-fusion", "linear-probe"]}
    for head, slugs in expect.items():
        rows = {"full": {}, **heads.config_class(head).ABLATIONS}
        assert [v.get("slug") or results.slug(k) for k, v in rows.items()] == slugs


@pytest.mark.parametrize("width", [80, 120, 200])
def test_on_screen_the_table_fits_the_terminal_and_keeps_the_needed_columns(tmp_path, width):
    import re
    from io import StringIO

    from rich.console import Console

    make_run(tmp_path, "probe", REF, head="probe", head_config={"modalities": "both"})
    make_run(tmp_path, "spp", OTHER, head_config={"alpha": 0.5})
    console = Console(file=StringIO(), width=width, force_terminal=True)
    console.print(results_view.screen_table(results.build([tmp_path], against="probe"), width))
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in console.file.getvalue().splitlines()]
    assert all(len(line) <= width for line in lines) and lines[0].rstrip().endswith("┓")  # nothing cut
    text = "\n".join(lines)
    for needed in ("run", "accuracy", "Δacc vs probe", "p (Holm)", "0.7040 ± 0.0114", "(reference)"):
        assert needed in text, needed
    if width >= 200:
        assert "alpha=0.5" in text and "Left out" not in text


def test_a_row_of_the_heads_defaults_reads_defaults(tmp_path):
    """Two SPP-SCL rows, one official: the other's supcon_official=False is the default, not a difference."""
    from train.config import TrainConfig

    default = TrainConfig(dataset="mvsa_s", head="spp_scl").resolved().to_json()["head_config"]
    make_run(tmp_path, "spp", REF, head_config=default)
    make_run(tmp_path, "official", OTHER, head_config={**default, "supcon_official": True, "gate_floor": True})
    t = results.build([tmp_path])
    settings = {r.name: results_view._settings(r) for r in t.rows}
    assert settings == {"spp": "defaults", "official": "supcon_official=True, gate_floor=True"}


def test_one_seed_prints_no_std():
    assert results_view._ms({"mean": 0.66, "std": 0.0}, 1) == "0.6600 ± n/a"
    assert results_view._ms({"mean": 0.66, "std": 0.01}, 2) == "0.6600 ± 0.0100"


def test_cost_columns_appear_when_a_run_recorded_its_cost(tmp_path):
    """metrics.json `cost` (seconds per epoch, peak RSS, parameters, device) gives optional columns;
    a run trained before it leaves them blank, and without any cost they are not shown."""
    make_run(tmp_path, "probe", REF, head="probe", head_config={"modalities": "both"})
    assert "peak RSS" not in results_view.markdown(results.build([tmp_path]))
    run = make_run(tmp_path, "spp", OTHER)
    m = json.loads((run / "metrics.json").read_text())
    m["cost"] = {"seconds_per_epoch_median": 7.456, "peak_rss_bytes": 3 << 29, "trainable_parameters": 123456,
                 "device": "cpu"}
    (run / "metrics.json").write_text(json.dumps(m))
    table = results.build([tmp_path])
    md = results_view.markdown(table)
    assert "| s/epoch (median) | peak RSS | trainable parameters | device |" in md
    assert "| 7.46 | 1.50 GiB | 123,456 | cpu |" in md
    assert "|  |  |  |  |" in md  # the probe has no cost recorded
    frame = results_view.csv_frame(table)
    assert frame.loc[frame["run"] == "spp", "cost_trainable_parameters"].item() == 123456


def test_dev_accuracy_stands_beside_test_in_tables_and_csv(tmp_path):
    """A setting chosen on dev (alpha) is read from the dev column; test stays beside it, never used to choose."""
    for name in ("a", "b"):
        make_run(tmp_path / "runs", name, REF)
    t = results.build([tmp_path / "runs"])
    head, _, rows, notes = results_view._layout(t)
    k = head.index("dev acc")
    assert head[k - 1] == "selected epochs"
    for r, cells in zip(t.rows, rows):
        assert cells[k] == results_view._ms(r.metrics["dev"]["accuracy"], len(r.seeds)) != ""
        assert cells[k] != cells[head.index("accuracy")] or r.metrics["dev"]["accuracy"] == r.metrics["test"]["accuracy"]
    frame = results_view.csv_frame(t)
    assert list(frame["dev_accuracy_mean"]) == [r.metrics["dev"]["accuracy"]["mean"] for r in t.rows]
    assert any("Dev acc" in n for n in notes)
