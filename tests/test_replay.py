"""train/replay.py and `pipeline.py replay`: a run's code identity is decided by what the code computes.

A refactor that keeps the numbers (simulated: the code fingerprint changes, nothing else) makes
`results` and resume refuse with the replay command named; a replay then vouches for the new code.
An edit that changes a number (a loss scaled by 1.0001) fails the replay, naming the file, column
and epoch, and `results` keeps refusing."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from experiments import results
from heads import spp_scl
from train import fingerprint, run_folder, runs
from train.config import TrainConfig
from train.replay import Difference, replay

from conftest import REPO, quiet_console, write_synth_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def evidence(tmp_path_factory) -> Path:
    """A folder of two finished runs (SPP-SCL with the protocol check, the probe), patience 3, on
    features with a faint signal (SPP-SCL's seed 2 selects epoch 7)."""
    root = tmp_path_factory.mktemp("evidence")
    c = write_synth_cache(root / "cache", strength=0.05)
    for head in ("spp_scl", "probe"):
        cfg = TrainConfig(dataset=c.dataset, cache_dir=c.cache_dir, text_encoder=c.text_encoder,
                          image_encoder=c.image_encoder, head=head, epochs=8, patience=3, seeds=(1, 2),
                          batch_size=8, eval_orders=2, protocol_check=head == "spp_scl", out=root / "runs" / head)
        runs.train(cfg, quiet_console())
    return root


@pytest.fixture
def copy(evidence, tmp_path) -> Path:
    shutil.copytree(evidence / "runs", tmp_path / "evidence")
    return tmp_path / "evidence"


@pytest.fixture
def new_code(monkeypatch):
    """The code fingerprint of an edited tree (a renamed local, say): every number unchanged."""
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda: "feedfacecafe")


@pytest.fixture
def change_a_number(monkeypatch):
    """`change_a_number()`: an edit that changes a number, SPP-SCL's cross-entropy scaled by 1.0001."""
    cross = spp_scl.SppSclHead.objective

    def scaled(self, out, y, weight=None):
        terms = cross(self, out, y, weight)
        terms["ce"] = terms["ce"] * 1.0001
        return terms

    return lambda: monkeypatch.setattr(spp_scl.SppSclHead, "objective", scaled)


def made_elsewhere(run: Path, machine: dict | None, seed: int = 1) -> None:
    """Make `run` a run trained by the committed code (HEAD) on `machine` (None: unrecorded) whose numbers
    this machine does not give (simulated: the loss_ce of `seed`'s epoch 1 edited by 0.0001). Skips when
    core/, heads/ or train/ differ from HEAD: the reference a replay then runs is the committed code."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip()

    if git("status", "--porcelain", "--", "core", "heads", "train"):
        pytest.skip("the reference is the committed code: commit core/, heads/ and train/ first")
    saved = json.loads((run / "config.json").read_text())
    saved["machine"], saved["git_commit"] = machine, git("rev-parse", "HEAD")
    if machine is None:
        del saved["machine"]
    (run / "config.json").write_text(json.dumps(saved))
    log = (run / "log.csv").read_text().splitlines()
    row = next(i for i, line in enumerate(log) if line.startswith(f"{seed},1,"))
    cells, column = log[row].split(","), log[0].split(",").index("loss_ce")
    cells[column] = f"{float(cells[column]) + 0.0001:.4f}"
    log[row] = ",".join(cells)
    (run / "log.csv").write_text("\n".join(log) + "\n")


def test_config_json_records_the_machine(evidence):
    saved = json.loads((evidence / "runs" / "probe" / "config.json").read_text())
    assert set(saved["machine"]) == {"cpu", "torch", "threads"}
    assert saved["machine"]["threads"] == 1


def test_replay_of_unchanged_code_is_identical_and_recorded(copy):
    r = replay(copy / "spp_scl", seed=2)
    recorded = json.loads((copy / "spp_scl" / "seed-2.json").read_text())
    assert recorded["best_epoch"] > 1  # several epochs, the selection and the final scoring replayed
    assert r.complete and r.seed == 2 and r.epochs == recorded["best_epoch"]
    assert r.largest_difference == 0.0
    assert r.compared["protocol_rows"] == r.epochs and "test" in r.compared["final"]
    entry = json.loads((copy / "spp_scl" / "replay.json").read_text())["replays"][-1]
    assert entry["code_fingerprint"] == fingerprint.code_fingerprint() and entry["complete"]
    assert entry["machine"]["threads"] == 1


def test_a_refactor_that_keeps_the_numbers_is_refused_until_replayed(copy, new_code):
    with pytest.raises(UserError, match=rf"pipeline.py replay {copy}`"):
        results.build([copy])
    c = TrainConfig.from_json(json.loads((copy / "probe" / "config.json").read_text())["train"])
    assert any("pipeline.py replay" in d for d in run_folder.RunFolder(copy / "probe").mismatch(c))  # resume and grids too
    for run in ("spp_scl", "probe"):
        assert replay(copy / run).complete
    table = results.build([copy], against="probe")
    assert [r.name for r in table.rows] == ["probe", "spp_scl"]
    assert run_folder.RunFolder(copy / "probe").mismatch(c) == []
    # config.json keeps its fingerprint as a record
    assert json.loads((copy / "probe" / "config.json").read_text())["code_fingerprint"] != "feedfacecafe"


def test_a_partial_replay_vouches_for_nothing(copy, new_code):
    r = replay(copy / "spp_scl", seed=2, epochs=2)
    assert not r.complete and r.epochs == 2
    with pytest.raises(UserError, match="pipeline.py replay"):
        results.build([copy / "spp_scl"])


def test_an_edit_that_changes_a_number_fails_naming_file_column_and_epoch(copy, new_code, change_a_number):
    change_a_number()
    with pytest.raises(Difference, match=r"log\.csv, loss_ce, epoch 1: recorded [0-9.]+, now [0-9.]+"):
        replay(copy / "spp_scl")
    assert not (copy / "spp_scl" / "replay.json").exists()
    with pytest.raises(UserError, match="pipeline.py replay"):
        results.build([copy / "spp_scl"])


def test_a_changed_final_score_is_named(copy):
    path = copy / "probe" / "seed-1.json"
    seed = json.loads(path.read_text())
    seed["test"]["accuracy"] += 0.01
    path.write_text(json.dumps(seed))
    with pytest.raises(Difference, match=r"seed-1\.json, test\.accuracy, epoch final"):
        replay(copy / "probe")


def test_replay_through_the_cli(copy, run_main):
    r = run_main("replay", str(copy / "spp_scl"), "--seed", "2", "--epochs", "1")
    assert r.code == 0, r.err
    assert "seed 2, 1 epoch(s) identical" in r.out and "partial" in r.out
    r = run_main("replay", str(copy / "probe"), "--seed", "7")
    assert r.code == 1 and "seed 7 is not a finished seed" in r.err and "Traceback" not in r.err


def test_train_says_whether_it_matches_an_evidence_run_of_the_same_configuration(evidence, tmp_path):
    """The same settings and cache as a committed run (the output folder and --protocol-check aside):
    `train` ends by saying whether its numbers equal that run's, and which seeds differ if not."""
    shelf = tmp_path / "results" / "set"
    shutil.copytree(evidence / "runs" / "spp_scl", shelf / "spp_scl")
    again = TrainConfig.from_json({**json.loads((evidence / "runs" / "spp_scl" / "config.json").read_text())["train"],
                                   "protocol_check": False, "out": str(tmp_path / "again")})
    runs.train(again, quiet_console())
    assert run_folder.evidence_twins(tmp_path / "again", tmp_path / "results") == [
        f"matches {shelf / 'spp_scl'}: identical"]
    seed = json.loads((shelf / "spp_scl" / "metrics.json").read_text())
    seed["per_seed"][1]["test"]["accuracy"] += 0.25
    (shelf / "spp_scl" / "metrics.json").write_text(json.dumps(seed))
    [line] = run_folder.evidence_twins(tmp_path / "again", tmp_path / "results")
    assert line.startswith(f"compared with {shelf / 'spp_scl'}: seed 2 differ, test metrics by up to 0.2500")


def test_numbers_recorded_on_another_machine_are_compared_with_the_runs_own_code_here(copy):
    """A run whose machine is unrecorded and whose numbers this machine does not give (simulated: one
    log value edited): the code that trained it (its commit, here HEAD) is run beside the current code,
    and the two must agree bit for bit; the replay says so and vouches, naming the recorded difference."""
    run = copy / "probe"
    made_elsewhere(run, None)
    head = json.loads((run / "config.json").read_text())["git_commit"]
    r = replay(run)
    assert r.complete and r.reference["commit"] == head and "epoch 1" in r.reference["recorded_differs"]
    entry = json.loads((run / "replay.json").read_text())["replays"][-1]
    assert entry["reference"]["commit"] == head and entry["recorded_machine"] is None


def test_the_numbers_of_a_replay_are_stored_and_the_next_replay_here_runs_no_reference(copy, monkeypatch, run_main,
                                                                                       change_a_number):
    """Trained on another CPU: the first replay here needs the run's own code beside it, and stores the
    numbers this machine computed with the machine; the next replay here (new code) compares with
    those alone, one training, and still names the column and epoch of a number that changed. A
    replay.json without stored numbers (written before they were kept) falls back to the reference."""
    from train import replay as replaying

    run = copy / "spp_scl"
    folder = run_folder.RunFolder(run)
    as_written = folder.log_rows(2)  # before made_elsewhere edits one value
    recorded = json.loads((run / "seed-2.json").read_text())
    made_elsewhere(run, {"cpu": "another CPU", "torch": torch.__version__, "threads": 1}, seed=2)
    first = replay(run, seed=2)
    assert first.complete and first.reference and first.stored is None

    [numbers] = json.loads((run / "replay.json").read_text())["numbers"]
    assert numbers["machine"] == {**fingerprint.machine(), "threads": 1} and numbers["seed"] == 2
    assert numbers["epochs"] == first.epochs == recorded["best_epoch"] > 1

    def text(row: dict) -> dict:  # a row as log.csv holds it, seconds aside
        return {k: str(v) for k, v in row.items() if k != "seconds" and str(v) != ""}

    # this machine's numbers (not the edited record): every compared row, the seed's scores
    assert [text(row) for row in numbers["log_rows"]] == [text(row) for row in as_written[:first.epochs]]
    assert [text(row) for row in numbers["protocol_rows"]] == [text(row) for row in
                                                               folder.protocol_rows(2)[:first.epochs]]
    assert all(numbers["final"][k] == recorded[k] for k in replaying.FINAL_FIELDS)

    saved = json.loads((run / "replay.json").read_text())
    (run / "replay.json").write_text(json.dumps({"replays": saved["replays"]}))  # an older replay.json
    assert replay(run, seed=2).reference
    [stored] = folder.replay_numbers()

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference process was started")

    monkeypatch.setattr(replaying, "reference_numbers", no_reference)
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda: "feedfacecafe")  # a refactor
    again = replay(run, seed=2)
    assert again.complete and again.reference is None
    assert again.stored == {"code_fingerprint": stored["code_fingerprint"], "date": stored["date"]}
    assert folder.replays()[-1]["stored_numbers"] == again.stored and folder.vouched()
    r = run_main("replay", run, "--seed", "2", "--epochs", "1")  # a partial check compares with them too
    assert r.code == 0 and "with this machine's numbers stored in replay.json by the replay of" in r.out, r.err
    assert "partial" in r.out
    assert len(folder.replay_numbers()[0]["log_rows"]) == first.epochs  # and keeps the complete set

    latest = folder.replay_numbers()[0]["date"]  # the newest replay that reached as far
    change_a_number()
    with pytest.raises(Difference, match=r"log\.csv, loss_ce, epoch 1: this machine's numbers stored in replay\.json "
                                         rf"by the replay of {latest} [0-9.]+, now [0-9.]+; the current code does not"):
        replay(run, seed=2)


def test_a_run_resumed_here_after_seeds_made_elsewhere_replays_its_first_seed_against_this_machines_numbers(copy):
    """Seeds 1-3 trained on another CPU, seeds 4-5 here: the resume wrote this machine into config.json,
    so the recorded numbers of seed 1 are not this machine's. A replay that stored this machine's numbers
    of seed 1 earlier is the target, not the record (it failed, naming epoch 1, before)."""
    run = copy / "probe"
    made_elsewhere(run, None)
    first = replay(run)  # against the run's own code here; stores this machine's numbers
    assert first.complete and first.reference
    saved = json.loads((run / "config.json").read_text())
    saved["machine"] = {**fingerprint.machine(), "threads": 1}  # what a resume here writes
    (run / "config.json").write_text(json.dumps(saved))
    again = replay(run)
    assert again.complete and again.stored is not None and not again.reference
