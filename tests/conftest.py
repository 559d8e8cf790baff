"""Shared fixtures: the real data root, small extraction configs, the CLI, and one tiny
real cache built once per session that every test module (stage one and two) can read.

Real data is read in place from `../shared/data` (or `$SPP_DATA_ROOT`), never copied
into the repository; synthetic inputs are made in `tmp_path`.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `pytest` as well as `python -m pytest` from anywhere
    sys.path.insert(0, str(REPO))

from core import threads  # noqa: E402

threads.policy()  # as pipeline.py does, before torch loads: tests share the machine too

from core import store  # noqa: E402
from core.paths import default_data_root  # noqa: E402
from extract.extractor import ExtractConfig, Summary, run  # noqa: E402

DATA = default_data_root()

# The tiny cache's settings; a CLI run with TINY_ARGS writes the very same cache.
TINY_LIMIT, TINY_SHARD, TINY_BATCH = 12, 8, 4
TINY_ARGS = ("--dataset", "mvsa_s", "--limit", str(TINY_LIMIT), "--shard-size", str(TINY_SHARD),
             "--encoder-batch-size", str(TINY_BATCH))


@dataclass(frozen=True)
class TinyCache:
    """A real cache of mvsa_s (first 12 items of each split) with the default encoders."""

    cache_dir: Path  # pass as --cache-dir / TrainConfig.cache_dir
    dataset: str  # the data set's name inside the cache ("mvsa_s-first12")
    text: Path  # folder of the text shards and index.json
    image: Path  # folder of the image shards and index.json
    text_encoder: str
    image_encoder: str
    config: ExtractConfig
    summary: Summary


def quiet_console() -> Console:
    """A console that records instead of printing; read it back with `.file.getvalue()`."""
    return Console(file=io.StringIO(), width=200, force_terminal=False)


def run_numbers(metrics: dict) -> dict:
    """metrics.json without what the run took (wall clock, `cost`): what two runs that compute the
    same numbers share, however long they ran, on whatever memory."""
    return {**metrics, "wall_seconds": 0, "cost": None}


def small_config(cache_dir: Path, **overrides) -> ExtractConfig:
    """An ExtractConfig with test-sized settings on the real data root."""
    kw = dict(data_root=DATA, cache_dir=Path(cache_dir), batch_size=TINY_BATCH, shard_size=TINY_SHARD)
    kw.update(overrides)
    return ExtractConfig(**kw)


class Cli:
    """`python pipeline.py ...` run from the repository root, offline, on this data root, in
    an 80-column terminal (so a long error message would show up wrapped onto two lines)."""

    repo = REPO
    tiny_args = TINY_ARGS  # these flags write exactly the tiny cache

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, SPP_DATA_ROOT=str(DATA), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="80")
        env.update(extra)
        return env

    def command(self, *args) -> list[str]:
        return [sys.executable, str(REPO / "pipeline.py"), *(str(a) for a in args)]

    def run(self, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), cwd=REPO, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def popen(self, *args, **kw) -> subprocess.Popen:
        """Started in its own process group, so the test can kill it and its loader worker."""
        opts = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        opts.update(kw)
        return subprocess.Popen(self.command(*args), cwd=REPO, env=self.env(), start_new_session=True, **opts)


@dataclass(frozen=True)
class MainResult:
    code: int  # exit code
    out: str  # stdout
    err: str  # stderr, with any warning and any escaped exception's traceback appended as a user would see them


@pytest.fixture
def run_main(capsys, monkeypatch):
    """`run_main(*args)`: `pipeline.main()` in this process with sys.argv patched, as `python
    pipeline.py ...` would run it (exit code, stdout, stderr), without importing torch again."""
    import traceback
    import warnings

    import pipeline

    def run(*args) -> MainResult:
        monkeypatch.setattr(sys, "argv", ["pipeline.py", *(str(a) for a in args)])
        monkeypatch.setenv("COLUMNS", "80")
        code, extra = 0, ""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                pipeline.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # what the user would see: a traceback
                code, extra = 1, traceback.format_exc()
        out, err = capsys.readouterr()
        warned = "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught
                         if not issubclass(w.category, DeprecationWarning))
        return MainResult(code, out, warned + err + extra)

    return run


@pytest.fixture(scope="session")
def data_root() -> Path:
    assert (DATA / "mvsa_single" / "train.jsonl").is_file(), (
        f"the shared data is not at {DATA}: set SPP_DATA_ROOT to the folder holding mvsa_single/, mvsa_multiple/, hfm/"
    )
    return DATA


@pytest.fixture
def make_config():
    """`make_config(cache_dir, **overrides)`: a small ExtractConfig (batch 4, shard 8)."""
    return small_config


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


@pytest.fixture
def console() -> Console:
    return quiet_console()


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, data_root) -> TinyCache:
    """Built once per session: mvsa_s, 12 items per split, 8 items a shard, default encoders. Built
    with the thread count a CLI extraction takes, whichever test asks first (a module under
    `one_thread` included): tests compare it bit for bit with caches `pipeline.py extract` writes,
    and an encoder's last float bits depend on the threads."""
    import torch

    cfg = small_config(tmp_path_factory.mktemp("tiny_cache") / "cache", dataset="mvsa_s", limit=TINY_LIMIT)
    before = torch.get_num_threads()
    torch.set_num_threads(threads.default_threads())
    try:
        summary = run(cfg, quiet_console())
    finally:
        torch.set_num_threads(before)
    assert summary.complete, "the tiny cache should be complete after one process"
    name = summary.dataset
    return TinyCache(
        cache_dir=cfg.cache_dir, dataset=name,
        text=store.cache_folder(cfg.cache_dir, name, store.TEXT, cfg.text_encoder),
        image=store.cache_folder(cfg.cache_dir, name, store.IMAGE, cfg.image_encoder),
        text_encoder=cfg.text_encoder, image_encoder=cfg.image_encoder, config=cfg, summary=summary,
    )


# --- a synthetic multi-class cache --------------------------------------------------------

@dataclass(frozen=True)
class SynthCache:
    """A tiny cache of 3 classes, written with core/store: every split holds every class,
    stored sorted by label as the shipped split files are, with features that carry the label
    (so a head can learn it and a label mix-up shows)."""

    cache_dir: Path
    dataset: str
    text_encoder: str
    image_encoder: str
    sizes: dict


SYNTH_SIZES = {"train": 36, "dev": 18, "test": 18}
SYNTH_CLASSES = ["positive", "neutral", "negative"]


def write_synth_cache(cache_dir: Path, dataset: str = "synth", sizes: dict | None = None, seed: int = 0,
                      layers: int = 4, width: int = 16, channels: int = 8, strength: float = 1.5) -> SynthCache:
    import numpy as np

    sizes = sizes or SYNTH_SIZES
    rng = np.random.default_rng(seed)
    root = Path(cache_dir) / dataset
    text_dir = store.cache_folder(cache_dir, dataset, store.TEXT, "synth-text")
    image_dir = store.cache_folder(cache_dir, dataset, store.IMAGE, "synth-image")
    ids, labels, splits = [], [], []
    for split, n in sizes.items():
        y = np.sort(np.arange(n) % len(SYNTH_CLASSES))  # sorted by label, like the shipped files
        ids += [f"{split}-{i}" for i in range(n)]
        labels += y.tolist()
        splits += [split] * n
    labels = np.array(labels)
    n = len(ids)
    lengths = rng.integers(2, 7, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    signal = np.eye(len(SYNTH_CLASSES), width)[labels] * strength  # the label, visible in the features
    cls = rng.normal(size=(n, layers, width)) + signal[:, None, :]
    tokens = rng.normal(size=(offsets[-1], layers, width)) + np.repeat(signal, lengths, axis=0)[:, None, :]
    maps = np.abs(rng.normal(size=(n, channels, 2, 2)) + np.eye(len(SYNTH_CLASSES), channels)[labels][:, :, None, None] * (strength / 1.5))
    for kind, folder, name in ((store.TEXT, text_dir, "synth-text"), (store.IMAGE, image_dir, "synth-image")):
        folder.mkdir(parents=True, exist_ok=True)
        prov = store.Provenance(kind, name, "synthetic", "{}", dataset, f"seed{seed}", 1,
                                layers if kind == store.TEXT else 0, 32 if kind == store.TEXT else 0)
        path = folder / store.shard_name(0, 1)
        if kind == store.TEXT:
            store.write_text_shard(path, prov, ids, labels, splits, cls, tokens, offsets)
        else:
            store.write_image_shard(path, prov, ids, labels, splits, maps)
        assert store.finish(folder, prov)
    store.write_dataset_info(root, {"classes": SYNTH_CLASSES, "counts": sizes}, [])
    return SynthCache(Path(cache_dir), dataset, "synth-text", "synth-image", dict(sizes))


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory) -> SynthCache:
    return write_synth_cache(tmp_path_factory.mktemp("synth") / "cache")


TINY_VIEWS = 2


@pytest.fixture(scope="session")
def tiny_views_cache(tiny_cache, tmp_path_factory) -> TinyCache:
    """The tiny cache plus TINY_VIEWS dropout views of its train texts (`extract --cache-text-views 2`
    on a copy: the clean text shards are found finished and kept, only the views are encoded)."""
    import shutil

    cache = tmp_path_factory.mktemp("tiny_views") / "cache"
    shutil.copytree(tiny_cache.cache_dir, cache)
    cfg = small_config(cache, dataset="mvsa_s", limit=TINY_LIMIT, text_only=True, text_views=TINY_VIEWS)
    summary = run(cfg, quiet_console())
    assert summary.complete
    return TinyCache(cache_dir=cache, dataset=tiny_cache.dataset,
                     text=store.cache_folder(cache, tiny_cache.dataset, store.TEXT, cfg.text_encoder),
                     image=store.cache_folder(cache, tiny_cache.dataset, store.IMAGE, cfg.image_encoder),
                     text_encoder=cfg.text_encoder, image_encoder=cfg.image_encoder, config=cfg, summary=summary)


@pytest.fixture(scope="session")
def views_run(tiny_views_cache, tmp_path_factory) -> Path:
    """A run trained with `--text-views` (SPP-SCL, batch scope, seeds 1 and 2): config.json records
    the number of views beside the caches' provenance; eval, report, predict and resume read it back."""
    from train import runs
    from train.config import TrainConfig

    c = tiny_views_cache
    cfg = TrainConfig(dataset=c.dataset, cache_dir=c.cache_dir, text_encoder=c.text_encoder,
                      image_encoder=c.image_encoder, epochs=1, seeds=(1, 2), batch_size=6, eval_orders=1,
                      text_views=True, out=tmp_path_factory.mktemp("views_run") / "run")
    return runs.train(cfg, quiet_console())


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    on two cores shared with other jobs, two torch threads spin against each other on tiny batches."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FullDisk:
    """An open file on a full disk: the first write() fails with ENOSPC after writing a little, as
    Python's own write would (tests of the one-line disk errors)."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()

    def write(self, data):
        import errno

        self.f.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")


# --- processes: a main process killed mid-run leaves no worker behind (Linux: reads /proc) ---------------

def descendants(pid: int) -> list[int]:
    """The processes under `pid`: its children, theirs, ... (a scan of /proc; a forkserver's workers too)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [pid]
    while todo:
        up = todo.pop()
        kids = [p for p, pp in parent.items() if pp == up]
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie not reaped yet counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def cut_when_saved(cli: Cli, args, folder: Path, pattern: str, sig) -> tuple[subprocess.Popen, list[int]]:
    """Start `pipeline.py args`; once a file matching `pattern` is in `folder` (an epoch saved), send `sig`
    to the main process alone (not its group). Returns the process and its workers at that moment (two at least)."""
    import time

    proc = cli.popen(*args)
    end = time.time() + 240
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < end, "no epoch was saved"
        time.sleep(0.02)
    workers = descendants(proc.pid)
    assert len(workers) >= 2, workers
    proc.send_signal(sig)
    return proc, workers


def assert_gone(workers: list[int], within: float = 15.0) -> None:
    """Every one of `workers` ends within `within` seconds (those left are killed, and the test fails)."""
    import signal
    import time

    end = time.time() + within
    while any(alive(p) for p in workers) and time.time() < end:
        time.sleep(0.05)
    left = [p for p in workers if alive(p)]
    for pid in left:  # a failed test leaves no worker behind either
        os.kill(pid, signal.SIGKILL)
    assert not left, "workers outlived the main process"
