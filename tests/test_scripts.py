"""The scripts in results/ and the evidence they made: each `pipeline.py train` line of a results/*.sh, parsed
by the real `train` command and resolved as `train` resolves it, gives the settings of the committed run its
--out names (config.json's "train" section), and every committed run (results/<table>/<row>/) is made by a
line of some script. Nothing is trained: each script runs, from a copy in tmp, with a stub `python` first on
PATH that writes down its arguments and exits 0. (tests/test_readme.py holds the scripts' flags to the
commands' --help; this holds each line to the run it made.)"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

from conftest import REPO

SCRIPTS = sorted(p.name for p in (REPO / "results").glob("*.sh"))
QUEUE = "queue.sh"  # runs the `train` lines on its stdin: what the other scripts feed it
MAKERS = [s for s in SCRIPTS if s != QUEUE]
# scripts whose runs are not committed yet: their --out may name no committed run
NOT_RUN_YET = {"mvsa_s-tuned.sh": "its searches have no committed run yet"}
NOT_SETTINGS = {"out", "cache_dir"}  # where the run went and where the cache was, not how it was trained

STUB = """#!{python} -S
import json, os, sys
with open(os.environ["STUB_CALLS"], "a") as f:
    f.write(json.dumps({{"cwd": os.getcwd(), "argv": sys.argv[1:]}}) + "\\n")
"""


@dataclass(frozen=True)
class Call:
    """One `python ...` a script ran: from which folder, with which arguments."""

    cwd: Path
    argv: list[str]

    @property
    def command(self) -> str | None:
        """The `pipeline.py` command (`train`), or None for another program."""
        return self.argv[1] if len(self.argv) > 1 and Path(self.argv[0]).name == "pipeline.py" else None


def run_script(root: Path, name: str, stdin: str = "") -> tuple[subprocess.CompletedProcess, list[Call]]:
    """results/`name` of the copy of the repository at `root`, with the stub `python` of `root`/bin."""
    calls = root / f"{name}.calls"
    calls.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "LANES"}
    env.update(PATH=f"{root / 'bin'}{os.pathsep}{env['PATH']}", STUB_CALLS=str(calls))
    done = subprocess.run(["bash", str(root / "results" / name)], input=stdin, cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)
    lines = calls.read_text().splitlines() if calls.is_file() else []
    return done, [Call(Path(c["cwd"]), c["argv"]) for c in map(json.loads, lines)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """results/*.sh copied into a folder of their own, and a stub `python` in its bin/: the scripts `cd` to the
    folder above theirs and write their logs in its results/, never in the repository."""
    root = tmp_path_factory.mktemp("repo")
    (root / "results").mkdir()
    for name in SCRIPTS:
        shutil.copy2(REPO / "results" / name, root / "results" / name)
    (root / "bin").mkdir()
    stub = root / "bin" / "python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def calls(root) -> dict[str, list[Call]]:
    """The `python` calls of each script that makes runs."""
    out = {}
    for name in MAKERS:
        done, made = run_script(root, name)
        assert done.returncode == 0, f"results/{name} failed with the stub python (exit {done.returncode}): {done.stderr}"
        assert made, f"results/{name} ran no python"
        wrong = {str(c.cwd) for c in made} - {str(root)}
        assert not wrong, f"results/{name} ran python in {sorted(wrong)}, not in the repository's root"
        out[name] = made
    return out


@functools.cache
def command(name: str):
    """`pipeline.py`'s command `name`, parsing as it does but running nothing once parsed."""
    import pipeline

    cmd = typer.main.get_command(pipeline.app).commands[name]  # click objects made for this call alone
    cmd.callback = lambda **own: None
    return cmd


def parse(argv: list[str]):
    """The click context of `pipeline.py <argv>` as the command sees it once invoked: its config fields in
    ctx.meta["fields"], its own options in ctx.params, the options given in ctx.meta["given"]. Nothing runs.
    Parsed in the repository's root, where the scripts run (--splits is read from the folder a command runs in)."""
    cmd = command(argv[0])
    with contextlib.chdir(REPO):
        ctx = cmd.make_context(argv[0], list(argv[1:]))
        with ctx:
            cmd.invoke(ctx)
    return ctx


def train_config(argv: list[str]) -> dict:
    """The "train" section of config.json that `pipeline.py train <argv>` writes: the config built from the
    options as `train` builds it (a --config file read from the repository's root), resolved as `train` resolves it."""
    from train.config import TrainConfig

    ctx = parse(["train", *argv])
    with contextlib.chdir(REPO):
        cfg = TrainConfig.from_cli(ctx.meta["fields"], ctx.params["set_"], ctx.params["config"], ctx.meta["given"])
    return cfg.resolved().to_json()


def differences(committed: dict, now: dict) -> list[str]:
    """`field: committed X, the line gives Y` for each setting that differs (a head's as head_config.<field>)."""
    out = []
    for key in sorted(set(committed) | set(now)):
        if key in NOT_SETTINGS:
            continue
        a, b = committed.get(key, "(absent)"), now.get(key, "(absent)")
        if key == "head_config" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"head_config.{d}" for d in differences(a, b)]
        elif a != b:
            out.append(f"{key}: committed {a!r}, the line gives {b!r}")
    return out


def committed_runs() -> set[str]:
    """Every committed run folder, results/<table>/<row>, relative to the repository."""
    return {p.parent.relative_to(REPO).as_posix() for p in (REPO / "results").glob("*/*/config.json")}


def out_of(argv: list[str]) -> str | None:
    """The --out of a command line, as written (relative to the repository's root)."""
    ctx = parse(argv)
    out = ctx.meta["fields"].get("out", ctx.params.get("out"))
    return None if out is None else Path(out).as_posix()


def test_queue_trains_each_line_it_reads(root):
    """results/queue.sh: one `pipeline.py train --jobs 1 --threads 1 <line>` per line of its stdin, comments and
    blank lines skipped, quoted values kept whole."""
    done, made = run_script(root, QUEUE, "--head probe --out results/x/a\n# a comment\n\n"
                                         "  --head spp_scl --set 'cmf_scope=sample' --out results/x/b\n")
    assert done.returncode == 0, done.stderr
    assert sorted(c.argv for c in made) == [
        ["pipeline.py", "train", "--jobs", "1", "--threads", "1", "--head", "probe", "--out", "results/x/a"],
        ["pipeline.py", "train", "--jobs", "1", "--threads", "1", "--head", "spp_scl", "--set", "cmf_scope=sample",
         "--out", "results/x/b"]]
    assert {c.cwd for c in made} == {root}


@pytest.mark.parametrize("script", MAKERS)
def test_each_line_of_a_script_parses(script, calls):
    """Every `pipeline.py` command a script runs takes its options and values (parsed by the real command)."""
    for call in calls[script]:
        if call.command is None:
            continue
        try:
            parse(call.argv[1:])
        except Exception as e:  # click's UsageError (a bad option or value), a UserError
            pytest.fail(f"results/{script}: `pipeline.py {' '.join(call.argv[1:])}` does not parse: {e}")


@pytest.mark.parametrize("script", MAKERS)
def test_each_train_line_gives_its_committed_runs_settings(script, calls):
    """Each `train` line of a script, resolved as `train` resolves it, gives field by field the settings in
    config.json of the committed run its --out names (a script of NOT_RUN_YET may name runs not committed)."""
    committed, problems, matched = committed_runs(), [], 0
    for call in calls[script]:
        if call.command not in ("train", "search"):
            continue  # extract makes a cache, not a run
        out = out_of(call.argv[1:])
        if out is None:
            problems.append(f"`pipeline.py {' '.join(call.argv[1:])}` names no --out: its run folder is not a row")
            continue
        if out not in committed:
            if script not in NOT_RUN_YET:
                problems.append(f"--out {out}: no committed run (no {out}/config.json)")
            continue
        if call.command != "train":
            problems.append(f"--out {out}: a committed run made by `{call.command}`, whose settings no line gives")
            continue
        saved = json.loads((REPO / out / "config.json").read_text())["train"]
        problems += [f"--out {out}: {d}" for d in differences(saved, train_config(call.argv[2:]))]
        matched += 1
    assert not problems, f"results/{script}:\n  " + "\n  ".join(problems)
    assert matched or script in NOT_RUN_YET, f"results/{script} made none of the committed runs"


def test_every_committed_run_is_made_by_a_script_line(calls):
    """A committed run folder that no line of results/*.sh names with --out is evidence no script makes again."""
    made = {}
    for script, found in calls.items():
        for call in found:
            if call.command in ("train", "search") and (out := out_of(call.argv[1:])) is not None:
                made.setdefault(out, []).append(script)
    orphans = sorted(committed_runs() - set(made))
    assert not orphans, f"committed runs that no results/*.sh line makes: {', '.join(orphans)}"
    twice = {out: scripts for out, scripts in made.items() if len(scripts) > 1}
    assert not twice, f"run folders two lines make: {twice}"
