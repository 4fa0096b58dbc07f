"""Decode a scan (PNG, JPEG, BMP, TIFF or DICOM) into an 8-bit grayscale image, once per run.

B-mode ultrasound is grayscale: colour overlays are reduced to luminance, and the model sees the
gray image repeated on its 3 input channels. Only the formats a scanner or an archive exports are decoded
(DECODED_FORMATS, by Pillow, in this process; DICOM by pydicom): anything else, whatever its name, is refused
before a decoder sees it, so no other Pillow plugin (EPS would start Ghostscript) ever runs on input data.
"""
from __future__ import annotations

import contextlib
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MissingExtra, SonocadError
from .overlays import MIN_CLEAN_SIDE, remove_overlays

__all__ = ["MIN_CLEAN_SIDE", "remove_overlays"]

MIN_SIDE = 32
# Found in folders by these suffixes; GIF, WebP and PGM/PPM are then refused by name (no scanner exports them).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm", ".dcm", ".dicom"}
DECODED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")     # Pillow's names; DICOM is read by pydicom
READABLE = "PNG, JPEG, BMP, TIFF or DICOM"
MAX_PIXELS = 64_000_000  # refuse decompression bombs and absurd sizes before decoding
# The heavy steps (overlay cleaning) work on images of at most this many pixels on the longer side; larger ones
# are first reduced to it. Every BUSI and BUS-BRA image is smaller (the widest has 1048 px): their figures stand.
WORK_SIDE = 2048
_REFUSED = ((b"%!PS", "PostScript (EPS)"), (b"\xc5\xd0\xd3\xc6", "PostScript (EPS)"), (b"%PDF", "PDF"),
            (b"GIF8", "GIF"), (b"\x89HDF", "HDF5"), (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "Photoshop (PSD)"))


def _format_of(head: bytes) -> str | None:
    """The name of a format sonocad refuses, from a file's first bytes (None when not recognised)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if len(head) > 2 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3].isspace():
        return "PBM/PGM/PPM"
    if head[4:12] in (b"ftypavif", b"ftypavis", b"ftypheic", b"ftypmif1"):
        return "AVIF/HEIF"
    return next((name for magic, name in _REFUSED if head.startswith(magic)), None)


def _not_readable(head: bytes, name: str) -> SonocadError:
    fmt = _format_of(head)
    if fmt:
        return SonocadError(f"{name}: {fmt} is not a format sonocad reads ({READABLE}); convert it to PNG")
    return SonocadError(f"{name}: not an image ({READABLE})")


@contextlib.contextmanager
def open_image(source, name: str | None = None, max_pixels: int = MAX_PIXELS):
    """Pillow's Image.open restricted to DECODED_FORMATS (header read, pixels not decoded), refusing images over
    `max_pixels`; every problem is a SonocadError naming the file as `name`."""
    name = name or str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=DECODED_FORMATS) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise SonocadError(f"{name}: image of {w}x{h} pixels is over the limit of {max_pixels:,} "
                                       "(possible decompression bomb)")
                yield img
    except UnidentifiedImageError:
        if hasattr(source, "seek"):
            source.seek(0)
            head = source.read(16)
        else:
            with open(source, "rb") as f:
                head = f.read(16)
        raise _not_readable(head, name) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SonocadError(f"{name}: refused as a possible decompression bomb") from None


def _to_gray(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.array(img, dtype=np.float32)      # a writable copy: the steps below work in place
        hi = float(a.max()) if a.size else 0.0
        if img.mode == "F" or hi > 65535:
            lo = float(a.min())
            a -= lo
            a /= max(hi - lo, 1e-6)
            a *= 255.0
        elif hi > 255:
            a /= 257.0   # 16-bit range onto 8-bit, keeping relative gain between images
        a += 0.5
        return Image.fromarray(np.clip(a, 0, 255, out=a).astype(np.uint8))
    if img.mode == "LAB":      # CIE L*a*b*: its lightness band is the gray image
        return img.getchannel(0)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img if img.mode == "L" else img.convert("L")


def _all_finite(img: Image.Image) -> bool:
    """Whether a floating-point image holds no NaN or infinity (checked a band of rows at a time)."""
    w, h = img.size
    step = max(1, (1 << 20) // max(1, w))
    return all(np.isfinite(np.asarray(img.crop((0, r, w, min(r + step, h))))).all() for r in range(0, h, step))


def _reduced(img: Image.Image) -> Image.Image:
    """A decoded image over WORK_SIDE reduced to at most WORK_SIDE px (integer box reduction), a band of about a
    megapixel at a time, so that nothing but the decoded image itself costs a full image's memory. Palette images
    become gray (or RGBA) and 16-bit ones 32-bit, as their gray conversion would. Smaller images: themselves."""
    w, h = img.size
    if max(w, h) <= WORK_SIDE:
        return img
    k = -(-max(w, h) // WORK_SIDE)
    mode = {"1": "L", "P": "RGBA" if "transparency" in img.info else "L", "PA": "RGBA"}.get(img.mode, img.mode)
    mode = "I" if mode.startswith("I;16") else mode          # reduce() does not take 16-bit images
    out = Image.new(mode, (-(-w // k), -(-h // k)))
    rows = k * max(1, (1 << 20) // (w * k))
    for top in range(0, h, rows):
        band = img.crop((0, top, w, min(top + rows, h)))
        out.paste((band if band.mode == mode else band.convert(mode)).reduce(k), (0, top // k))
    return out


_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def _upright(img: Image.Image, working_size: bool) -> Image.Image:
    """`img` turned as its EXIF orientation says (and, with `working_size`, reduced to WORK_SIDE first)."""
    if not working_size or max(img.size) <= WORK_SIDE:
        ImageOps.exif_transpose(img, in_place=True)
        return img
    turn = _ORIENTATION.get(img.getexif().get(0x0112))
    small = _reduced(img)
    return small.transpose(turn) if turn is not None else small


def decode_bytes(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An uploaded file's bytes (an image of DECODED_FORMATS, or DICOM) as an 8-bit gray PIL image of at most
    WORK_SIDE px, decoded in memory; errors name the file as `name`, like load_gray's."""
    import io

    from .dicom import DICOM_SUFFIXES, read_dicom

    if data[128:132] == b"DICM" or name.lower().endswith(tuple(DICOM_SUFFIXES)):
        img = read_dicom(io.BytesIO(data), max_pixels=max_pixels, name=name)
        if min(img.size) < MIN_SIDE:
            raise SonocadError(f"{name}: image is {img.size[0]}x{img.size[1]} px, under the minimum of {MIN_SIDE} px")
        return img
    return _pil_gray(io.BytesIO(data), name, max_pixels)


def load_gray(path: str, max_pixels: int = MAX_PIXELS, working_size: bool = False) -> Image.Image:
    """Open `path` as an 8-bit grayscale PIL image (EXIF rotation applied, first frame only); with
    `working_size`, an image over WORK_SIDE px is reduced to it (which bounds the memory its conversion takes).
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
            return at_working_size(img) if working_size else img
    except SonocadError:
        raise
    except FileNotFoundError:
        raise SonocadError(f"{path}: file not found") from None
    except (IsADirectoryError, PermissionError, OSError) as e:
        raise SonocadError(f"{path}: cannot read ({e.strerror or e})") from None
    return _pil_gray(path, path, max_pixels, working_size)


def _pil_gray(source, path: str, max_pixels: int, working_size: bool = True) -> Image.Image:
    """`source` (a path or a file object) decoded by Pillow; `path` names it in errors."""
    try:
        with open_image(source, path, max_pixels) as img:
            w, h = img.size
            if min(w, h) < MIN_SIDE:
                raise SonocadError(f"{path}: image is {w}x{h} px, under the minimum of {MIN_SIDE} px")
            if working_size and img.format == "JPEG" and max(w, h) > 2 * WORK_SIDE:
                # decoded at 1/2, 1/4 or 1/8 scale, never below WORK_SIDE: only images over the ceiling differ
                scale = WORK_SIDE / max(w, h)
                img.draft(img.mode, (max(1, round(w * scale)), max(1, round(h * scale))))
            img.seek(0)
            img.load()
            if img.mode == "F" and not _all_finite(img):
                raise SonocadError(f"{path}: floating-point image holds NaN or infinite values")
            return _to_gray(_upright(img, working_size))
    except SonocadError:
        raise
    except FileNotFoundError:
        raise SonocadError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SonocadError(f"{path}: is a folder, not an image") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, TypeError, IndexError, KeyError,
            ZeroDivisionError, AttributeError, RuntimeError) as e:
        # PIL reports truncated or corrupt data through many exception types
        raise SonocadError(f"{path}: corrupt or truncated image ({e.__class__.__name__}: {str(e)[:80]})") from None


def at_working_size(img: Image.Image) -> Image.Image:
    """`img` reduced to WORK_SIDE pixels on its longer side when it is larger (aspect ratio kept); else itself."""
    w, h = img.size
    if max(w, h) <= WORK_SIDE:
        return img
    scale = WORK_SIDE / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)


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
    """A decoded gray image as the model takes it: at most WORK_SIDE px, overlays painted over (if asked),
    resized to size x size."""
    img = at_working_size(img)
    return to_square(remove_overlays(img) if clean_overlays else img, size, resize)


def load_square(path: str, size: int, resize: str = "pad", max_pixels: int = MAX_PIXELS,
                clean_overlays: bool = False) -> np.ndarray:
    return square_gray(load_gray(path, max_pixels, working_size=True), size, resize, clean_overlays)


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


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of the image load_gray gives (EXIF rotation applied), from the header where the format
    allows (DICOM: decoded, for its ultrasound region)."""
    from .dicom import is_dicom, split_ref

    file = split_ref(path)[0]
    if is_dicom(file):
        return load_gray(path).size
    try:
        with open_image(file, path) as img:
            w, h = img.size
            return (h, w) if img.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)
    except FileNotFoundError:
        raise SonocadError(f"{path}: file not found") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise SonocadError(f"{path}: corrupt or truncated image ({e.__class__.__name__})") from None


def load_mask(mask_paths, image_path: str, size: int, resize: str = "pad") -> np.ndarray:
    """Union of an image's lesion masks, resized like the image, as a boolean (size, size) array. A mask of
    another size than its image is refused: it cannot be placed on it."""
    from .dicom import is_dicom, split_ref

    file = split_ref(image_path)[0]
    size_of_image = None
    if not is_dicom(file):
        try:
            size_of_image = image_size(file)
        except SonocadError:
            pass       # the image's own problem is reported where it is decoded
    out = np.zeros((size, size), bool)
    for p in mask_paths:
        m = load_gray(p, working_size=True)
        mask_size = image_size(p)                  # its own size, before any reduction to WORK_SIDE
        if size_of_image is not None and mask_size != size_of_image:
            raise SonocadError(f"{p}: mask is {mask_size[0]}x{mask_size[1]} px, its image {file} is "
                               f"{size_of_image[0]}x{size_of_image[1]} px")
        out |= to_square(m, size, resize, resample=Image.NEAREST) > 127
    return out
