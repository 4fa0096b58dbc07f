"""What a run is trained (and tested) on, file by file: written when the run starts, compared when it resumes,
so that a resumed run never continues on other data.

>>> record = data_record(task.samples, test_samples)                      # doctest: +SKIP
>>> write_data_record(run / "checkpoints" / "data.json", record)          # doctest: +SKIP
>>> check_same_data(run / "checkpoints" / "data.json", data_record(...))  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from ..data.dicom import split_ref
from ..errors import SonocadError
from ..io.files import atomic_write_text


def size_and_time(path: str) -> tuple[int, int]:
    """Size and modification time (ns) of a sample's file (a cine loop's file for one of its frames)."""
    st = os.stat(split_ref(path)[0])
    return st.st_size, st.st_mtime_ns


def data_record(samples: list, test_samples: list = ()) -> dict:
    """Every sample's row [path, size, modification time, label, group, site] in the order given, and the
    SHA-256 of every file: a copy or a checkout that only changed the files' times is still the same data."""
    digests: dict[str, str | None] = {}

    def rows(ss):
        out = []
        for s in ss:
            path = os.path.abspath(s.path)
            file = split_ref(path)[0]
            if file not in digests:
                digests[file] = _sha256(file)
            out.append([path, *size_and_time(s.path), s.label, s.group, s.site])
        return out

    return {"data": rows(samples), "test": rows(test_samples), "sha256": digests}


def _sha256(file: str) -> str | None:
    """The file's SHA-256; None for what is not a readable regular file (a named pipe would block): decoding
    reports those."""
    try:
        if not stat.S_ISREG(os.stat(file).st_mode):
            return None
        with open(file, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def write_data_record(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record))


def check_same_data(path: Path, record: dict) -> None:
    """Refuse to resume on data that differ from the record the run started with, saying how. A file counts as
    changed when its size or its SHA-256 differs (its modification time, for records without SHA-256)."""
    try:
        old = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return      # runs started before sonocad recorded their data
    except (OSError, ValueError) as e:
        raise SonocadError(f"{path}: damaged record of the run's data ({e.__class__.__name__})") from None
    if not (isinstance(old, dict) and all(isinstance(old.get(k, []), list) for k in ("data", "test"))
            and all(isinstance(r, list) and len(r) == 6 for k in ("data", "test") for r in old.get(k, []))
            and isinstance(old.get("sha256", {}), dict)):
        raise SonocadError(f"{path}: damaged record of the run's data")
    old_digests, digests = old.get("sha256", {}), record.get("sha256", {})

    def changed(p: str, before: list, now: list) -> bool:
        file = split_ref(p)[0]
        if before[0] != now[0]:
            return True
        if old_digests.get(file) and digests.get(file):
            return old_digests[file] != digests[file]
        return before[1] != now[1]

    problems = []
    for part in ("data", "test"):
        before = {r[0]: r[1:] for r in old.get(part, [])}
        now = {r[0]: r[1:] for r in record[part]}
        added, removed = sorted(set(now) - set(before)), sorted(set(before) - set(now))
        edited = sorted(p for p in set(now) & set(before) if changed(p, before[p], now[p]))
        relabelled = sorted(p for p in set(now) & set(before) if now[p][2:] != before[p][2:])
        for what, paths in (("new", added), ("missing", removed), ("changed on disk", edited),
                            ("with another label, group or site", relabelled)):
            if paths:
                problems.append(f"{part}: {len(paths)} image(s) {what} (e.g. {paths[0]})")
    for part in ("data", "test"):
        if not problems and [r[0] for r in old.get(part, [])] != [r[0] for r in record[part]]:
            # the splits are drawn by position: the same images in another order make other splits
            problems.append(f"{part}: the same images in another order (sites or manifest rows reordered)")
    if problems:
        raise SonocadError(f"the data differ from those the run started with: {'; '.join(problems)}; resume "
                           "with the same data, or start a new run")
