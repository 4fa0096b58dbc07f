"""DICOM input: pixel data decoded with pydicom (and the pylibjpeg codecs), cropped to the ultrasound image
area, reduced to 8-bit gray. Nothing from the header other than what shapes the pixels is ever read out:
patient names, ids and dates never reach an output or an error message.

>>> img = read_dicom("exam.dcm")            # a PIL 'L' image: the first frame's ultrasound region   # doctest: +SKIP
>>> n_frames("cine.dcm")                                                                             # doctest: +SKIP
48
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

from ..errors import SonocadError
from ..runtime.extras import install_hint, require

DICOM_SUFFIXES = {".dcm", ".dicom"}
FRAME_SEP = "#frame="    # "cine.dcm#frame=12": one frame of a multi-frame file, as a sample's path
FRAMES = ("first", "middle", "all")
SPATIAL_2D = 0x0001      # RegionSpatialFormat of a 2D (B-mode) region
# transfer syntaxes a sonocad install decodes (pydicom, pylibjpeg, pylibjpeg-libjpeg, -openjpeg, -rle)
TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian", "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian", "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (8-bit)", "1.2.840.10008.1.2.4.51": "JPEG Extended (12-bit)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless", "1.2.840.10008.1.2.4.70": "JPEG Lossless, first-order prediction",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless", "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless", "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless", "1.2.840.10008.1.2.4.202": "HTJ2K Lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K", "1.2.840.10008.1.2.5": "RLE Lossless",
}


def is_dicom(path: str) -> bool:
    """By suffix, or by the 'DICM' mark after the 128-byte preamble."""
    if str(path).lower().endswith(tuple(DICOM_SUFFIXES)):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def frame_ref(path: str, frame: int) -> str:
    return f"{path}{FRAME_SEP}{frame}"


def split_ref(ref: str) -> tuple[str, int | None]:
    """(file, frame) of a sample path: "cine.dcm#frame=12" -> ("cine.dcm", 12); a plain path -> (path, None)."""
    base, sep, k = str(ref).rpartition(FRAME_SEP)
    if sep and k.isdigit() and not os.path.exists(ref):
        return base, int(k)
    return str(ref), None


def frame_refs(path: str, frames: str = "first") -> list[str]:
    """The sample paths of one image file: itself, or for a multi-frame DICOM file its middle frame
    (`middle`) or every frame (`all`)."""
    if frames == "first" or not is_dicom(path):
        return [path]
    n = n_frames(path)
    if n == 1:
        return [path]
    return [frame_ref(path, n // 2)] if frames == "middle" else [frame_ref(path, k) for k in range(n)]


def _dataset(path, header_only: bool = False, name: str | None = None):
    label = name or str(path)
    require("dicom", f"{label}: reading a DICOM file", ("pydicom",))
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, force=False, stop_before_pixels=header_only)
            except InvalidDicomError:
                if not label.lower().endswith(tuple(DICOM_SUFFIXES)):
                    raise
                if hasattr(path, "seek"):
                    path.seek(0)
                ds = pydicom.dcmread(path, force=True, stop_before_pixels=header_only)   # no 128-byte preamble
            if header_only:
                return ds
            ds.get("PixelData")                             # parses up to the pixels: truncation shows here
    except InvalidDicomError:
        raise SonocadError(f"{label}: not a DICOM file") from None
    except Exception as e:
        raise SonocadError(f"{label}: corrupt or truncated DICOM file ({e.__class__.__name__})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise SonocadError(f"{label}: DICOM file holds no pixel data (not an image)")
    return ds


def n_frames(path: str) -> int:
    """Frames in a DICOM file (1 for a single image); a header claiming more frames than the file's bytes can
    hold is refused, before a million frame references are made of a few kilobytes."""
    ds = _dataset(path, header_only=True)
    try:
        n = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1
    uid = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
    try:            # uncompressed: every frame's pixels; encapsulated: at least one 8-byte fragment item each
        per_frame = 8 if uid is not None and uid.is_compressed else (
            int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * max(1, -(-int(ds.BitsAllocated) // 8)))
    except (AttributeError, TypeError, ValueError):
        per_frame = 1
    size = os.path.getsize(path)
    if n * per_frame > size:
        raise SonocadError(f"{path}: its header says {n} frames, more than its {size} bytes can hold")
    return n


def _pixels(ds, path: str, frame: int) -> np.ndarray:
    """One frame's pixels, RGB where the file is in colour (YBR converted), as stored otherwise."""
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
    if uid is not None and uid.is_compressed:
        try:
            available = get_decoder(uid).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise SonocadError(f"{path}: compressed as {uid.name} ({uid}), which this installation cannot decode "
                               f"(the decoders come with {install_hint('dicom')})")
    frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    if not 0 <= frame < frames:
        raise SonocadError(f"{path}: has {frames} frame(s); frame {frame} asked for")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pydicom.pixels import pixel_array

            a = pixel_array(ds, index=frame if frames > 1 else None)
    except Exception as e:
        raise SonocadError(f"{path}: corrupt, truncated or undecodable pixel data ({e.__class__.__name__}: "
                           f"{str(e)[:80]})") from None
    return np.asarray(a)


def _to_uint8(a: np.ndarray, ds, name) -> np.ndarray:
    """Pixels as 8-bit gray, a band of rows at a time (floating-point copies of a band, not of the frame)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    rgb = a.ndim == 3 and a.shape[-1] in (3, 4)           # RGB (pydicom converts YBR to RGB)
    step = max(1, (1 << 20) // max(1, a[0].size))

    def gray(band: np.ndarray) -> np.ndarray:
        if rgb:
            return band[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return band.astype(np.float32)

    bands = [slice(r, r + step) for r in range(0, len(a), step)]
    hi = max((float(gray(a[b]).max(initial=0)) for b in bands), default=0.0)
    lo = min((float(gray(a[b]).min(initial=0)) for b in bands), default=0.0)
    if not (np.isfinite(hi) and np.isfinite(lo)):          # max and min carry any NaN or infinity through
        raise SonocadError(f"{name}: floating-point pixel data holds NaN or infinite values")
    bits = int(ds.get("BitsStored", 8) or 8)
    rescale = hi > 255 or bits > 8
    shift = lo if rescale and ds.get("PixelRepresentation", 0) == 1 else 0.0   # signed: shift to start at 0
    out = np.empty(a.shape[:2], np.uint8)
    for b in bands:
        g = gray(a[b])
        if rescale:
            g = (g - shift) * (255.0 / max(float(2 ** bits - 1), 1.0))
        if photometric == "MONOCHROME1":                 # bright is low: invert
            g = 255.0 - g
        out[b] = np.clip(g + 0.5, 0, 255).astype(np.uint8)
    return out


def ultrasound_region(ds, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the largest 2D region of the Sequence of Ultrasound Regions (0018,6011),
    inclusive, clipped to the image; None without one."""
    best = None
    for item in ds.get("SequenceOfUltrasoundRegions", []) or []:
        try:
            x0, y0 = int(item.RegionLocationMinX0), int(item.RegionLocationMinY0)
            x1, y1 = int(item.RegionLocationMaxX1), int(item.RegionLocationMaxY1)
            spatial = int(item.get("RegionSpatialFormat", SPATIAL_2D))
        except (AttributeError, TypeError, ValueError):
            continue
        h, w = shape
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w - 1, x1), min(h - 1, y1)
        if spatial != SPATIAL_2D or x1 - x0 < 15 or y1 - y0 < 15:
            continue
        if best is None or (x1 - x0) * (y1 - y0) > (best[2] - best[0]) * (best[3] - best[1]):
            best = (x0, y0, x1, y1)
    return best


def read_dicom(path, frame: int = 0, crop: bool = True, max_pixels: int | None = None,
               name: str | None = None) -> Image.Image:
    """Frame `frame` of a DICOM file (a path or a file object; `name` names it in errors) as an 8-bit gray PIL
    image, cropped to its ultrasound region (when the file declares one and `crop`). Frames over `max_pixels`
    are refused before decoding."""
    ds = _dataset(path, name=name)
    path = name or path
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise SonocadError(f"{path}: DICOM image without rows and columns") from None
    if max_pixels and rows * cols > max_pixels:
        raise SonocadError(f"{path}: image of {cols}x{rows} pixels is over the limit of {max_pixels:,}")
    pixels = _pixels(ds, path, frame)
    if pixels.ndim != 2 and not (pixels.ndim == 3 and pixels.shape[-1] in (3, 4)):
        raise SonocadError(f"{path}: DICOM pixel data of shape {pixels.shape} is not one 2D image")
    a = _to_uint8(pixels, ds, path)
    region = ultrasound_region(ds, a.shape) if crop else None
    if region is not None:
        x0, y0, x1, y1 = region
        a = a[y0:y1 + 1, x0:x1 + 1]
    return Image.fromarray(np.ascontiguousarray(a))
