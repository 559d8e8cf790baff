"""`pipeline.py search` (experiments/search.py, search_space.py, search_result.py): a study of a few
trials with --jobs 2 finishes and resumes with more; a trial left RUNNING by a dead process is
marked failed and not counted; best/ is a `results` row; dev alone chooses (shuffled test labels
change nothing); the pruner stops a trial from the trainer's epoch hook; a study never resumes
across numerics versions; bad input is one line.

On the synthetic 3-class cache (the tiny real cache holds one class in every split: no dev score
to choose on, no test labels to shuffle), epochs 2-3, in process."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from experiments import grid, search, search_space
from experiments.results import load_row, search_record
from experiments.search_folder import SearchFolder
from train import data as train_data
from train import numerics
from train.config import TrainConfig
from train.run_folder import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread", "warm")


@pytest.fixture(scope="module")
def warm():
    """torch imports its compiler the first time an optimizer is made: once here, not in every
    forked --jobs worker of every search below."""
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])


def args(c, out: Path, *extra) -> list:
    return ["search", "-d", c.dataset, "--cache-dir", c.cache_dir, "--text-encoder", c.text_encoder,
            "--image-encoder", c.image_encoder, "--epochs", 2, "--seeds", 1, "--batch-size", 12, "--eval-orders", 1,
            "--threads", 1, "--out", out, *extra]


def rows(out: Path) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def study_of(out: Path):
    """The study in `out`'s journal, as another process would open it."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = SearchFolder(out).journal
    storage = JournalStorage(JournalFileBackend(str(journal), lock_obj=search._JournalLock(journal)))
    return optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_study_finishes_resumes_with_more_trials_and_fails_a_dead_processs_trial(synth_cache, run_main, tmp_path):
    out = tmp_path / "s"
    r = run_main(*args(synth_cache, out, "--trials", 4, "--jobs", 2, "--rescore", 1, "--pruner", "none"))
    assert r.code == 0, r.err
    first = rows(out)
    assert [(t["number"], t["state"]) for t in first] == [(str(n), "COMPLETE") for n in range(4)]
    assert all(t["epochs"] == "2" and t["lr"] and t["dim"] in ("32", "64", "128") for t in first)
    assert sum(bool(t["rescore_dev_weighted_f1"]) for t in first) == 1
    assert (out / "history.png").is_file() and (out / "importance.png").is_file()
    best = json.loads((out / "best.json").read_text())
    assert best["search"]["numerics_version"] == numerics.NUMERICS_VERSION and best["train"]["seeds"] == [1]
    # best/ is an ordinary run of best.json's settings: a `results` row
    assert TrainConfig.load(out / "best.json").resolved().to_json() == {
        **TrainConfig.load(out / "best" / "config.json").to_json(), "out": None}
    assert load_row(out / "best").seeds == [1]
    assert load_row(out / "best").name == out.name  # named by its search: one row per head in a table
    record = search_record(out / "best")  # the table's trials and lane-hours columns, read from the files
    assert record["trials"] == 4 and 0 < record["hours"] < 1 and search_record(out / "trials" / "trial-0000") is None
    # a run resumed by a later process records that process's wall time alone: then its epochs' seconds count
    metrics = out / "best" / "metrics.json"
    saved = metrics.read_text()
    wall, epochs = json.loads(saved)["wall_seconds"], sum(float(r["seconds"]) for r in RunFolder(out / "best").log_rows())
    metrics.write_text(json.dumps({**json.loads(saved), "wall_seconds": 0.0}))
    assert search_record(out / "best")["hours"] * 3600 == pytest.approx(record["hours"] * 3600 - wall + epochs)
    metrics.write_text(saved)
    assert run_main("results", out).code == 0

    # kill -9 in the middle of a trial: the journal holds a RUNNING trial of a process that is gone
    study = study_of(out)
    left = study.ask()
    left.set_user_attr("process", {"host": socket.gethostname(), "pid": dead_pid(), "start": "0"})
    r = run_main(*args(synth_cache, out, "--trials", 6, "--jobs", 2, "--rescore", 1, "--pruner", "none"))
    assert r.code == 0, r.err
    assert f"trial {left.number} of a process that is gone: marked failed, not counted" in r.out
    states = {int(t["number"]): t["state"] for t in rows(out)}
    assert states == {**dict.fromkeys(range(4), "COMPLETE"), 4: "FAIL", 5: "COMPLETE", 6: "COMPLETE"}
    assert search_record(out / "best")["trials"] == 6  # the failed trial (no folder, no epoch) counts no time
    kept = lambda table: [{k: v for k, v in t.items() if not k.startswith("rescore")} for t in table]  # noqa: E731
    assert kept(rows(out)[:4]) == kept(first)  # the first trials as they were
    assert len(study_of(out).trials) == 7  # the same study, 2 trials more
    done, best_json, journal = rows(out), (out / "best.json").read_text(), SearchFolder(out).journal.read_bytes()

    # a second process at the finish (two lanes reached one study) waits for the first, then finds its work done
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(SearchFolder(out).finish_lock)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "held\n"
    r = run_main(*args(synth_cache, out, "--trials", 6, "--jobs", 2, "--rescore", 1, "--pruner", "none"))
    assert r.code == 0, r.err
    assert "another process is finishing this search" in r.out and holder.poll() is not None
    assert kept(rows(out)) == kept(done) and (out / "best.json").read_text() == best_json
    assert SearchFolder(out).journal.read_bytes() == journal  # a finished study opened again: its journal as it was


HOLD = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(1.5)"""


def _shuffled_test(real):
    def load(cfg, memory=None):
        data = real(cfg, memory)
        test = data.splits["test"]
        perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
        assert not torch.equal(test.labels[perm], test.labels)
        test.labels = test.labels[perm]
        return data
    return load


def test_shuffled_test_labels_change_no_trial_and_no_choice(synth_cache, run_main, tmp_path, monkeypatch):
    """Test is never read: with the test labels shuffled, every trial's values, scores and epochs,
    the re-scoring and the choice are the same."""
    made = {}
    for name in ("real", "shuffled"):
        monkeypatch.setattr(grid, "_DATA", {})  # each search loads its own cache
        if name == "shuffled":
            monkeypatch.setattr(train_data, "load_data", _shuffled_test(train_data.load_data))
        out = tmp_path / name
        r = run_main(*args(synth_cache, out, "--trials", 3, "--jobs", 1, "--rescore", 2))
        assert r.code == 0, r.err
        made[name] = ([{k: v for k, v in t.items() if k != "seconds"} for t in rows(out)],
                      json.loads((out / "best.json").read_text()))
    assert made["real"] == made["shuffled"]


class PruneTrial1:
    """A pruner that stops trial 1 once it has reported epoch 2."""

    def __new__(cls):
        import optuna

        class Stub(optuna.pruners.BasePruner):
            def prune(self, study, trial):
                return trial.number == 1 and max(trial.intermediate_values, default=0) >= 2

        return Stub()


def test_the_pruner_stops_a_trial_in_its_epoch_hook(synth_cache, run_main, tmp_path, monkeypatch):
    monkeypatch.setattr(search, "make_pruner", lambda name: PruneTrial1())
    out = tmp_path / "s"
    r = run_main(*args(synth_cache, out, "--trials", 3, "--jobs", 1, "--rescore", 0, "--epochs", 3))
    assert r.code == 0, r.err
    assert [(t["state"], t["epochs"]) for t in rows(out)] == [("COMPLETE", "3"), ("PRUNED", "2"), ("COMPLETE", "3")]
    assert "trial 1: pruned after epoch 2" in r.out
    cut = out / "trials" / "trial-0001"  # as the pruner left it: whole files, 2 epochs, no result
    assert [row["epoch"] for row in RunFolder(cut).log_rows()] == ["1", "2"]
    assert not (cut / "metrics.json").exists() and not (cut / "seed-1001.json").exists()
    assert not [p for p in cut.iterdir() if ".tmp" in p.name]


def test_the_pruners():
    import optuna

    assert isinstance(search.make_pruner("median"), optuna.pruners.MedianPruner)
    assert isinstance(search.make_pruner("none"), optuna.pruners.NopPruner)


def test_a_study_never_resumes_across_numerics_versions(synth_cache, run_main, tmp_path, monkeypatch):
    out = tmp_path / "s"
    command = args(synth_cache, out, "--trials", 1, "--jobs", 1, "--rescore", 0, "--report-to", "tensorboard")
    assert run_main(*command).code == 0
    assert (out / "trials" / "trial-0000" / "tb" / "seed-1001").is_dir() and (out / "best" / "tb").is_dir()
    monkeypatch.setattr(numerics, "NUMERICS_VERSION", numerics.NUMERICS_VERSION + 1)
    r = run_main(*command)
    assert r.code == 1 and r.err.count("\n") == 1 and "numerics version 1" in r.err and "--retrain-best" in r.err
    r = run_main(*command, "--retrain-best")
    assert r.code == 0, r.err
    assert (out / "superseded" / "best-1" / "metrics.json").is_file() and (out / "best" / "metrics.json").is_file()
    saved = json.loads((out / "best.json").read_text())["search"]
    assert saved["trained_with_numerics_version"] == numerics.NUMERICS_VERSION and len(rows(out)) == 1


def test_a_database_storage_holds_the_study(synth_cache, run_main, tmp_path):
    out = tmp_path / "s"
    r = run_main(*args(synth_cache, out, "--trials", 1, "--jobs", 1, "--rescore", 0, "--storage",
                       f"sqlite:///{tmp_path / 'studies.db'}"))
    assert r.code == 0, r.err
    assert (tmp_path / "studies.db").is_file() and not (SearchFolder(out).journal).exists() and len(rows(out)) == 1


BAD = [
    (["--space", "foo=1:2"], "--space foo: no such field"),
    (["--space", "epochs=1:3"], "--space epochs: epochs is part of the protocol"),
    (["--space", "select=accuracy"], "--space select: select is part of the protocol"),
    (["--space", "cache_dir=x"], "--space cache_dir: cache_dir is part of the protocol"),
    (["--space", "lr=0:1"], "--space 'lr=0:1': lr=0.0 is outside what lr takes (must be > 0)"),
    (["--space", "dropout=0:1"], "dropout=1.0 is outside what dropout takes"),
    (["--space", "batch_size=1,16"], "batch_size=1 is outside what batch_size takes (must be >= 2)"),
    (["--space", "dim="], "--space 'dim=': give dim=low:high[:log] or a choice list dim=a,b,c"),
    (["--space", "dim=,"], "give dim=low:high[:log] or a choice list"),
    (["--space", "lr=0.1:0.01"], "low 0.1 must be below high 0.01"),
    (["--space", "lr=1e-4:1e-2", "--space", "lr=1e-3:1e-2"], "lr is given twice"),
    (["--storage", "nosuchdb://x/y"], "--storage nosuchdb://x/y: cannot open it"),
    (["--trials", "0"], "--trials 0: give at least 1"),
    (["--seeds", "1,1001"], "--seeds 1001: the search trains its trials on seed 1001"),
    (["--pruner", "hyperband"], "--pruner hyperband: use median or none"),
    (["--report-to", "wandb"], "--report-to 'wandb'"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m.split(":")[0] + str(k) for k, (_, m) in enumerate(BAD)])
def test_bad_input_is_one_line(extra, message, synth_cache, run_main, tmp_path):
    out = tmp_path / "s"
    r = run_main(*args(synth_cache, out), *extra)
    assert r.code == 1 and r.err.startswith("error: ") and r.err.count("\n") == 1, r.err
    assert message in r.err, r.err
    assert not out.exists()


def test_the_journal_lock_cuts_a_half_written_line(tmp_path):
    journal = tmp_path / "j"
    journal.write_bytes(b'{"op_code": 0}\n{"op_co')
    lock = search._JournalLock(journal)
    assert lock.acquire()
    lock.release()
    assert journal.read_bytes() == b'{"op_code": 0}\n'


def test_the_default_space_leaves_out_what_the_user_set():
    import heads

    base = TrainConfig(head="spp_scl", lr=1e-3, head_config=heads.build_config("spp_scl", {"dim": 64}))
    space = search_space.space(base, ["lr=1e-4:1e-2:log", "balanced=true,false"])
    assert {k: d.spec() for k, d in space.items()} == {
        "weight_decay": "1e-08:0.01:log", "batch_size": "16,32,64,128", "dropout": "0:0.5",
        "temperature": "0.03:0.3:log", "alpha": "0.3:0.95", "lambda_ce": "0.5:20:log", "lr": "0.0001:0.01:log",
        "balanced": "true,false"}
    with pytest.raises(UserError, match="nothing to search"):
        search.plan(TrainConfig(head="probe", lr=1e-3, weight_decay=0.1, batch_size=8), [])


def test_values_a_run_refuses_stop_the_search_in_one_line(synth_cache, run_main, tmp_path):
    """A value each field takes, but this cache does not (4 text layers): the trial fails, named, not counted."""
    out = tmp_path / "s"
    r = run_main(*args(synth_cache, out, "--trials", 2, "--jobs", 1, "--space", "text_layers=6"))
    assert r.code == 1 and r.err.startswith("error: trial 0 (") and "text_layers=6" in r.err, r.err
    assert r.err.count("\n") == 1 and "the cache holds 4 text layers" in r.err
    assert [t.state.name for t in study_of(out).trials] == ["FAIL"]


def test_a_storage_password_is_never_shown():
    assert search.shown("postgresql://bob:s3cret@db:5432/studies") == "postgresql://bob:***@db:5432/studies"
    assert search.shown("sqlite:///runs/studies.db") == "sqlite:///runs/studies.db"


def test_a_searched_batch_size_leaves_the_scoring_batch_as_the_base_resolves_it():
    """eval_batch_size is the protocol: a trial with batch_size 16 is scored in batches of the base's 64,
    like the untuned runs its table compares it with (a batch-scope head attends over its scoring batch)."""
    from experiments import search_space
    from train.config import TrainConfig

    base = TrainConfig(dataset="mvsa_s", head="probe")
    dims = search_space.space(base, [])
    cfg = search_space.apply(base, {"batch_size": 16}, dims).resolved()
    assert (cfg.batch_size, cfg.eval_batch_size) == (16, base.resolved().eval_batch_size) == (16, 64)
