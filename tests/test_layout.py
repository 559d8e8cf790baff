"""The rooms (docs/architecture.md rule 7): shared pieces in core/ import no stage, and the
top-level packages import each other in one direction only (no cycle). Imports are read
with `ast`, so a lazy import inside a function counts as much as one at the top."""

import ast
from pathlib import Path

from conftest import REPO

ROOMS = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file())


def imported_rooms(path: Path) -> set[str]:
    """The top-level project packages a module imports (absolute imports; relative ones stay inside)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ROOMS)


def room_graph() -> dict[str, set[str]]:
    return {room: set().union(*(imported_rooms(p) for p in (REPO / room).rglob("*.py"))) - {room}
            for room in ROOMS}


def test_the_rooms_are_the_stages():
    assert {"core", "extract", "heads", "train", "experiments", "inspection", "inference"} <= set(ROOMS)


def test_core_imports_no_stage():
    bad = {str(p.relative_to(REPO)): imported_rooms(p) - {"core"} for p in (REPO / "core").rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_rooms_have_no_import_cycle():
    graph = room_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 finished

    def visit(room: str, path: list[str]) -> None:
        state[room] = 1
        for nxt in sorted(graph[room]):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [room, nxt])}"
            if nxt not in state:
                visit(nxt, path + [room])
        state[room] = 2

    for room in ROOMS:
        if room not in state:
            visit(room, [])


def test_the_cycle_check_can_fail(tmp_path):
    """The parser sees lazy imports: a function-level import of a stage is found."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from extract import datasets\n    import train.data\n")
    assert imported_rooms(p) == {"extract", "train"}
