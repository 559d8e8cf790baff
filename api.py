"""The project from Python: a notebook started in the repository folder does with these functions
what the command line does, and gets numbers and tables back instead of printed lines.

- `load_cache`: a cache's items as numpy arrays or torch tensors (ids, labels, CLS and token states,
  image maps), per split, exactly the items a run of stage two trains and scores on;
- `train`: train a `TrainConfig` (or its fields) and get the run folder back, the console kept quiet;
- `run_metrics`, `run_log`, `run_config`: what a run folder holds, as a dict, a DataFrame, a config;
- `results_table`: the table of `pipeline.py results` as a DataFrame, with the same refusals.

Only public functions of the library are called here (train/data.py, train/runs.py,
train/run_folder.py, experiments/results.py, experiments/results_view.py), so this module is a thin
shell and the command line and a notebook cannot disagree. A problem the user can fix raises `UserError`
with a one-line message that says how, as the command line prints it. docs/api.md shows every function
at work.
"""

from __future__ import annotations

from core import threads as _threads

_threads.policy()  # as pipeline.py does, before torch loads (OpenMP reads it once: import api first)

import io  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, fields as dataclass_fields, replace  # noqa: E402
from pathlib import Path  # noqa: E402

from core.defaults import IMAGE_ENCODER, TEXT_ENCODER  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.paths import DEFAULT_CACHE  # noqa: E402
from train.config import TrainConfig, parse_seeds  # noqa: E402

__all__ = ["CacheSplit", "TrainConfig", "UserError", "load_cache", "results_table", "run_config", "run_log",
           "run_metrics", "train"]

SPLITS = ("train", "dev", "test")


@dataclass
class CacheSplit:
    """One split of a cache as arrays (numpy) or tensors (torch), features float16 as stored.

    Texts have a ragged number of tokens, so their token states are stored back to back: the tokens
    of item i are `tokens[offsets[i]:offsets[i + 1]]` (`text_tokens(i)`). A modality the cache (or
    the `modalities` asked) does not have is None."""

    ids: list[str]  # item ids, in the order of every array below
    labels: object  # (N,) int64: an index into `classes`
    classes: list[str]  # label names
    cls: object = None  # (N, L, H) float16: the CLS state of each cached text layer
    tokens: object = None  # (T, L, H) float16: every text's token states, back to back
    offsets: object = None  # (N+1,) int64: where each text's tokens start in `tokens`
    maps: object = None  # (N, C, h, w) float16: the image encoder's feature map

    def __len__(self) -> int:
        return len(self.ids)

    def text_tokens(self, i: int):
        """The token states of item `i`, (tokens, L, H)."""
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])]


def _modalities(cache_dir: Path, dataset: str, text_encoder: str, image_encoder: str) -> str:
    """The caches there are: text, image or both (neither: "both", so the load names what to extract)."""
    from core import store

    has = [kind for kind, encoder in ((store.TEXT, text_encoder), (store.IMAGE, image_encoder))
           if (store.cache_folder(cache_dir, dataset, kind, encoder) / "index.json").is_file()]
    return has[0] if len(has) == 1 else "both"


def load_cache(dataset: str, cache_dir: str | Path = DEFAULT_CACHE, split: str | None = None,
               as_tensors: bool = False, text_encoder: str = TEXT_ENCODER, image_encoder: str = IMAGE_ENCODER,
               modalities: str | None = None, splits_dir: str | Path | None = None):
    """A cache's splits as `CacheSplit`s: {"train": ..., "dev": ..., "test": ...}, or the one `split`.

    Loaded by the very code a run loads with, so the items are those a run sees: text and image
    joined by id (an item without an image is left out of a two-modality load), every shard's
    checksum verified, a missing or damaged cache refused with the command that makes or repairs it.
    `modalities` ("text", "image", "both"; None: whichever caches exist), `splits_dir` (the split
    files of `audit --write-clean`) as `TrainConfig` takes them. Every split is read into memory,
    whatever the budget a run would stream beyond: load a cache that fits in RAM."""
    from train import data as cache

    if split is not None and split not in SPLITS:
        raise UserError(f"split {split!r}: give one of {', '.join(SPLITS)} (or None for all three)")
    cache_dir = Path(cache_dir)
    kinds = modalities or _modalities(cache_dir, dataset, text_encoder, image_encoder)
    loaded = cache.load(cache_dir, dataset, kinds, text_encoder, image_encoder,
                        split_files=Path(splits_dir) if splits_dir is not None else None, memory=sys.maxsize)
    out = {name: _as_split(s, loaded.classes, as_tensors) for name, s in loaded.splits.items()}
    return out if split is None else out[split]


def _as_split(s, classes: list[str], as_tensors: bool) -> CacheSplit:
    """A loaded split (train.data.Split) as a CacheSplit of tensors or of numpy arrays."""
    convert = (lambda t: t) if as_tensors else (lambda t: None if t is None else t.numpy())  # noqa: E731
    return CacheSplit(list(s.ids), convert(s.labels), list(classes), convert(s.cls), convert(s.tokens),
                      convert(s.offsets), convert(s.maps))


def _config(config: TrainConfig | None, head_options: dict | None, changes: dict) -> TrainConfig:
    """`config` (None: the defaults) with `changes` to its fields and `head_options` for the head's config,
    refused in one line, as the command line refuses them, when a name or a seed list is wrong."""
    import heads

    names = {f.name for f in dataclass_fields(TrainConfig)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise UserError(f"TrainConfig has no field {', '.join(unknown)}; its fields: {', '.join(sorted(names))}")
    for key in ("cache_dir", "out", "splits"):
        if changes.get(key) is not None:
            changes[key] = Path(changes[key])
    if "seeds" in changes:  # each seed once and in range, as `--seeds` checks them
        try:
            changes["seeds"] = parse_seeds(",".join(str(s) for s in changes["seeds"]))
        except ValueError as e:
            raise UserError(f"seeds={changes['seeds']!r}: {e}") from None
    cfg = replace(config if config is not None else TrainConfig(), **changes)
    if head_options is not None:
        cfg = replace(cfg, head_config=heads.build_config(cfg.head, head_options))
    return cfg


def train(config: TrainConfig | None = None, /, *, head_options: dict | None = None, verbose: bool = False,
          jobs: int = 1, threads: int | None = None, memory: str | int | None = None, **fields) -> Path:
    """Train a configuration as `pipeline.py train` does and return its run folder.

    `config` and keyword `fields` of TrainConfig (`train(dataset="mvsa_s", head="probe", epochs=2)`;
    a field given beside a config replaces its value); `head_options`: the head's own config fields,
    as `--set key=value` gives them. The run folder is `out`, else runs/<dataset>-<head>-<hash> under
    the working folder; a folder already holding this run's finished seeds is resumed, not retrained.
    The console is quiet unless `verbose` (a notebook wants the folder back, not a progress board);
    `jobs` seeds train at once in worker processes; `threads` torch threads for each (None: the
    notebook's own setting is left alone, and workers take their share of the cores); `memory` the
    cache budget as `--memory` takes it."""
    from rich.console import Console

    from train import runs

    cfg = _config(config, head_options, dict(fields))
    console = Console() if verbose else Console(file=io.StringIO())
    if threads is not None:  # as `pipeline.py train --threads` sets them, for a seed trained in this process
        _threads.use(threads, jobs)
    return runs.train(cfg, console, jobs=jobs, threads=threads, memory=memory)


def run_metrics(path: str | Path) -> dict:
    """A finished run's metrics.json: test and dev mean and std over seeds, each seed's numbers under
    "per_seed". An unfinished run or a corrupt file is refused in one line."""
    from train.run_folder import RunFolder

    return RunFolder(Path(path)).metrics()


def run_log(path: str | Path):
    """A run's log.csv as a pandas DataFrame, one row per seed and epoch (losses, dev scores), for plots."""
    from train.run_folder import RunFolder

    return RunFolder(Path(path)).log_frame()


def run_config(path: str | Path) -> TrainConfig:
    """The TrainConfig a run folder was trained with (its config.json): to train it again with a change,
    `train(run_config(path), seeds=(4, 5))`."""
    from train.run_folder import RunFolder

    return RunFolder(Path(path)).read_run()[1]


def results_table(paths, against: str | None = None, allow_mixed: bool = False):
    """The table of `pipeline.py results PATHS` as a pandas DataFrame, one row per run: test metrics as
    mean and std over seeds, and with `against` (a row's name or head) each row's difference in accuracy
    to it with its p-value (paired over seeds when they match, Holm-corrected).

    `paths`: run folders, folders of run folders or glob patterns (one path alone is fine). Runs that
    do not compare (another cache, split, scoring protocol or code) are refused with the difference
    named, as on the command line; `allow_mixed` shows them anyway."""
    from experiments import results, results_view

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    return results_view.csv_frame(results.build(paths, against=against, allow_mixed=allow_mixed))
