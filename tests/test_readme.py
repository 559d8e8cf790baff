"""README.md: every `python pipeline.py ...` line of its bash blocks uses only flags that the
command's `--help` lists, so a documented flag can never go missing again."""

from __future__ import annotations

import re
import shlex

import pytest

from conftest import REPO


def readme_commands() -> list[list[str]]:
    """The argument lists of each `python pipeline.py` command in the README's ```bash blocks
    (a line may chain several with `&&`); comments dropped."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:2] == ["python", "pipeline.py"] and len(words) > 2:
                    commands.append(words[2:])
    return commands


COMMANDS = readme_commands()


def former_names(command: str) -> set[str]:
    """The flags `command` still takes under a former name (hidden from --help, with a deprecation
    line; tests/test_cli_options.py RENAMED): a README that still uses one is not wrong, only behind."""
    import typer

    import pipeline

    cmd = typer.main.get_command(pipeline.app).commands[command]
    with typer.Context(cmd) as ctx:
        return {o for p in cmd.get_params(ctx) if hasattr(p, "renamed_to") for o in p.opts}


def test_the_readme_has_commands_of_every_stage():
    names = {c[0] for c in COMMANDS}
    assert {"extract", "train", "eval", "ablate", "sweep", "audit", "report", "predict", "heads"} <= names


@pytest.mark.parametrize("command", sorted({c[0] for c in COMMANDS}))
def test_every_documented_flag_exists(command, run_main):
    r = run_main(command, "--help")
    assert r.code == 0, r.err
    known = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", r.out)) | former_names(command)
    for words in (c for c in COMMANDS if c[0] == command):
        flags = {w.partition("=")[0] for w in words[1:] if w.startswith("-")}
        missing = flags - known
        assert not missing, f"README: `pipeline.py {' '.join(words)}` uses {missing}, not in `{command} --help`"


def test_flags_show_no_value_and_every_option_its_help(run_main):
    """An on/off flag shows no `<bool>` as if it took a value; a help in brackets is not eaten as markup."""
    train = run_main("train", "--help").out
    assert "<bool>" not in train and "--one-step " in train
    assert "default: 64 mvsa_s" in train  # --batch-size has its help
    for command in ("eval", "report"):
        assert "the one the run used" in run_main(command, "--help").out
