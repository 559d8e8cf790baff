"""Command-line options read from config dataclass fields, as HF's HfArgumentParser does.

Why: a setting's name, type, default and help are declared once, on its dataclass field
(docs/architecture.md rule 4), so `--help`, the config a command builds and `config.json` cannot
drift apart, and `pipeline.py` repeats no default. A field is an option when it is declared
with `option(...)` (it has a help); a field without one (an internal knob) is not. This is the one
helper that declares options: a head's config fields use it too, and those with a `flag` are options
of `train` (`flags`, `flag_params`, `flag_values`; `--set` reaches every field through `parse_sets`).

A flag name means one thing in every command (tests/test_cli_options.py holds the rule): a field whose
`--field-name` would mean something else elsewhere gets a `flag` of its own, and a renamed option keeps
its former name hidden (`was`, `renamed`), still taken with a one-line deprecation notice.

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


def option(default=MISSING, help: str = "", *, flag: str | None = None, was: Iterable[str] = (),
           short: str | None = None, min: int | float | None = None, max: int | float | None = None,
           min_open: bool = False, finite: bool = True, parse: Callable[[str], object] | None = None,
           choices: Iterable[str] = (), default_factory=MISSING):
    """A config field that is also an option of the commands built on its dataclass: `--field-name`,
    or `flag`, a name of its own where `--field-name` means something else in another command (one
    meaning per option name: ExtractConfig.batch_size is `--encoder-batch-size`, TrainConfig's is
    `--batch-size`). A field whose default is True or False is an on/off pair, `--x/--no-x` (`flag`
    may name both sides: "--two-step/--one-step"). On a head's config a field is an option of `train`
    only if it has a `flag` (`--set` reaches every field).

    `was`: the option's former names, still taken (hidden from --help) with a one-line deprecation
    notice on stderr. `short`: a one-letter alias ("-d"). `min`, `max`: the least and the greatest
    value the option takes; `min_open`: `min` itself is not taken (a learning rate > 0). A float must
    be finite unless `finite=False` (nan and inf mean nothing as a rate, a weight or a threshold).
    `parse`: text to value, for what a command line cannot spell as one typed value (seeds "1,2,3"
    -> (1, 2, 3)); it raises ValueError or UserError on bad text. `choices`: the only values the
    option takes. A `default_factory` field's option defaults to None (the factory decides), so
    say the default in `help`."""
    meta = {"help": help}
    for key, value in (("flag", flag), ("short", short), ("min", min), ("max", max), ("parse", parse)):
        if value is not None:
            meta[key] = value
    if was:
        meta["was"] = tuple(was)
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
            raise UserError(f"{flag_of(f)} {value}: {why}" if named else f"{f.name}={value}: {why}")


def flag_name(field: str) -> str:
    """`text_views` -> `--text-views`."""
    return "--" + field.replace("_", "-")


def flag_decl(f: dataclasses.Field) -> str:
    """How field `f` is spelt on a command line: its `flag` or `--field-name`; an on/off field (a True
    or False default) as its pair, `--x/--no-x` (`--two-step/--one-step` when its flag names both)."""
    name = f.metadata.get("flag") or flag_name(f.name)
    if isinstance(f.default, bool) and "/" not in name:
        name = f"{name}/--no-{name[2:]}"
    return name


def flag_of(f: dataclasses.Field) -> str:
    """The option that sets field `f` (of a pair, its `on` side), for messages: `--encoder-batch-size`."""
    return flag_decl(f).partition("/")[0]


def cli_default(f: dataclasses.Field):
    """The option's default: the field's (a tuple as it is typed: "1,2,3"), or None for a
    `default_factory` field (not given)."""
    if f.default is MISSING:
        return None
    return ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default


def base_type(kind):
    """`int | None` -> int."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(kind) and len(args) == 1 else kind


def params(config: type, skip: Iterable[str] = ()) -> list:
    """One typer option per `option(...)` field of dataclass `config`, in field order, except `skip`;
    then a hidden one per former name of a field (`option(was=...)`)."""
    hints = typing.get_type_hints(config)
    specs = []
    for f in dataclasses.fields(config):
        if "help" in f.metadata and f.name not in skip:
            spec = _spec(f, base_type(hints[f.name]))
            specs.append(spec)
            specs += [_renamed_spec(old, f.name, k, spec.annotation, like=spec)
                      for k, old in enumerate(f.metadata.get("was", ()))]
    return _typer_params(specs)


def _spec(f: dataclasses.Field, kind) -> inspect.Parameter:
    """The typer option of field `f` (of type `kind`, optional stripped) as a keyword parameter."""
    import typer

    meta, default = f.metadata, cli_default(f)
    kw = {"help": meta["help"]}
    if kind in (int, float) and "parse" not in meta:
        kw["callback"] = _in_range(meta)
        if kind is int:  # typer's range, shown in --help too (a float's would judge nan before `finite`)
            kw.update({k: meta[k] for k in ("min", "max") if k in meta and not (k == "min" and meta.get("min_open"))})
    if kind is bool:
        annotation = bool
    elif "parse" in meta:
        annotation, kw["parser"] = str, _parser(meta["parse"])
        if kind is Path:
            kw["metavar"] = "<path>"
    else:
        annotation = Literal[meta["choices"]] if "choices" in meta else kind
    if default is None:
        annotation = Optional[annotation]
    names = [flag_decl(f), *([meta["short"]] if "short" in meta else [])]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *names, **kw))


# --- former names: hidden, still taken, with a one-line notice ------------------------------------------

_WAS = "__was"  # a former name's parameter is named <the new one's>__was<k>


def _renamed_spec(old: str, new: str, k: int, annotation, like: inspect.Parameter | None = None) -> inspect.Parameter:
    """Hidden option `old`, the `k`th former name of parameter `new`: None unless given, parsed as
    option `like` is."""
    import typer

    info = getattr(like, "default", None)
    kw = {key: getattr(info, key) for key in ("callback", "parser", "metavar", "min", "max")
          if getattr(info, key, None) is not None}
    return inspect.Parameter(f"{new}{_WAS}{k}", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[annotation],
                             default=typer.Option(None, old, hidden=True, **kw))


def renamed(old: str, new: str, annotation, required: bool = False) -> list:
    """A hidden option `old` that stands for parameter `new` of a command's own (`--run` for the
    positional RUN of `eval`), for `fields_command(first=...)`. `required`: `new` must be given one
    way or the other (declare it with a None default, as the old name may give it instead)."""
    made = _typer_params([_renamed_spec(old, new, 0, annotation)])
    made[0].renamed_required = required
    return made


def given(ctx, name: str) -> bool:
    """Whether parameter `name` was given on the command line (not its default, nor from a file)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _take_renamed(ctx, params: list) -> None:
    """Former names given: their value goes to the parameter they stand for, with one line on stderr
    (both names given: click's one line). A required parameter given by neither is click's error."""
    import typer

    by_name = {p.name: p for p in params}
    for p in [p for p in params if hasattr(p, "renamed_to")]:
        value, target = ctx.params.pop(p.name, None), by_name[p.renamed_to]
        if ctx.resilient_parsing:  # shell completion: nothing is checked, nothing said
            continue
        new = target.opts[0] if target.param_type_name == "option" else target.metavar or target.name.upper()
        if given(ctx, p.name):
            if given(ctx, target.name):
                raise typer.BadParameter(f"{p.opts[0]} is the former name of {new}: give it once", ctx, p)
            now = new if target.param_type_name == "option" else f"the argument {new} (`{ctx.command_path} {new}`)"
            typer.echo(f"deprecated: {p.opts[0]} is now {now}; {p.opts[0]} works for now", err=True)
            ctx.params[target.name] = value
            ctx.set_parameter_source(target.name, ctx.get_parameter_source(p.name))
        elif p.renamed_required and ctx.params.get(target.name) is None:
            ctx.fail(f"Missing argument '{new}'.")


# --- flags several configs declare (a head's shorthands of `train`) -------------------------------------

VARIES = "the head's own"  # the default of a flag whose heads default otherwise

@dataclasses.dataclass(frozen=True)
class Flag:
    """An option of `train` that head configs declare on a field (`option(flag=...)`), once for all the
    heads that declare it: it sets that field of the head trained, and only of one that declares it."""

    decl: str  # "--alpha", "--cmf/--no-cmf", "--two-step/--one-step"
    field: str  # the config field it sets
    kind: type  # bool: an on/off pair; else the value's type
    default: object  # the field's default (an unset flag leaves the field alone)
    choices: tuple[str, ...]
    help: str
    owners: tuple[str, ...]  # the heads that declare it

    @property
    def opts(self) -> tuple[str, ...]:
        return tuple(self.decl.split("/"))

    @property
    def name(self) -> str:
        """The parameter's name: "--cmf/--no-cmf" -> "cmf", "--two-step/--one-step" -> "two_step"."""
        return self.opts[0].lstrip("-").replace("-", "_")

    @property
    def summary(self) -> str:
        """What the flag does and the field it sets, for `train --help`. A bool field's help "false: what
        false means" names the side that means it: "--no-ha: plain last cached layer, no HA"."""
        owners = f"{', '.join(self.owners)}: {self.field}"
        said, colon, does = self.help.partition(": ")
        if self.kind is bool and colon and said in ("true", "false"):
            return f"{self.opts[said == 'false']}: {does} ({owners})"
        return f"{self.help} ({owners})"  # no [...]: rich reads it as markup

    @property
    def shown_default(self) -> str | None:
        """The default `--help` shows: the side that is on by default (`ha`), or the value."""
        if self.default is VARIES:
            return VARIES
        if self.kind is bool:
            return self.opts[not self.default].lstrip("-")
        return None if self.default is None else f"{self.default:.4g}" if isinstance(self.default, float) else str(self.default)


def flags(configs: Mapping[str, type]) -> list[Flag]:
    """Every flag of these dataclasses (owner name -> class), one per flag, in their order. A flag two
    of them declare must set the same field the same way (else ValueError: a coding bug)."""
    found: dict[str, Flag] = {}
    for owner, config in configs.items():
        hints = typing.get_type_hints(config)
        for f in dataclasses.fields(config):
            if "flag" not in f.metadata:
                continue
            new = Flag(flag_decl(f), f.name, base_type(hints[f.name]), field_default(f), f.metadata.get("choices", ()),
                       f.metadata["help"], (owner,))
            old = next((o for o in found.values() if set(o.opts) & set(new.opts)), None)
            if old is None:
                found[new.decl] = new
            elif dataclasses.replace(old, help="", owners=(), default=None) != dataclasses.replace(new, help="", owners=(), default=None):
                raise ValueError(f"flag {new.decl} of {owner!r} sets {new.field} otherwise than {old.decl} of {old.owners}")
            else:
                found[new.decl] = dataclasses.replace(old, owners=old.owners + (owner,),
                                                      default=old.default if old.default == new.default else VARIES)
    return list(found.values())


def field_default(f: dataclasses.Field) -> object:
    """The default of field `f`, a `default_factory` called."""
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def flag_params(flags: Iterable[Flag]) -> list:
    """Typer options for `flags`: each None unless given (an unset flag sets nothing), its default shown."""
    import typer

    return _typer_params([
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                          annotation=Optional[bool if f.kind is bool else Literal[f.choices] if f.choices else f.kind],
                          default=typer.Option(None, f.decl, help=f.summary, show_default=f.shown_default or False,
                                               **({"callback": _in_range({})} if f.kind is float else {})))
        for f in flags])


def flag_values(owner: str, configs: Mapping[str, type], given: Mapping[str, object]) -> dict:
    """Field values of `configs[owner]` from the flags given (`given`: Flag.name -> value, None: not
    given). A flag `owner` does not declare is one UserError naming the ones that do."""
    values, wrong = {}, []
    for f in flags(configs):
        value = given.get(f.name)
        if value is None:
            continue
        if owner not in f.owners:
            wrong.append(f"{f.opts[0] if value is not False else f.opts[-1]} (a flag of {', '.join(f.owners)})")
            continue
        values[f.field] = value
    if wrong:
        keys = sorted(f.name for f in dataclasses.fields(configs[owner]))
        raise UserError(f"head {owner!r} has no option {'; '.join(wrong)}: its fields are {', '.join(keys)} "
                        f"(set them with --set key=value)")
    return values


def parse_value(value: str, kind: object):
    """`value` as the field's type: bool, int, float, str, or an optional of one ('none')."""
    if base_type(kind) is not kind:  # X | None
        if value.lower() in ("none", "null", ""):
            return None
        kind = base_type(kind)
    if kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("a boolean: true or false")
    if kind in (int, float, str):
        return kind(value)
    raise ValueError(f"a {kind}: this field cannot be set from the command line")


def parse_sets(config: type, sets: Iterable[str], option: str = "--set", owner: str = "the config") -> dict:
    """`["alpha=0.5", "cmf=false"]` -> typed field values of dataclass `config` (`option`: the flag that
    gave them, `owner`: what `config` is, e.g. "head 'spp_scl'", for the error).

    An unknown key or a value of the wrong type is one UserError listing the valid keys.
    """
    hints = typing.get_type_hints(config)
    keys = [f.name for f in dataclasses.fields(config)]
    out = {}
    for item in sets:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in keys:
            raise UserError(f"{option} {item!r}: {owner} has no field {key!r}; valid keys: {', '.join(keys)}")
        try:
            out[key] = parse_value(value.strip(), hints[key])
        except ValueError:
            kind = getattr(hints[key], "__name__", str(hints[key]))
            several = "; one value (`sweep --vary key=v1,v2` tries several)" if "," in value else ""
            raise UserError(f"{option} {item!r}: {key} takes a {kind} value{several}; valid keys: {', '.join(keys)}") from None
    return out


# --- callbacks --------------------------------------------------------------------------------------

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
    would silently keep its last value, so it is click's one line naming the key. Keys are read as
    `parse_sets` reads them (`cmf-scope` is `cmf_scope`); a malformed item is left to it."""
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
    look, parse and convert exactly as the hand-written ones of `pipeline.py`); a former name's
    (`<new>__was<k>`) is tagged with the parameter it stands for."""
    import typer

    def options(**_): ...

    options.__signature__ = inspect.Signature(specs)
    one = typer.Typer(add_completion=False, rich_markup_mode=None)
    one.command()(options)
    made = typer.main.get_command(one).params
    for p in made:
        if _WAS in p.name:
            p.renamed_to, p.renamed_required = p.name.partition(_WAS)[0], False
    return made


def _parser(parse: Callable[[str], object]) -> Callable[[object], object]:
    """`parse` as a typer parser: a bad value is click's one-line `Invalid value for '--x': ...`."""
    import typer

    def run(value: str):
        try:
            return parse(value)
        except (ValueError, UserError) as e:
            raise typer.BadParameter(str(e)) from None

    return run


# --- commands ---------------------------------------------------------------------------------------

def fields_command(first: Callable[[], list] = list, last: Callable[[], list] = list) -> type:
    """A typer command class with options made on first use: `first()`'s before the function's own
    options, `last()`'s after them (e.g. `params(TrainConfig)`, then a head's flags). Their values
    reach the function as `ctx.meta["fields"]` (name -> value), not as arguments; the names of the
    parameters given on the command line (by any name) as `ctx.meta["given"]`. A former name
    (`renamed`, `option(was=...)`) gives its value to the parameter it stands for."""
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

        def parse_args(self, ctx, args):
            rest = super().parse_args(ctx, args)
            params = self.get_params(ctx)
            _take_renamed(ctx, params)
            ctx.meta["given"] = {p.name for p in params if p.name in ctx.params and given(ctx, p.name)}
            return rest

        def invoke(self, ctx):
            before, after = self._made()
            ctx.meta["fields"] = {p.name: ctx.params.pop(p.name, None) for p in (*before, *after)
                                  if not hasattr(p, "renamed_to")}
            return super().invoke(ctx)

    return FieldsCommand


def build(config: type, values: dict, **extra):
    """`config(**values, **extra)` from a command's options: keys that are not fields of `config`
    (a head's flags) are left out, and a `default_factory` field not given (None) keeps its factory."""
    kw = {f.name: values[f.name] for f in dataclasses.fields(config)
          if f.name in values and not (values[f.name] is None and f.default is MISSING)}
    return config(**kw, **extra)
