"""Decoded images on disk, for datasets larger than memory: one uint8 file per dataset and input geometry, built
once, reused while its images and settings stay the same, and read a batch at a time.

>>> images, good, problems = cached_images(paths, 224, cache="~/.cache/sonocad/images")   # doctest: +SKIP
>>> batch = np.asarray(images[[3, 17, 42]])          # reads three images, (3, 224, 224) uint8   # doctest: +SKIP

`DiskImages` stands where an in-memory (N, S, S) uint8 array stands elsewhere in sonocad: indexing it with a
slice or an index array gives a view (nothing read); an integer reads one image; `np.asarray(view)` reads the
view's images (os.pread: the page cache holds them, not the process, so its memory stays bounded).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import MissingExtra, SonocadError

VERSION = 1      # of the file's layout and of the decoding; a new one rebuilds every cache


class DiskImages:
    """uint8 images (N, S, S) stored row after row in `path`, seen through `index` (rows of the file)."""

    def __init__(self, path: str | Path, n_rows: int, side: int, index: np.ndarray | None = None):
        self.path, self.n_rows, self.side = str(path), n_rows, side
        self.index = np.arange(n_rows) if index is None else np.asarray(index, np.int64)
        self._fd: tuple[int, int] | None = None      # (pid, file descriptor): reopened after a fork

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.index), self.side, self.side)

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __len__(self) -> int:
        return len(self.index)

    def _descriptor(self) -> int:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
        return self._fd[1]

    def _read(self, rows: np.ndarray) -> np.ndarray:
        size = self.side * self.side
        out = np.empty((len(rows), self.side, self.side), np.uint8)
        fd = self._descriptor()
        for k in np.argsort(rows, kind="stable"):     # in file order: sequential reads where rows are close
            data = os.pread(fd, size, int(rows[k]) * size)
            if len(data) != size:
                raise SonocadError(f"{self.path}: image cache is shorter than it should be; delete it to rebuild")
            out[k] = np.frombuffer(data, np.uint8).reshape(self.side, self.side)
        return out

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._read(self.index[[key]])[0]
        return DiskImages(self.path, self.n_rows, self.side, self.index[key])

    def first_pixel(self, i: int) -> int:
        """The first pixel of image `i` (one byte read)."""
        return os.pread(self._descriptor(), 1, int(self.index[i]) * self.side * self.side)[0]

    def __array__(self, dtype=None, copy=None):
        a = self._read(self.index)
        return a if dtype is None else a.astype(dtype)


def fingerprint(paths: list[str]) -> str:
    """What the images are: every file's name, size and modification time, in order."""
    from .dicom import split_ref

    h = hashlib.sha256()
    for p in paths:
        st = os.stat(split_ref(p)[0])
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_name(paths: list[str], settings: dict) -> str:
    """One name per dataset (its files, in order) and input geometry (`settings`)."""
    key = json.dumps({"paths": [os.path.abspath(p) for p in paths], "settings": settings, "version": VERSION},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def build_or_reuse(folder: str | Path, name: str, paths: list[str], side: int,
                   decode: Callable[[list[int]], list[tuple[np.ndarray | None, str | None]]],
                   chunk: int = 256, n: int | None = None) -> tuple[DiskImages, list[int], list[str], bool]:
    """(images, indices of the items stored, problems of the others, whether it was built now) of the cache
    `folder/name`: reused when its fingerprint matches the files `paths`, else built by `decode` (a chunk of item
    indices -> one (array or None, problem or None) per item; `n` items, default one per path), written chunk by
    chunk, swapped in when complete."""
    folder = Path(folder).expanduser()
    data, meta_path = folder / f"{name}.u8", folder / f"{name}.json"
    want = fingerprint(paths)
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == want and meta.get("side") == side and data.stat().st_size == \
                len(meta["good"]) * side * side:
            return DiskImages(data, len(meta["good"]), side), meta["good"], meta["problems"], False
    except (OSError, ValueError, KeyError, TypeError):
        pass                    # no cache yet, or a damaged one: build it
    folder.mkdir(parents=True, exist_ok=True)
    good, problems = [], []
    tmp = data.with_name(f"{data.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            n = len(paths) if n is None else n
            for start in range(0, n, chunk):
                ids = list(range(start, min(start + chunk, n)))
                for i, (a, problem) in zip(ids, decode(ids)):
                    if a is None:
                        problems.append(problem)
                        continue
                    f.write(np.ascontiguousarray(a, np.uint8).tobytes())
                    good.append(i)
        os.replace(tmp, data)
    finally:
        tmp.unlink(missing_ok=True)
    meta_tmp = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
    meta_tmp.write_text(json.dumps({"fingerprint": want, "side": side, "good": good, "problems": problems}))
    os.replace(meta_tmp, meta_path)
    return DiskImages(data, len(good), side), good, problems, True


UNKNOWN = 2       # a mask row filled with it: no mask known for that image (mask pixels are 0 or 1)
AUTO_DISK_BYTES = 2 * 2**30


def cached_images(paths: list[str], size: int, resize: str = "pad", skip_bad: bool = False,
                  clean_overlays: bool = False, folder: str | Path | None = None,
                  threads: int = 2) -> tuple[DiskImages, list[int], list[str]]:
    """load_many through the on-disk cache: (images, indices of the good paths, problems of the bad ones).
    Without `skip_bad` the first bad image raises SonocadError (and nothing is cached)."""
    from concurrent.futures import ThreadPoolExecutor

    from .images import load_square

    def one(i):
        try:
            return load_square(paths[i], size, resize, clean_overlays=clean_overlays), None
        except SonocadError as e:
            if not skip_bad or isinstance(e, MissingExtra):
                raise
            return None, str(e)

    def decode(ids):
        with ThreadPoolExecutor(max(1, threads)) as pool:
            return list(pool.map(one, ids))

    name = cache_name(paths, {"size": size, "resize": resize, "clean_overlays": clean_overlays})
    images, good, problems, _ = build_or_reuse(folder or default_folder(), name, paths, size, decode)
    if problems and not skip_bad:      # a cache built with --skip-bad, read without it
        raise SonocadError(problems[0] + (f" (and {len(problems) - 1} more; --skip-bad leaves them out)"
                                          if len(problems) > 1 else ""))
    return images, good, problems


def cached_masks(samples: list, size: int, resize: str, skip_bad: bool = False,
                 folder: str | Path | None = None) -> tuple[DiskImages, np.ndarray, list[str]]:
    """decode_masks through the on-disk cache: (masks (N, S, S) of 0/1, which are known, problems)."""
    from .images import load_mask

    problems: list[str] = []

    def decode(ids):
        out = []
        for i in ids:
            s = samples[i]
            m = np.full((size, size), UNKNOWN, np.uint8)
            if s.masks:
                try:
                    m = load_mask(s.masks, s.path, size, resize).astype(np.uint8)
                except SonocadError as e:
                    if not skip_bad:
                        raise
                    problems.append(f"{e} (its image trains without a mask)")
            out.append((m, None))
        return out

    files = [p for s in samples for p in (s.path, *s.masks)]
    name = cache_name(files, {"size": size, "resize": resize, "masks": True})
    masks, _, _, _ = build_or_reuse(folder or default_folder(), name, files, size, decode, n=len(samples))
    known = np.asarray([masks.first_pixel(i) != UNKNOWN for i in range(len(masks))], bool)
    return masks, known, problems


def default_folder() -> Path:
    return Path(os.environ.get("SONOCAD_CACHE", "~/.cache/sonocad")).expanduser() / "images"
