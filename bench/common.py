"""What every benchmark ends with: its figures as JSON, the same as a markdown table, and on screen."""

from __future__ import annotations

import json
from pathlib import Path


def save(out: Path, result: dict, markdown: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
