"""Where things live by default. Every default can be overridden by a flag."""

import os
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


def write_atomic(path: Path, data: bytes | str, tmp: Path | None = None) -> None:
    """Write `data` to a temp file (default `<file>.tmp<pid>`) and rename it to `path`: a reader
    never sees half a file. If the write fails (a full disk) the temp file is deleted and the
    OSError names `path`; a file already at `path` is left as it was."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f"{path.name}.tmp{os.getpid()}")
    data = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write() or close() names no file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def write_png(path: Path, fig, **savefig) -> Path:
    """A matplotlib figure as a PNG through `write_atomic`: rendered to bytes first, so neither a
    reader nor a full disk ever leaves half an image at `path`."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    write_atomic(path, buf.getvalue())
    return path
