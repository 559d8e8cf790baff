"""core/pretty_json.py: nested JSON with the leaves' containers on one line, read back exactly."""

from __future__ import annotations

import json

from core.pretty_json import dumps


def test_flat_containers_on_one_line_and_exact_round_trip():
    obj = {"rows": [{"epoch": 1, "loss": "0.9069"}, {"epoch": 2, "loss": "0.8038"}],
           "final": {"test": {"accuracy": 0.1 + 0.2, "per_class": [1 / 3, 2 / 3]}, "pred": [0, 2, 1], "none": None},
           "empty": {}}
    text = dumps(obj)
    assert json.loads(text) == obj
    assert json.loads(text)["final"]["test"]["accuracy"] == 0.30000000000000004  # floats as compared, to the bit
    lines = text.splitlines()
    assert '  {"epoch": 1, "loss": "0.9069"},' in lines  # one row, one line, under its list
    assert '  "pred": [0, 2, 1],' in lines
    assert '   "per_class": [0.3333333333333333, 0.6666666666666666]' in lines
    assert lines[0] == "{" and lines[-1] == "}" and len(lines) == 15


def test_plain_values_are_json_dumps():
    for value in (3, "x", None, [], {}, [1, 2], {"a": 1}, (1, 2)):
        assert dumps(value) == json.dumps(value)
