"""The life of a run directory: in progress (locked by one writer), finished (its final files committed
at once by a marker that holds their hashes), replaced only by an atomic swap.

>>> with RunLock("runs/busi"):          # one writer at a time; a dead writer's lock is free again
...     ...                             # doctest: +SKIP
>>> finish("runs/busi", ["config.json", "model.safetensors", "metrics.json"])   # doctest: +SKIP
>>> check_finished("runs/busi")         # raises SonocadError if unfinished or changed since   # doctest: +SKIP
"""
from __future__ import annotations

import ctypes
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

from .errors import OptionError, SonocadError
from .io import atomic_write_text

MARKER = "run.json"          # written last: the run is finished, and these are its files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def finish(run: str | os.PathLike, files: list[str], kind: str = "train") -> None:
    """Mark `run` finished: one atomic write of the marker listing `files` (relative names) and their hashes."""
    run = Path(run)
    record = {"kind": kind, "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "files": {name: _sha256(run / name) for name in files if (run / name).is_file()}}
    atomic_write_text(run / MARKER, json.dumps(record, indent=1))


def kind(run: str | os.PathLike) -> str | None:
    """What wrote a finished folder (train, cv, evaluate), or None when it is not finished."""
    try:
        return json.loads((Path(run) / MARKER).read_text()).get("kind", "train")
    except (OSError, ValueError, AttributeError):
        return None


def check_finished(run: str | os.PathLike) -> None:
    """Refuse a run that is not finished, or whose committed files changed since (a half-written overwrite,
    a hand edit). Runs written before sonocad marked finished runs (no marker, no checkpoint of an
    unfinished run) pass as they are."""
    run = Path(run)
    marker = run / MARKER
    if not marker.is_file():
        if (run / "checkpoints" / "last.pt").is_file() and not (run / "metrics.json").is_file():
            raise SonocadError(f"{run}: training is in progress or was interrupted (continue it with "
                               f"sonocad train DATA --resume {run})")
        return
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SonocadError(f"{marker}: damaged record of a finished run") from None
    changed = [name for name, digest in files.items() if not (run / name).is_file() or _sha256(run / name) != digest]
    if changed:
        raise SonocadError(f"{run}: {', '.join(changed)} changed after the run finished; this is not the run "
                           "sonocad wrote (train it again, or restore its files)")


def state(path: str | os.PathLike) -> str:
    """absent | empty | finished | unfinished (a run's files without the marker) | other (a folder with
    files that are not a run's)."""
    path = Path(path)
    if not path.exists():
        return "absent"
    if not path.is_dir():
        return "other"
    names = {p.name for p in path.iterdir()}
    if not names:
        return "empty"
    if MARKER in names:
        return "finished"
    if (path / "checkpoints" / "last.pt").is_file() or (path / "config.json").is_file() or any(
            (path / sub / "config.json").is_file() for sub in ("fold-1", "repeat-1/fold-1")):
        return "unfinished"
    return "other"


def _lock_path(run: Path) -> Path:
    return run.parent / f".{run.name}.lock"


class RunLock:
    """An exclusive lock on a run directory for one writing process: a lock file beside the directory (so
    that it stays put when the directory is swapped), held with flock, holding the writer's pid and host.
    The kernel releases it when the process ends, however it ends, so a dead writer's lock is free again."""

    def __init__(self, run: str | os.PathLike, option: str = "out"):
        self.run, self.option, self.fd = Path(run), option, None

    def __enter__(self) -> "RunLock":
        path = _lock_path(self.run)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OptionError(self.option, f"{self.run}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise SonocadError(f"{self.run}: another sonocad process is writing it ({holder}); wait for it or "
                               "choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{datetime.datetime.now().isoformat(timespec='seconds')}".encode())
        self.fd = fd
        _recover(self.run)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)     # releases the flock; the file stays (removing it would race a new writer)
            self.fd = None


def scratch_dir(run: Path) -> Path:
    """Where a replacement for `run` is built, beside it (same file system, so it can be swapped in)."""
    return run.parent / f".{run.name}.new-{os.getpid()}"


def _recover(run: Path) -> None:
    """With the lock held: finish a swap that a killed process left half done, and remove its leftovers."""
    olds = sorted(run.parent.glob(f".{run.name}.old-*"))
    if not run.exists() and olds:
        os.rename(olds[-1], run)           # the fallback swap died between its two renames: the old run back
    for leftover in [*olds, *run.parent.glob(f".{run.name}.new-*")]:
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_in(new: Path, run: Path) -> None:
    """Replace `run` by the finished run `new` (built by scratch_dir): one atomic exchange where the system
    has it, so a kill at any moment leaves the old or the new run; then the old one is removed."""
    if run.exists() and _exchange(new, run):
        shutil.rmtree(new, ignore_errors=True)      # `new` now holds the old run
        return
    old = run.parent / f".{run.name}.old-{os.getpid()}"
    if run.exists():
        os.rename(run, old)                         # a kill here is undone by _recover under the next lock
    os.rename(new, run)
    shutil.rmtree(old, ignore_errors=True)


def prepare_output(out: Path, allowed_kind: str, option: str = "out", overwrite: bool = False) -> Path:
    """Where a command that writes the folder `out` (holding its lock) should write: `out` itself when it is
    absent or empty, a scratch folder to swap in when it holds an earlier result this command may replace
    (one of `allowed_kind`, or any finished result with `overwrite`). Anything else is refused."""
    st = state(out)
    if st in ("absent", "empty"):
        return out
    if st == "other":
        raise OptionError(option, f"{out} is not empty and holds no sonocad result; choose a new folder")
    if st == "unfinished" and not overwrite:
        raise OptionError(option, f"{out} holds an unfinished run; continue it with --resume {out}, or replace "
                          "it with --overwrite")
    if st == "finished" and not overwrite and kind(out) != allowed_kind:
        raise OptionError(option, f"{out} holds a finished {kind(out)} result; choose a new folder, or replace "
                          "it with --overwrite")
    return scratch_dir(out)


def refuse_writing_into_runs(out: str | os.PathLike, reading: list, option: str) -> None:
    """Refuse an output path (a file, or a folder a command fills) that lies inside a run being read, or
    inside any other sonocad result folder, whose files it could replace."""
    out = Path(out).resolve()
    for run in reading:
        run = Path(run).resolve()
        if out == run or run in out.parents:
            raise OptionError(option, f"{out} is inside {run}, which this command reads; write elsewhere")
    for folder in list(out.parents)[:3]:       # a run, a cv fold, or a fold's external evaluation
        if state(folder) in ("finished", "unfinished"):
            raise OptionError(option, f"{out} is inside {folder}, a sonocad result folder; write elsewhere")
