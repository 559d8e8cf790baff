"""`--config FILE` of `train`, `ablate` and `sweep`: settings to start from, read from a file.

FILE is a run's `config.json` (its "train" section: the settings that run trained with, resolved
for its data set and head) or a JSON or YAML file of `TrainConfig` fields, a head's own under
`head_config` (the shape of that section; any field may be left out). Paths are read as config.json
records them: a relative `splits` folder is inside the repository (`config.splits_path`).

Only the options given on the command line override the file: an option's default never does, nor
an on/off option or a head's flag left unset (click's parameter source says which were given). `out`
never comes from a file: a run's folder is its own (the command's `--out`, else named from the
settings' hash). A file of settings for one data set or head used with `--dataset` or `--head` naming
another is refused in one line, not re-resolved: its batch size, learning rate, StepLR step, epoch
selection and head fields were chosen for those. YAML is read with `yaml.safe_load`: plain values
only, never a Python object.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

from core.errors import UserError

NEVER = ("out",)  # fields a file never gives


def read(path: Path, config: type) -> dict:
    """FILE's settings: a run's "train" section, or the file itself; `out` left out. Unreadable, not a
    mapping, or naming a field `config` (TrainConfig) has not: one UserError."""
    data = _load(Path(path))
    settings = data["train"] if isinstance(data.get("train"), dict) else data
    fields = [f.name for f in dataclasses.fields(config)]
    unknown = [k for k in settings if k not in fields]
    if unknown:
        raise UserError(f"--config {path}: no setting {unknown[0]!r} (a {config.__name__} field: {', '.join(fields)})")
    _check_types(path, config, {k: v for k, v in settings.items() if k != "head_config"})
    if settings.get("head_config") is not None and not isinstance(settings["head_config"], dict):
        raise UserError(f"--config {path}: head_config is a mapping of a head's fields, not {settings['head_config']!r}")
    return {k: v for k, v in settings.items() if k not in NEVER}


def _load(path: Path) -> dict:
    """The file's content as a mapping: JSON for `.json`, else YAML (`yaml.safe_load`)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: not a text file of settings ({e.__class__.__name__})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--config {path} is not valid JSON ({e})") from None
    else:
        data = _yaml(path, text)
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: give a mapping of settings (field: value), not a {type(data).__name__}")
    return data


def _yaml(path: Path, text: str):
    """`text` read by `yaml.safe_load`: a Python object tag (`!!python/object`) is refused in one line."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"--config {path}: {problem}{line}; a settings file holds plain values "
                        "(numbers, text, lists, true/false)") from None


def _check_types(path: Path, config: type, values: dict, where: str = "") -> None:
    """One UserError for the first value of `values` that is not of its field's type in `config`."""
    hints = typing.get_type_hints(config)
    for key, value in values.items():
        if not _fits(value, hints[key]):
            kind, args = hints[key], typing.get_args(hints[key])
            shown = (kind.__name__ if type(kind) is type else f"a list of {args[0].__name__}"  # no [...]: rich markup
                     if typing.get_origin(kind) is tuple else str(kind).replace("typing.", "").replace("pathlib.", ""))
            raise UserError(f"--config {path}: {where}{key}={value!r} does not fit the field's type ({shown})")


def _fits(value, kind) -> bool:
    """Whether a value read from JSON or YAML can be field type `kind` (a path is text, a tuple a list)."""
    args = typing.get_args(kind)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return value is None or any(_fits(value, a) for a in rest)
    if typing.get_origin(kind) is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is Path:
        return isinstance(value, str)
    return not isinstance(kind, type) or isinstance(value, kind)


def refuse_other(path: Path, saved: dict, values: dict, given: typing.Collection[str]) -> None:
    """A `--dataset` or `--head` given that is not the file's: one UserError (the file's settings were
    resolved for its own)."""
    for key, what in (("head", "head"), ("dataset", "data set")):
        if key in given and saved.get(key) is not None and values[key] != saved[key]:
            raise UserError(f"--config {path} holds settings for {what} {saved[key]!r}, not --{key} {values[key]}: "
                            f"drop --{key}, or start from settings of {what} {values[key]!r}")


def head_fields(path: Path, head: str, saved: dict) -> dict:
    """The file's `head_config` section, checked against head `head`'s config: one UserError for a
    field it has not or a value of another type."""
    import heads

    head_config = saved.get("head_config") or {}
    config = heads.config_class(head)  # an unknown head is its own error
    unknown = [k for k in head_config if k not in {f.name for f in dataclasses.fields(config)}]
    if unknown:
        raise UserError(f"--config {path}: head {head!r} has no field {unknown[0]!r} (head_config)")
    _check_types(path, config, head_config, "head_config.")
    return head_config
