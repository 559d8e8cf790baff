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
import math
import typing
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping, Optional

from core.errors import UserError

MISSING = dataclasses.MISSING


def option(default=MISSING, help: str = "", *, short: str | None = None, min: int | float | None = None,
           max: int | float | None = None, min_open: bool = False, finite: bool = True,
           parse: Callable[[str], object] | None = None, choices: Iterable[str] = (), default_factory=MISSING):
    """A config field that is also the option `--field-name` of the commands built on its dataclass.

    `short`: a one-letter alias ("-d"). `min`, `max`: the least and the greatest value the option
    takes; `min_open`: `min` itself is not taken (a learning rate > 0). A float must be finite
    unless `finite=False` (nan and inf mean nothing as a rate, a weight or a threshold).
    `parse`: text to value, for what a command line cannot spell as one typed value (seeds "1,2,3"
    -> (1, 2, 3)); it raises ValueError or UserError on bad text. `choices`: the only values the
    option takes. A `default_factory` field's option defaults to None (the factory decides), so
    say the default in `help`."""
    meta = {"help": help}
    for key, value in (("short", short), ("min", min), ("max", max), ("parse", parse)):
        if value is not None:
            meta[key] = value
    if min_open:
        meta["min_open"] = True
    if not finite:
        meta["finite"] = False
    if choices:
        meta["choices"] = tuple(choices)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def out_of_range(value, meta: Mapping) -> str | None:
    """Why `value` cannot be the value of a field with these metadata (`option`'s `min`, `max`,
    `min_open`, `finite`), or None. Only numbers are judged (None, a bool, a text: None)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and meta.get("finite", True) and not math.isfinite(value):
        return "give a finite number"
    low, high = meta.get("min"), meta.get("max")
    if low is not None and (value <= low if meta.get("min_open") else value < low):
        return f"must be {'>' if meta.get('min_open') else '>='} {low}"
    if high is not None and value > high:
        return f"must be <= {high}"
    return None


def check_fields(config, as_options: bool = True) -> None:
    """UserError for the first field of dataclass instance `config` whose value is `out_of_range`,
    named as its option (`--weight-decay -1.0: must be >= 0`) or, for a field that is none (an
    internal knob) or `as_options=False`, as a config key (`alpha=inf: give a finite number`, as
    `--set` spells it). For a config made in code or read from JSON, and for values no option
    parsed (`--set`); the options made by `params` refuse such values as they are parsed."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        why = out_of_range(value, f.metadata)
        if why:
            named = as_options and "help" in f.metadata
            raise UserError(f"{flag_name(f.name)} {value}: {why}" if named else f"{f.name}={value}: {why}")


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
        if kind in (int, float) and "parse" not in meta:
            kw["callback"] = _in_range(meta)
            if kind is int:  # typer's range, shown in --help too (a float's would judge nan before `finite`)
                kw.update({k: meta[k] for k in ("min", "max") if k in meta and not (k == "min" and meta.get("min_open"))})
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
                          default=typer.Option(False if f.kind is bool else None, f.flag, help=f.summary,
                                               **({"callback": _in_range({})} if f.kind is float else {})))
        for f in flags])


def _in_range(meta: Mapping) -> Callable[[object], object]:
    """A typer callback refusing what `out_of_range` refuses: click's one line `Invalid value for '--lr': ...`."""
    import typer

    def check(value):
        why = out_of_range(value, meta)
        if why:
            raise typer.BadParameter(f"{value}: {why}")
        return value

    return check


def each_once(values: list) -> list:
    """A typer callback for a repeatable option whose values must differ (`eval --noise 0.5 --noise 0.5`
    would score one condition twice under one name): a value given twice is click's one line."""
    import typer

    twice = [v for k, v in enumerate(values) if v in values[:k]]
    if twice:
        raise typer.BadParameter(f"{twice[0]} given twice; give each value once")
    return values


def keys_once(values: list[str]) -> list[str]:
    """A typer callback for `--set key=value` (repeatable): a key set twice (`--set alpha=0.5 --set alpha=0.6`)
    would silently keep its last value, so it is click's one line naming the key. Keys are read as the
    heads' `parse_sets` reads them (`cmf-scope` is `cmf_scope`); a malformed item is left to it."""
    import typer

    keys = [v.partition("=")[0].strip().replace("-", "_") for v in values]
    twice = [k for i, k in enumerate(keys) if k in keys[:i]]
    if twice:
        given = ", ".join(v for v, k in zip(values, keys) if k == twice[0])
        raise typer.BadParameter(f"{twice[0]} set twice ({given}); set each key once "
                                 "(`sweep --vary key=v1,v2` tries several values)")
    return values


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
