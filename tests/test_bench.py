"""bench/common.py and the benchmark scripts' outputs: every script checks its `--out` before it
measures anything (a folder, the root, or someone's folder is one line and exit code 1), writes
its JSON and markdown whole (a full disk leaves the previous result as it was), and may write
into bench/results/, the benchmarks' own folder. The scripts run in this process (`main` with
sys.argv patched); those that are cheap on tiny inputs (patience, audit) run to the end."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from bench import common
from core import paths

from conftest import FullDisk, quiet_console

SCRIPTS = {"ablate": (), "audit": (), "contention": (), "extract": (), "patience": ("some-run",), "scale": (),
           "train": ()}


def run_script(name: str, *args, monkeypatch, capsys) -> tuple[int, str, str]:
    """`python bench/<name>.py args...`: (exit code, stdout, stderr)."""
    script = importlib.import_module(f"bench.{name}")
    monkeypatch.setattr(sys, "argv", [f"bench/{name}.py", *(str(a) for a in args)])
    code = 0
    try:
        script.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def other_files(tmp_path: Path) -> Path:
    folder = tmp_path / "someones"
    folder.mkdir()
    (folder / "thesis.tex").write_text("mine")
    return folder


BAD_OUT = {  # --out -> what the one line says
    "root": (lambda tmp: Path("/bench-test.json"), "the file system's root"),
    "someone's-folder": (lambda tmp: other_files(tmp) / "x.json", "holds other files (thesis.tex)"),
    "a-folder": (lambda tmp: tmp, "give the .json file to write"),
    "not-json": (lambda tmp: tmp / "new" / "x.md", "give the .json file to write"),
}


@pytest.mark.parametrize("bad", sorted(BAD_OUT))
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_refused_out_is_one_line_before_anything_is_measured(name, bad, tmp_path, monkeypatch, capsys):
    out, says = BAD_OUT[bad]
    out = out(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, shown, err = run_script(name, *SCRIPTS[name], "--out", out, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1, shown + err
    assert err.count("\n") == 1 and err.startswith(f"error: --out {out}") and says in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, nothing measured
    assert not Path("/bench-test.json").exists() and not Path("/bench-test.md").exists()


def test_bench_results_is_the_benchmarks_own_folder():
    """It holds every benchmark's files: each may write its own there."""
    assert len(list(common.RESULTS.iterdir())) > 2
    assert common.out_file(common.RESULTS / "patience.json") == common.RESULTS / "patience.json"


@pytest.fixture(scope="module")
def finished_run(synth_cache, tmp_path_factory) -> Path:
    from train import runs
    from train.config import TrainConfig

    c = synth_cache
    cfg = TrainConfig(dataset=c.dataset, cache_dir=c.cache_dir, text_encoder=c.text_encoder, image_encoder=c.image_encoder,
                      epochs=4, seeds=(1,), batch_size=12, eval_orders=1, patience=0,
                      out=tmp_path_factory.mktemp("bench") / "run")
    return runs.train(cfg, quiet_console(), jobs=1)


def test_patience_writes_its_json_and_table_whole_and_again_into_its_own_folder(finished_run, tmp_path, monkeypatch,
                                                                               capsys):
    out = tmp_path / "new" / "p.json"
    for _ in range(2):  # the second time the folder holds the script's own files: written again
        code, shown, err = run_script("patience", finished_run, "--patience", "1,2", "--out", out,
                                      monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err
        assert sorted(p.name for p in out.parent.iterdir()) == ["p.json", "p.md"]  # no temp file left
    result = json.loads(out.read_text())
    assert list(result["per_patience"]) == ["1", "2"] and result["seeds"] == 1
    assert result["per_patience"]["1"]["epochs_total"] == 4
    assert out.with_suffix(".md").read_text() == shown and shown.startswith("| patience |")


def test_audit_bench_on_tiny_features_writes_its_json(tmp_path, monkeypatch, capsys):
    out = tmp_path / "a" / "audit.json"
    code, shown, err = run_script("audit", "--n", 300, "--dim", 8, "--block", 64, "--cache-dir", tmp_path / "no-cache",
                                  "--out", out, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert [p.name for p in out.parent.iterdir()] == ["audit.json"]  # no table: the JSON is all it writes
    result = json.loads(out.read_text())
    assert result["synthetic"]["items"] == 300 and result["synthetic"]["pairs"] >= 100  # the planted copies
    assert "mvsa_s" not in result and json.loads(shown) == result


def test_a_full_disk_leaves_the_previous_result_whole_and_is_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r" / "x.json"
    common.save(out, {"seconds": 1}, "| old |\n")
    real = open
    monkeypatch.setattr(paths, "open", lambda p, *a, **k: FullDisk(real(p, *a, **k)), raising=False)
    with pytest.raises(SystemExit) as end:
        common.cli(lambda: common.save(out, {"seconds": 2}, "| new |\n"))()
    assert end.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: no space left on the device: {out}"), err
    assert json.loads(out.read_text()) == {"seconds": 1} and out.with_suffix(".md").read_text() == "| old |\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.json", "x.md"]


def test_synth_cache_keeps_a_finished_cache_of_the_same_arguments_and_rewrites_another(tmp_path):
    """bench/scale.py writes its caches while the cores are busy and measures later: a finished
    cache written with the same arguments is reused untouched; other arguments write anew."""
    from bench import synth_cache
    small = synth_cache.SHAPES["default"]
    first = synth_cache.write(tmp_path, "s", 30, small, shard_size=16, log=None)
    shards = sorted(tmp_path.rglob("*.h5"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    again = synth_cache.write(tmp_path, "s", 30, small, shard_size=16, log=None)
    assert again["write_seconds"] is None and first["write_seconds"] is not None
    assert {k: v for k, v in again.items() if k != "write_seconds"} == \
        {k: v for k, v in first.items() if k != "write_seconds"}
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    other = synth_cache.write(tmp_path, "s", 30, small, shard_size=16, seed=3, log=None)
    assert other["write_seconds"] is not None
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.rglob("*.h5"))] != stamps
