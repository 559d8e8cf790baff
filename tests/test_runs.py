"""train/runs.py, train/run_folder.py and the `train` / `eval` / `heads` commands: what a run folder holds,
that `eval` recomputes the recorded numbers from it, and that bad input through the CLI
is one line on stderr, never a traceback.

One run is trained once for the module (tiny real cache, 2 seeds x 2 epochs, batch 8)."""

from __future__ import annotations

import csv
import json
import re
import signal
import shutil
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest
import torch

import heads
from core import store
from core.device import device
from core.errors import Interrupted, UserError
from train import data as cache
from train import run_folder, runs, scoring, trainer
from train.config import METRICS, TrainConfig
from train.metrics import scores
from train.numerics import NUMERICS_VERSION

from conftest import assert_gone, cut_when_saved, quiet_console, run_numbers

SEEDS, EPOCHS = (1, 2), 2
LOG_HEAD, LOG_TAIL = ["seed", "epoch", "lr"], ["step_two_rate", "seconds", "dev_accuracy", "dev_weighted_f1",
                                                "dev_macro_f1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread(tiny_cache):
    """One intra-op thread (two shared cores, a background run): see test_trainer.py."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tiny_cache, tmp_path_factory):
    """(run folder, the config asked for, the SeedResults the trainer handed to the writer)."""
    cfg = TrainConfig(dataset=tiny_cache.dataset, cache_dir=tiny_cache.cache_dir, text_encoder=tiny_cache.text_encoder,
                      image_encoder=tiny_cache.image_encoder, epochs=EPOCHS, seeds=SEEDS, batch_size=8,
                      out=tmp_path_factory.mktemp("runs") / "tiny")
    results = []

    def keep(*args, **kw):
        results.append(trainer.train_seed(*args, **kw))
        return results[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "train_seed", keep)
        run = runs.train(cfg, quiet_console())
    assert run == cfg.out
    return run, cfg, results


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_log(run: Path) -> tuple[list[str], list[dict]]:
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def fresh_head(run: Path, seed: int) -> tuple[torch.nn.Module, TrainConfig]:
    """A head built from config.json alone, with seed-<s>.pt loaded strictly and weights_only."""
    cfg = TrainConfig.load(run / "config.json")
    head = trainer.build_head(cfg, cache.load_data(cfg))
    head.load_state_dict(torch.load(run / f"seed-{seed}.pt", weights_only=True))
    return head.eval(), cfg


# --- the run folder ----------------------------------------------------------------------

def test_run_folder_holds_the_documented_files(trained):
    run, _, _ = trained
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["config.json", "metrics.json", "log.csv", "report.txt", *(f"seed-{s}.pt" for s in SEEDS),
         *(f"seed-{s}.json" for s in SEEDS)])


def test_config_json_records_config_provenance_and_commit(trained, tiny_cache):
    run, cfg, _ = trained
    saved = read_json(run / "config.json")
    assert set(saved["train"]) == {f.name for f in fields(TrainConfig)}
    assert saved["train"] == cfg.resolved().to_json()
    assert saved["train"]["batch_size"] == 8 and saved["train"]["lr"] == 1e-4  # per-data-set default filled in
    assert saved["provenance"] == {"text": asdict(store.provenance(tiny_cache.text)),
                                   "image": asdict(store.provenance(tiny_cache.image))}
    assert re.fullmatch(r"[0-9a-f]{40}", saved["git_commit"]), saved["git_commit"]  # a record, checked by nothing
    assert saved["numerics_version"] == NUMERICS_VERSION and "code_fingerprint" not in saved
    assert saved["classes"] == ["positive", "neutral", "negative"]
    assert saved["sizes"] == {"train": 12, "dev": 12, "test": 12}
    assert saved["dims"] == {"text_layers": 4, "text_width": 384, "image_channels": 1280, "n_classes": 3}


def test_config_json_alone_rebuilds_the_config(trained):
    run, cfg, _ = trained
    loaded = TrainConfig.load(run / "config.json")
    assert loaded == cfg.resolved()
    assert isinstance(loaded.cache_dir, Path) and isinstance(loaded.seeds, tuple)
    assert loaded.resolved() == loaded  # nothing left to fill in


def test_metrics_json_structure_and_summary(trained):
    run, _, results = trained
    m = read_json(run / "metrics.json")
    assert m["select"] == "weighted_f1" and m["wall_seconds"] > 0
    assert [p["seed"] for p in m["per_seed"]] == list(SEEDS)
    for split in ("dev", "test"):
        assert set(m[split]) == set(METRICS)
        for metric in METRICS:
            values = [p[split][metric] for p in m["per_seed"]]
            assert m[split][metric] == {"mean": pytest.approx(np.mean(values)), "std": pytest.approx(np.std(values, ddof=1))}  # sample std
    for p, r in zip(m["per_seed"], results):
        assert set(p) == {"seed", "best_epoch", "test", "test_orders", "dev", "per_class_f1", "step_two_rate",
                          "leak_check"}
        assert len(p["test_orders"]) == 5 and p["leak_check"] == r.leak_check
        assert p["seed"] == r.seed and p["best_epoch"] == r.best_epoch and 1 <= p["best_epoch"] <= EPOCHS
        assert p["test"] == {k: r.test[k] for k in METRICS}
        assert p["per_class_f1"] == r.test["per_class_f1"] and len(p["per_class_f1"]) == 3
        assert 0.0 <= p["step_two_rate"] <= 1.0 and p["step_two_rate"] == r.step_two_rate
        assert all(0.0 <= v <= 1.0 for v in p["test"].values())


def test_log_csv_has_one_row_per_seed_and_epoch(trained):
    run, _, results = trained
    header, rows = read_log(run)
    logs = [log for res in results for log in res.log]
    terms = sorted({k for log in logs for k in log.losses})
    assert {"ce", "clt", "cli"} <= set(terms)  # SPP-SCL's terms, each its own column, named by the head
    assert header == LOG_HEAD + [f"loss_{k}" for k in terms] + LOG_TAIL
    assert [(int(r["seed"]), int(r["epoch"])) for r in rows] == [(s, e) for s in SEEDS for e in range(1, EPOCHS + 1)]
    for r, log in zip(rows, logs):
        for k in terms:
            assert r[f"loss_{k}"] == ("" if k not in log.losses else r[f"loss_{k}"])
            if k in log.losses:
                assert float(r[f"loss_{k}"]) == pytest.approx(log.losses[k], abs=1e-4)
        assert float(r["step_two_rate"]) == pytest.approx(log.step_two_rate, abs=1e-3)
        assert float(r["lr"]) == pytest.approx(1e-4)
        for metric in METRICS:
            assert float(r[f"dev_{metric}"]) == pytest.approx(log.dev[metric], abs=1e-4)


def test_best_epoch_is_the_argmax_of_the_dev_column(trained):
    run, _, _ = trained
    _, rows = read_log(run)
    for p in read_json(run / "metrics.json")["per_seed"]:
        column = [float(r["dev_weighted_f1"]) for r in rows if int(r["seed"]) == p["seed"]]
        assert p["best_epoch"] == int(np.argmax(column)) + 1  # the first of equals, as argmax
        assert p["dev"]["weighted_f1"] == pytest.approx(column[p["best_epoch"] - 1], abs=1e-4)


def test_checkpoint_round_trip_gives_the_same_predictions(trained):
    run, _, results = trained
    for r in results:
        saved = torch.load(run / f"seed-{r.seed}.pt", weights_only=True)
        assert saved.keys() == r.state.keys()
        assert all(torch.equal(saved[k], r.state[k]) for k in saved)
        head, cfg = fresh_head(run, r.seed)
        test = cache.load_data(cfg).splits["test"]
        orders = scoring.eval_orders(len(test), cfg)
        pred = scoring.predict(head, test, cfg.eval_batch_size, device(), orders[0])
        assert pred.tolist() == r.test_pred
        assert scoring.score_split(head, test, cfg, 3, device(), orders)[0] == r.test


def test_report_has_each_seed_and_a_line_per_class(trained):
    run, _, _ = trained
    text = (run / "report.txt").read_text()
    m = read_json(run / "metrics.json")
    blocks = re.split(r"^(?=seed \d+ \(best dev epoch)", text, flags=re.M)[1:]
    assert len(blocks) == len(SEEDS)
    for block, p in zip(blocks, m["per_seed"]):
        assert block.startswith(f"seed {p['seed']} (best dev epoch {p['best_epoch']}), test in the first of 5 "
                                "label-blind orders; metrics.json holds the mean over the orders")
        assert "confusion matrix" in block
        for name, f1 in zip(["positive", "neutral", "negative"], p["per_class_f1"]):
            # precision, recall, F1, support (sklearn prints support as 12.0 for some predictions)
            line = re.search(rf"^\s*{name}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", block, flags=re.M)
            assert line, (name, block)
            assert float(line.group(3)) == pytest.approx(f1, abs=1e-4)


# --- eval ------------------------------------------------------------------------------

def test_train_resumes_an_interrupted_run_per_seed(trained, tmp_path):
    """Seed 1 finished, seed 2 was cut off: the same command trains seed 2 only and the
    run folder ends as an uninterrupted run's (log rows of the cut seed start over)."""
    run, cfg, _ = trained
    again = tmp_path / "again"
    shutil.copytree(run, again)
    (again / "seed-2.json").unlink()  # seed 2 never finished
    with open(again / "log.csv", "a", newline="") as f:
        csv.writer(f).writerow(["2", "99"] + ["0"] * 9)  # its half-written log
    calls = []

    def count(cfg_, data, seed, *a, **kw):
        calls.append(seed)
        return trainer.train_seed(cfg_, data, seed, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "train_seed", count)
        runs.train(TrainConfig.from_json({**cfg.to_json(), "out": str(again)}), quiet_console())
    assert calls == [2]
    before, after = read_json(run / "metrics.json"), read_json(again / "metrics.json")
    assert after["per_seed"] == before["per_seed"] and after["test"] == before["test"]
    assert [(r["seed"], r["epoch"]) for r in read_log(again)[1]] == [(r["seed"], r["epoch"]) for r in read_log(run)[1]]


def test_train_refuses_a_folder_of_another_run(trained, tmp_path):
    run, cfg, _ = trained
    saved = cfg.resolved().to_json()
    other = TrainConfig.from_json({**saved, "head_config": {**saved["head_config"], "alpha": 0.5}})
    with pytest.raises(UserError, match=r"holds a run with other settings \(head_config\)"):
        runs.train(other, quiet_console())


@pytest.mark.parametrize("what, message", [
    ("provenance", r"holds a run with other settings \(text cache \(fingerprint '[0-9a-f]+' \(asked 'rebuilt'\)\)"),
    ("another version", r"^{run} was made by numerics version 0, the current code is version \d+: its numbers are not "
                        r"this code's; delete it and train it again with the command that made it$"),
    ("no version", r"^{run} was made before numerics versions, the current code is version"),
])
def test_resume_refuses_another_cache_or_numerics_version(what, message, trained, tmp_path):
    """Seeds trained on other features or by other arithmetic are never mixed into one run; the commit
    that made a run is a record, not a check."""
    run, cfg, _ = trained
    again = tmp_path / "again"
    shutil.copytree(run, again)
    saved = read_json(again / "config.json")
    saved["git_commit"] = "0123456789abcdef"  # never a reason to refuse
    if what == "provenance":
        saved["provenance"]["text"]["fingerprint"] = "rebuilt"
    elif what == "another version":
        saved["numerics_version"] = 0
    else:
        del saved["numerics_version"]
    (again / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match=message.replace("{run}", re.escape(str(again)))):
        runs.train(TrainConfig.from_json({**cfg.to_json(), "out": str(again)}), quiet_console())


def test_resume_of_another_commit_of_the_same_numerics_version_goes_ahead(trained, tmp_path):
    run, cfg, _ = trained
    again = tmp_path / "again"
    shutil.copytree(run, again)
    saved = read_json(again / "config.json")
    (again / "config.json").write_text(json.dumps({**saved, "git_commit": "0" * 40, "git_dirty": True}))
    assert run_folder.RunFolder(again).mismatch(cfg.resolved()) == []
    assert runs.train(TrainConfig.from_json({**cfg.to_json(), "out": str(again)}), quiet_console()) == again


def test_a_views_run_records_its_views_and_resumes(views_run, tmp_path):
    """Regression: the number of views travels with the provenance (it used to be a bare int
    that resume iterated: TypeError). A cut seed resumes; other views are refused."""
    from conftest import TINY_VIEWS

    saved = read_json(views_run / "config.json")
    assert saved["provenance"]["text_views"] == TINY_VIEWS
    assert cache.CacheProvenance.from_json(saved["provenance"]).to_json() == saved["provenance"]
    cfg = TrainConfig.from_json({**saved["train"], "out": str(tmp_path / "again")})
    again = tmp_path / "again"
    shutil.copytree(views_run, again)
    (again / "seed-2.json").unlink()
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "train_seed", lambda cfg_, data, seed, *a, **kw: calls.append(seed)
                   or trainer.train_seed(cfg_, data, seed, *a, **kw))
        runs.train(cfg, quiet_console())
    assert calls == [2]
    assert read_json(again / "metrics.json")["per_seed"] == read_json(views_run / "metrics.json")["per_seed"]
    saved["provenance"]["text_views"] = TINY_VIEWS + 1
    (again / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match=rf"text cache \(dropout views {TINY_VIEWS} \(asked {TINY_VIEWS + 1}\)\)"):
        runs.train(cfg, quiet_console())


def test_eval_of_a_views_run_scores_the_clean_states(views_run):
    """Regression: `eval` of a --text-views run (TypeError before); test never reads views."""
    result = runs.evaluate(views_run)
    assert result["matches_metrics_json"] is True


def test_config_json_records_a_dirty_working_tree(trained):
    saved = read_json(trained[0] / "config.json")
    assert saved["git_dirty"] == run_folder.git_dirty() and isinstance(saved["git_dirty"], bool)


def test_evaluate_recomputes_the_recorded_test_metrics(trained):
    run, _, _ = trained
    result = runs.evaluate(run)
    assert result["matches_metrics_json"] is True
    m = read_json(run / "metrics.json")
    assert result["test"] == m["test"]
    assert [p["seed"] for p in result["per_seed"]] == list(SEEDS)


def test_evaluate_notices_metrics_that_do_not_match(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    m = read_json(run / "metrics.json")
    m["per_seed"][1]["test"]["macro_f1"] += 0.01
    (run / "metrics.json").write_text(json.dumps(m))
    assert runs.evaluate(run)["matches_metrics_json"] is False


def test_evaluate_a_run_missing_a_checkpoint(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    (run / "seed-2.pt").unlink()
    with pytest.raises(UserError, match=r"seed-2\.pt missing"):
        runs.evaluate(run)


def test_evaluate_refuses_a_cache_built_differently(trained, tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache.cache_dir, cache)
    index = store.cache_folder(cache, tiny_cache.dataset, store.IMAGE, tiny_cache.image_encoder) / "index.json"
    data = read_json(index)
    data["provenance"]["preprocessing"] = '{"resize": 300}'
    data["sha256"] = store.index_digest(data)  # a whole index, of another build
    index.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"image cache .* differs .*\(preprocessing .*pipeline\.py extract "
                                        r".*--image-encoder efficientnet-lite0"):
        runs.evaluate(trained[0], cache)


# --- the command line ------------------------------------------------------------------

def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The error line of a UserError exit; fails unless it is exit 1, one line, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_cli(trained, tiny_cache, cli, tmp_path, monkeypatch):
    """Every CLI case side by side (each is a Python start-up): eval and heads succeed, bad input
    is one line (UserError, exit 1) or typer's usage error (exit 2), never a traceback."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # cli.env() copies os.environ
    run = trained[0]
    text_only = tmp_path / "text_only"
    shutil.copytree(tiny_cache.cache_dir / tiny_cache.dataset, text_only / tiny_cache.dataset,
                    ignore=lambda folder, names: ["image"] if Path(folder).name == tiny_cache.dataset else [])
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(tiny_cache.cache_dir, rebuilt)
    index = store.cache_folder(rebuilt, tiny_cache.dataset, store.TEXT, tiny_cache.text_encoder) / "index.json"
    data = read_json(index)
    data["provenance"]["fingerprint"] = "0123456789abcdef"  # as if extracted again with other weights
    data["sha256"] = store.index_digest(data)  # a whole index, of another build
    index.write_text(json.dumps(data))
    (tmp_path / "not_a_run").mkdir()
    tiny = ("--dataset", tiny_cache.dataset, "--cache-dir", tiny_cache.cache_dir, "--epochs", "1", "--seeds", "1",
            "--batch-size", "8")
    cases = {
        "eval": ("eval", "--run", run),
        "heads": ("heads",),
        "no cache": ("train", "--dataset", "mvsa_x", "--cache-dir", tmp_path / "empty", "--out", tmp_path / "r1"),
        "text-only cache": ("train", *tiny, "--cache-dir", text_only, "--out", tmp_path / "r2"),
        "rebuilt cache": ("eval", "--run", run, "--cache-dir", rebuilt),
        "not a run": ("eval", "--run", tmp_path / "not_a_run"),
        "unknown head": ("train", *tiny, "--head", "sppscl", "--out", tmp_path / "r3"),
        "bad modalities": ("train", *tiny, "--modalities", "foo", "--out", tmp_path / "r4"),
        "bad scope": ("train", *tiny, "--cmf-scope", "foo", "--out", tmp_path / "r5"),
    }
    procs = {k: cli.popen(*args) for k, args in cases.items()}
    done = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=240)
        done[k] = subprocess.CompletedProcess(p.args, p.returncode, out, err)

    assert done["eval"].returncode == 0, done["eval"].stderr
    assert "matches metrics.json" in done["eval"].stdout
    assert done["heads"].returncode == 0
    for name in heads.available():
        assert f"{name}  (reads" in done["heads"].stdout
    assert "alpha" in done["heads"].stdout and "step-two gate" in done["heads"].stdout

    one_line_error(done["no cache"], "no cache for data set 'mvsa_x'", "`python pipeline.py extract --manifest PATH --name mvsa_x`")
    one_line_error(done["text-only cache"], "no image cache", "pipeline.py extract", "--image-dir",
                   "or train with --modalities text")
    one_line_error(done["rebuilt cache"], "text cache", "differs", "fingerprint",
                   "`python pipeline.py extract --dataset mvsa_s --limit 12 --text-encoder minilm`")
    one_line_error(done["not a run"], "is not a run folder", "--run")
    line = one_line_error(done["unknown head"], "unknown head 'sppscl'")
    assert all(name in line for name in heads.available())
    for k, option in (("bad modalities", "--modalities"), ("bad scope", "--cmf-scope")):
        proc = done[k]
        assert proc.returncode == 2, (k, proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr
        assert "Invalid value" in proc.stderr and option in proc.stderr and "foo" in proc.stderr, proc.stderr
    # bad input writes no run folder
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 6))


def test_ctrl_c_mid_seed_then_the_same_command_ends_as_an_uninterrupted_run(trained, tmp_path):
    """Cut in seed 2 after its epoch 1: the state of that epoch is kept, and the same command
    trains epoch 2 only, ending with the uninterrupted run's metrics.json and log.csv."""
    run, cfg, _ = trained
    again = tmp_path / "again"
    same = TrainConfig.from_json({**cfg.to_json(), "out": str(again)})

    def ctrl_c(entry):
        if (entry.seed, entry.epoch) == (2, 1):
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match=rf"^{again}: seed 1 finished and epoch 1 of seed 2 kept; run the same "
                                          "command to continue$"):
        runs.train_run(same, cache.load_data(same.resolved()), ctrl_c)
    assert (again / "seed-2.state.pt").is_file() and not (again / "seed-1.state.pt").exists()
    assert [(r["seed"], r["epoch"]) for r in read_log(again)[1]] == [("1", "1"), ("1", "2"), ("2", "1")]
    assert run_folder.RunFolder(again).epochs_done(same.resolved()) == (3, 0)
    console, epochs = quiet_console(), []

    def count(*a, on_epoch, **kw):
        return trainer.train_seed(*a, on_epoch=lambda entry: epochs.append((entry.seed, entry.epoch)) or on_epoch(entry),
                                  **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "train_seed", count)
        runs.train(same, console)
    assert epochs == [(2, 2)] and "seed 2: resuming after epoch 1 of 2" in console.file.getvalue()
    before, after = read_json(run / "metrics.json"), read_json(again / "metrics.json")
    assert run_numbers(before) == run_numbers(after)
    header, rows = read_log(again)
    assert (header, [{**r, "seconds": ""} for r in rows]) == \
        (read_log(run)[0], [{**r, "seconds": ""} for r in read_log(run)[1]])
    assert not (again / "seed-2.state.pt").exists()
    assert run_folder.RunFolder(again).epochs_done(same.resolved()) == (4, 0)


def test_the_saved_state_rewrites_the_log_rows_of_its_seed(trained, tmp_path):
    """Ctrl-C between saving epoch k and logging it, or after logging k + 1: log.csv
    restarts from the state's own epoch logs."""
    run, cfg, results = trained
    path = tmp_path / "log.csv"
    shutil.copy(run / "log.csv", path)
    done = {1: results[0]}
    log = run_folder.LogCsv(path, done, results[1].log[:1])
    assert [(r["seed"], r["epoch"]) for r in read_log(tmp_path)[1]] == [("1", "1"), ("1", "2"), ("2", "1")]
    assert read_log(tmp_path)[1][2] == read_log(run)[1][2]
    log.add(results[1].log[1])
    assert read_log(tmp_path) == read_log(run)


def test_ctrl_c_prints_what_was_kept_and_the_same_command_continues(synth_cache, cli, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dataset", synth_cache.dataset, "--cache-dir", synth_cache.cache_dir, "--text-encoder",
            synth_cache.text_encoder, "--image-encoder", synth_cache.image_encoder, "--epochs", "2", "--seeds", "1",
            "--batch-size", "12", "--out", out]
    code = f"""
import sys
import pipeline
from train import runs
real = runs.train_seed

def ctrl_c_after_epoch_1(*a, on_epoch, **kw):
    def each(entry):
        on_epoch(entry)
        raise KeyboardInterrupt
    return real(*a, on_epoch=each, **kw)

runs.train_seed = ctrl_c_after_epoch_1
sys.argv = {["pipeline.py", *map(str, args)]!r}
pipeline.main()
"""
    cut = subprocess.run([sys.executable, "-c", code], cwd=cli.repo, env=cli.env(), capture_output=True, text=True,
                         timeout=300)
    assert cut.returncode == 130, cut.stderr[-2000:]
    assert cut.stderr.strip() == f"interrupted: {out}: epoch 1 of seed 1 kept; run the same command to continue"
    again = cli.run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "seed 1: resuming after epoch 1 of 2" in again.stdout
    assert [r["epoch"] for r in read_log(out)[1]] == ["1", "2"]


# --- --protocol-check --------------------------------------------------------------------------

PROTOCOL_HEAD = ["seed", "epoch", "test_file_order_accuracy", "test_file_order_weighted_f1", "test_file_order_macro_f1"]


def synth_train_config(c, out: Path, **kw) -> TrainConfig:
    return TrainConfig(dataset=c.dataset, cache_dir=c.cache_dir, text_encoder=c.text_encoder,
                       image_encoder=c.image_encoder, epochs=3, seeds=(1, 2), batch_size=12, lr=3e-3, out=out, **kw)


def read_protocol(run: Path) -> tuple[list[str], list[dict]]:
    with open(run / "protocol.csv", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


@pytest.fixture(scope="module")
def protocol_runs(synth_cache, tmp_path_factory) -> tuple[Path, Path]:
    """(a --protocol-check run, the same run without it) on the synthetic cache, 2 seeds x 3 epochs."""
    root = tmp_path_factory.mktemp("protocol")
    return (runs.train(synth_train_config(synth_cache, root / "checked", protocol_check=True), quiet_console()),
            runs.train(synth_train_config(synth_cache, root / "plain"), quiet_console()))


def test_protocol_check_selects_nothing(protocol_runs):
    """The same numbers, selected epochs and log.csv (wall times aside) with and without it."""
    checked, plain = (read_json(run / "metrics.json") for run in protocol_runs)
    assert "protocol_check" in checked and "protocol_check" not in plain
    checked.pop("protocol_check")
    assert run_numbers(checked) == run_numbers(plain)
    assert not (protocol_runs[1] / "protocol.csv").exists()
    strip = lambda rows: [{**r, "seconds": ""} for r in rows]  # noqa: E731
    assert strip(read_log(protocol_runs[0])[1]) == strip(read_log(protocol_runs[1])[1])


def test_protocol_csv_has_one_row_per_seed_and_epoch(protocol_runs):
    header, rows = read_protocol(protocol_runs[0])
    assert header == PROTOCOL_HEAD
    assert [(r["seed"], r["epoch"]) for r in rows] == [(str(s), str(e)) for s in (1, 2) for e in (1, 2, 3)]
    assert all(0.0 <= float(r[k]) <= 1.0 for r in rows for k in PROTOCOL_HEAD[2:])


def test_metrics_json_protocol_check_is_the_best_and_last_protocol_rows(protocol_runs):
    run = protocol_runs[0]
    m = read_json(run / "metrics.json")
    p = m["protocol_check"]
    _, rows = read_protocol(run)
    assert [s["seed"] for s in p["per_seed"]] == [1, 2]
    for s, chosen in zip(p["per_seed"], m["per_seed"]):
        mine = [r for r in rows if int(r["seed"]) == s["seed"]]
        accuracy = [float(r["test_file_order_accuracy"]) for r in mine]
        best, last = mine[int(np.argmax(accuracy))], mine[-1]
        for part, row in (("best_epoch", best), ("last_epoch", last)):
            assert s[part]["epoch"] == int(row["epoch"])
            for metric in METRICS:
                assert s[part][metric] == pytest.approx(float(row[f"test_file_order_{metric}"]), abs=1e-4)
        assert s["best_epoch"]["accuracy"] == pytest.approx(max(accuracy), abs=1e-4)
        assert s["test"] == chosen["test"]  # the label-blind, dev-selected number beside it
        assert s["inflation"] == pytest.approx(s["best_epoch"]["accuracy"] - chosen["test"]["accuracy"])
    for part in ("best_epoch", "last_epoch", "test"):
        for metric in METRICS:
            values = [s[part][metric] for s in p["per_seed"]]
            assert p[part][metric] == {"mean": pytest.approx(np.mean(values)),
                                       "std": pytest.approx(np.std(values, ddof=1))}
    assert p["test"] == {k: m["test"][k] for k in METRICS}
    assert p["inflation"]["mean"] == pytest.approx(np.mean([s["inflation"] for s in p["per_seed"]]))
    assert "nothing is selected" in p["about"]


def test_protocol_csv_is_rebuilt_when_a_seed_resumes(protocol_runs, synth_cache, tmp_path):
    """Ctrl-C in seed 2 after its epoch 1, a stale row written past the saved state: the same
    command ends with the uninterrupted run's protocol.csv and metrics.json."""
    run = protocol_runs[0]
    again = tmp_path / "again"
    same = synth_train_config(synth_cache, again, protocol_check=True)

    def ctrl_c(entry):
        if (entry.seed, entry.epoch) == (2, 1):
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        runs.train_run(same, runs.load_data(same.resolved()), ctrl_c)
    assert [(r["seed"], r["epoch"]) for r in read_protocol(again)[1]] == [("1", "1"), ("1", "2"), ("1", "3"),
                                                                          ("2", "1")]
    with open(again / "protocol.csv", "a", newline="") as f:
        csv.writer(f).writerow(["2", "2", "0", "0", "0"])  # an epoch the state never saved
    runs.train(same, quiet_console())
    assert read_protocol(again) == read_protocol(run)
    before, after = read_json(run / "metrics.json"), read_json(again / "metrics.json")
    assert run_numbers(before) == run_numbers(after)


def test_train_protocol_check_prints_the_authors_protocol_rows(synth_cache, cli, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dataset", synth_cache.dataset, "--cache-dir", synth_cache.cache_dir, "--text-encoder",
            synth_cache.text_encoder, "--image-encoder", synth_cache.image_encoder, "--epochs", "2", "--seeds", "1",
            "--batch-size", "12", "--out", out, "--protocol-check"]
    proc = subprocess.run(cli.command(*args), cwd=cli.repo, env=cli.env(COLUMNS="200"), capture_output=True, text=True,
                          timeout=300)  # wide enough that no row label wraps
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = {line.split("│")[1].strip() for line in proc.stdout.splitlines() if line.count("│") == 5}
    assert {"test (label-blind)", "test, file order, best epoch (authors' protocol)",
            "test, file order, last epoch (authors' protocol)"} <= shown
    assert "inflation (best epoch in file order minus label-blind test accuracy)" in proc.stdout
    assert read_json(out / "config.json")["train"]["protocol_check"] is True
    assert len(read_protocol(out)[1]) == 2


# --- train --jobs ------------------------------------------------------------------------------

def test_seeds_in_two_processes_give_the_same_run_as_one(synth_cache, tmp_path):
    """`train --jobs 2`: the seeds train in two worker processes, and the run folder says exactly
    what one process says (a seed depends on its seed alone); log.csv has every epoch once. So
    does a streamed cache, each worker reading through the readers it forked with."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as each worker: sums are then bit-identical
    try:
        one = runs.train(synth_train_config(synth_cache, tmp_path / "one"), quiet_console(), jobs=1)
    finally:
        torch.set_num_threads(before)
    two = runs.train(synth_train_config(synth_cache, tmp_path / "two"), quiet_console(), jobs=2, threads=1)
    a, b = read_json(one / "metrics.json"), read_json(two / "metrics.json")
    assert run_numbers(a) == run_numbers(b)
    rows = lambda run: sorted((r["seed"], r["epoch"], r["dev_accuracy"]) for r in read_log(run)[1])  # noqa: E731
    assert rows(one) == rows(two) and len(rows(two)) == 2 * 3
    assert not list(two.glob("*.state.pt"))
    streamed = runs.train(synth_train_config(synth_cache, tmp_path / "streamed"), quiet_console(), jobs=2, threads=1,
                          memory=1)
    c = read_json(streamed / "metrics.json")
    assert c["cost"]["cache_streamed"] and not a["cost"]["cache_streamed"]
    assert run_numbers(c) == run_numbers(a) and rows(streamed) == rows(one)


def test_a_finished_seed_kept_as_evidence_without_weights_is_not_trained_again(synth_cache, tmp_path, monkeypatch):
    """results/ keeps config.json, metrics.json, log.csv and seed-<s>.json, not the weights: training
    the same configuration there again trains nothing and writes the same metrics."""
    run = runs.train(synth_train_config(synth_cache, tmp_path / "evidence"), quiet_console(), jobs=1)
    before = read_json(run / "metrics.json")
    for pt in run.glob("seed-*.pt"):
        pt.unlink()
    monkeypatch.setattr(runs, "train_seed", lambda *a, **k: pytest.fail("a finished seed was trained again"))
    again = runs.train(synth_train_config(synth_cache, tmp_path / "evidence"), quiet_console(), jobs=1)
    assert run_numbers(read_json(again / "metrics.json")) == run_numbers(before)


# --- the main process of `train --jobs 2` dies: no worker is left, the same command continues ----------

def _pool_args(c, out: Path) -> list:
    return ["train", "--dataset", c.dataset, "--cache-dir", c.cache_dir, "--text-encoder", c.text_encoder,
            "--image-encoder", c.image_encoder, "--epochs", "6", "--seeds", "1,2", "--batch-size", "12",
            "--jobs", "2", "--threads", "1", "--out", out]


@pytest.fixture(scope="module")
def pool_reference(synth_cache, cli, tmp_path_factory) -> Path:
    """The run of `_pool_args`, never interrupted."""
    out = tmp_path_factory.mktemp("pool") / "reference"
    r = cli.run(*_pool_args(synth_cache, out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    """metrics.json and log.csv (wall times aside; rows in any order) as an uninterrupted run's."""
    assert run_numbers(read_json(a / "metrics.json")) == run_numbers(read_json(b / "metrics.json"))
    rows = lambda run: sorted(tuple(v for k, v in r.items() if k != "seconds") for r in read_log(run)[1])  # noqa: E731
    assert read_log(a)[0] == read_log(b)[0] and rows(a) == rows(b) and len(rows(b)) == 2 * 6
    assert not list(b.glob("*.state.pt*"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_main_process_leaves_no_worker_and_the_same_command_continues(synth_cache, cli, tmp_path,
                                                                                     pool_reference):
    out = tmp_path / "run"
    args = _pool_args(synth_cache, out)
    proc, workers = cut_when_saved(cli, args, out, "seed-*.state.pt", signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -9
    assert_gone(workers)  # before: both kept training, wrote their states, then hung on a pipe forever
    again = cli.run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout
    _assert_same_run(pool_reference, out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_is_ctrl_c_exit_143_and_the_same_command_continues(synth_cache, cli, tmp_path, pool_reference):
    """What a cluster scheduler sends: finished work kept, one line saying so, exit code 143."""
    out = tmp_path / "run"
    args = _pool_args(synth_cache, out)
    proc, workers = cut_when_saved(cli, args, out, "seed-*.state.pt", signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    line = err.strip()
    assert "\n" not in line, repr(err)
    assert line.startswith(f"terminated: {out}: ") and " kept" in line, err
    assert line.endswith("; run the same command to continue"), err
    assert_gone(workers)
    again = cli.run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    _assert_same_run(pool_reference, out)
