"""Decode any PIL-readable image into a square 8-bit grayscale array, once per run.

B-mode ultrasound is grayscale: colour overlays are reduced to luminance, and the model sees the
gray image repeated on its 3 input channels.
"""
from __future__ import annotations

import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MissingExtra, SonocadError

MIN_SIDE = 32
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm", ".dcm", ".dicom"}
MAX_PIXELS = 64_000_000  # refuse decompression bombs and absurd sizes before decoding


def _to_gray(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        hi = float(a.max()) if a.size else 0.0
        if img.mode == "F" or hi > 65535:
            lo = float(a.min())
            a = (a - lo) / max(hi - lo, 1e-6) * 255.0
        elif hi > 255:
            a = a / 257.0   # 16-bit range onto 8-bit, keeping relative gain between images
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "LAB":      # CIE L*a*b*: its lightness band is the gray image
        return img.getchannel(0)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("L")


def decode_bytes(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An uploaded file's bytes (an image PIL reads, or DICOM) as an 8-bit gray PIL image, decoded in memory;
    errors name the file as `name`, like load_gray's."""
    import io

    from .dicom import DICOM_SUFFIXES, read_dicom

    if data[128:132] == b"DICM" or name.lower().endswith(tuple(DICOM_SUFFIXES)):
        img = read_dicom(io.BytesIO(data), max_pixels=max_pixels, name=name)
        if min(img.size) < MIN_SIDE:
            raise SonocadError(f"{name}: image is {img.size[0]}x{img.size[1]} px, under the minimum of {MIN_SIDE} px")
        return img
    return _pil_gray(io.BytesIO(data), name, max_pixels)


def load_gray(path: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open `path` as an 8-bit grayscale PIL image (EXIF rotation applied, first frame only).
    Raises SonocadError with the file name for anything that is not a usable image."""
    from .dicom import is_dicom, read_dicom, split_ref

    file, frame = split_ref(path)
    try:
        mode = os.stat(file).st_mode
        if stat.S_ISDIR(mode):
            raise SonocadError(f"{path}: is a folder, not an image")
        if not stat.S_ISREG(mode):      # a named pipe or a device would block or never end
            raise SonocadError(f"{path}: not a regular file")
        if is_dicom(file):
            img = read_dicom(file, frame or 0, max_pixels=max_pixels)
            if min(img.size) < MIN_SIDE:
                raise SonocadError(f"{path}: image is {img.size[0]}x{img.size[1]} px, under the minimum of "
                                   f"{MIN_SIDE} px")
            return img
    except SonocadError:
        raise
    except FileNotFoundError:
        raise SonocadError(f"{path}: file not found") from None
    except (IsADirectoryError, PermissionError, OSError) as e:
        raise SonocadError(f"{path}: cannot read ({e.strerror or e})") from None
    return _pil_gray(path, path, max_pixels)


def _pil_gray(source, path: str, max_pixels: int) -> Image.Image:
    """`source` (a path or a file object) decoded by PIL; `path` names it in errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise SonocadError(f"{path}: image of {w}x{h} pixels is over the limit of {max_pixels:,} "
                                       "(possible decompression bomb)")
                if min(w, h) < MIN_SIDE:
                    raise SonocadError(f"{path}: image is {w}x{h} px, under the minimum of {MIN_SIDE} px")
                img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_gray(img)
    except SonocadError:
        raise
    except FileNotFoundError:
        raise SonocadError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SonocadError(f"{path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise SonocadError(f"{path}: not an image (or a format PIL cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SonocadError(f"{path}: refused as a possible decompression bomb") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, TypeError, IndexError, KeyError,
            ZeroDivisionError, AttributeError, RuntimeError) as e:
        # PIL reports truncated or corrupt data through many exception types
        raise SonocadError(f"{path}: corrupt or truncated image ({e.__class__.__name__}: {str(e)[:80]})") from None


# Marks are found as strokes thinner than half the window. In images under this size (thumbnails, the
# synthetic phantoms) lesion margins and speckle are that thin too, so they are left alone. Scanner
# frames are larger: every BUSI and BUS-BRA image has a shorter side of 190 px or more.
MIN_CLEAN_SIDE = 160


def _local_median(padded: np.ndarray, rows: np.ndarray, cols: np.ndarray, window: int) -> np.ndarray:
    """Median of the window x window neighbourhood of the given pixels (of the unpadded image)."""
    from numpy.lib.stride_tricks import sliding_window_view

    windows = sliding_window_view(padded, (window, window))[rows, cols]
    return np.median(windows.reshape(len(rows), -1), axis=1)


def remove_overlays(img: Image.Image, window: int = 9, contrast: int = 50, level: int = 150) -> Image.Image:
    """Paint over thin bright marks (calipers, text, markers) with the local median of the tissue around
    them, so a model cannot learn a site's annotations instead of the lesion.

    A pixel is a mark when it is bright (>= level) and much brighter (by `contrast`) than the median of
    its `window` x `window` neighbourhood: strokes thinner than half the window; tissue edges are not.
    Images with a side under MIN_CLEAN_SIDE are returned unchanged. Medians are computed only where needed (bright pixels and the marks' borders): the same result as a
    full median filter (mode 'reflect'), about 20 times faster."""
    from scipy import ndimage

    if min(img.size) < MIN_CLEAN_SIDE:
        return img
    a = np.asarray(img).astype(np.int16)
    padded = np.pad(a, window // 2, mode="symmetric")   # scipy.ndimage's 'reflect'
    rows, cols = np.nonzero(a >= level)
    if not len(rows):
        return img
    hit = a[rows, cols] - _local_median(padded, rows, cols, window) >= contrast
    mask = np.zeros(a.shape, bool)
    mask[rows[hit], cols[hit]] = True
    if not mask.any():
        return img
    rows, cols = np.nonzero(ndimage.binary_dilation(mask, iterations=1))
    out = a.copy()
    out[rows, cols] = _local_median(padded, rows, cols, window)
    return Image.fromarray(out.astype(np.uint8))


def to_square(img: Image.Image, size: int, resize: str = "pad", resample=Image.BILINEAR) -> np.ndarray:
    """Resize to size x size: `pad` keeps the aspect ratio (black letterbox), `stretch` does not."""
    if resize == "stretch":
        return np.asarray(img.resize((size, size), resample, reducing_gap=None))
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(img.resize((nw, nh), resample), ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas)


def from_square(prob: np.ndarray, size: tuple[int, int], resize: str = "pad") -> np.ndarray:
    """The inverse of to_square for a per-pixel probability map (S, S) in [0, 1]: the letterbox cut off and the
    rest resized to the original `size` (width, height); returns the boolean map (height, width) at 0.5."""
    w, h = size
    side = prob.shape[0]
    if resize != "stretch":
        scale = side / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        x0, y0 = (side - nw) // 2, (side - nh) // 2
        prob = prob[y0:y0 + nh, x0:x0 + nw]
    img = Image.fromarray(np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8))
    return np.asarray(img.resize((w, h), Image.BILINEAR)) >= 128


def square_gray(img: Image.Image, size: int, resize: str = "pad", clean_overlays: bool = False) -> np.ndarray:
    """A decoded gray image as the model takes it: overlays painted over (if asked), resized to size x size."""
    return to_square(remove_overlays(img) if clean_overlays else img, size, resize)


def load_square(path: str, size: int, resize: str = "pad", max_pixels: int = MAX_PIXELS,
                clean_overlays: bool = False) -> np.ndarray:
    return square_gray(load_gray(path, max_pixels), size, resize, clean_overlays)


def load_many(paths: list[str], size: int, resize: str = "pad", skip_bad: bool = False,
              threads: int = 2, clean_overlays: bool = False) -> tuple[np.ndarray, list[int], list[str]]:
    """Decode and resize `paths` into a uint8 array (N, size, size).

    Returns (array of the good images, indices of the good ones, one-line problems of the bad ones).
    Without `skip_bad` the first bad image raises SonocadError, so nothing trains on broken data."""
    def one(p):
        try:
            return load_square(p, size, resize, clean_overlays=clean_overlays), None
        except MissingExtra:
            raise               # not a bad image: every file of its kind would fail alike
        except SonocadError as e:
            return None, str(e)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(one, paths))
    problems = [err for _, err in results if err]
    if problems and not skip_bad:
        more = (f" (and {len(problems) - 1} more bad image(s) among the {len(paths)} read; --skip-bad leaves them "
                "out)" if len(problems) > 1 else "")
        raise SonocadError(problems[0] + more)
    good = [i for i, (a, _) in enumerate(results) if a is not None]
    arr = np.stack([results[i][0] for i in good]) if good else np.zeros((0, size, size), np.uint8)
    return arr, good, problems


def load_mask(mask_paths, image_path: str, size: int, resize: str = "pad") -> np.ndarray:
    """Union of an image's lesion masks, resized like the image, as a boolean (size, size) array. A mask of
    another size than its image is refused: it cannot be placed on it."""
    from .dicom import is_dicom, split_ref

    file = split_ref(image_path)[0]
    image_size = None
    if not is_dicom(file):
        try:
            with Image.open(file) as img:
                image_size = img.size
        except (OSError, ValueError, SyntaxError):
            image_size = None       # the image's own problem is reported where it is decoded
    out = np.zeros((size, size), bool)
    for p in mask_paths:
        m = load_gray(p)
        if image_size is not None and m.size != image_size:
            raise SonocadError(f"{p}: mask is {m.size[0]}x{m.size[1]} px, its image {file} is "
                               f"{image_size[0]}x{image_size[1]} px")
        out |= to_square(m, size, resize, resample=Image.NEAREST) > 127
    return out
