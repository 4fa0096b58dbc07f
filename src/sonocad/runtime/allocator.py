"""The C allocator's settings for CNN work on a CPU (kept free of torch: every sonocad command runs it)."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys


def tune_allocator() -> bool:
    """Keep freed memory for reuse instead of handing large blocks back to the kernel (glibc only).

    By default glibc serves every allocation above its mmap threshold (128 KiB, rising to 32 MiB at
    most) with a fresh mmap and unmaps it when freed, so each batch's activation maps are new pages
    that the kernel must fault in and zero again. On 2 cores that doubles CNN inference time (measured:
    ~100 against ~200 img/s, docs/performance.md). This turns mmap off for the heap and raises the
    trim threshold to 1 GiB. Called by the `sonocad` command; call it yourself first in a notebook.
    Returns whether the settings took effect (False off glibc, e.g. macOS or Windows)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):    # musl and other libcs have no mallopt
        return False
