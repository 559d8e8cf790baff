"""JSON for files people read: nested, but a list or object of plain values on one line.

`json.dumps(indent=1)` puts every element on a line of its own, so a file holding a run's
test predictions or its log rows (replay.json) becomes thousands of one-number lines. Here
a container whose members are all plain values (numbers, strings, null, empty containers)
is written on one line, as `json.dumps` would; everything else is indented one space per level.
With `width`, so is any container whose one line, indented, fits in `width` characters.
Floats are written as `json.dumps` writes them (shortest repr), so they read back exactly.
"""

from __future__ import annotations

import json


def dumps(obj, level: int = 0, width: int = 0) -> str:
    """`obj` as JSON text; `json.loads` of it gives `obj` back."""
    members = (list(obj.items()) if isinstance(obj, dict) else
               list(enumerate(obj)) if isinstance(obj, (list, tuple)) else [])
    if not any(isinstance(v, (dict, list)) and v for _, v in members) or len(json.dumps(obj)) + level < width:
        return json.dumps(obj)
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(obj, dict):
        lines = [f"{inner}{json.dumps(str(k))}: {dumps(v, level + 1, width)}" for k, v in members]
        return "{\n" + ",\n".join(lines) + f"\n{pad}}}"
    return "[\n" + ",\n".join(f"{inner}{dumps(v, level + 1, width)}" for _, v in members) + f"\n{pad}]"
