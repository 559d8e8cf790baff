"""The numerics version: which arithmetic a run's numbers come from.

An integer, bumped when an existing golden value of `tests/test_numerics.py` changes (a test
holds it to the goldens). Every run records it in config.json; `results`, resume and the grids
accept runs of the current version and refuse the others, naming what remakes them. A refactor
that keeps every golden keeps the version, and so keeps the evidence, with no retraining.
"""

from __future__ import annotations

import re
from pathlib import Path

NUMERICS_VERSION = 1

# a `--out PATH` of a results/*.sh script, its shell variables ($name, ${ds}) standing for any one folder name
_OUT = re.compile(r"--out[ =]+[\"']?([^\s\"']+)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")


def made_by(saved: dict) -> str | None:
    """None when a run's config.json `saved` records the current numerics version; else what made the
    run ("made by numerics version 0", "made before numerics versions": no version recorded)."""
    version = saved.get("numerics_version")
    if version == NUMERICS_VERSION:
        return None
    return "made before numerics versions" if version is None else f"made by numerics version {version}"


def remaking_script(run: Path) -> Path | None:
    """The results/*.sh script that remakes the run in `run` when it lies in a results/<table>/<row> folder
    (a script whose `--out` is that folder, or its table's folder to which the script adds the row), else None."""
    run = Path(run).resolve()
    table, shelf = run.parent, run.parent.parent
    if shelf.name != "results":
        return None
    wanted = [f"results/{table.name}/{run.name}", f"results/{table.name}"]
    for script in sorted(shelf.glob("*.sh")):
        for out in _OUT.findall(script.read_text()):
            pattern = r"[^/\s]+".join(map(re.escape, _VARIABLE.split(out)))
            if any(re.fullmatch(pattern, name) for name in wanted):
                return script
    return None


def refusal(run: Path, saved: dict) -> str | None:
    """None when the run in `run` (its config.json `saved`) is of the current numerics version; else the
    one line that refuses it, with what remakes it (the results/*.sh script of a committed run)."""
    made = made_by(saved)
    if made is None:
        return None
    script = remaking_script(run)
    remake = (f"delete it and run `bash results/{script.name}`, which trains the runs that are missing" if script
              else "delete it and train it again with the command that made it")
    return (f"{run} was {made}, the current code is version {NUMERICS_VERSION}: its numbers are not this code's; "
            f"{remake}")
