"""Where things live by default. Every default can be overridden by a flag."""

import errno
import mmap
import os
import threading
from pathlib import Path

from core.errors import UserError

REPO = Path(__file__).resolve().parent.parent

# The shipped data sits beside the project, never inside it (it is not ours to copy).
DATA_ROOT_ENV = "SPP_DATA_ROOT"


def default_data_root() -> Path:
    """`$SPP_DATA_ROOT` if set, else `../shared/data` next to the repository."""
    return Path(os.environ.get(DATA_ROOT_ENV, REPO.parent / "shared" / "data"))


DEFAULT_CACHE = Path("cache")
DEFAULT_RUNS = Path("runs")


def make_dir(path: Path) -> Path:
    """`mkdir -p path`; a file where a folder must go (an `--out` naming a file) is a UserError, not a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        in_the_way = next(p for p in (path, *path.parents) if p.exists() and not p.is_dir())
        raise UserError(f"{in_the_way} is a file, not a folder: give a folder path (or move the file)") from None
    return path


def output_dir(path: Path, owns: tuple[str, ...], what: str) -> Path:
    """`make_dir` for a command's output folder that may hold only the files it writes (`owns`):
    an existing folder with anything else in it is someone's, and is refused rather than written into."""
    path = Path(path)
    if path.resolve() == Path(path.resolve().anchor):
        raise UserError(f"{what} {path}: the file system's root; give a folder of its own")
    if path.is_dir():
        # `<owned>.tmp<pid>`: what write_atomic leaves when a writer is killed mid-write is its own
        other = sorted(p.name for p in path.iterdir()
                       if p.name not in owns and not any(p.name.startswith(f"{o}.tmp") for o in owns))
        if other:
            raise UserError(f"{what} {path} holds other files ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}): "
                            "give an empty or new folder")
    return make_dir(path)


def write_atomic(path: Path, data: bytes | str, tmp: Path | None = None, uncached: bool = False) -> None:
    """Write `data` to a temp file (default `<file>.tmp<pid>`) and rename it to `path`: a reader
    never sees half a file. If the write fails (a full disk) the temp file is deleted and the
    OSError names `path`; a file already at `path` is left as it was. `uncached`: see `_write_uncached`."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f"{path.name}.tmp{os.getpid()}")
    data = data.encode() if isinstance(data, str) else data
    try:
        if not (uncached and _write_uncached(tmp, data)):
            with open(tmp, "wb") as f:
                f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write() or close() names no file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


_BLOCK = 4096  # O_DIRECT wants the buffer, the offset and the length aligned to the disk's block (512 or 4096)
_aligned = threading.local()  # each writing thread's block-aligned buffer, kept for its next file


def _write_uncached(tmp: Path, data: bytes) -> bool:
    """Write `data` to `tmp` past the page cache (O_DIRECT, its block-aligned head; the last partial
    block through the cache); False, with nothing written, where the file system or the platform
    has no O_DIRECT.

    Why: a cache shard is written once and read by later processes. Through the page cache, its
    bytes were copied into pages the kernel had to find first: writing a 32 MB text shard took
    0.05-0.14 s of kernel time on this project's 2-core VM (fresh pages cost it most), on the cores
    the encoder computes on; by O_DIRECT, 0.001 s of CPU. Extraction's kernel time halved and its
    time against the bare forward went from 1.11x to 1.07-1.10x (bench/extract.py)."""
    head = len(data) - len(data) % _BLOCK
    if not head or not hasattr(os, "O_DIRECT"):
        return False
    try:
        f = open(tmp, "wb", buffering=0, opener=lambda p, flags: os.open(p, flags | os.O_DIRECT, 0o666))
    except OSError as e:
        if e.errno == errno.EINVAL:  # a file system without O_DIRECT
            return False
        raise
    with f, memoryview(_buffer(head)) as buf, memoryview(data) as src:
        buf[:head] = src[:head]
        try:
            _write_all(f, buf[:head])
        except OSError as e:
            if e.errno == errno.EINVAL:  # took O_DIRECT at open, refused its writes: the caller rewrites
                return False
            raise
        import fcntl  # (Unix; O_DIRECT is Linux's)

        fcntl.fcntl(f.fileno(), fcntl.F_SETFL, fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & ~os.O_DIRECT)
        _write_all(f, src[head:])
    return True


def _buffer(n: int) -> mmap.mmap:
    """This thread's page-aligned buffer of at least `n` bytes (grown by 16 MB steps), so that the
    writes of a pass fault its pages in once."""
    buf = getattr(_aligned, "buf", None)
    if buf is None or len(buf) < n:
        if buf is not None:
            buf.close()
        buf = _aligned.buf = mmap.mmap(-1, -(-n // (16 << 20)) * (16 << 20))
    return buf


def _write_all(f, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += f.write(view[done:])


def write_png(path: Path, fig, **savefig) -> Path:
    """A matplotlib figure as a PNG through `write_atomic`: rendered to bytes first, so neither a
    reader nor a full disk ever leaves half an image at `path`."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    write_atomic(path, buf.getvalue())
    return path
