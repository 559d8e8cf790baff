"""core/cli_fields.py and the commands built with it: every option of `extract`, `train`, `audit`,
`ablate` and `sweep` that sets a config field is read from the field (docs/architecture.md rule 4), so its
default and help are the field's and pipeline.py repeats none; a grid takes every `train` option."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer

import pipeline
from core import cli_fields
from extract.audit import AuditConfig
from extract.extractor import ExtractConfig
from train.config import TrainConfig

CONFIGS = {"extract": ExtractConfig, "audit": AuditConfig, "train": TrainConfig, "ablate": TrainConfig,
           "sweep": TrainConfig, "search": TrainConfig}
GRID_OWN = {"out"}  # a grid's (or a search's) --out is its own folder; each run folder in it is named from its hash


def command(name: str):
    return typer.main.get_command(pipeline.app).commands[name]


def options(name: str) -> dict:
    cmd = command(name)
    with typer.Context(cmd) as ctx:
        return {p.name: p for p in cmd.get_params(ctx)}


def cli_fields_of(config: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config) if "help" in f.metadata]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_field_option_is_the_fields_own(name):
    """Default and help of each generated option are the dataclass field's, never a copy."""
    config, params = CONFIGS[name], options(name)
    for f in cli_fields_of(config):
        if name in ("ablate", "sweep", "search") and f.name in GRID_OWN:
            assert params[f.name].help != f.metadata["help"]  # the grid's (the search's) own --out
            continue
        p = params[f.name]
        assert p.help == f.metadata["help"], f.name
        assert cli_fields.flag_of(f) == p.opts[0] and p.opts[0] == (f.metadata.get("flag") or cli_fields.flag_name(f.name)).partition("/")[0], f.name
        assert p.default == cli_fields.cli_default(f), f.name
        if "parse" in f.metadata and p.default is not None:  # typed as text, parsed to the field's value
            assert f.metadata["parse"](p.default) == f.default, f.name


def test_fields_without_help_are_not_options():
    params = options("train")
    assert {"head_config", "lr_gamma", "eval_seed", "eval_batch_size"}.isdisjoint(params)
    assert "block" not in options("audit")


def test_per_data_set_defaults_say_so():
    from train.defaults import default_help

    params = options("train")
    assert params["batch_size"].default is None and params["batch_size"].help == default_help("batch_size")
    assert params["select"].default is None and default_help("select") in params["select"].help


@pytest.mark.parametrize("grid", ["ablate", "sweep"])
def test_a_grid_takes_every_train_option(grid, run_main):
    train, own = options("train"), options(grid)
    assert set(train) - {"jobs", "threads"} <= set(own)
    shown = run_main(grid, "--help").out
    for flag in ("--official", "--splits", "--select", "--weight-decay", "--protocol-check", "--alpha", "--set"):
        assert flag in shown, flag


def test_sweep_varies_with_vary_and_fixes_with_set(run_main):
    shown = run_main("sweep", "--help").out
    assert "--vary" in shown and "--fix" not in shown


def parsed(name: str, *args: str) -> dict:
    """The values a command's generated options parse `args` to, as the command function sees them."""
    cmd = command(name)
    ctx = cmd.make_context(name, list(args))
    before, after = cmd._made()
    return {p.name: ctx.params[p.name] for p in (*before, *after) if not hasattr(p, "renamed_to")}


def test_a_grid_config_gets_what_train_only_had(tmp_path):
    values = parsed("ablate", "--weight-decay", "0.01", "--official", "--protocol-check", "--select", "macro_f1",
                    "--splits", str(tmp_path), "--seeds", "3,1", "--patience", "0", "--alpha", "0.5")
    cfg = TrainConfig.from_cli(values, ["cmf_scope=sample"])
    assert (cfg.weight_decay, cfg.official, cfg.protocol_check, cfg.select) == (0.01, True, True, "macro_f1")
    assert cfg.splits == tmp_path.resolve() and cfg.seeds == (3, 1) and cfg.patience == 0
    assert (cfg.head_config.alpha, cfg.head_config.cmf_scope) == (0.5, "sample")


def test_defaults_build_the_dataclass_defaults():
    import heads

    assert TrainConfig.from_cli(parsed("train")) == TrainConfig(head_config=heads.build_config("spp_scl"))
    assert cli_fields.build(ExtractConfig, parsed("extract")) == ExtractConfig()
    assert cli_fields.build(AuditConfig, parsed("audit")) == AuditConfig()


def test_types_reach_the_config(tmp_path):
    values = parsed("extract", "--classes", "pos, neg", "--cache-dir", str(tmp_path), "--data-root", str(tmp_path))
    cfg = cli_fields.build(ExtractConfig, values)
    assert cfg.classes == ("pos", "neg") and cfg.cache_dir == tmp_path and cfg.data_root == tmp_path
    assert isinstance(parsed("train", "--out", "x")["out"], Path)


@pytest.mark.parametrize("args, fragment", [(("--seeds", "1,1"), "seed 1 given twice"),
                                             (("--seeds", "1,x"), "give seeds as 1,2,3"),
                                             (("--patience", "-1"), "--patience"),
                                             (("--select", "f1"), "--select")])
def test_bad_values_are_click_errors(args, fragment):
    with pytest.raises(typer.BadParameter) as e:
        parsed("train", *args)
    assert fragment in e.value.format_message()


def test_an_option_declared_twice_is_a_coding_bug():
    """E.g. a head that declares a shorthand flag a command has already."""
    app = typer.Typer()

    @app.command(cls=cli_fields.fields_command(lambda: cli_fields.params(AuditConfig),
                                               lambda: cli_fields.params(AuditConfig, skip=("out",))))
    def audit(ctx: typer.Context): ...

    cmd = typer.main.get_command(app)
    with typer.Context(cmd) as ctx, pytest.raises(ValueError, match="twice: cache_dir, data_root, dataset"):
        cmd.get_params(ctx)


# --- numbers: finite, in the field's range ------------------------------------------------------------

@pytest.mark.parametrize("value, meta, why", [
    (float("nan"), {}, "give a finite number"),
    (float("-inf"), {"min": 0}, "give a finite number"),
    (float("inf"), {"finite": False}, None),  # a field may say otherwise
    (0.0, {"min": 0, "min_open": True}, "must be > 0"),
    (0.0, {"min": 0}, None),
    (-1, {"min": 0}, "must be >= 0"),
    (1.5, {"max": 1}, "must be <= 1"),
    (None, {"min": 1}, None),  # not given: the default decides
    (True, {"min": 2}, None),  # a switch is no number
])
def test_out_of_range(value, meta, why):
    assert cli_fields.out_of_range(value, meta) == why


def test_check_fields_names_the_option_or_the_key():
    from core.errors import UserError

    @dataclasses.dataclass
    class Config:
        rate: float = cli_fields.option(0.1, "a rate", min=0, min_open=True)
        steps: int = cli_fields.option(1, "steps", min=1)
        knob: float = dataclasses.field(default=0.5, metadata={"max": 1})  # no option: named as a key

    cli_fields.check_fields(Config())
    with pytest.raises(UserError, match=r"^--rate 0\.0: must be > 0$"):
        cli_fields.check_fields(Config(rate=0.0))
    with pytest.raises(UserError, match=r"^rate=nan: give a finite number$"):
        cli_fields.check_fields(Config(rate=float("nan")), as_options=False)
    with pytest.raises(UserError, match=r"^steps=0: must be >= 1$"):
        cli_fields.check_fields(Config(steps=0), as_options=False)
    with pytest.raises(UserError, match=r"^knob=2\.0: must be <= 1$"):
        cli_fields.check_fields(Config(knob=2.0))
    with pytest.raises(UserError, match=r"^knob=inf: give a finite number$"):
        cli_fields.check_fields(Config(knob=float("inf")))


def test_a_split_folder_inside_the_repository_is_recorded_relative_to_it(tmp_path, monkeypatch, tiny_cache):
    """A committed run's config.json must not carry the path of the clone it ran in: another clone
    resumes or replays it (and a grid finds its finished cell) only if both record the same value."""
    from core.paths import REPO
    from train.data import load_data

    for cwd, given in ((REPO, "splits/mvsa_s_clean"), (tmp_path, str(REPO / "splits" / "mvsa_s_clean"))):
        monkeypatch.chdir(cwd)  # the folder a command runs in does not matter
        cfg = TrainConfig.from_cli(parsed("train", "--splits", given), [])
        assert cfg.splits == Path("splits/mvsa_s_clean")
    cfg = dataclasses.replace(cfg, dataset=tiny_cache.dataset, cache_dir=tiny_cache.cache_dir)
    data = load_data(cfg)  # read from the repository's folder, not from ./splits of the working folder
    clean = {s: set((REPO / "splits" / "mvsa_s_clean" / f"{s}.txt").read_text().split()) for s in ("train", "dev", "test")}
    assert all(set(data.splits[s].ids) <= clean[s] for s in clean)


# --- one meaning per option name, across every command ------------------------------------------------

# Flags that several configs or commands declare with one meaning (the allow-list), and why.
SHARED = {
    "--dataset": "the data set's name in the cache (extract: the one it writes; verify: every one by default)",
    "-d": "--dataset",
    "--cache-dir": "the folder caches live in",
    "--text-encoder": "the text encoder, and so the text cache: extract writes it, train and audit read it",
    "--image-encoder": "the image encoder, and so the image cache: extract writes it, train and audit read it",
    "--data-root": "the folder of the built-in data sets",
    "--out": "the command's output folder",
    "--shard": "i/N: this process's share of the work (extract's shards, a grid's cells)",
    "--manifest": "a CSV/JSONL manifest as extract reads it (predict: of new items)",
    "--epochs": "how many epochs to train (replay: of the seed it retrains)",
}
# Former names: hidden, still taken with a one-line notice. command -> {old: new}
RENAMED = {
    "extract": {"--batch-size": "--encoder-batch-size", "--seed": "--split-seed", "--text-layers": "--cache-text-layers",
                "--text-views": "--cache-text-views"},
    **{name: {"--run": "RUN"} for name in ("eval", "report", "predict")},
}


def meanings() -> dict[str, set[tuple[str, str]]]:
    """Each flag of every command -> what it sets: (config, field) for an option made from a config
    field, ("heads", field) for a head's flag, ("process", name) for a command's own option."""
    from train.config import head_flags

    from_heads = {f.name: f.field for f in head_flags()}
    found: dict[str, set] = {}
    for name in typer.main.get_command(pipeline.app).commands:
        config = CONFIGS.get(name)
        fields = {f.name for f in cli_fields_of(config)} - (GRID_OWN if name in ("ablate", "sweep", "search") else set()) if config else set()
        for p in options(name).values():
            if hasattr(p, "renamed_to") or p.name == "help":
                continue
            what = ((config.__name__, p.name) if p.name in fields else ("heads", from_heads[p.name])
                    if name in CONFIGS and p.name in from_heads else ("process", p.name))
            for flag in (*p.opts, *p.secondary_opts):
                if flag.startswith("-"):
                    found.setdefault(flag, set()).add(what)
    return found


def test_a_flag_name_means_one_thing_in_every_command():
    """`--batch-size` is train's batch, never also extract's encoder batch: a flag name sets one config
    field, or is one command-level option, wherever it appears, unless SHARED says why it is shared."""
    found = meanings()
    several = {flag: sorted(what) for flag, what in found.items() if len(what) > 1}
    assert set(several) <= set(SHARED), {f: w for f, w in several.items() if f not in SHARED}
    assert set(SHARED) <= set(several), "SHARED names a flag that is no longer shared"


@pytest.mark.parametrize("name", sorted(RENAMED))
def test_a_former_name_still_works_with_one_line(name, capsys):
    """Each renamed flag keeps its old name hidden: it still sets what the new one does, says so on stderr
    once, and is listed in RENAMED (a page that still uses it is behind, not wrong)."""
    cmd = command(name)
    with typer.Context(cmd) as ctx:
        hidden = {p.opts[0]: p for p in cmd.get_params(ctx) if hasattr(p, "renamed_to")}
    assert {old: (p.renamed_to, p.hidden) for old, p in hidden.items()} == {
        old: (hidden[old].renamed_to, True) for old in RENAMED[name]}
    for old, new in RENAMED[name].items():
        value = "7" if old != "--run" else "runs/x"
        ctx = cmd.make_context(name, [old, value])
        target = hidden[old].renamed_to
        assert str(ctx.params[target]) == value and target not in ctx.params.get(old, ())
        assert target in ctx.meta["given"]
        assert capsys.readouterr().err.strip() == (
            f"deprecated: {old} is now {new}; {old} works for now" if new.startswith("--") else
            f"deprecated: {old} is now the argument {new} (`{name} {new}`); {old} works for now")
        with pytest.raises(typer.BadParameter, match="give it once"):
            cmd.make_context(name, [old, value, *([new, value] if new.startswith("--") else [value])])
    ctx = cmd.make_context(name, [*(["runs/x"] if name != "extract" else [])])
    assert capsys.readouterr().err == ""  # the new spelling: no notice


@pytest.mark.parametrize("name", ["eval", "report", "predict"])
def test_a_run_is_named_as_replay_and_results_name_theirs(name, run_main):
    """RUN is an argument, as `replay RUN...` and `results RUN...` take theirs; missing, it is click's one line."""
    r = run_main(name)
    assert r.code == 2 and "Missing argument 'RUN'" in r.err
    assert "[RUN]" in run_main(name, "--help").out


# --- --config FILE: a run's config.json or a JSON/YAML file of settings to start from --------------------

HEADS_RUNS = sorted(Path(pipeline.__file__).parent.glob("results/mvsa_s-heads/*/config.json"))


def config_of(name: str, *args: str) -> TrainConfig:
    """The TrainConfig `pipeline.py <name> *args` starts from (train: before its run folder is named)."""
    cmd = command(name)
    ctx = cmd.make_context(name, list(args))
    before, after = cmd._made()
    values = {p.name: ctx.params[p.name] for p in (*before, *after) if not hasattr(p, "renamed_to")}
    return TrainConfig.from_cli(values, ctx.params["set_"], ctx.params["config"], ctx.meta["given"])


def saved_train(path: Path) -> dict:
    import json

    return {k: v for k, v in json.loads(path.read_text())["train"].items() if k != "out"}


@pytest.mark.parametrize("path", HEADS_RUNS, ids=lambda p: p.parent.name)
def test_a_runs_config_json_gives_exactly_its_settings(path, tmp_path):
    """`train --config results/mvsa_s-heads/probe/config.json --out DIR` trains what that run trained
    (resolved, the folder aside); a grid starts its cells from them too."""
    assert {"probe", "spp_scl", "spp_scl-official"} <= {p.parent.name for p in HEADS_RUNS}
    cfg = config_of("train", "--config", str(path), "--out", str(tmp_path / "again"))
    assert cfg.out == tmp_path / "again"
    assert {k: v for k, v in cfg.resolved().to_json().items() if k != "out"} == saved_train(path)
    grid = config_of("ablate", "--config", str(path))
    assert {k: v for k, v in grid.resolved().to_json().items() if k != "out"} == saved_train(path)


def test_only_the_options_given_override_the_file(tmp_path):
    probe, spp = (Path(pipeline.__file__).parent / f"results/mvsa_s-heads/{n}/config.json" for n in ("probe", "spp_scl"))
    cfg = config_of("train", "--config", str(probe), "--epochs", "3", "--seeds", "7", "--no-protocol-check")
    assert (cfg.epochs, cfg.seeds, cfg.protocol_check) == (3, (7,), False)
    assert (cfg.head, cfg.batch_size, cfg.patience, cfg.out) == ("probe", 64, 10, None)  # --out never from a file
    assert config_of("train", "--config", str(probe)).protocol_check is True  # an unset switch overrides nothing
    cfg = config_of("sweep", "--config", str(spp), "--vary", "alpha=0.5", "--no-cmf", "--set", "cmf_scope=sample")
    saved = saved_train(spp)["head_config"]
    assert (cfg.head_config.cmf, cfg.head_config.cmf_scope, cfg.head_config.lambda_ce) == (False, "sample", saved["lambda_ce"])
    (tmp_path / "mine.yaml").write_text("head: probe\nepochs: 2\nseeds: [1, 2]\nhead_config: {modalities: text}\n")
    cfg = config_of("train", "--config", str(tmp_path / "mine.yaml"), "-d", "hfm")  # no data set in the file: any
    assert (cfg.dataset, cfg.head, cfg.epochs, cfg.seeds, cfg.head_config.modalities) == ("hfm", "probe", 2, (1, 2), "text")
    assert cfg.resolved().batch_size == 256  # hfm's own, resolved for it


CONFIG_REFUSED = [
    ("other-dataset", "run", ("-d", "hfm"), "holds settings for data set 'mvsa_s', not --dataset hfm"),
    ("other-head", "run", ("--head", "spp_scl"), "holds settings for head 'probe', not --head spp_scl"),
    ("unknown-field", "epochs: 2\nepoks: 3\n", (), "no setting 'epoks'"),
    ("unknown-head-field", "head: probe\nhead_config: {alpha: 0.5}\n", (), "head 'probe' has no field 'alpha'"),
    ("wrong-type", "epochs: ten\n", (), "epochs='ten' does not fit the field's type (int)"),
    ("wrong-head-type", "head: probe\nhead_config: {dim: wide}\n", (), "head_config.dim='wide' does not fit the field's type (int)"),
    ("wrong-list", "seeds: 1\n", (), "seeds=1 does not fit the field's type (a list of int)"),
    ("python-tag", "epochs: !!python/object/apply:os.system ['true']\n", (), "could not determine a constructor"),
    ("not-a-mapping", "- 1\n- 2\n", (), "give a mapping of settings"),
    ("missing", None, (), "no such file"),
]


@pytest.mark.parametrize("case, text, args, fragment", CONFIG_REFUSED, ids=[c[0] for c in CONFIG_REFUSED])
def test_a_config_file_refused_is_one_line(case, text, args, fragment, tmp_path, run_main):
    """Refused before anything is trained or written: one `error:` line, no traceback."""
    path = tmp_path / "settings.yaml"
    if text == "run":
        path = Path(pipeline.__file__).parent / "results/mvsa_s-heads/probe/config.json"
    elif text is not None:
        path.write_text(text)
    r = run_main("train", "--config", path, *args, "--out", tmp_path / "run")
    assert r.code == 1, r.out + r.err
    assert r.err.count("\n") == 1 and r.err.startswith("error: --config ") and fragment in r.err, r.err
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("one_thread")
def test_a_tiny_training_from_a_settings_file_and_again_from_its_config_json(synth_cache, tmp_path, run_main):
    """A YAML file trains (its run folder named from the settings' hash in --runs-dir); the run's own
    config.json then names the same settings, so the same folder is found finished, nothing retrained."""
    c = synth_cache
    (tmp_path / "s.yaml").write_text(
        f"dataset: {c.dataset}\ncache_dir: {c.cache_dir}\ntext_encoder: {c.text_encoder}\nimage_encoder: {c.image_encoder}\n"
        "head: probe\nepochs: 1\nseeds: [1]\nbatch_size: 12\neval_orders: 1\n")
    r = run_main("train", "--config", tmp_path / "s.yaml", "--runs-dir", tmp_path / "runs", "--jobs", "1")
    assert r.code == 0, r.err
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith(f"{c.dataset}-probe-") and (run / "seed-1.pt").is_file()
    again = run_main("train", "--config", run / "config.json", "--runs-dir", tmp_path / "runs", "--jobs", "1")
    assert again.code == 0, again.err
    assert "seeds [1] already done" in again.out and list((tmp_path / "runs").iterdir()) == [run]
