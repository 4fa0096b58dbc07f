"""Overlay cleaning: thin bright marks (calipers, text, markers) painted over with the local median of the tissue
around them, so a model cannot learn a site's annotations instead of the lesion.

Medians are computed only where needed (bright pixels and the marks' borders), a band of rows at a time: the
memory it takes is about 10 bytes per pixel of the image plus at most MEDIAN_CHUNK windows (11 MiB), however many
pixels are bright.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# Marks are found as strokes thinner than half the window. In images under this size (thumbnails, the
# synthetic phantoms) lesion margins and speckle are that thin too, so they are left alone. Scanner
# frames are larger: every BUSI and BUS-BRA image has a shorter side of 190 px or more.
MIN_CLEAN_SIDE = 160
MEDIAN_CHUNK = 1 << 16      # pixels whose windows are gathered at once: 65,536 x 81 int16 values, about 10 MiB


def _local_median(padded: np.ndarray, rows: np.ndarray, cols: np.ndarray, window: int) -> np.ndarray:
    """Median of the window x window neighbourhood of the given pixels (of the unpadded image), MEDIAN_CHUNK
    pixels at a time."""
    from numpy.lib.stride_tricks import sliding_window_view

    view = sliding_window_view(padded, (window, window))
    out = np.empty(len(rows), np.float64)
    for start in range(0, len(rows), MEDIAN_CHUNK):
        r, c = rows[start:start + MEDIAN_CHUNK], cols[start:start + MEDIAN_CHUNK]
        out[start:start + len(r)] = np.median(view[r, c].reshape(len(r), -1), axis=1)
    return out


def _bands(shape: tuple[int, int]):
    """Row ranges of at most about MEDIAN_CHUNK pixels each."""
    step = max(1, MEDIAN_CHUNK // max(1, shape[1]))
    for r0 in range(0, shape[0], step):
        yield r0, min(r0 + step, shape[0])


def remove_overlays(img: Image.Image, window: int = 9, contrast: int = 50, level: int = 150) -> Image.Image:
    """Paint over thin bright marks with the local median of the tissue around them.

    A pixel is a mark when it is bright (>= level) and much brighter (by `contrast`) than the median of
    its `window` x `window` neighbourhood: strokes thinner than half the window; tissue edges are not.
    Images with a side under MIN_CLEAN_SIDE are returned unchanged. The same result as a full median filter
    (mode 'reflect') wherever it paints, about 20 times faster."""
    from scipy import ndimage

    if min(img.size) < MIN_CLEAN_SIDE:
        return img
    a = np.asarray(img).astype(np.int16)
    padded = np.pad(a, window // 2, mode="symmetric")   # scipy.ndimage's 'reflect'
    mask = np.zeros(a.shape, bool)
    for r0, r1 in _bands(a.shape):
        rows, cols = np.nonzero(a[r0:r1] >= level)
        if len(rows):
            rows += r0
            mask[rows, cols] = a[rows, cols] - _local_median(padded, rows, cols, window) >= contrast
    if not mask.any():
        return img
    mask = ndimage.binary_dilation(mask, iterations=1)
    out = a.copy()
    for r0, r1 in _bands(a.shape):
        rows, cols = np.nonzero(mask[r0:r1])
        if len(rows):
            rows += r0
            out[rows, cols] = _local_median(padded, rows, cols, window)
    return Image.fromarray(out.astype(np.uint8))
