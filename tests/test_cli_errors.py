"""Every command of pipeline.py against each kind of bad input a user gives: unknown names, bad
values, missing and corrupt files, empty caches, unfinished runs. Each must exit non-zero with one
line naming the problem (a UserError's `error: ...`, or click's `Error: ...` for a malformed
option), no traceback and no warning. Run in-process through `pipeline.main` (conftest `run_main`).

One run is trained once on the synthetic cache (1 epoch, 1 seed); broken copies of it are made here."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import pytest

import heads
from train import runs
from train.config import TrainConfig

from conftest import DATA, FullDisk, quiet_console

IMAGE = DATA / "mvsa_single" / "images" / "17.jpg"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def places(synth_cache, tmp_path_factory) -> dict[str, Path]:
    """Named paths the cases below refer to as `{name}`."""
    tmp = tmp_path_factory.mktemp("bad")
    cfg = TrainConfig(dataset=synth_cache.dataset, cache_dir=synth_cache.cache_dir, text_encoder=synth_cache.text_encoder,
                      image_encoder=synth_cache.image_encoder, epochs=1, seeds=(1,), batch_size=12, eval_orders=1,
                      head_config=heads.build_config("spp_scl", {"cmf_scope": "sample"}), out=tmp / "run")
    run = runs.train(cfg, quiet_console())
    corrupt, unfinished = tmp / "corrupt", tmp / "unfinished"
    for folder in (corrupt, unfinished):
        folder.mkdir()
    (corrupt / "config.json").write_text('{"train": {"dataset": ')  # cut off mid-write
    shutil.copy(run / "config.json", unfinished)
    (unfinished / "log.csv").write_text((run / "log.csv").read_text().splitlines()[0] + "\n")  # no epoch, no weights
    (tmp / "a_file").write_text("not a folder")
    (tmp / "empty_cache").mkdir()
    (tmp / "texts").mkdir()
    (tmp / "texts" / "x.txt").write_bytes("caf\xe9".encode("cp1252"))
    (tmp / "missing_text.csv").write_text("id,text_file,image\nx,texts/gone.txt,\n")
    (tmp / "missing_image.jsonl").write_text(json.dumps({"id": "x7", "text": "hi", "image": "gone.jpg"}) + "\n")
    (tmp / "not_json.jsonl").write_text("{oops\n")
    (tmp / "blank_split.csv").write_text("id,text,label,split\n1,hello,positive,\n2,bye,negative, \n")
    return {"cache": synth_cache.cache_dir, "ds": Path(synth_cache.dataset), "run": run, "corrupt": corrupt,
            "unfinished": unfinished, "tmp": tmp, "image": IMAGE}


SYNTH = ("--cache-dir", "{cache}", "--text-encoder", "synth-text", "--image-encoder", "synth-image")
TRAIN = ("train", "-d", "{ds}", *SYNTH, "--epochs", "1", "--seeds", "1", "--batch-size", "12")
GRID = ("-d", "{ds}", *SYNTH, "--epochs", "1", "--seeds", "1", "--batch-size", "12", "--runs-dir", "{tmp}/grid")

# (id, arguments, fragments the one error line must hold)
CASES = [
    # extract
    ("extract-unknown-dataset", ("extract", "-d", "mvsa_x", "--cache-dir", "{tmp}/c1"), ["unknown data set 'mvsa_x'"]),
    ("extract-missing-manifest", ("extract", "--manifest", "{tmp}/nope.csv", "--cache-dir", "{tmp}/c2"), ["nope.csv not found"]),
    ("extract-corrupt-manifest", ("extract", "--manifest", "{tmp}/not_json.jsonl", "--cache-dir", "{tmp}/c3"), ["not valid JSON"]),
    ("extract-blank-split-cells", ("extract", "--manifest", "{tmp}/blank_split.csv", "--cache-dir", "{tmp}/c4",
                                   "--text-only", "--random-weights"), ["no usable items", "1: blank split cell"]),
    ("extract-bad-shard", ("extract", "-d", "mvsa_s", "--shard", "3/2", "--cache-dir", "{tmp}/c5"), ["--shard '3/2'"]),
    ("extract-bad-value", ("extract", "-d", "mvsa_s", "--encoder-batch-size", "0"), ["--encoder-batch-size"]),
    ("extract-name-with-slash", ("extract", "--manifest", "{tmp}/blank_split.csv", "--name", "a/b", "--cache-dir", "{tmp}/c6"),
     ["--name 'a/b'", "plain folder name"]),
    ("extract-name-dotdot", ("extract", "--manifest", "{tmp}/blank_split.csv", "--name", "..", "--cache-dir", "{tmp}/c7"),
     ["--name '..'"]),
    ("extract-name-empty", ("extract", "--manifest", "{tmp}/blank_split.csv", "--name", "", "--cache-dir", "{tmp}/c8"),
     ["--name ''"]),
    # verify
    ("verify-no-cache", ("verify", "--cache-dir", "{tmp}/nope"), ["no cache at", "nope"]),
    ("verify-unknown-dataset", ("verify", "--cache-dir", "{cache}", "-d", "synht"), ["no cache for data set 'synht'", "synth"]),
    # train
    ("train-misspelled-dataset", ("train", "-d", "synht", *SYNTH[:2]), ["did you mean synth?", "caches in"]),
    ("train-empty-cache", ("train", "-d", "mvsa_s", "--cache-dir", "{tmp}/empty_cache"), ["no caches in", "extract"]),
    ("train-unknown-head", (*TRAIN, "--head", "sppscl"), ["unknown head 'sppscl'"]),
    ("train-unknown-field", (*TRAIN, "--set", "alpah=1"), ["no field 'alpah'"]),
    ("train-clip-heads-0", (*TRAIN, "--head", "clip_ca_cg", "--set", "heads=0"), ["heads=0"]),
    ("train-hybrid-heads-0", (*TRAIN, "--head", "hybrid_fusion", "--set", "heads=0"), ["heads=0"]),
    ("train-alpha-0", (*TRAIN, "--alpha", "0"), ["alpha=0.0", "> 0"]),
    ("train-alpha-negative", (*TRAIN, "--set", "alpha=-0.5"), ["alpha=-0.5"]),
    ("train-out-is-a-file", (*TRAIN, "--out", "{tmp}/a_file"), ["a_file is a file"]),
    ("train-corrupt-run-to-resume", (*TRAIN, "--out", "{corrupt}"), ["config.json is corrupt"]),
    ("train-bad-seeds", (*TRAIN[:-4], "--seeds", "a,b"), ["give seeds as 1,2,3"]),
    ("train-seed-twice", (*TRAIN[:-4], "--seeds", "1,2,1"), ["--seeds", "seed 1 given twice"]),
    ("train-bad-select", (*TRAIN, "--select", "f1"), ["--select"]),
    ("train-bad-patience", (*TRAIN, "--patience", "-1"), ["--patience"]),
    ("train-bad-choice", (*TRAIN, "--cmf-scope", "global"), ["--cmf-scope"]),
    ("train-no-such-option", (*TRAIN, "--alpah", "1"), ["No such option: --alpah"]),
    # eval
    ("eval-not-a-run", ("eval", "{tmp}"), ["not a run folder"]),
    ("eval-corrupt-config", ("eval", "{corrupt}"), ["config.json is corrupt"]),
    ("eval-unfinished-run", ("eval", "{unfinished}"), ["seed-1.pt missing"]),
    ("eval-unknown-seed", ("eval", "{run}", "--seed", "9"), ["--seed 9", "has seeds 1"]),
    ("eval-empty-cache", ("eval", "{run}", "--cache-dir", "{tmp}/empty_cache"), ["no cache"]),
    # replay
    ("replay-missing-folder", ("replay", "{tmp}/nope"), ["nope: no such file or folder"]),
    # report
    ("report-unfinished-run", ("report", "{unfinished}"), ["no seed-<s>.pt yet"]),
    ("report-corrupt-config", ("report", "{corrupt}"), ["config.json is corrupt"]),
    ("report-missing-run", ("report", "{tmp}/nope"), ["not a run folder"]),
    # predict
    ("predict-missing-image", ("predict", "{run}", "--text", "hi", "--image", "{tmp}/gone.jpg"),
     ["item gone.jpg: image file", "gone.jpg not found"]),
    ("predict-manifest-missing-image", ("predict", "{run}", "--manifest", "{tmp}/missing_image.jsonl"),
     ["item x7: image file", "gone.jpg not found"]),
    ("predict-manifest-missing-text-file", ("predict", "{run}", "--manifest", "{tmp}/missing_text.csv"),
     ["item x: text file", "gone.txt not found"]),
    ("predict-corrupt-manifest", ("predict", "{run}", "--manifest", "{tmp}/not_json.jsonl"), ["not valid JSON"]),
    ("predict-nothing", ("predict", "{run}"), ["nothing to predict"]),
    ("predict-unknown-seed", ("predict", "{run}", "--text", "hi", "--image", "{image}", "--seed", "9"), ["--seed 9"]),
    ("predict-corrupt-config", ("predict", "{corrupt}", "--text", "hi"), ["config.json is corrupt"]),
    ("predict-unfinished-run", ("predict", "{unfinished}", "--text", "hi", "--image", "{image}"),
     ["seed-1.pt missing"]),
    # audit
    ("audit-unknown-dataset", ("audit", "-d", "nope", "--cache-dir", "{cache}"), ["no cache for data set 'nope'"]),
    ("audit-empty-cache", ("audit", "-d", "mvsa_s", "--cache-dir", "{tmp}/empty_cache"), ["no cache for data set"]),
    # ablate
    ("ablate-unknown-row", ("ablate", *GRID, "--rows", "nope"), ["--rows nope"]),
    ("ablate-heads-0", ("ablate", *GRID, "--head", "clip_ca_cg", "--set", "heads=0"), ["heads=0"]),
    ("ablate-empty-cache", ("ablate", "-d", "mvsa_s", "--cache-dir", "{tmp}/empty_cache", "--rows", "one-step",
                            "--runs-dir", "{tmp}/grid0"), ["no caches in"]),
    ("ablate-bad-shard", ("ablate", *GRID, "--shard", "2/2"), ["--shard '2/2'"]),
    ("ablate-bad-seeds", ("ablate", *GRID[:-4], "--seeds", "2,2"), ["seed 2 given twice"]),
    ("ablate-bad-patience", ("ablate", *GRID, "--patience", "-1"), ["--patience"]),
    # sweep
    ("sweep-unknown-field", ("sweep", *GRID, "--vary", "alpah=0.5"), ["--vary 'alpah=0.5'", "no field 'alpah'"]),
    ("sweep-alpha-0", ("sweep", *GRID, "--vary", "alpha=0,0.5"), ["alpha=0"]),
    ("sweep-heads-0", ("sweep", *GRID, "--head", "hybrid_fusion", "--vary", "heads=0,4"), ["heads=0"]),
    ("sweep-no-values", ("sweep", *GRID, "--vary", "alpha"), ["give key=v1,v2"]),
    ("sweep-several-fixed", ("sweep", *GRID, "--vary", "alpha=0.5", "--set", "lambda_ce=1,2"), ["one value", "--vary"]),
    ("sweep-unknown-fixed", ("sweep", *GRID, "--vary", "alpha=0.5", "--set", "alpah=0.5"), ["--set 'alpah=0.5'"]),
    ("sweep-set-and-varied", ("sweep", *GRID, "--vary", "alpha=0.5,0.75", "--set", "alpha=0.6"),
     ["--vary 'alpha=0.5,0.75'", "also set for the whole grid"]),
    ("sweep-flag-and-varied", ("sweep", *GRID, "--vary", "alpha=0.5,0.75", "--alpha", "0.6"), ["also set for the whole grid"]),
    # search
    ("search-protocol-field", ("search", *GRID, "--space", "epochs=1:3"), ["--space epochs", "part of the protocol"]),
    # results
    ("results-nothing", ("results",), ["give run folders"]),
    ("results-missing-folder", ("results", "{tmp}/nope"), ["nope: no such file or folder"]),
    ("results-unfinished-run", ("results", "{unfinished}"), ["is not finished"]),
    ("results-corrupt-config", ("results", "{corrupt}"), ["config.json is corrupt"]),
    ("results-out-of-other-files", ("results", "{run}", "--out", "{tmp}"), ["holds other files"]),
    ("results-out-root", ("results", "{run}", "--out", "/"), ["root"]),
    # replay
    ("replay-missing-folder", ("replay", "{tmp}/nope"), ["nope: no such file or folder"]),
    # heads
    ("heads-no-such-option", ("heads", "--verbose"), ["No such option: --verbose"]),
]


def one_error_line(r, fragments) -> str:
    """The one `error: ...` (UserError) or `Error: ...` (click) line of a failed command, holding every fragment."""
    assert r.code != 0, r.out + r.err
    assert "Traceback" not in r.out + r.err and "Warning" not in r.err, r.err
    problem = [line for line in r.err.splitlines() if line.lower().startswith("error")]
    assert len(problem) == 1, r.err
    for fragment in fragments:
        assert fragment in problem[0], (fragment, problem[0])
    if r.code == 1:  # a UserError: that one line is all
        assert r.err.strip() == problem[0], r.err
    return problem[0]


@pytest.mark.parametrize("args, fragments", [pytest.param(a, f, id=i) for i, a, f in CASES])
def test_bad_input_is_one_line(args, fragments, places, run_main, monkeypatch):
    monkeypatch.chdir(places["tmp"])  # default folders (cache/, runs/) land in the test's folder
    r = run_main(*(a.format(**places) for a in args))
    problem = one_error_line(r, fragments)
    if "No such option" not in problem:  # there the option is the user's mistake, quoted
        given = {a for a in args if a.startswith("--")}
        for command, option in suggested_options(args[0], problem):
            assert option in given or option in options_of(command), (
                f"the message suggests `{command} {option}`, which `{command}` does not take: {problem}")


# --- numbers: every numeric option finite and in the range its meaning gives; lists without repeats ----------

FINITE = "give a finite number"
# (id, arguments, exit code: 2 click's parsing, 1 a UserError; fragments of the one error line, the option first)
NUMBERS = [
    *((f"train-{flag[2:]}-{v}", (*TRAIN, flag, v), 2, [f"'{flag}'", f"{v}: {FINITE}"])
      for flag in ("--lr", "--weight-decay", "--alpha", "--temperature", "--lambda-ce") for v in ("nan", "inf", "-inf")),
    ("ablate-lr-inf", ("ablate", *GRID, "--lr", "inf"), 2, ["'--lr'", FINITE]),
    ("sweep-weight-decay-nan", ("sweep", *GRID, "--vary", "alpha=0.5", "--weight-decay", "nan"), 2,
     ["'--weight-decay'", FINITE]),
    *((f"audit-threshold-{v}", ("audit", "-d", "{ds}", *SYNTH, "--image-threshold", v), 2, ["'--image-threshold'", why])
      for v, why in (("nan", FINITE), ("inf", FINITE), ("0", "must be > 0"), ("-1", "must be > 0"), ("1.5", "must be <= 1"))),
    ("audit-hash-distance-65", ("audit", "-d", "{ds}", *SYNTH, "--hash-distance", "65"), 2, ["'--hash-distance'"]),
    ("extract-seed-negative", ("extract", "-d", "mvsa_s", "--split-seed", "-1", "--cache-dir", "{tmp}/c9"), 2, ["'--split-seed'"]),
    ("extract-seed-2^32", ("extract", "-d", "mvsa_s", "--split-seed", str(2**32), "--cache-dir", "{tmp}/c9"), 2, ["'--split-seed'"]),
    ("extract-class-twice", ("extract", "--manifest", "{tmp}/blank_split.csv", "--classes", "positive,negative,positive",
                             "--cache-dir", "{tmp}/c10"), 2, ["'--classes'", "positive given twice"]),
    ("eval-noise-twice", ("eval", "{run}", "--noise", "0.5", "--noise", "0.50"), 2,
     ["'--noise'", "0.5 given twice"]),
    ("eval-drop-twice", ("eval", "{run}", "--drop", "text", "--drop", "text"), 2, ["'--drop'", "text given twice"]),
    ("sweep-value-twice", ("sweep", *GRID, "--vary", "alpha=0.5,0.50"), 1, ["--vary 'alpha=0.5,0.50'", "alpha=0.50 given twice"]),
    ("sweep-field-twice", ("sweep", *GRID, "--vary", "alpha=0.5", "--vary", "alpha=0.6"), 1,
     ["--vary 'alpha=0.6'", "alpha is varied twice"]),
    ("ablate-row-twice", ("ablate", *GRID, "--rows", "one-step,w/o CMF,one-step"), 1, ["--rows", "'one-step' given twice"]),
    ("train-set-key-twice", (*TRAIN, "--set", "alpha=0.5", "--set", "alpha=0.6"), 2,
     ["'--set'", "alpha set twice (alpha=0.5, alpha=0.6)"]),
    ("ablate-set-key-twice", ("ablate", *GRID, "--set", "cmf_scope=batch", "--set", "cmf-scope=sample"), 2,
     ["'--set'", "cmf_scope set twice"]),
    ("sweep-set-key-twice", ("sweep", *GRID, "--vary", "alpha=0.5", "--set", "lambda_ce=1", "--set", "lambda_ce=1"), 2,
     ["'--set'", "lambda_ce set twice"]),
    # ranges declared on the fields of train/config.py and checked by HeadConfig.validate
    ("train-lr-0", (*TRAIN, "--lr", "0"), 2, ["'--lr'", "must be > 0"]),
    ("train-weight-decay-negative", (*TRAIN, "--weight-decay", "-1"), 2, ["'--weight-decay'", "must be >= 0"]),
    ("train-seed-negative", (*TRAIN[:-4], "--seeds", "1,-1"), 2, ["'--seeds'", "seed -1: give seeds from 0 to 4294967295"]),
    ("train-seed-2^32", (*TRAIN[:-4], "--seeds", str(2**32)), 2, ["'--seeds'", f"seed {2**32}: give seeds from 0"]),
    *((f"train-set-{key}-{v}", (*TRAIN, *head, "--set", f"{key}={v}"), 1, [f"{key}={v}: {FINITE}"])
      for head, key, v in (((), "alpha", "inf"), ((), "lambda_ce", "nan"), ((), "temperature", "inf"), ((), "dropout", "nan"),
                           (("--head", "clip_ca_cg"), "clip_weight", "inf"), (("--head", "clip_ca_cg"), "temperature", "inf"),
                           (("--head", "hybrid_fusion"), "aux_weight", "nan"))),
    ("sweep-value-inf", ("sweep", *GRID, "--vary", "alpha=0.5,inf"), 1, [f"alpha=inf: {FINITE}"]),
    ("ablate-set-nan", ("ablate", *GRID, "--set", "temperature=nan"), 1, [f"temperature=nan: {FINITE}"]),
]


@pytest.mark.parametrize("args, code, fragments", [pytest.param(a, c, f, id=i) for i, a, c, f in NUMBERS])
def test_a_number_out_of_its_range_is_one_line_naming_the_option(args, code, fragments, places, run_main, monkeypatch):
    """nan, inf, a value outside the range the option's meaning gives, a value given twice: refused
    before any work (nothing trained: the grids' runs folder stays empty)."""
    monkeypatch.chdir(places["tmp"])
    r = run_main(*(a.format(**places) for a in args))
    one_error_line(r, fragments)
    assert r.code == code, r.err
    assert not list((places["tmp"] / "grid").glob("*/log.csv"))


GRID_OUT = {"ablate": ("ablate", *GRID, "--rows", "one-step"), "sweep": ("sweep", *GRID, "--vary", "alpha=0.5")}


@pytest.mark.parametrize("command", GRID_OUT)
def test_a_grid_out_of_other_files_is_refused_before_any_training(command, places, run_main, monkeypatch, tmp_path):
    """`ablate/sweep --out` as `results --out`: a folder of someone's files (even beside the grid's own
    table) is refused in one line before a cell trains, and its files are left as they were; the file
    system's root and the cells' own --runs-dir are refused too."""
    monkeypatch.chdir(places["tmp"])
    runs = tmp_path / "runs"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    files = {"notes.txt": b"mine", "table.csv": b"an old table", "sweep.png": b"an old plot"}
    for name, data in files.items():
        (theirs / name).write_bytes(data)
    for out, fragments in ((theirs, ["--out", "holds other files", "notes.txt", "give an empty or new folder"]),
                           ("/", ["root"]), (runs, ["holds the cells' --runs-dir"]), (tmp_path, ["holds other files"])):
        args = [a.format(**places) for a in GRID_OUT[command]]
        r = run_main(*args, "--runs-dir", runs, "--out", out)
        one_error_line(r, fragments)
        assert r.code == 1
        assert "grid:" not in r.out  # run_cells never started
        assert not list(runs.glob("*/log.csv")), "a cell trained before --out was refused"
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == files


def test_a_sweep_table_on_a_full_disk_is_one_line_and_leaves_no_half_file(places, run_main, monkeypatch, tmp_path):
    """The grids' tables and plot are written whole or not at all (core.paths.write_atomic)."""
    monkeypatch.chdir(places["tmp"])
    _full_for(monkeypatch, "sweep.png")
    out = tmp_path / "sw"
    r = run_main(*(a.format(**places) for a in GRID_OUT["sweep"]), "--runs-dir", tmp_path / "runs", "--out", out)
    _one_disk_line(r, out / "sweep.png")
    assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.md"]  # no half PNG, no temp file


COMMAND = re.compile(r"(?:pipeline\.py |`)(extract|train|eval|replay|audit|report|predict|ablate|sweep|results|heads)\b")


def suggested_options(invoked: str, message: str) -> list[tuple[str, str]]:
    """(command, --option) for every option a message names: of the command named just before it
    (`pipeline.py replay ...`, `extract --text-views`), else of the command that printed it."""
    out = []
    for m in re.finditer(r"(?<![\w-])--[a-z][a-z-]*", message):
        named = list(COMMAND.finditer(message[: m.start()]))
        near = [n for n in named if not re.search(r"[;.]\s", message[n.end(): m.start()])]  # the same clause
        out.append((near[-1].group(1) if near else invoked, m.group()))
    return out


def options_of(command: str) -> set[str]:
    """Every option `pipeline.py <command>` takes (train: with the heads' own flags)."""
    import typer

    import pipeline

    cmd = typer.main.get_command(pipeline.app).commands[command]
    ctx = cmd.make_context(command, [], resilient_parsing=True)
    return {o for p in cmd.get_params(ctx) for o in (*p.opts, *p.secondary_opts)}


def test_every_option_a_message_suggests_exists_there():
    """The messages that name an option of another command, checked the same way as the cases."""
    assert suggested_options("eval", "error: x: pick a finished seed with --seed 1") == [("eval", "--seed")]
    assert suggested_options("train", "run `python pipeline.py replay r --epochs 2`") == [("replay", "--epochs")]
    assert "--seed" in options_of("eval") and "--no-ha" in options_of("train")

    for command in ("eval", "predict"):
        assert "--seed" in options_of(command)


def test_every_command_is_covered():
    import typer

    import pipeline

    # the hidden cli-reference takes no input: nothing to get wrong
    commands = {name for name, cmd in typer.main.get_command(pipeline.app).commands.items() if not cmd.hidden}
    assert len(commands) >= 9 and commands <= {args[0] for _, args, _ in CASES}


# --- a disk that refuses a write: one line naming the file, exit 1, nothing half-written left ----------



def _full_for(monkeypatch, fragment: str) -> None:
    """Writes through core.paths.write_atomic to a file whose name holds `fragment` meet a full disk."""
    from core import paths

    real = open
    monkeypatch.setattr(paths, "open", lambda p, *a, **k: FullDisk(real(p, *a, **k)) if fragment in str(p)
                        else real(p, *a, **k), raising=False)


def _one_disk_line(r, path: Path) -> None:
    assert r.code == 1, r.out + r.err
    assert r.err.strip() == (f"error: no space left on the device: {path}: free some space there (or give another "
                             "--cache-dir or --out) and run the same command again; finished work is kept"), r.err


def test_train_on_a_full_disk_is_one_line(places, run_main, monkeypatch, tmp_path):
    _full_for(monkeypatch, "state.pt")
    out = tmp_path / "run"
    r = run_main(*(a.format(**places) for a in TRAIN), "--out", out)
    _one_disk_line(r, out / "seed-1.state.pt")
    assert not list(out.glob("*.tmp*")) and not list(out.glob("*.pt"))


def test_extract_on_a_full_disk_is_one_line_and_leaves_no_half_shard(data_root, cli, run_main, monkeypatch, tmp_path):
    _full_for(monkeypatch, ".h5.tmp")
    cache = tmp_path / "cache"
    r = run_main("extract", *cli.tiny_args, "--cache-dir", cache)
    first = sorted(cache.rglob("*.h5"))
    assert not first, first
    shard = next(Path(p) for p in re.findall(r"device: (\S+\.h5):", r.err))  # the shard it was writing
    _one_disk_line(r, shard)
    assert shard.parent.is_dir() and not list(cache.rglob("*.tmp*"))


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MB tmpfs (root only: skipped where it cannot be mounted)."""
    import subprocess

    where = tmp_path / "full"
    where.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_extract_onto_a_really_full_disk_is_one_line_and_no_crash(data_root, cli, full_disk):
    """HDF5 writing to a full disk was seen to segfault: the shard is built in memory, Python writes it."""
    cache = full_disk / "cache"
    r = cli.run("extract", *cli.tiny_args, "--cache-dir", cache)
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert r.stderr.strip().startswith(f"error: no space left on the device: {cache}/"), r.stderr
    assert "\n" not in r.stderr.strip(), r.stderr
    assert not list(cache.rglob("*.tmp*"))
    for shard in cache.rglob("*.h5"):  # every shard left is whole
        with h5py.File(shard, "r") as f:
            assert len(f["ids"]) > 0
