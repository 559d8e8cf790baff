"""experiments/grid.py and the `ablate` / `sweep` commands, on the synthetic 3-class cache: the table
is `results`' table of the cells (paper numbers, paired tests, Holm); an interrupted grid redoes only what was
not finished; two shards (processes) make the same table as one process; a sweep writes its CSV
and plot; run folders are named from the config hash."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from train.metrics import mean_std
import torch

import heads
from experiments import grid, stats
from train import data as cache
from train import run_folder, runs, trainer
from train.config import TrainConfig
from train.numerics import NUMERICS_VERSION

from conftest import assert_gone, cut_when_saved, quiet_console, run_numbers

ROWS = ["one-step", "w/o CMF", "linear probe"]


def base(c, **kw) -> TrainConfig:
    cfg = dict(dataset=c.dataset, cache_dir=c.cache_dir, text_encoder=c.text_encoder, image_encoder=c.image_encoder,
               epochs=2, seeds=(1, 2), batch_size=12)
    cfg.update(kw)
    return TrainConfig(**cfg)


pytestmark = pytest.mark.usefixtures("one_thread")


def cli_args(c, runs_dir: Path, *extra) -> list:
    return ["--dataset", c.dataset, "--cache-dir", c.cache_dir, "--text-encoder", c.text_encoder, "--image-encoder",
            c.image_encoder, "--epochs", "2", "--seeds", "1,2", "--batch-size", "12", "--runs-dir", runs_dir, *extra]


def test_config_hash_names_run_folders(synth_cache, tmp_path):
    a = base(synth_cache).resolved()
    assert run_folder.default_out(a, tmp_path) == run_folder.default_out(replace(a), tmp_path)
    other = replace(a, head_config=replace(a.head_config, alpha=0.5))
    assert run_folder.default_out(other, tmp_path) != run_folder.default_out(a, tmp_path)
    assert run_folder.default_out(replace(a, out=tmp_path / "x"), tmp_path) == run_folder.default_out(a, tmp_path)


def test_ablate_table_is_the_results_table_of_its_cells(synth_cache, tmp_path):
    """Rows named by the ablation row, against the full model, the paper's numbers beside them, and
    the statistics of `results`: paired over seeds, Holm-corrected across the rows."""
    cells = grid.ablation_cells(base(synth_cache), tmp_path / "runs", ROWS)
    assert [c.name for c in cells] == ["full", *ROWS]
    assert cells[-1].cfg.head == "probe" and cells[1].cfg.head_config.two_step is False
    assert cells[2].cfg.head_config.cmf is False
    grid.run_cells(cells, console=quiet_console())
    t = grid.assemble(cells, tmp_path / "table", synth_cache.dataset, "spp_scl")
    assert t is not None and t.reference.name == "full"
    table = pd.read_csv(tmp_path / "table" / "table.csv")
    assert table["run"].tolist() == ["full", *ROWS]
    assert table.loc[0, "paper_accuracy"] == 0.8133 and table.loc[1, "paper_accuracy"] == 0.7956
    assert pd.isna(table.loc[3, "paper_accuracy"])  # the linear probe is not in the paper
    raw = [t.comparisons[r]["p"] for r in ROWS]
    assert [t.comparisons[r]["p_holm"] for r in ROWS] == pytest.approx(stats.holm(raw), nan_ok=True)
    assert table["p_holm"].iloc[1:].tolist() == pytest.approx([t.comparisons[r]["p_holm"] for r in ROWS], nan_ok=True)
    assert set(table["test"].iloc[1:]) == {"paired"}
    for row, metrics in zip(table.to_dict("records"), [json.loads((c.cfg.out / "metrics.json").read_text()) for c in cells]):
        assert row["accuracy_mean"] == pytest.approx(metrics["test"]["accuracy"]["mean"])
        assert row["accuracy_std"] == pytest.approx(metrics["test"]["accuracy"]["std"])
    md = (tmp_path / "table" / "table.md").read_text()
    assert md.startswith(f"spp_scl ablations on {synth_cache.dataset}, 2 epochs")
    assert "| one-step | spp_scl |" in md and "0.7956 / 0.7684" in md and "| Δacc vs full | p (Holm) |" in md
    assert "Holm-corrected over 3 comparisons" in md
    assert "2 seeds gives its t-test 1 degree of freedom" in md  # seeds (1, 2): the table says the test is weak


def test_a_constant_difference_over_seeds_is_p_0_in_ablate_as_in_results(synth_cache, tmp_path):
    """Every seed 0.01 above the full model: the paired test is 0/0, and the difference is certain (p = 0), not NaN."""
    cells = grid.ablation_cells(base(synth_cache, epochs=1), tmp_path / "runs", ["one-step"])
    grid.run_cells(cells, console=quiet_console())
    full = json.loads((cells[0].cfg.out / "metrics.json").read_text())
    path = cells[1].cfg.out / "metrics.json"
    m = json.loads(path.read_text())
    for mine, ref in zip(m["per_seed"], full["per_seed"]):  # the seed files too: results checks they agree
        mine["test"]["accuracy"] = ref["test"]["accuracy"] + 0.01
        seed_file = cells[1].cfg.out / f"seed-{mine['seed']}.json"
        seed = json.loads(seed_file.read_text())
        seed["test"]["accuracy"] = mine["test"]["accuracy"]
        seed_file.write_text(json.dumps(seed))
    m["test"]["accuracy"] = mean_std([p["test"]["accuracy"] for p in m["per_seed"]])
    path.write_text(json.dumps(m))
    t = grid.assemble(cells, tmp_path / "table", synth_cache.dataset, "spp_scl")
    assert t.comparisons["one-step"]["p"] == 0.0 and t.comparisons["one-step"]["p_holm"] == 0.0
    assert t.comparisons["one-step"]["delta_accuracy"] == pytest.approx(0.01)
    assert "| +0.0100 | 0.000 | paired | yes |" in (tmp_path / "table" / "table.md").read_text()


def test_a_row_that_is_the_full_models_run_is_no_test(synth_cache, tmp_path):
    cells = grid.ablation_cells(base(synth_cache, seeds=(1,), epochs=1), tmp_path / "runs", ["HA last 4"])
    grid.run_cells(cells, console=quiet_console())
    t = grid.assemble(cells, tmp_path / "table", synth_cache.dataset, "spp_scl")
    assert t.comparisons == {}
    md = (tmp_path / "table" / "table.md").read_text()
    assert "| HA last 4 |" in md and "(the reference's run)" in md and "0.8133 / 0.8015" in md
    assert "1 seed cannot be tested" in md


def test_unknown_rows_are_a_user_error(synth_cache, tmp_path):
    from core.errors import UserError

    with pytest.raises(UserError, match="--rows nope: spp_scl has rows full, one-step"):
        grid.ablation_cells(base(synth_cache), tmp_path, ["nope"])
    assert [c.name for c in grid.ablation_cells(base(synth_cache, head="clip_ca_cg"), tmp_path)][:4] == \
        ["full", "w/o CLIP", "w/o CA", "w/o CG"]


def table_numbers(csv: Path) -> pd.DataFrame:
    """A table.csv without what each cell took (the cost_* columns: seconds, memory): two grids that
    compute the same numbers give the same frame."""
    return pd.read_csv(csv).filter(regex="^(?!cost_)")


def test_an_interrupted_grid_redoes_only_unfinished_work(synth_cache, tmp_path, monkeypatch):
    cells = grid.ablation_cells(base(synth_cache), tmp_path / "runs", ROWS)
    grid.run_cells(cells, console=quiet_console())
    grid.assemble(cells, tmp_path / "before", synth_cache.dataset, "spp_scl")
    cut = cells[2].cfg.out  # "w/o CMF" was cut off after its first seed
    (cut / "metrics.json").unlink()
    (cut / "seed-2.json").unlink()
    calls = []
    real = runs.train_seed

    def count(cfg, data, seed, *a, **kw):
        calls.append((cfg.out, seed))
        return real(cfg, data, seed, *a, **kw)

    monkeypatch.setattr(runs, "train_seed", count)
    grid.run_cells(cells, console=quiet_console())
    assert calls == [(cut, 2)]
    grid.assemble(cells, tmp_path / "after", synth_cache.dataset, "spp_scl")
    pd.testing.assert_frame_equal(*(table_numbers(tmp_path / d / "table.csv") for d in ("before", "after")))


def test_a_cell_started_before_numerics_versions_is_refused_before_any_training(synth_cache, tmp_path, monkeypatch):
    cells = grid.ablation_cells(base(synth_cache), tmp_path / "runs", ["one-step"])
    grid.run_cells(cells[:1], console=quiet_console())  # the full model finishes
    stale = cells[1].cfg.out
    stale.mkdir(parents=True)
    (stale / "config.json").write_text(json.dumps({"train": cells[1].cfg.to_json(), "git_commit": "0" * 40}))
    calls = []
    monkeypatch.setattr(runs, "train_seed", lambda *a, **kw: calls.append(a))
    from core.errors import UserError

    with pytest.raises(UserError, match=f"{stale} \\(numerics version \\(made before numerics versions, now "
                                        f"{NUMERICS_VERSION}\\)\\).*Delete those folders"):
        grid.run_cells(cells, console=quiet_console())
    assert calls == []


def test_a_finished_cell_of_another_numerics_version_is_not_reused_silently(synth_cache, tmp_path, monkeypatch):
    """A finished cell whose config.json records another numerics version is refused with its folder, not
    put in the table; another commit of the same version is reused (the commit is a record, not a check)."""
    from core.errors import UserError

    cells = grid.ablation_cells(base(synth_cache, seeds=(1,), epochs=1), tmp_path / "runs", ["one-step"])
    grid.run_cells(cells, console=quiet_console())
    old = cells[1].cfg.out
    saved = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**saved, "git_commit": "1" * 40}))
    grid.run_cells(cells, console=quiet_console())
    (old / "config.json").write_text(json.dumps({**saved, "numerics_version": NUMERICS_VERSION + 1}))
    with pytest.raises(UserError, match=f"{old} \\(numerics version \\(made by numerics version "
                                        f"{NUMERICS_VERSION + 1}, now {NUMERICS_VERSION}\\)\\).*Delete those folders"):
        grid.run_cells(cells, console=quiet_console())


def test_a_row_equal_to_the_full_model_is_trained_once_and_said_so(synth_cache, tmp_path, monkeypatch):
    cells = grid.ablation_cells(base(synth_cache, seeds=(1,)), tmp_path / "runs", ["HA last 4"])
    assert cells[0].cfg.out == cells[1].cfg.out  # HA over the last 4 layers is the full model
    calls = []
    real = runs.train_seed
    monkeypatch.setattr(runs, "train_seed", lambda cfg, *a, **kw: calls.append(cfg.out) or real(cfg, *a, **kw))
    console = quiet_console()
    grid.run_cells(cells, console=console)
    assert calls == [cells[0].cfg.out]
    assert "1 the same run as another row, 0 done earlier, 1 to train" in console.file.getvalue()


def test_two_shards_make_the_same_table_as_one_process(synth_cache, cli, tmp_path):
    rows = ("--rows", "one-step,linear probe")
    env = cli.env(OMP_NUM_THREADS="1")
    shards = [subprocess.Popen(cli.command("ablate", *cli_args(synth_cache, tmp_path / "two", *rows, "--shard", f"{i}/2",
                                                               "--out", tmp_path / "two-table")),
                               cwd=cli.repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in range(2)]
    outs = [p.communicate(timeout=600) for p in shards]
    assert all(p.returncode == 0 for p in shards), outs
    if not (tmp_path / "two-table" / "table.csv").is_file():  # both finished at once: either may assemble; run again
        proc = cli.run("ablate", *cli_args(synth_cache, tmp_path / "two", *rows, "--out", tmp_path / "two-table"))
        assert proc.returncode == 0, proc.stderr
    # one process, its cells in two workers that stream the cache from its shards (--memory 1): the same table
    one = cli.run("ablate", *cli_args(synth_cache, tmp_path / "one", *rows, "--jobs", "2", "--memory", "1",
                                      "--out", tmp_path / "one-table"))
    assert one.returncode == 0, one.stderr
    a, b = (table_numbers(tmp_path / d / "table.csv").drop(columns="folder") for d in ("two-table", "one-table"))
    pd.testing.assert_frame_equal(a, b)
    assert [set(pd.read_csv(tmp_path / d / "table.csv")["cost_cache_streamed"]) for d in ("two-table", "one-table")] \
        == [{False}, {True}]


def test_sweep_writes_csv_and_plot(synth_cache, cli, tmp_path):
    proc = cli.run("sweep", "--vary", "alpha=0.5,0.9", *cli_args(synth_cache, tmp_path / "runs", "--out", tmp_path / "sw"))
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_csv(tmp_path / "sw" / "sweep.csv")
    assert frame["cell"].tolist() == ["alpha=0.5", "alpha=0.9"]
    for row in frame.to_dict("records"):
        assert json.loads((Path(row["run"]) / "config.json").read_text())["train"]["head_config"]["alpha"] in (0.5, 0.9)
        metrics = json.loads((Path(row["run"]) / "metrics.json").read_text())  # dev beside test: choose on dev
        assert row["dev_accuracy_mean"] == pytest.approx(metrics["dev"]["accuracy"]["mean"])
        assert row["accuracy_mean"] == pytest.approx(metrics["test"]["accuracy"]["mean"])
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # the table on screen (and in sweep.md), titled with what the PNG's title names: data set, head, epochs
    assert f"spp_scl on {synth_cache.dataset}, 2 epochs" in proc.stdout and "| alpha=0.9 |" in proc.stdout
    assert "| alpha=0.5 |" in (tmp_path / "sw" / "sweep.md").read_text()
    bad = cli.run("sweep", "--vary", "alpah=0.5", *cli_args(synth_cache, tmp_path / "runs"))
    assert bad.returncode == 1 and "has no field 'alpah'" in bad.stderr and "Traceback" not in bad.stderr


def test_a_grid_loads_each_cache_once_and_gives_each_cell_its_modalities(synth_cache, tmp_path, monkeypatch):
    """One process, rows of both modalities and of text alone: each cell trains on the caches its
    head reads, and each modality set is loaded once."""
    loads, seen = [], []
    real_load, real_run = cache.load_data, runs.train_run
    monkeypatch.setattr(grid, "_DATA", {})
    monkeypatch.setattr(cache, "load_data", lambda cfg, *a: loads.append(cache.modalities(cfg)) or real_load(cfg, *a))
    monkeypatch.setattr(runs, "train_run", lambda cfg, data, *a, **k: seen.append(
        (cfg.head_config.reads(), data.dims.image_channels > 0, data.dims.text_layers > 0)) or real_run(cfg, data, *a, **k))
    cells = grid.ablation_cells(base(synth_cache, seeds=(1,)), tmp_path / "runs", ["text only", "w/o CMF"])
    grid.run_cells(cells, console=quiet_console())
    assert sorted(loads) == ["both", "text"]
    for reads, has_image, has_text in seen:
        assert has_image == ("image" in reads) and has_text == ("text" in reads)


def test_the_grid_bar_counts_epochs_and_drops_those_patience_skips(synth_cache, tmp_path, monkeypatch):
    """2 cells x 2 seeds x 4 epochs planned; dev never improves after epoch 1, so --patience 1
    stops every seed after epoch 2 and the bar ends at 8 of 8, not 8 of 16."""
    real = trainer.scores
    monkeypatch.setattr(trainer, "scores", lambda *a: {**real(*a), "weighted_f1": 0.5, "accuracy": 0.5})
    cells = grid.ablation_cells(base(synth_cache, epochs=4, patience=1), tmp_path / "runs", ["one-step"])
    console = quiet_console()
    grid.run_cells(cells, console=console)
    assert [c.folder.epochs_done(c.cfg) for c in cells] == [(4, 4), (4, 4)]
    assert "8/8 epochs" in console.file.getvalue()


# --- the main process of `ablate --jobs 2` dies: no worker is left, the same command finishes the same table -------

def _killed_grid_args(c, runs_dir: Path) -> list:
    return ["ablate", "--dataset", c.dataset, "--cache-dir", c.cache_dir, "--text-encoder", c.text_encoder,
            "--image-encoder", c.image_encoder, "--epochs", "4", "--seeds", "1,2", "--batch-size", "12", "--rows",
            "one-step", "--jobs", "2", "--threads", "1", "--runs-dir", runs_dir, "--out", runs_dir / "table"]


def _cells(runs_dir: Path) -> dict[str, Path]:
    """Row -> run folder, from the grid's table."""
    return dict(zip(*pd.read_csv(runs_dir / "table" / "table.csv")[["run", "folder"]].T.values))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_a_grid_leaves_no_worker_and_the_same_command_makes_the_same_table(synth_cache, cli, tmp_path):
    cells = grid.ablation_cells(base(synth_cache, epochs=4), tmp_path / "reference", ["one-step"])
    grid.run_cells(cells, console=quiet_console())  # uninterrupted, here (one job gives the numbers two do)
    grid.assemble(cells, tmp_path / "reference" / "table", synth_cache.dataset, "spp_scl")
    runs_dir = tmp_path / "cut"
    args = _killed_grid_args(synth_cache, runs_dir)
    proc, workers = cut_when_saved(cli, args, runs_dir, "*/seed-*.state.pt", signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert_gone(workers)  # each worker held a cell; none trains on, orphaned
    assert not list((runs_dir / "table").iterdir())  # cut mid-grid: its folder was made before training, no table yet
    again = cli.run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = (table_numbers(d / "table" / "table.csv").drop(columns="folder") for d in (tmp_path / "reference", runs_dir))
    pd.testing.assert_frame_equal(a, b)
    ref, cut = _cells(tmp_path / "reference"), _cells(runs_dir)
    assert sorted(ref) == sorted(cut) == ["full", "one-step"]
    for row in ref:
        x, y = (run_folder.RunFolder(Path(f[row])).metrics() for f in (ref, cut))
        assert run_numbers(x) == run_numbers(y), row
        logs = [sorted(tuple(v for k, v in r.items() if k != "seconds") for r in run_folder.RunFolder(Path(f[row])).log_rows())
                for f in (ref, cut)]
        assert logs[0] == logs[1] and len(logs[1]) == 2 * 4, row
        assert not list(Path(cut[row]).glob("*.state.pt*"))
