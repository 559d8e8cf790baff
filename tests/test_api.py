"""api.py, the notebook's API: every python block of docs/api.md runs as written on the tiny cache
(so the documented examples cannot rot), and the API refuses bad input in one line, as the CLI does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import api
from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = REPO / "docs" / "api.md"
SETTINGS = "# settings"  # the first line of the block whose names the test sets itself


def python_blocks() -> list[tuple[int, str]]:
    """(line number of the code's first line, code) of each ```python block of docs/api.md."""
    text = DOC.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M)]


def test_the_settings_block_names_what_the_test_sets():
    settings = [code for _, code in python_blocks() if code.startswith(SETTINGS)]
    assert len(settings) == 1
    names = set(re.findall(r"^([A-Z_]+) = ", settings[0], re.M))
    assert names == {"CACHE_DIR", "DATASET", "RUNS"}


def test_the_examples_of_docs_api_md_run(tiny_cache, tmp_path, monkeypatch, capsys):
    """Each block in turn in one namespace, as notebook cells; a failure points at its line of docs/api.md."""
    monkeypatch.chdir(tmp_path)  # a default run folder (runs/...) would land here
    ns = {"CACHE_DIR": tiny_cache.cache_dir, "DATASET": tiny_cache.dataset, "RUNS": tmp_path / "runs"}
    for line, code in python_blocks():
        if not code.startswith(SETTINGS):
            exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), ns)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["probe", "probe-text", "spp_scl"]
    assert list(ns["table"]["run"]) == ["probe", "spp_scl", "probe-text"]
    assert "did you mean" in capsys.readouterr().out


def test_every_public_name_is_documented():
    doc = DOC.read_text()
    for name in api.__all__:
        assert getattr(api, name).__doc__, name
        assert name in doc, f"{name} is not in docs/api.md"


@pytest.mark.parametrize("call, message", [
    (lambda: api.train(epoch=2), "TrainConfig has no field epoch"),
    (lambda: api.train(seeds=(1, 1)), "seed 1 given twice"),
    (lambda: api.train(head="probe", head_options={"nope": 1}), "head 'probe' has no field nope"),
    (lambda: api.load_cache("mvsa_s", split="val"), "split 'val': give one of train, dev, test"),
])
def test_bad_input_is_one_line_before_any_work(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(api.UserError, match=re.escape(message)):
        call()
    assert not list(Path(tmp_path).iterdir())  # nothing written


def test_arrays_and_tensors_hold_the_same_values(tiny_cache):
    import numpy as np
    import torch

    arrays = api.load_cache(tiny_cache.dataset, tiny_cache.cache_dir)
    tensors = api.load_cache(tiny_cache.dataset, tiny_cache.cache_dir, as_tensors=True)
    assert set(arrays) == {"train", "dev", "test"}
    for name, a in arrays.items():
        t = tensors[name]
        assert a.ids == t.ids and isinstance(a.labels, np.ndarray) and isinstance(t.labels, torch.Tensor)
        for field in ("labels", "cls", "tokens", "offsets", "maps"):
            assert np.array_equal(getattr(a, field), getattr(t, field).numpy()), (name, field)
        assert a.maps.dtype == np.float16 and len(a.maps) == len(a) == len(a.offsets) - 1
