"""train/run_folder.py: one module owns the run folder, and what it writes can be trusted.

- no other module names a run folder's files (a scan of the source);
- one writer at a time: a second `train`, grid cell or `replay` is refused in one line naming
  the holder, and the lock of a process that died blocks nothing;
- `train --out` never writes among files that are not its own;
- `results` refuses a run whose files disagree, naming the file; `eval` refuses a checkpoint that
  is more than plain weights, naming it.
Each case the user meets goes through `pipeline.main` (fixture `run_main`)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from train import runs
from train.config import TrainConfig
from train.run_folder import RunFolder

from conftest import REPO, quiet_console

pytestmark = pytest.mark.usefixtures("one_thread")

# a string that is a run folder file's name or a path/pattern ending in one (not prose that mentions it)
RUN_FILE = re.compile(r"^(?:[\w./*{}<>-]*/)?(config\.json|metrics\.json|log\.csv|protocol\.csv|report\.txt"
                      r"|writer\.lock|seed-(\{\}|\*|<s>)\.(json|pt|state\.pt))$")
# other folders' files of the same name: a Hugging Face model folder's config.json (stage one)
NOT_RUN_FOLDERS = {("extract/encoders.py", "config.json")}


def _path_strings(tree: ast.AST) -> list[str]:
    """Every string constant and f-string of a module (f-string fields as {}), docstrings left out."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            found.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
    return found


def test_no_module_but_run_folder_names_the_files_of_a_run_folder():
    """docs/architecture.md rules 4 and 9: every read and write of a run folder goes through RunFolder."""
    offenders = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(("tests/", "results/", ".")) or rel == "train/run_folder.py":
            continue
        for s in _path_strings(ast.parse(path.read_text())):
            m = RUN_FILE.match(s)
            if m and (rel, m.group(1)) not in NOT_RUN_FOLDERS:
                offenders.append(f"{rel}: {s!r}")
    assert offenders == [], "read or write these through train/run_folder.py's RunFolder:\n" + "\n".join(offenders)


def test_the_scan_sees_a_path_built_in_another_module():
    tree = ast.parse('def f(run, s):\n    """Reads log.csv."""\n    return run / "log.csv", run / f"seed-{s}.pt"\n')
    assert [s for s in _path_strings(tree) if RUN_FILE.match(s)] == ["log.csv", "seed-{}.pt"]


# --- a small run, and the CLI -----------------------------------------------------------------

def train_args(c, out: Path, *extra) -> list:
    return ["train", "--dataset", c.dataset, "--cache-dir", c.cache_dir, "--text-encoder", c.text_encoder,
            "--image-encoder", c.image_encoder, "--epochs", "1", "--seeds", "1", "--batch-size", "12",
            "--threads", "1", "--out", out, *extra]


@pytest.fixture(scope="module")
def finished(synth_cache, tmp_path_factory) -> Path:
    """A finished run on the synthetic cache: 2 seeds x 3 epochs."""
    c = synth_cache
    cfg = TrainConfig(dataset=c.dataset, cache_dir=c.cache_dir, text_encoder=c.text_encoder,
                      image_encoder=c.image_encoder, epochs=3, seeds=(1, 2), batch_size=12, lr=3e-3, eval_orders=2,
                      out=tmp_path_factory.mktemp("finished") / "run")
    return runs.train(cfg, quiet_console())


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def one_line(r, *fragments: str) -> str:
    """The error line of a refused command: exit 1, one line, no traceback."""
    assert r.code == 1, (r.code, r.out, r.err)
    assert "Traceback" not in r.out + r.err, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- one writer -------------------------------------------------------------------------------

def test_a_second_train_of_a_folder_being_written_is_refused_naming_the_holder(synth_cache, run_main, tmp_path):
    out = tmp_path / "run"
    with RunFolder(out).writer():  # a train of this folder, running
        r = run_main(*train_args(synth_cache, out))
        one_line(r, str(out), "is being written by another process", f"pid {os.getpid()} on {socket.gethostname()}")
        cfg = TrainConfig(dataset=synth_cache.dataset, cache_dir=synth_cache.cache_dir, epochs=1, seeds=(1,),
                          text_encoder=synth_cache.text_encoder, image_encoder=synth_cache.image_encoder,
                          batch_size=12, out=out)
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):  # a grid cell is one writer too
            runs.train_run(cfg, runs.load_data(cfg.resolved()))
    assert not (out / "config.json").exists()  # the refused writer wrote nothing
    r = run_main(*train_args(synth_cache, out))  # let go: the same command trains
    assert r.code == 0, r.err
    assert not (out / RunFolder.LOCK).exists()


def test_a_replay_holds_the_writer_lock_too(copy, run_main):
    """A replay writes nothing, but compares with files a train of the same folder could change."""
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    with RunFolder(copy).writer():
        one_line(run_main("replay", copy), "is being written by another process", f"pid {os.getpid()}")
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_the_lock_of_a_process_that_died_blocks_nothing(synth_cache, run_main, cli, tmp_path):
    """Held by another process, it is refused naming that process; killed (no clean-up at all), the
    kernel drops its flock and the next writer goes ahead, its lock file left behind or not."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from train.run_folder import RunFolder
held = RunFolder({str(out)!r}).writer()
held.__enter__()
print("held", flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True, env=cli.env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"^{out} is being written by another process \(pid {holder.pid} on "):
            with RunFolder(out).writer():
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (out / RunFolder.LOCK).exists()  # a dead process's leftover
    r = run_main(*train_args(synth_cache, out))
    assert r.code == 0, r.err
    assert RunFolder(out).is_finished()


# --- outputs never clobber what is not theirs -------------------------------------------------

def test_train_out_on_a_folder_of_other_files_is_refused(synth_cache, run_main, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "log.csv").write_text("my own log\n")
    one_line(run_main(*train_args(synth_cache, mine)), f"--out {mine} holds other files (log.csv)", "no config.json")
    assert sorted(p.name for p in mine.iterdir()) == ["log.csv"] and (mine / "log.csv").read_text() == "my own log\n"


def test_train_out_on_the_root_or_a_file_is_refused(synth_cache, run_main, tmp_path):
    one_line(run_main(*train_args(synth_cache, Path("/"))), "--out / is the root folder")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    one_line(run_main(*train_args(synth_cache, a_file)), f"--out {a_file} is a file")
    assert a_file.read_text() == "mine"


def test_train_out_on_an_empty_folder_or_its_own_run_is_fine(synth_cache, run_main, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert run_main(*train_args(synth_cache, out)).code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run_main(*train_args(synth_cache, out), "--robustness")  # the same run again: found finished, nothing trained
    assert r.code == 0 and "seeds [1] already done" in " ".join(r.out.split())
    # its record of the code, machine and wall time that made it is kept; only robustness.json is new
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "robustness.json"} == before
    assert (out / "robustness.json").is_file()


# --- evidence is self-consistent --------------------------------------------------------------

def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_results_reads_a_run_whose_files_agree(finished, run_main):
    r = run_main("results", finished)
    assert r.code == 0, r.err


def test_results_refuses_an_edited_seed_accuracy_naming_the_file(copy, run_main):
    edit_json(copy / "seed-2.json", lambda s: s["test"].update(accuracy=s["test"]["accuracy"] + 0.01))
    one_line(run_main("results", copy), f"{copy / 'seed-2.json'} disagrees with metrics.json", "test accuracy")


def test_results_refuses_an_edited_summary(copy, run_main):
    edit_json(copy / "metrics.json", lambda m: m["test"]["accuracy"].update(mean=m["test"]["accuracy"]["mean"] + 0.01))
    one_line(run_main("results", copy), f"{copy / 'metrics.json'} disagrees with its seed files", "test accuracy")


def edit_log(run: Path, seed: int, epoch: int, column: str, value) -> None:
    lines = (run / "log.csv").read_text().splitlines()
    col = lines[0].split(",").index(column)
    for k, line in enumerate(lines[1:], 1):
        cells = line.split(",")
        if cells[:2] == [str(seed), str(epoch)]:
            cells[col] = value(cells[col])
            lines[k] = ",".join(cells)
    (run / "log.csv").write_text("\n".join(lines) + "\n")


def test_results_refuses_a_selected_epoch_that_log_csv_contradicts(copy, run_main):
    """The selected epoch must be an argmax row of dev `select` (weighted F1) in log.csv."""
    best = json.loads((copy / "seed-1.json").read_text())["best_epoch"]
    other = 3 if best != 3 else 1
    edit_log(copy, 1, other, "dev_weighted_f1", lambda v: "1.0001")
    line = one_line(run_main("results", copy), f"{copy / 'seed-1.json'} disagrees with log.csv")
    assert f"best_epoch {best}, but dev weighted_f1 of seed 1 is higher in epoch {other}" in line


def test_results_refuses_a_dev_value_edited_in_log_csv(copy, run_main):
    """The selected row's dev values are the seed file's, to the 4 digits log.csv holds."""
    best = json.loads((copy / "seed-1.json").read_text())["best_epoch"]
    edit_log(copy, 1, best, "dev_macro_f1", lambda v: f"{float(v) / 2:.4f}")  # not the selecting column
    one_line(run_main("results", copy), f"{copy / 'seed-1.json'} disagrees with log.csv", "dev macro_f1")


# --- checkpoints ----------------------------------------------------------------------------

def test_a_checkpoint_that_is_more_than_plain_weights_is_refused_naming_it(copy, run_main):
    torch.save(torch.nn.Linear(2, 2), copy / "seed-2.pt")  # a pickled module: weights_only refuses it
    line = one_line(run_main("eval", copy), f"{copy / 'seed-2.pt'} holds more than plain tensors")
    assert "weights_only" not in line


def test_a_corrupt_checkpoint_is_one_line(copy, run_main):
    (copy / "seed-1.pt").write_bytes(b"not a checkpoint")
    one_line(run_main("eval", copy), f"{copy / 'seed-1.pt'} is corrupt")


def test_ctrl_c_note_reads_what_the_state_files_hold(finished, tmp_path):
    """The note names the epoch in each unfinished seed's seed-<s>.state.pt, whoever wrote it."""
    folder = RunFolder(tmp_path / "run")
    shutil.copytree(finished, folder.path)
    (folder.path / "seed-2.json").unlink()
    folder.save_state(2, {"epoch": 2})
    assert folder.kept_epochs([1, 2, 3]) == {1: 0, 2: 2, 3: 0}


def test_an_output_folder_keeps_accepting_its_own_half_written_files(tmp_path):
    """A writer killed mid-write leaves `<owned>.tmp<pid>` (core.paths.write_atomic): the folder is
    still the command's own; anything else in it is someone's."""
    from core.paths import output_dir

    out = tmp_path / "tables"
    out.mkdir()
    (out / "table.csv.tmp4242").write_text("half")
    assert output_dir(out, ("table.csv", "table.md"), "--out") == out
    (out / "table.csv.bak").write_text("mine")
    with pytest.raises(UserError, match=r"holds other files \(table.csv.bak\)"):
        output_dir(out, ("table.csv", "table.md"), "--out")
