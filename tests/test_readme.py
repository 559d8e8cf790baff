"""The documentation: README.md, docs/*.md and the scripts in results/. Every `pipeline.py` command
and flag they show exists (each flag in that command's `--help`), every `bench/*.py` flag in its
script, every relative link and anchor resolves, the split checksums on docs/data.md are the files',
docs/cli.md is what core/cli_reference.py writes from the commands now,
no paragraph is said twice, the README stays a front door, and CITATION.cff is valid CFF 1.2.0."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import DATA, REPO

PAGES = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
SCRIPTS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "results").glob("*.sh"))
# pages other branches write; the README links to them before they are merged
PENDING = {"docs/search.md", "docs/tracking.md", "docs/api.md"}

FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
# `pipeline.py CMD args` up to the end of a shell command (`;`, `|`, `>`, `&`, a quote that closes it)
PIPELINE = re.compile(r"(?<![\w/])pipeline\.py\s+([a-z][a-z_-]*)([^;|>&'`\n]*)")
BENCH = re.compile(r"(?<![\w/])(bench/[\w-]+\.py)([^;|>&'`\n]*)")
MARKER = re.compile(r"^<!-- results: (.+?) -->$", re.M)


def _text(page: str) -> str:
    return (REPO / page).read_text()


def _code(text: str) -> list[str]:
    """The shell of a markdown page: each line of its ```bash blocks (continuations joined, comments
    dropped) and each inline code span."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.lstrip().startswith("#"):
                out.append(re.sub(r"\s#\s.*$", "", line))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    out += re.findall(r"`([^`\n]+)`", prose)
    return out


def _script_lines(script: str) -> list[str]:
    return _text(script).replace("\\\n", " ").splitlines()


def commands(where: str) -> list[tuple[str, list[str]]]:
    """(command, its flags) of every `pipeline.py` command a page or script shows, results markers included."""
    text = _text(where)
    lines = _script_lines(where) if where.endswith(".sh") else _code(text)
    found = [(m.group(1), FLAG.findall(m.group(2))) for line in lines for m in PIPELINE.finditer(line)]
    found += [("results", FLAG.findall(args)) for args in MARKER.findall(text)]
    return found


def bench_commands(where: str) -> list[tuple[str, list[str]]]:
    lines = _script_lines(where) if where.endswith(".sh") else _code(_text(where))
    return [(m.group(1), FLAG.findall(m.group(2))) for line in lines for m in BENCH.finditer(line)]


@pytest.fixture(scope="module")
def helps():
    """`pipeline.py --help` and each command's `--help`, run in this process (typer's own output);
    a hidden command (cli-reference) by its own `--help` alone."""
    import typer
    from typer.testing import CliRunner

    import pipeline

    runner = CliRunner()
    top = runner.invoke(pipeline.app, ["--help"], env={"COLUMNS": "200"}).output
    names = re.findall(r"^\s{2}([a-z_]+)\s", top.split("Commands:")[1], flags=re.M)
    names += [name for name, cmd in typer.main.get_command(pipeline.app).commands.items() if cmd.hidden]
    return {name: set(FLAG.findall(runner.invoke(pipeline.app, [name, "--help"], env={"COLUMNS": "200"}).output))
            | former_names(name) for name in names}


def former_names(command: str) -> set[str]:
    """The flags `command` still takes under a former name (hidden from --help, with a deprecation
    line; tests/test_cli_options.py RENAMED): a page that still uses one is not wrong, only behind."""
    import typer

    import pipeline

    cmd = typer.main.get_command(pipeline.app).commands[command]
    with typer.Context(cmd) as ctx:
        return {o for p in cmd.get_params(ctx) if hasattr(p, "renamed_to") for o in p.opts}


def test_the_cli_reference_is_what_the_commands_say_now():
    """docs/cli.md is written by core/cli_reference.py from the commands: a changed command, option or
    help means regenerating it."""
    import pipeline
    from core.cli_reference import REGENERATE, reference

    page = REPO / "docs" / "cli.md"
    now, fresh = (page.read_text() if page.is_file() else "").splitlines(), reference(pipeline.app).splitlines()
    if now != fresh:
        k = next((k for k, (a, b) in enumerate(zip(now, fresh)) if a != b), min(len(now), len(fresh)))
        pytest.fail(f"docs/cli.md differs from the commands (line {k + 1}: {now[k] if k < len(now) else '(none)'!r}, "
                    f"now {fresh[k] if k < len(fresh) else '(none)'!r}); `{REGENERATE}` rewrites it")


def test_the_cli_reference_lists_no_former_name(helps):
    """Each command's section of docs/cli.md shows its options by their names now, never a hidden former one."""
    sections = dict(re.findall(r"^## ([a-z_]+)\n(.*?)(?=^## |\Z)", _text("docs/cli.md"), flags=re.M | re.S))
    assert set(sections) == set(helps) - {"cli-reference"}
    for command, text in sections.items():
        rows = {f for line in text.splitlines() if line.startswith("| `-") for f in FLAG.findall(line.split(" | ")[0])}
        assert rows <= helps[command] - former_names(command), f"docs/cli.md, {command}: {sorted(rows - (helps[command] - former_names(command)))}"


def test_every_command_is_documented(helps):
    shown = {c for page in PAGES for c, _ in commands(page)}
    assert set(helps) <= shown, f"not shown on any page: {sorted(set(helps) - shown)}"


@pytest.mark.parametrize("where", PAGES + SCRIPTS)
def test_every_command_and_flag_shown_exists(where, helps):
    for command, flags in commands(where):
        assert command in helps, f"{where}: `pipeline.py {command}` is no command ({', '.join(helps)})"
        missing = set(flags) - helps[command]
        assert not missing, f"{where}: `pipeline.py {command}` shown with {sorted(missing)}, not in `{command} --help`"


@pytest.mark.parametrize("where", PAGES + SCRIPTS)
def test_every_benchmark_and_its_flags_exist(where):
    for script, flags in bench_commands(where):
        path = REPO / script
        assert path.is_file(), f"{where}: {script} does not exist"
        source = path.read_text() + (REPO / "bench" / "common.py").read_text()
        for flag in flags:  # argparse names the flag, typer the parameter
            assert f'"{flag}"' in source or f"{flag[2:].replace('-', '_')}:" in source, f"{where}: {script} has no {flag}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_train_line_of_a_results_script_uses_train_options(script, helps):
    """The lines a script feeds to results/queue.sh (and its variables) are `train` flags."""
    for line in _script_lines(script):
        if line.lstrip().startswith(("#", "pip", "grep", "set ")) or "pipeline.py" in line:
            continue
        missing = {f for f in FLAG.findall(line.split(" #")[0]) if f.startswith("--")} - helps["train"]
        assert not missing, f"{script}: {sorted(missing)} in `{line.strip()}` are not `train` options"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(re.sub(r"[`*]", "", h)) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_anchor_resolves(page):
    text = re.sub(r"```.*?```", "", _text(page), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (REPO / page).parent / path if path else REPO / page
        rel = file.resolve().relative_to(REPO.resolve()).as_posix() if file.resolve().is_relative_to(REPO.resolve()) else None
        if rel in PENDING and not file.exists():
            continue
        assert file.exists(), f"{page}: link to {target}: no such file"
        if anchor:
            assert anchor in _anchors(file), f"{page}: link to {target}: no heading with that anchor in {path or page}"


def test_the_readme_is_a_front_door():
    """At most 150 lines; a short paragraph, then the two commands, each under a one-line comment."""
    text = _text("README.md")
    assert len(text.splitlines()) <= 150
    head, _, rest = text.partition("```bash\n")
    prose = [line for line in head.splitlines()[1:] if line.strip()]
    assert len(prose) <= 5, "more than a short paragraph above the first code block"
    block = rest.split("```")[0].splitlines()
    assert len(block) == 4 and all(block[k].startswith("# ") for k in (0, 2))
    assert "pip install -r requirements.txt" in block[1] and "pipeline.py extract --dataset mvsa_s" in block[1]
    assert "pipeline.py train --dataset mvsa_s" in block[1] and block[3] == "python -m pytest -q"
    for needed in ("LICENSE", "CITATION.cff", "--data-root", "SPP_DATA_ROOT", "../shared/data", "docs/results.md"):
        assert needed in text, needed


def test_no_paragraph_is_said_twice():
    """Each topic once: no paragraph (or code block) of 200 characters or more appears twice in the README and docs/.
    A generated table and its caption are written by `results`, not said: two tables of one shape share a caption."""
    from experiments.results_pages import BLOCK

    paragraphs = Counter()
    for page in PAGES:
        for para in re.split(r"\n\s*\n", BLOCK.sub("", _text(page))):
            norm = " ".join(para.split())
            if len(norm) >= 200:
                paragraphs[norm] += 1
    twice = [p[:80] for p, n in paragraphs.items() if n > 1]
    assert not twice, f"said more than once: {twice}"


def _checksums() -> list[tuple[str, str]]:
    return re.findall(r"^([0-9a-f]{64})  (\S+)$", _text("docs/data.md"), flags=re.M)


def test_the_split_checksums_on_the_data_page_are_the_files():
    sums = _checksums()
    shipped = [(h, name) for h, name in sums if name.endswith(".jsonl")]
    clean = [(h, name) for h, name in sums if not name.endswith(".jsonl")]
    assert {name for _, name in clean} == {p.relative_to(REPO / "splits").as_posix() for p in (REPO / "splits").rglob("*")
                                           if p.is_file()}
    assert len(shipped) == 9
    for h, name in clean:
        assert hashlib.sha256((REPO / "splits" / name).read_bytes()).hexdigest() == h, name
    for h, name in shipped:
        if (DATA / name).is_file():
            assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == h, name


# --- CITATION.cff ------------------------------------------------------------------------------

CFF_KEYS = {"abstract", "authors", "cff-version", "commit", "contact", "date-released", "doi", "identifiers",
            "keywords", "license", "license-url", "message", "preferred-citation", "references", "repository",
            "repository-artifact", "repository-code", "title", "type", "url", "version"}
REFERENCE_KEYS = {"type", "title", "authors", "year", "month", "conference", "journal", "volume", "issue", "start",
                  "end", "pages", "publisher", "doi", "url", "repository-code", "collection-title", "notes", "abstract"}
REFERENCE_TYPES = {"article", "book", "conference", "conference-paper", "data", "generic", "manual", "proceedings",
                   "report", "software", "software-code", "thesis", "unpublished", "website"}


def _is_str(v) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _check_authors(authors, where: str) -> None:
    assert isinstance(authors, list) and authors, f"{where}: authors must be a non-empty list"
    for a in authors:
        assert isinstance(a, dict), f"{where}: an author is a mapping"
        person = {"family-names", "given-names"} & set(a)
        assert person or "name" in a, f"{where}: {a}: a person (family-names/given-names) or an entity (name)"
        assert all(_is_str(a[k]) for k in person | ({"name"} & set(a))), f"{where}: {a}: names are strings"


def _check_reference(ref: dict, where: str) -> None:
    assert isinstance(ref, dict), f"{where}: a mapping"
    assert set(ref) <= REFERENCE_KEYS, f"{where}: unknown keys {set(ref) - REFERENCE_KEYS}"
    assert ref.get("type") in REFERENCE_TYPES, f"{where}: type {ref.get('type')!r}"
    assert _is_str(ref.get("title")), f"{where}: a title"
    _check_authors(ref.get("authors"), where)
    if "year" in ref:
        assert isinstance(ref["year"], int) and 1900 < ref["year"] < 2100
    for key in ("repository-code", "url"):
        if key in ref:
            assert _is_str(ref[key]) and ref[key].startswith("https://"), f"{where}: {key} is a URL"
    if "doi" in ref:
        assert re.fullmatch(r"10\.\d{4,9}/\S+", ref["doi"]), f"{where}: doi"
    for key in ("conference", "journal"):
        if key in ref:
            value = ref[key]
            assert _is_str(value) or (isinstance(value, dict) and _is_str(value.get("name"))), f"{where}: {key}"


def test_citation_cff_is_valid_cff_1_2_0():
    import yaml

    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert isinstance(cff, dict) and set(cff) <= CFF_KEYS, f"unknown keys {set(cff) - CFF_KEYS}"
    assert cff["cff-version"] == "1.2.0"  # quoted or not, YAML reads it as a string
    assert _is_str(cff["message"]) and _is_str(cff["title"])
    _check_authors(cff["authors"], "authors")
    assert cff.get("type", "software") in {"software", "dataset"}
    assert cff.get("license") == "MIT"  # an SPDX id, the one LICENSE holds
    assert "MIT License" in (REPO / "LICENSE").read_text()
    assert all(_is_str(k) for k in cff.get("keywords", []))
    refs = cff.get("references", []) + ([cff["preferred-citation"]] if "preferred-citation" in cff else [])
    for k, ref in enumerate(refs):
        _check_reference(ref, f"reference {k + 1}")
    assert any(r["title"].startswith("SPP-SCL:") for r in refs), "the SPP-SCL paper is among the references"


def test_flags_show_no_value_and_every_option_its_help(run_main):
    """An on/off flag shows no `<bool>` as if it took a value; a help in brackets is not eaten as markup."""
    train = run_main("train", "--help").out
    assert "<bool>" not in train and "--one-step " in train
    assert "default: 64 mvsa_s" in train  # --batch-size has its help
    for command in ("eval", "report"):
        assert "the one the run used" in run_main(command, "--help").out
