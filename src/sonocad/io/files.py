"""Atomic file writes and output-folder checks, so a run directory is never half-written."""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

from ..errors import OptionError


# what atomic_path's temporary files are called: "." + the file's name + "." + mkstemp's 8 characters + ".tmp"
TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True):
    """Yield a temporary path beside `path`; on success fsync it (unless told not to: a picture, not a run's
    file) and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600, and a writer may replace the file (safetensors does): give it the permissions of
        # any new file
        os.chmod(tmp, 0o666 & ~_umask())
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    # file names that are not valid UTF-8 (Python holds their bytes as surrogates) are written back as bytes
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ensure_writable_dir(path: str | os.PathLike, option: str = "out") -> Path:
    """Create `path` if needed and prove it is writable; raise a one-line OptionError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test."):
            pass
    except OSError as e:
        raise OptionError(option, f"{path}: cannot write there ({e.strerror or e})") from None
    return path


def refuse_replacing(path: str | os.PathLike, option: str, ours, what: str) -> None:
    """Refuse to write the file `path` where something is already that `ours(path)` does not take for `what` (an
    earlier output of the same command): sonocad writes over its own outputs only, never over an input or a
    user's file."""
    p = Path(path)
    try:
        if not (p.exists() or p.is_symlink()):
            return
        if p.is_dir():
            raise OptionError(option, f"{p} is a folder; give a file name")
        if p.is_file() and ours(p):
            return
    except OSError as e:
        raise OptionError(option, f"{p}: {e.strerror or e}") from None
    raise OptionError(option, f"{p} exists and is not {what}; choose another name (sonocad writes over its own "
                      "outputs only)")


def refuse_foreign_files(folder: str | os.PathLike, option: str, ours, what: str) -> None:
    """Refuse to fill `folder` when it holds a file whose name `ours(name)` does not take for one this command
    writes (`what`); hidden files are left out of the count."""
    try:
        names = [p.name for p in Path(folder).iterdir()]
    except NotADirectoryError:
        raise OptionError(option, f"{folder} is a file, not a folder") from None
    except OSError:
        return      # absent (it will be made), or unreadable (ensure_writable_dir says so)
    foreign = sorted(n for n in names if not n.startswith(".") and not ours(n))
    if foreign:
        raise OptionError(option, f"{folder} holds files that are not {what} (e.g. {foreign[0]}); choose an empty "
                          "or new folder")


def csv_fields(path: str | os.PathLike) -> list[str]:
    """The first row of a UTF-8 text file, as CSV fields ([] for a file that is not one)."""
    import csv

    try:
        with open(path, "rb") as f:
            line = f.read(65536).split(b"\n", 1)[0].rstrip(b"\r")
        return next(csv.reader([line.decode("utf-8-sig")]), []) if b"\0" not in line else []
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


@contextlib.contextmanager
def removed_if_failed(*folders):
    """Remove the folders of `folders` (None: none) that this block made, and the parents it made for them, when
    the block fails and leaves them empty: a refused command leaves nothing behind."""
    chains = [(q, *q.parents) for q in (Path(f).absolute() for f in folders if f is not None)]
    made = [p for chain in chains for p in chain if not p.exists()]
    try:
        yield
    except BaseException:
        for p in made:
            try:
                p.rmdir()
            except OSError:
                pass
        raise
