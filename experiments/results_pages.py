"""The result tables inside markdown pages (README.md, docs/*.md): each is the output of `results`
between markers (`<!-- results: ARGS -->` ... `<!-- results:end -->`, ARGS naming repository-relative run
folders and `--columns` choosing the columns); `refresh_markdown` regenerates them, each under a one-line
caption that links to the one legend (docs/results.md), and a test fails when a page and `results/` disagree.

A page's numbers are thus never typed by hand: they are made from the committed run folders, as
experiments/results.py builds a table and experiments/results_view.py shows it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from core.errors import UserError
from experiments.results import build
from experiments.results_view import markdown, parse_columns

# a marker starts its line, so a page may quote one in running text
BLOCK = re.compile(r"^(<!-- results: (?P<args>.+?) -->\n)(?P<body>.*?)^(<!-- results:end -->)", re.S | re.M)
LEGEND = "docs/results.md#legend"  # repository-relative: the one page that says what every column means


def _block_table(args: str, root: Path, legend: str | None = None) -> str:
    """The table a block's arguments (`results/x --against probe --columns run,accuracy`) make, paths
    relative to `root` (the repository); with `legend`, a one-line caption linking there."""
    words = shlex.split(args)
    against = allow = paper = columns = None
    paths, baseline = [], []
    it = iter(words)
    for w in it:
        if w == "--against":
            against = next(it)
        elif w == "--paper":
            paper = next(it)
        elif w == "--baseline":
            baseline.append(str(root / next(it)))
        elif w == "--columns":
            columns = parse_columns(next(it))
        elif w == "--allow-mixed":
            allow = True
        elif w.startswith("-"):
            raise UserError(f"results block `{args}`: unknown option {w} (--against, --paper, --baseline, --columns, "
                            "--allow-mixed)")
        else:
            paths.append(str(root / w))
    return markdown(build(paths, against, bool(allow), baseline or None, paper), columns, legend)


def markdown_root(page: Path) -> Path:
    """Where a page's block paths start: the repository for a page inside it (README.md, docs/*.md name
    `results/...` alike), else the page's own folder."""
    from core.paths import REPO

    page = page.resolve()
    return REPO if page.is_relative_to(REPO) else page.parent


def refresh_markdown(page: Path, check: bool = False, root: Path | None = None) -> list[str]:
    """Regenerate every results block of the markdown file `page` from the run folders it names
    (repository-relative), each captioned in one line that links to the legend; with `check`, change
    nothing and return the arguments of the blocks that differ."""
    import os

    page = Path(page)
    if not page.is_file():
        raise UserError(f"{page}: no such markdown file")
    root = markdown_root(page) if root is None else root
    target = root / LEGEND.partition("#")[0]
    here = page.resolve() == target.resolve()
    legend = "#legend" if here else os.path.relpath(target, page.resolve().parent) + "#legend"
    text = page.read_text()
    stale: list[str] = []

    def redo(m: re.Match) -> str:
        body = _block_table(m.group("args"), root, legend)
        if body != m.group("body"):
            stale.append(m.group("args"))
        return m.group(1) + body + m.group(4)

    new = BLOCK.sub(redo, text)
    if not check and new != text:
        from core.paths import write_atomic

        write_atomic(page, new)
    return stale
