"""The life of a run directory: in progress (locked by one writer), finished (its final files committed at
once by a marker that holds their hashes), replaced only by an atomic swap.

>>> with RunLock("runs/busi") as lock:     # one writer at a time; a dead writer's lock is free again
...     ...                                # doctest: +SKIP
>>> finish("runs/busi", ["config.json", "model.safetensors", "metrics.json"])    # doctest: +SKIP
>>> read_finished("runs/busi", ["config.json"])   # bytes, checked against run.json   # doctest: +SKIP
"""
from __future__ import annotations

import ctypes
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
from pathlib import Path

from ..errors import OptionError, SonocadError
from .files import TEMPORARY, atomic_write_text

MARKER = "run.json"                      # written last: the run is finished, and these are its files
STARTED = Path("checkpoints") / "data.json"   # written first by every training run since run.json exists
# what sonocad's commands write at the top of a result folder (its marker also lists its files)
RESULT_ENTRIES = {MARKER, "checkpoints", "config.json", "external", "log.csv", "metrics.json", "model.safetensors",
                  "oof_predictions.csv", "plots", "predictions.csv", "report.html"}
FOLD_ENTRY = re.compile(r"(fold|repeat)-\d+")


def canonical(path: str | os.PathLike) -> Path:
    """The absolute path with symbolic links resolved: one name, and so one lock, per folder."""
    p = Path(path).expanduser().resolve()
    if p == p.parent:
        raise OptionError("out", f"{p} is a file system's root; choose a folder inside it")
    return p


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_regular(path: Path) -> bytes:
    """A file's bytes. Anything else in its place (a named pipe, a device, a folder) is refused with
    SonocadError, never waited on or read without end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)      # a named pipe opens at once, so that fstat can see it
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SonocadError(f"{path}: not a regular file (a named pipe, a device or a folder in its place)")
        return f.read()


def _read_json(path: Path):
    try:
        return json.loads(read_regular(path))
    except (OSError, ValueError, UnicodeDecodeError, SonocadError):
        return None


def is_run_config(path: Path) -> bool:
    """Whether `path` is a sonocad run's config.json (parsed, not guessed from its name)."""
    d = _read_json(path)
    return isinstance(d, dict) and {"config", "classes", "img_size"} <= set(d)


def finish(run: str | os.PathLike, files: list[str], kind: str = "train") -> None:
    """Mark `run` finished: one atomic write of the marker listing `files` (relative names) and their hashes."""
    run = Path(run)
    record = {"kind": kind, "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "files": {name: _sha256((run / name).read_bytes()) for name in files if (run / name).is_file()}}
    atomic_write_text(run / MARKER, json.dumps(record, indent=1))


def _marker(run: Path) -> dict | None:
    m = _read_json(run / MARKER)
    if isinstance(m, dict) and isinstance(m.get("files"), dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in m["files"].items()):
        return m
    return None


def kind(run: str | os.PathLike) -> str | None:
    """What wrote a finished folder (train, cv, evaluate), or None when it is not finished. Results written
    before run.json existed are recognised by their files."""
    run = Path(run)
    m = _marker(run)
    if m is not None:
        return str(m.get("kind", "train"))
    if (run / MARKER).exists() or (run / STARTED).exists():
        return None
    if (run / "metrics.json").is_file() and (run / "report.html").is_file():
        if is_run_config(run / "config.json") and (run / "predictions.csv").is_file():
            return "train"
        if (run / "oof_predictions.csv").is_file():
            return "cv"
        if (run / "predictions.csv").is_file() and not (run / "config.json").exists():
            return "evaluate"
    return None


def state(path: str | os.PathLike) -> str:
    """absent | empty | finished | unfinished (sonocad's, in progress or interrupted) | other (a folder
    with files that are not sonocad's)."""
    path = Path(path)
    try:
        if not path.exists():
            return "absent"
        if not path.is_dir():
            return "other"
        if not any(path.iterdir()):
            return "empty"
        if kind(path):
            return "finished"
        if ((path / MARKER).exists() or (path / STARTED).is_file() or (path / "checkpoints" / "last.pt").is_file()
                or any(is_run_config(path / sub / "config.json") for sub in (".", "fold-1", "repeat-1/fold-1"))):
            return "unfinished"
    except OSError:
        pass
    return "other"


def check_finished(run: str | os.PathLike, unchecked: tuple[str, ...] = ()) -> dict[str, str]:
    """The committed files' hashes of a finished run ({} for one written before run.json existed); refuses a
    run that is unfinished, or whose committed files changed since (a hand edit, a half-done replacement).
    Files named in `unchecked` are left for the caller to check (it has their bytes)."""
    run = Path(run)
    if kind(run) is None:
        if (run / MARKER).exists():
            raise SonocadError(f"{run / MARKER}: damaged record of a finished run")
        if (run / "config.json").exists() or (run / STARTED).exists():
            raise SonocadError(f"{run}: training is in progress or was interrupted (continue it with "
                               f"sonocad train DATA --resume {run})")
        return {}      # not a run at all: the caller says what is missing
    m = _marker(run)
    files = m["files"] if m else {}
    changed = [n for n, digest in files.items() if n not in unchecked
               and (not (run / n).is_file() or _sha256(read_regular(run / n)) != digest)]
    if changed:
        raise _changed(run, changed)
    return files


def _changed(run: Path, names: list[str]) -> SonocadError:
    return SonocadError(f"{run}: {', '.join(names)} changed after the run finished; this is not the run sonocad "
                        "wrote (train it again, or restore its files)")


def read_finished(run: str | os.PathLike, names: list[str]) -> dict[str, bytes]:
    """The bytes of some files of a finished run, all of one and the same run even while another process
    swaps a new run in (the marker is read before and after; the bytes are checked against it)."""
    run = Path(run)
    for _ in range(5):
        before = read_regular(run / MARKER) if (run / MARKER).is_file() else b""
        files = check_finished(run, unchecked=tuple(names))
        try:
            data = {n: read_regular(run / n) for n in names}
        except FileNotFoundError:
            data = None
        after = read_regular(run / MARKER) if (run / MARKER).is_file() else b""
        if before != after:
            continue                                 # a new run was swapped in meanwhile: read again
        if data is None:
            break
        changed = [n for n in names if n in files and _sha256(data[n]) != files[n]]
        if changed:
            raise _changed(run, changed)
        return data
    missing = [n for n in names if not (run / n).is_file()]
    if missing:
        raise SonocadError(f"{run}: {', '.join(missing)} missing; is this a sonocad run directory?")
    raise SonocadError(f"{run}: changed while being read (is a new run being swapped in?); try again")


def _lock_path(run: Path) -> Path:
    return run.parent / f".{run.name}.lock"


class RunLock:
    """An exclusive lock on a run directory for one writing process: a lock file beside the directory (so
    that it stays put when the directory is swapped), held with flock, holding the writer's pid and host.
    The kernel releases it when the process ends, however it ends, so a dead writer's lock is free again.
    `.run` is the folder's canonical path: use it for everything written under the lock."""

    def __init__(self, run: str | os.PathLike, option: str = "out"):
        self.run, self.option, self.fd = canonical(run), option, None
        self.made: list[Path] = []      # folders this lock made (the run's and its parents), newest first

    def __enter__(self) -> "RunLock":
        path = _lock_path(self.run)
        self.made = [p for p in (self.run, *self.run.parents) if not p.exists()]
        for _ in range(5):
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
                raise SonocadError(f"{self.run}: another sonocad process is writing it ({holder}); wait for it "
                                   "or choose another folder") from None
            try:                      # the file locked must still be the lock file, not one deleted meanwhile
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise SonocadError(f"{path}: the lock file keeps disappearing; is something deleting it?")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{datetime.datetime.now().isoformat(timespec='seconds')}".encode())
        self.fd = fd
        _recover(self.run)
        return self

    def __exit__(self, *exc) -> None:
        """Release the lock and leave nothing behind that the command did not mean to write: a run folder it
        made and left without a file, the lock file, the parent folders it made for them. Removing the lock file
        while holding it is safe: a process that opened it meanwhile finds it gone once it holds it, and retries."""
        if self.fd is None:
            return
        if self.run in self.made and not any(p.is_file() or p.is_symlink() for p in self.run.rglob("*")):
            remove(self.run)
        _lock_path(self.run).unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        for folder in self.made[1:]:
            try:
                folder.rmdir()
            except OSError:
                break                # not empty (or not ours to remove): the folders above it stay too


def scratch_dir(run: Path) -> Path:
    """Where a replacement for `run` is built, beside it (same file system, so it can be swapped in)."""
    return run.parent / f".{run.name}.new-{os.getpid()}"


def _leftovers(run: Path) -> list[Path]:
    pattern = re.compile(re.escape(f".{run.name}.") + r"(new|old)-\d+")
    try:
        return sorted(p for p in run.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return []


def _recover(run: Path) -> None:
    """With the lock held: finish a swap that a killed process left half done, and remove its leftovers."""
    leftovers = _leftovers(run)
    olds = [p for p in leftovers if ".old-" in p.name and (p / MARKER).is_file()]
    if not run.exists() and olds:
        os.rename(olds[-1], run)           # the fallback swap died between its two renames: the old run back
    for p in leftovers:
        remove(p)
    if state(run) in ("finished", "unfinished"):     # a killed writer's temporary files (a sonocad folder only)
        for folder in (run, run / "checkpoints", run / "plots"):
            for p in _ls(folder):
                if TEMPORARY.fullmatch(p.name) and p.is_file():
                    p.unlink(missing_ok=True)


def _ls(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def remove(path: Path) -> None:
    """Remove a folder (or a link or file) of ours, as far as possible."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_in(new: Path, run: Path) -> None:
    """Replace `run` by the finished folder `new` (built by scratch_dir): one atomic exchange where the
    system has it, so a kill at any moment leaves the old or the new run; then the old one is removed."""
    try:
        if run.exists() and _exchange(new, run):
            remove(new)                             # `new` now holds the old run
            return
        old = run.parent / f".{run.name}.old-{os.getpid()}"
        if run.exists():
            os.rename(run, old)                     # a kill here is undone by _recover under the next lock
        os.rename(new, run)
        remove(old)
    except OSError as e:
        raise SonocadError(f"{run}: could not put the new result in place ({e.strerror or e}); it is in {new}") \
            from None


def prepare_output(out: Path, allowed_kind: str, option: str = "out", overwrite: bool = False,
                   in_place: bool = True) -> Path:
    """Where a command that writes the folder `out` (holding its lock) should write: `out` itself when it is
    absent or empty (and `in_place`), else a scratch folder to swap in, when `out` holds an earlier result
    this command may replace (of `allowed_kind`, or any sonocad result with `overwrite`). Anything else is
    refused."""
    st = state(out)
    if st in ("absent", "empty"):
        return out if in_place else scratch_dir(out)
    if st == "other":
        raise OptionError(option, f"{out} is not empty and holds no sonocad result; choose a new folder")
    if st == "unfinished" and not overwrite:
        raise OptionError(option, f"{out} holds an unfinished run; continue it with --resume {out}, or replace "
                          "it with --overwrite")
    if st == "finished" and not overwrite and kind(out) != allowed_kind:
        raise OptionError(option, f"{out} holds a finished {kind(out)} result; choose a new folder, or replace "
                          "it with --overwrite")
    foreign = foreign_entries(out)
    if foreign:
        raise OptionError(option, f"{out} also holds what sonocad did not write there (e.g. {foreign[0]}), which "
                          "replacing its result would delete; move it out, or choose a new folder")
    return scratch_dir(out)


def foreign_entries(result: Path) -> list[str]:
    """The names at the top of a result folder that no sonocad command wrote there (a user's notes, say)."""
    listed = {Path(name).parts[0] for name in (_marker(result) or {}).get("files", {})}
    return sorted(n for n in os.listdir(result)
                  if n not in RESULT_ENTRIES and n not in listed and not FOLD_ENTRY.fullmatch(n)
                  and not TEMPORARY.fullmatch(n))        # an atomic write's leftover


def refuse_result_folder(out: str | os.PathLike, option: str | None = None) -> None:
    """Refuse an output folder that is itself a sonocad result (a run, an evaluation, a cv): a command that
    only adds files to a folder (dedup, synth --add) must not change a finished result. `option`: the
    option that named it (None: a positional argument)."""
    if state(out) in ("finished", "unfinished"):
        message = f"{out} is a sonocad result folder; write elsewhere"
        raise OptionError(option, message) if option else SonocadError(message)


def refuse_writing_into_runs(out: str | os.PathLike, reading: list, option: str) -> None:
    """Refuse an output path (a file, or a folder a command fills) that is, or lies inside, what the command
    reads (a run, a data folder or manifest, an image; lists of them, None for none), or inside any other
    sonocad result folder, whose files it could replace."""
    out = Path(out).expanduser().resolve()
    flat = [r for item in reading for r in (item if isinstance(item, (list, tuple)) else [item]) if r is not None]
    for run in flat:
        run = Path(run).expanduser().resolve()
        if out == run or run in out.parents:
            raise OptionError(option, f"{out} is inside {run}, which this command reads; write elsewhere")
    for folder in list(out.parents)[:3]:       # a run, a cv fold, or a fold's external evaluation
        if state(folder) in ("finished", "unfinished"):
            raise OptionError(option, f"{out} is inside {folder}, a sonocad result folder; write elsewhere")
