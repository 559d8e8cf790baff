"""What every benchmark ends with: its figures as JSON, the same as a markdown table, and on screen.

Every benchmark writes through `save`, so its outputs are kept as `pipeline.py`'s are
(docs/architecture.md rule 9): each file is written whole or not at all (`core.paths.write_atomic`),
and `--out` is checked by `out_file` when the benchmark starts, not after an hour of measuring:
a folder, the file system's root, or a folder holding files the benchmark does not write is
refused. bench/results/ is the benchmarks' own folder, where each writes its `<name>.json` and
`.md`. `cli` makes a refusal (or a full disk) one line and exit code 1, as `pipeline.main` does.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

from core.errors import UserError, disk_problem  # noqa: E402
from core.paths import make_dir, output_dir, write_atomic  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def out_file(out: Path) -> Path:
    """`out`, a `.json` file a benchmark may write (its markdown goes beside it as `.md`), or a
    UserError: `out` is a folder, or it lies in a folder other than bench/results/ that holds
    files besides these two (someone's folder, or the root)."""
    out = Path(out)
    if out.suffix != ".json" or out.is_dir():
        raise UserError(f"--out {out}: give the .json file to write, e.g. {RESULTS.relative_to(ROOT) / 'name.json'} "
                        "(its .md table goes beside it)")
    if out.parent.resolve() == RESULTS.resolve():
        make_dir(out.parent)
    else:
        output_dir(out.parent, (out.name, out.with_suffix(".md").name), f"--out {out}: its folder")
    return out


def save(out: Path, result: dict, markdown: str | None = None) -> None:
    """`result` as JSON to `out` and `markdown` beside it (`.md`), each written whole or not at all;
    then the markdown (or, without one, the JSON) on screen."""
    out = out_file(out)
    text = json.dumps(result, indent=1)
    write_atomic(out, text)
    if markdown is not None:
        write_atomic(out.with_suffix(".md"), markdown)
    print((markdown if markdown is not None else text).rstrip("\n"))


def cli(main):
    """A benchmark's `main`: a UserError (a refused `--out`) or a disk that refused a write is one
    line on stderr and exit code 1, not a traceback."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            line = str(e)
        except OSError as e:
            line = disk_problem(e)
            if line is None:
                raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(1)

    return run
