"""Reuse is real: every registered head trains from the same cache with no extract/ module
imported and the cache files untouched, and a head defined outside heads/ (one file, one
registration) trains end to end, its own loss term logged and its own field set by `--set`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO

TOY = textwrap.dedent('''
    """A toy head: pooled text -> linear, plus a loss term of its own."""
    from dataclasses import dataclass

    import torch
    from torch import nn

    from heads import Head, HeadConfig, HeadOutput, register
    from core.cli_fields import option
    from heads.ragged import segment_mean


    @dataclass
    class ToyConfig(HeadConfig):
        shrink: float = option(0.0, "weight of an L2 penalty on the logits", flag="--shrink")
        bias: bool = option(True, "false: a linear layer without bias", flag="--bias")

        def reads(self):
            return ("text",)


    @register("toy", config=ToyConfig)
    class Toy(Head):
        def __init__(self, dims, cfg):
            super().__init__()
            self.cfg = cfg
            self.fc = nn.Linear(dims.text_width, dims.n_classes, bias=cfg.bias)

        def forward(self, batch):
            return HeadOutput(logits=self.fc(segment_mean(batch.tokens[:, -1], batch.lengths)))

        def objective(self, out, labels, weight=None):
            return {**super().objective(out, labels, weight), "shrink": self.cfg.shrink * out.logits.pow(2).mean()}
''')


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_python(code: str, *paths: Path) -> subprocess.CompletedProcess:
    env_path = ":".join(str(p) for p in (REPO, *paths))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": env_path, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_every_head_trains_from_the_same_cache_without_extract(synth_cache, tmp_path):
    before = digest(synth_cache.cache_dir)
    code = textwrap.dedent(f'''
        import json, sys
        from pathlib import Path
        import heads
        from train import runs
        from train.config import TrainConfig
        from rich.console import Console
        done = {{}}
        for name in heads.available():
            cfg = TrainConfig(dataset={synth_cache.dataset!r}, cache_dir=Path({str(synth_cache.cache_dir)!r}),
                              text_encoder={synth_cache.text_encoder!r}, image_encoder={synth_cache.image_encoder!r},
                              head=name, epochs=2, seeds=(1,), batch_size=12, out=Path({str(tmp_path)!r}) / name)
            run = runs.train(cfg, Console(quiet=True))
            done[name] = json.loads((run / "metrics.json").read_text())["test"]["accuracy"]["mean"]
        print(json.dumps({{"done": done, "extract": sorted(m for m in sys.modules if m.split(".")[0] == "extract")}}))
    ''')
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    import heads

    assert sorted(result["done"]) == heads.available()
    assert {"spp_scl", "clip_ca_cg", "hybrid_fusion", "probe"} <= set(result["done"])
    assert result["extract"] == []  # stage two never loads stage one's code (docs/architecture.md rule 1)
    assert digest(synth_cache.cache_dir) == before  # nor changes a byte of the cache


def test_a_head_in_its_own_file_trains_end_to_end_with_set(synth_cache, tmp_path):
    (tmp_path / "toy_head.py").write_text(TOY)
    out = tmp_path / "run"
    code = textwrap.dedent(f'''
        import sys
        import toy_head  # the one registration: importing the file
        import pipeline
        sys.argv = ["pipeline.py", "train", "--head", "toy", "--set", "shrink=0.5", "--dataset", {synth_cache.dataset!r},
                    "--cache-dir", {str(synth_cache.cache_dir)!r}, "--text-encoder", {synth_cache.text_encoder!r},
                    "--epochs", "2", "--seeds", "1", "--batch-size", "12", "--out", {str(out)!r}]
        pipeline.main()
    ''')
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["head"] == "toy" and saved["train"]["head_config"]["shrink"] == 0.5
    header = (out / "log.csv").read_text().splitlines()[0].split(",")
    assert "loss_shrink" in header and "loss_ce" in header
    assert json.loads((out / "metrics.json").read_text())["test"]["accuracy"]["mean"] >= 0.0

    bad = code.replace('"shrink=0.5"', '"shrunk=1"')
    proc = run_python(bad, tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "head 'toy' has no field 'shrunk'; valid keys: dim, dropout, shrink, bias" in proc.stderr


def test_a_field_with_a_flag_is_declared_once_and_known_everywhere(synth_cache, tmp_path):
    """The toy head's `option(..., flag=...)` is its fields' only declaration: `train --help`, `train
    --shrink`/`--no-bias`, `--set`, `pipeline.py heads` and config.json all know them, and a flag
    of another head is one UserError."""
    (tmp_path / "toy_head.py").write_text(TOY)
    common = ["--dataset", synth_cache.dataset, "--cache-dir", str(synth_cache.cache_dir), "--text-encoder",
              synth_cache.text_encoder, "--epochs", "1", "--seeds", "1", "--batch-size", "12"]
    code = textwrap.dedent(f'''
        import json
        from typer.testing import CliRunner
        import toy_head  # the one registration: importing the file
        import pipeline
        runner, out = CliRunner(), {{}}
        common = {common!r}
        def run(key, *args):
            r = runner.invoke(pipeline.app, list(args), env={{"COLUMNS": "200"}})
            out[key] = [r.exit_code, r.output, repr(r.exception)]
        run("help", "train", "--help")
        run("heads", "heads")
        run("flags", "train", "--head", "toy", "--shrink", "0.5", "--no-bias", "--out", {str(tmp_path / "flags")!r}, *common)
        run("set", "train", "--head", "toy", "--set", "shrink=0.25", "--out", {str(tmp_path / "set")!r}, *common)
        run("alien", "train", "--head", "spp_scl", "--shrink", "0.5", "--out", {str(tmp_path / "alien")!r}, *common)
        print(json.dumps(out))
    ''')
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    code, text, _ = out["help"]
    text = " ".join(text.split())  # click wraps help at its own width
    assert code == 0 and "--shrink" in text and "weight of an L2 penalty on the logits" in text
    assert "--bias / --no-bias --no-bias: a linear layer without bias (toy: bias)" in text
    assert "--alpha" in text and "step-two gate" in text  # SPP-SCL's flags come from its config the same way
    code, text, _ = out["heads"]
    assert code == 0 and "toy  (reads text)" in text
    lines = text.splitlines()
    row = next(i for i, line in enumerate(lines) if " shrink " in line)
    assert "weight of an L2 penalty" in lines[row] and "--shrink" in lines[row + 1]  # the flag under its field
    for key, shrink, bias in (("flags", 0.5, False), ("set", 0.25, True)):
        assert out[key][0] == 0, out[key]
        saved = json.loads((tmp_path / key / "config.json").read_text())["train"]["head_config"]
        assert (saved["shrink"], saved["bias"]) == (shrink, bias)
    code, _, exception = out["alien"]
    assert code == 1 and "UserError" in exception and "--shrink (a flag of toy)" in exception
    assert not (tmp_path / "alien").exists()
