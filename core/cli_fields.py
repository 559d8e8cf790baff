"""Command-line options read from config dataclass fields, as HF's HfArgumentParser does.

Why: a setting's name, type, default and help are declared once, on its dataclass field
(ARCHITECTURE.md rule 4), so `--help`, the config a command builds and `config.json` cannot
drift apart, and `pipeline.py` repeats no default. A field is an option when it is declared
with `option(...)` (it has a help); a field without one (an internal knob) is not.

Options are made when a command parses its arguments or prints its help, not at start-up
(`fields_command`): a config's module may import torch, and the other commands need not pay
for it. This module imports no stage, and typer only when options are made.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional

from core.errors import UserError

MISSING = dataclasses.MISSING


def option(default=MISSING, help: str = "", *, short: str | None = None, min: int | float | None = None,
           parse: Callable[[str], object] | None = None, choices: Iterable[str] = (), default_factory=MISSING):
    """A config field that is also the option `--field-name` of the commands built on its dataclass.

    `short`: a one-letter alias ("-d"). `min`: the least value the option takes. `parse`: text to
    value, for what a command line cannot spell as one typed value (seeds "1,2,3" -> (1, 2, 3));
    it raises ValueError or UserError on bad text. `choices`: the only values the option takes.
    A `default_factory` field's option defaults to None (the factory decides), so say the default
    in `help`."""
    meta = {"help": help}
    for key, value in (("short", short), ("min", min), ("parse", parse)):
        if value is not None:
            meta[key] = value
    if choices:
        meta["choices"] = tuple(choices)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def flag_name(field: str) -> str:
    """`text_views` -> `--text-views`."""
    return "--" + field.replace("_", "-")


def cli_default(f: dataclasses.Field):
    """The option's default: the field's (a tuple as it is typed: "1,2,3"), or None for a
    `default_factory` field (not given)."""
    if f.default is MISSING:
        return None
    return ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default


def _base(kind):
    """`int | None` -> int."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(kind) and len(args) == 1 else kind


def params(config: type, skip: Iterable[str] = ()) -> list:
    """One typer option per `option(...)` field of dataclass `config`, in field order, except `skip`."""
    import typer

    hints = typing.get_type_hints(config)
    specs = []
    for f in dataclasses.fields(config):
        meta = f.metadata
        if "help" not in meta or f.name in skip:
            continue
        kind, default = _base(hints[f.name]), cli_default(f)
        kw = {"help": meta["help"]}
        if "min" in meta:
            kw["min"] = meta["min"]
        if kind is bool:
            if default:
                raise ValueError(f"{config.__name__}.{f.name}: an on/off option must default to False")
            annotation = bool
        elif "parse" in meta:
            annotation, kw["parser"] = str, _parser(meta["parse"])
            if kind is Path:
                kw["metavar"] = "<path>"
        else:
            annotation = Literal[meta["choices"]] if "choices" in meta else kind
        if default is None:
            annotation = Optional[annotation]
        names = [flag_name(f.name), *([meta["short"]] if "short" in meta else [])]
        specs.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                       default=typer.Option(default, *names, **kw)))
    return _typer_params(specs)


def flag_params(flags) -> list:
    """Typer options for shorthand flags that set a field of another dataclass (a head's config, see
    `heads.flags()`): `.name`, `.flag`, `.kind` (bool: a switch), `.choices` and `.summary` of each.
    Not given, a switch is False and a value None."""
    import typer

    return _typer_params([
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                          annotation=bool if f.kind is bool else Optional[Literal[f.choices] if f.choices else f.kind],
                          default=typer.Option(False if f.kind is bool else None, f.flag, help=f.summary))
        for f in flags])


def _typer_params(specs: list[inspect.Parameter]) -> list:
    """The click parameters typer makes for a function with this signature (so generated options
    look, parse and convert exactly as the hand-written ones of `pipeline.py`)."""
    import typer

    def options(**_): ...

    options.__signature__ = inspect.Signature(specs)
    one = typer.Typer(add_completion=False, rich_markup_mode=None)
    one.command()(options)
    return typer.main.get_command(one).params


def _parser(parse: Callable[[str], object]) -> Callable[[object], object]:
    """`parse` as a typer parser: a bad value is click's one-line `Invalid value for '--x': ...`."""
    import typer

    def run(value: str):
        try:
            return parse(value)
        except (ValueError, UserError) as e:
            raise typer.BadParameter(str(e)) from None

    return run


def fields_command(first: Callable[[], list], last: Callable[[], list] = list) -> type:
    """A typer command class with options made on first use: `first()`'s before the function's own
    options, `last()`'s after them (e.g. `params(TrainConfig)`, then a head's flags). Their values
    reach the function as `ctx.meta["fields"]` (name -> value), not as arguments."""
    from typer.core import TyperCommand

    class FieldsCommand(TyperCommand):
        def _made(self) -> tuple[list, list]:
            if not hasattr(self, "_extra"):
                self._extra = (first(), last())
                names = [p.name for p in (*self._extra[0], *self.params, *self._extra[1])]
                twice = sorted({n for n in names if names.count(n) > 1})
                if twice:  # a coding bug: e.g. a head declares a flag the command has already
                    raise ValueError(f"`{self.name}` declares these options twice: {', '.join(twice)}")
            return self._extra

        def get_params(self, ctx):
            before, after = self._made()
            params = super().get_params(ctx)  # the function's own, then --help
            return [*before, *self.params, *after, *params[len(self.params):]]

        def invoke(self, ctx):
            before, after = self._made()
            ctx.meta["fields"] = {p.name: ctx.params.pop(p.name, None) for p in (*before, *after)}
            return super().invoke(ctx)

    return FieldsCommand


def build(config: type, values: dict, **extra):
    """`config(**values, **extra)` from a command's options: keys that are not fields of `config`
    (a head's flags) are left out, and a `default_factory` field not given (None) keeps its factory."""
    kw = {f.name: values[f.name] for f in dataclasses.fields(config)
          if f.name in values and not (values[f.name] is None and f.default is MISSING)}
    return config(**kw, **extra)
