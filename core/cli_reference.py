"""docs/cli.md, the command-line reference, written from the commands themselves:
`python pipeline.py cli-reference > docs/cli.md` (a hidden command; tests/test_readme.py fails while
the page differs). The app is given, so this module imports no stage.

For each command of a typer app: its help, its usage, then one table row per argument and option
(names, type, default, help), in the order of `--help`. The hidden former names of renamed options
(core/cli_fields.py `was`, `renamed`) and hidden commands are left out; so is `--help`, which every
command takes. The page is formatted here, not captured from typer's help, so it depends on no
terminal width and on nothing of the machine, and reads whatever commands the app has when it runs.
"""

from __future__ import annotations

import re
from pathlib import Path

REGENERATE = "python pipeline.py cli-reference > docs/cli.md"
PROG = "python pipeline.py"


def reference(app) -> str:
    """The markdown page for typer app `app` (pipeline.app)."""
    import typer

    group = typer.main.get_command(app)
    root = typer.Context(group, info_name="pipeline.py")
    commands = [(name, cmd) for name, cmd in group.commands.items() if not cmd.hidden]
    out = ["# Command-line reference", "",
           f"Written from the commands themselves by `{REGENERATE}`; do not edit it by hand (a test fails when it "
           "differs). Every command also takes `--help`. Options a command still takes under a former name "
           "(with a deprecation line) are not listed.", "",
           _paragraphs(group.help or ""), "",
           "| command | what it does |", "| --- | --- |"]
    out += [f"| [`{name}`](#{name}) | {_cell(_first_paragraph(cmd.help or ''))} |" for name, cmd in commands]
    for name, cmd in commands:
        out += ["", *_command(name, cmd, typer.Context(cmd, info_name=name, parent=root))]
    return "\n".join(out) + "\n"


def _command(name: str, cmd, ctx) -> list[str]:
    """The section of one command: its help, its usage, its parameters."""
    params = [p for p in cmd.get_params(ctx) if not getattr(p, "hidden", False) and p.name != "help"]
    required = {p.renamed_to for p in cmd.get_params(ctx) if getattr(p, "renamed_required", False)}
    args = [p for p in params if p.param_type_name == "argument"]
    usage = " ".join([PROG, name, *(["[OPTIONS]"] if len(args) < len(params) else []),
                      *(_usage(p, p.required or p.name in required) for p in args)])
    out = [f"## {name}", "", _paragraphs(cmd.help or ""), "", f"`{usage}`", ""]
    if not params:
        return out + ["No options."]
    out += ["| argument or option | type | default | |", "| --- | --- | --- | --- |"]
    for p in params:
        names = f"`{_usage(p, True)}`" if p.param_type_name == "argument" else _names(p)
        default = "required" if p.required or p.name in required else _default(p)
        out.append(f"| {names} | {_cell(_type(p, ctx))} | {default} | {_cell(p.help or '')} |")
    return out


def _usage(arg, required: bool) -> str:
    """An argument as usage shows it: `RUN`, `[RUN]`, `RUNS...`."""
    name = (arg.metavar or arg.name).upper() + ("..." if arg.nargs != 1 else "")
    return name if required else f"[{name}]"


def _names(option) -> str:
    """`-d`, `--dataset`; an on/off pair as `--ha` / `--no-ha`."""
    opts = sorted(option.opts, key=lambda o: len(o) - len(o.lstrip("-")))  # -d before --dataset, as --help
    shown = ", ".join(f"`{o}`" for o in opts)
    return shown + "".join(f" / `{o}`" for o in option.secondary_opts)


def _type(p, ctx) -> str:
    """What the value is: int, float, path, text, a choice (`a|b`), FILE (a metavar), or flag (no value);
    its range; repeatable."""
    if getattr(p, "is_flag", False):
        return "flag"
    kind = (p.metavar if p.param_type_name == "option" and p.metavar else p.display_type(ctx)).strip("<>")
    kind = re.sub(r"^list\[(.*)\]$", r"\1", kind).removesuffix(" range")
    kind = {"str": "text", "Path": "path"}.get(kind, kind)
    bounds = _range(p.min, p.max)
    repeat = ", repeatable" if getattr(p, "multiple", False) else ""
    return f"`{kind}`" + (f" {bounds}" if bounds else "") + repeat


def _range(low, high) -> str:
    if low is not None and high is not None:
        return f"{low} to {high}"
    if low is not None:
        return f">= {low}"
    return f"<= {high}" if high is not None else ""


def _default(p) -> str:
    """The default --help shows: a value, or the side of an on/off pair that is on by default."""
    shown = getattr(p, "show_default", True)
    pair = getattr(p, "is_bool_flag", False) and p.secondary_opts
    if isinstance(shown, str):  # said for it (a head's flag: its own default)
        return f"`--{shown}`" if pair else _code(shown)
    if not shown or p.default is None or p.default == [] or p.default == ():
        return ""
    if pair:
        return f"`{(p.opts if p.default else p.secondary_opts)[0]}`"
    if getattr(p, "is_flag", False):
        return "off" if not p.default else "on"
    if isinstance(p.default, (list, tuple)):
        return _code(", ".join(map(str, p.default)))
    return _code(str(p.default) if not isinstance(p.default, Path) else p.default.as_posix())


def _code(text: str) -> str:
    return f"`{text}`" if " " not in text else _cell(text)


def _first_paragraph(text: str) -> str:
    return _paragraphs(text).split("\n")[0]


def _paragraphs(text: str) -> str:
    """A help text's paragraphs, each on one line (markdown reflows them), blank lines between."""
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip())]
    return "\n\n".join(_escape(p) for p in paras if p)


def _cell(text: str) -> str:
    """`text` fit for a table cell: on one line, `|` escaped."""
    return _escape(" ".join(text.split())).replace("|", "\\|")


def _escape(text: str) -> str:
    """`<` and `*` outside code spans as text, not HTML or emphasis (`<runs-dir>/<dataset>`, `alpha * c_mask`)."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(part if part.startswith("`") else part.replace("<", "&lt;").replace("*", "\\*") for part in parts)
