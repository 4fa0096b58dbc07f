"""Atomic file writes and output-folder checks, so a run directory is never half-written."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..errors import OptionError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True):
    """Yield a temporary path beside `path`; on success fsync it (unless told not to: a picture, not a run's
    file) and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())     # mkstemp makes 0600: give the file the permissions of any new file
    os.close(fd)
    try:
        yield Path(tmp)
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
