"""train/replay.py and `pipeline.py replay`: an audit, not a gate.

Replay retrains one seed of a finished run with the current code and reports `identical`, or the
first number that differs (an edit that changes a number: a loss scaled by 1.0001), naming the file,
column and epoch; it says so when the run was recorded on another kind of CPU, and writes nothing
into the run folder. What `results` and resume accept is the numerics version (test_results.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from experiments import evidence as evidence_module
from experiments import results
from heads import spp_scl
from train import fingerprint, runs
from train.config import TrainConfig
from train.replay import machine_note, replay

from conftest import quiet_console, write_synth_cache

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
def change_a_number(monkeypatch):
    """`change_a_number()`: an edit that changes a number, SPP-SCL's cross-entropy scaled by 1.0001."""
    cross = spp_scl.SppSclHead.objective

    def scaled(self, out, y, weight=None):
        terms = cross(self, out, y, weight)
        terms["ce"] = terms["ce"] * 1.0001
        return terms

    return lambda: monkeypatch.setattr(spp_scl.SppSclHead, "objective", scaled)


def files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())}


def test_config_json_records_the_machine(evidence):
    saved = json.loads((evidence / "runs" / "probe" / "config.json").read_text())
    assert set(saved["machine"]) == {"cpu", "torch", "threads"}
    assert saved["machine"]["threads"] == 1


def test_replay_of_unchanged_code_is_identical_and_writes_nothing(copy):
    before = files(copy / "spp_scl")
    r = replay(copy / "spp_scl", seed=2)
    recorded = json.loads((copy / "spp_scl" / "seed-2.json").read_text())
    assert recorded["best_epoch"] > 1  # several epochs, the selection and the final scoring replayed
    assert r.identical and r.difference is None and r.complete and r.seed == 2 and r.epochs == recorded["best_epoch"]
    assert r.compared["protocol_rows"] == r.epochs and "test" in r.compared["final"]
    assert r.machine is None  # trained on this machine
    assert files(copy / "spp_scl") == before


def test_an_edit_that_changes_a_number_is_reported_naming_file_column_and_epoch(copy, change_a_number):
    """Reported, not a gate: `results` takes the run as before (same numerics version)."""
    before = files(copy / "spp_scl")
    change_a_number()
    r = replay(copy / "spp_scl")
    assert not r.identical
    assert re.fullmatch(r"log\.csv, loss_ce, epoch 1: recorded [0-9.]+, now [0-9.]+", r.difference), r.difference
    assert files(copy / "spp_scl") == before
    assert [row.name for row in results.build([copy / "spp_scl"]).rows] == ["spp_scl"]


def test_a_changed_final_score_is_named(copy):
    path = copy / "probe" / "seed-1.json"
    seed = json.loads(path.read_text())
    seed["test"]["accuracy"] += 0.01
    path.write_text(json.dumps(seed))
    r = replay(copy / "probe")
    assert r.difference.startswith("seed-1.json, test.accuracy, epoch final: recorded ")


def test_a_run_recorded_on_another_cpu_or_none_says_so(copy):
    """float32's last bits differ between kinds of CPU: a difference there need not be changed code."""
    here = fingerprint.machine()["cpu"]
    config = copy / "probe" / "config.json"
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({**saved, "machine": {**saved["machine"], "cpu": "another CPU"}}))
    r = replay(copy / "probe", epochs=1)
    assert r.identical and r.epochs == 1
    assert r.machine.startswith(f"the run was trained on another kind of CPU (another CPU; replayed on {here}); "
                                "float32's last bits differ")
    assert "a selected epoch or a gate can flip" in r.machine
    assert machine_note(None, here).startswith("the run did not record its machine")
    assert machine_note(here, here) is None


def test_replay_through_the_cli(copy, run_main, change_a_number):
    r = run_main("replay", str(copy / "spp_scl"), "--seed", "2", "--epochs", "1")
    assert r.code == 0, r.err
    assert f"{copy / 'spp_scl'}: seed 2, 1 epoch(s) (partial): identical" in " ".join(r.out.split())
    r = run_main("replay", str(copy / "probe"), "--seed", "7")
    assert r.code == 1 and "seed 7 is not a finished seed" in r.err and "Traceback" not in r.err
    change_a_number()
    r = run_main("replay", str(copy), "--epochs", "1")  # the edit is in SPP-SCL alone: the probe is identical
    assert r.code == 1 and "Traceback" not in r.err, r.err
    out = " ".join(r.out.split())
    assert re.search(rf"{re.escape(str(copy / 'probe'))}: seed 1, 1 epoch\(s\)( \(partial\))?: identical", out), out
    assert re.search(rf"{re.escape(str(copy / 'spp_scl'))}: seed 1, 1 epoch\(s\)( \(partial\))?: differs in "
                     r"log\.csv, loss_ce, epoch 1: recorded [0-9.]+, now [0-9.]+", out), out
    assert r.err.strip().splitlines() == [f"error: 1 of 2 run(s) replayed differently: {copy / 'spp_scl'}"]


def test_train_says_whether_it_matches_an_evidence_run_of_the_same_configuration(evidence, tmp_path, run_main,
                                                                                 monkeypatch):
    """The same settings and cache as a committed run (the output folder and --protocol-check aside):
    `pipeline.py train` ends by saying whether its numbers equal that run's, and which seeds differ if not
    (experiments/evidence.py)."""
    shelf = tmp_path / "results" / "set"
    shutil.copytree(evidence / "runs" / "spp_scl", shelf / "spp_scl")
    monkeypatch.setattr(evidence_module, "EVIDENCE", tmp_path / "results")
    t = json.loads((evidence / "runs" / "spp_scl" / "config.json").read_text())["train"]
    r = run_main("train", "--dataset", t["dataset"], "--cache-dir", t["cache_dir"], "--text-encoder", t["text_encoder"],
                 "--image-encoder", t["image_encoder"], "--head", "spp_scl", "--epochs", "8", "--patience", "3",
                 "--seeds", "1,2", "--batch-size", "8", "--eval-orders", "2", "--jobs", "1", "--threads", "1",
                 "--out", tmp_path / "again")
    assert r.code == 0, r.err
    assert f"matches {shelf / 'spp_scl'}: identical" in r.out
    seed = json.loads((shelf / "spp_scl" / "metrics.json").read_text())
    seed["per_seed"][1]["test"]["accuracy"] += 0.25
    (shelf / "spp_scl" / "metrics.json").write_text(json.dumps(seed))
    [line] = evidence_module.evidence_twins(tmp_path / "again")
    assert line.startswith(f"compared with {shelf / 'spp_scl'}: seed 2 differ, test metrics by up to 0.2500")
    saved = json.loads((shelf / "spp_scl" / "config.json").read_text())
    (shelf / "spp_scl" / "config.json").write_text(json.dumps({**saved, "numerics_version": 0}))
    assert evidence_module.evidence_twins(tmp_path / "again") == []  # other arithmetic: not the same configuration
