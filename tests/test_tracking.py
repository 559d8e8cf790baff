"""train/tracking.py and `--report-to`: TensorBoard event files hold one point per log.csv value,
seed and epoch, also after a resume (never an epoch twice), the run's settings as hparams with its
final metrics; the option changes no config hash; bad input is one line.

Runs on the tiny real cache, 2 seeds x 3 epochs, in process."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from core.errors import Interrupted, UserError
from train import runs, tracking
from train.config import TrainConfig
from train.run_folder import RunFolder, config_hash

from conftest import quiet_console

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS, EPOCHS = (1, 2), 3
TB = ("tensorboard",)


def config(c, out: Path, **kw) -> TrainConfig:
    return TrainConfig(dataset=c.dataset, cache_dir=c.cache_dir, text_encoder=c.text_encoder,
                       image_encoder=c.image_encoder, epochs=EPOCHS, seeds=SEEDS, batch_size=8, eval_orders=1,
                       out=out, **kw)


def cli_args(c, out: Path) -> list:
    return ["train", "-d", c.dataset, "--cache-dir", c.cache_dir, "--text-encoder", c.text_encoder, "--image-encoder",
            c.image_encoder, "--epochs", EPOCHS, "--seeds", "1,2", "--batch-size", 8, "--eval-orders", 1,
            "--jobs", 1, "--threads", 1, "--out", out]


def events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar point of the event files in `folder`, by tag, as written (duplicates kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_tb_is_log_csv(run: Path) -> None:
    """Each seed's event files: one point per log.csv value and epoch, in epoch order, equal to it."""
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for seed in SEEDS:
        mine = [r for r in rows if r["seed"] == str(seed)]
        assert [int(r["epoch"]) for r in mine] == list(range(1, EPOCHS + 1))
        points = events(run / "tb" / f"seed-{seed}")
        columns = [k for k in mine[0] if k not in ("seed", "epoch") and mine[0][k] != ""]
        assert sorted(points) == sorted(columns)
        for tag in columns:
            assert [step for step, _ in points[tag]] == list(range(1, EPOCHS + 1)), (seed, tag, points[tag])
            for (step, value), row in zip(points[tag], mine):
                digits = 5e-3 if tag == "seconds" else 5e-5  # as log.csv rounds them (lr: 3 significant)
                assert value == pytest.approx(float(row[tag]), rel=5e-3, abs=digits), (seed, tag, step)


def assert_hparams(run: Path) -> None:
    """tb/ holds the run's settings (hparams plugin) and its final dev/test means."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    metrics = json.loads((run / "metrics.json").read_text())
    final = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert final == {f"final/{s}_{m}": [pytest.approx(metrics[s][m]["mean"], abs=1e-6)]
                     for s in ("dev", "test") for m in ("accuracy", "weighted_f1", "macro_f1")}
    content = acc.PluginTagToContent("hparams")
    assert b"lr" in b"".join(content.values()) and b"head.dim" in b"".join(content.values())


def test_train_report_to_tensorboard_writes_every_logged_value(tiny_cache, run_main, tmp_path):
    out = tmp_path / "run"
    r = run_main(*cli_args(tiny_cache, out), "--report-to", "tensorboard")
    assert r.code == 0, r.err
    assert_tb_is_log_csv(out)
    assert_hparams(out)


def _cut_in_on_epoch(entry):
    if (entry.seed, entry.epoch) == (2, 2):
        raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["after-the-epoch-reached-the-tracker", "after-the-state-before-the-tracker"])
def test_a_resumed_run_writes_each_epoch_once(where, tiny_cache, tmp_path, monkeypatch):
    """Cut in seed 2 epoch 2, either once the tracker wrote it or between the saved state and
    the tracker (the epoch is then only in the state): resumed, every value is there once."""
    out = tmp_path / "run"
    cfg = config(tiny_cache, out)
    data = runs.load_data(cfg.resolved())
    hook = lambda entry: None  # noqa: E731
    if where == "after-the-epoch-reached-the-tracker":
        hook = _cut_in_on_epoch
    else:
        real = RunFolder.save_state

        def cut(self, seed, state):
            real(self, seed, state)
            if (seed, int(state["epoch"])) == (2, 2):
                raise KeyboardInterrupt

        monkeypatch.setattr(RunFolder, "save_state", cut)
    with pytest.raises(Interrupted):
        runs.train_run(cfg, data, hook, report_to=TB)
    monkeypatch.undo()
    steps = [s for s, _ in events(out / "tb" / "seed-2")["dev_accuracy"]]
    assert steps == ([1, 2] if hook is _cut_in_on_epoch else [1])
    runs.train_run(cfg, data, report_to=TB)
    assert_tb_is_log_csv(out)
    assert_hparams(out)


def test_report_to_changes_no_hash_and_fills_a_finished_run(tiny_cache, tmp_path):
    """The same run with and without --report-to is one run: a finished one is not retrained, its
    event files are made from log.csv and metrics.json."""
    out = tmp_path / "run"
    cfg = config(tiny_cache, out)
    runs.train(cfg, quiet_console())
    assert not (out / "tb").exists()
    before = (out / "metrics.json").read_text()
    console = quiet_console()
    runs.train(cfg, console, report_to=TB)
    assert (out / "metrics.json").read_text() == before  # not trained again
    assert_tb_is_log_csv(out)
    assert_hparams(out)
    assert config_hash(cfg.resolved()) == config_hash(TrainConfig.load(out / "config.json"))


def test_sweep_report_to_tensorboard_follows_every_cell(synth_cache, run_main, tmp_path):
    c = synth_cache
    r = run_main("sweep", "-d", c.dataset, "--cache-dir", c.cache_dir, "--text-encoder", c.text_encoder,
                 "--image-encoder", c.image_encoder, "--epochs", 1, "--seeds", 1, "--batch-size", 12, "--jobs", 1,
                 "--threads", 1, "--vary", "alpha=0.5,0.9", "--runs-dir", tmp_path / "runs", "--out", tmp_path / "sw",
                 "--report-to", "tensorboard")
    assert r.code == 0, r.err
    cells = RunFolder.under(tmp_path / "runs")
    assert len(cells) == 2
    for cell in cells:
        assert [s for s, _ in events(cell.path / "tb" / "seed-1")["dev_accuracy"]] == [1]


@pytest.mark.parametrize("command", ["train", "ablate", "sweep"])
def test_bad_report_to_is_one_line(command, tiny_cache, run_main, tmp_path, monkeypatch):
    c = tiny_cache
    args = [command, "-d", c.dataset, "--cache-dir", c.cache_dir, "--epochs", 1, "--seeds", 1]
    args += {"train": ["--out", tmp_path / "r"], "ablate": ["--runs-dir", tmp_path / "g"],
             "sweep": ["--runs-dir", tmp_path / "g", "--vary", "alpha=0.5"]}[command]
    r = run_main(*args, "--report-to", "wandb")
    assert r.code == 1 and r.err.strip() == ("error: --report-to 'wandb': use none, tensorboard (a comma list for "
                                             "several)"), r.err
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed
    r = run_main(*args, "--report-to", "none,tensorboard")
    assert r.code == 1 and r.err.strip() == ("error: --report-to tensorboard needs the tensorboard package: pip "
                                             "install 'tensorboard>=2.14', or leave --report-to out"), r.err
    assert not (tmp_path / "r").exists() and not (tmp_path / "g").exists()


def test_parse():
    assert tracking.parse("none") == () and tracking.parse(None) == ()
    assert tracking.parse("tensorboard,none,tensorboard") == TB
    with pytest.raises(UserError):
        tracking.parse(",")
