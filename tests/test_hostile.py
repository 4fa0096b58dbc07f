"""Hostile input: files that are not what their names say, inputs a command could write over, images made to
exhaust memory. Each case came from trying sonocad as a hostile user would (docs/reliability.md)."""
import io
import os
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from sonocad.cli.main import main
from sonocad.data.images import WORK_SIDE, decode_bytes, load_gray, load_square
from sonocad.errors import SonocadError

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n"
       b"newpath 10 10 moveto 90 90 lineto stroke\nshowpage\n")


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A `gs` first on PATH that records every start in a file (and fails, as a broken Ghostscript would)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "gs-started.log"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> '{log}'\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_eps_named_png_never_reaches_ghostscript(fake_ghostscript, tiny_run, tmp_path, capsys):
    with pytest.raises(Exception):                   # the control: Pillow alone does start gs on this file
        with Image.open(io.BytesIO(EPS)) as img:
            img.load()
    assert fake_ghostscript.exists()
    fake_ghostscript.unlink()
    scan = tmp_path / "scan.png"
    scan.write_bytes(EPS)
    for decode in (lambda: load_gray(str(scan)), lambda: decode_bytes(EPS, "scan.png")):
        with pytest.raises(SonocadError, match=r"scan.png: PostScript \(EPS\) is not a format sonocad reads"):
            decode()
    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 48), 90, np.uint8)).save(good)
    assert main(["predict", str(tiny_run), str(scan), str(good), "--skip-bad"]) == 0
    printed = capsys.readouterr()
    assert "good.png" in printed.out and "scan.png: PostScript" in printed.err and "Traceback" not in printed.err
    assert not fake_ghostscript.exists()


@pytest.mark.parametrize("fmt,name", [("GIF", "GIF"), ("WEBP", "WebP"), ("PPM", "PBM/PGM/PPM")])
def test_formats_no_scanner_exports_are_refused_by_name(tmp_path, fmt, name):
    path = tmp_path / "scan.png"
    Image.fromarray(np.full((40, 48), 90, np.uint8)).save(path, fmt)
    with pytest.raises(SonocadError, match=f"scan.png: {name} is not a format sonocad reads.*convert it to PNG"):
        load_gray(str(path))


def test_float_images_with_nan_or_inf_are_refused(tmp_path):
    a = np.linspace(0, 1, 40 * 48, dtype=np.float32).reshape(40, 48)
    Image.fromarray(a).save(tmp_path / "ok.tif")
    assert np.asarray(load_gray(str(tmp_path / "ok.tif"))).max() == 255
    for bad in (np.nan, np.inf, -np.inf):
        b = a.copy()
        b[39, 47] = bad
        Image.fromarray(b).save(tmp_path / "bad.tif")
        with pytest.raises(SonocadError, match="bad.tif: floating-point image holds NaN or infinite values"):
            load_gray(str(tmp_path / "bad.tif"))


# --- bounded memory ---------------------------------------------------------------------------------------

def _median_then(img, window=9, contrast=50, level=150):
    """remove_overlays as it was before the median worked in chunks (the reference it must equal)."""
    from numpy.lib.stride_tricks import sliding_window_view
    from scipy import ndimage

    def local_median(padded, rows, cols):
        windows = sliding_window_view(padded, (window, window))[rows, cols]
        return np.median(windows.reshape(len(rows), -1), axis=1)

    if min(img.size) < 160:
        return img
    a = np.asarray(img).astype(np.int16)
    padded = np.pad(a, window // 2, mode="symmetric")
    rows, cols = np.nonzero(a >= level)
    if not len(rows):
        return img
    hit = a[rows, cols] - local_median(padded, rows, cols) >= contrast
    mask = np.zeros(a.shape, bool)
    mask[rows[hit], cols[hit]] = True
    if not mask.any():
        return img
    rows, cols = np.nonzero(ndimage.binary_dilation(mask, iterations=1))
    out = a.copy()
    out[rows, cols] = local_median(padded, rows, cols)
    return Image.fromarray(out.astype(np.uint8))


@pytest.mark.parametrize("chunk", [97, 1 << 16])
def test_chunked_median_equals_the_original(monkeypatch, chunk):
    from sonocad.data import overlays

    monkeypatch.setattr(overlays, "MEDIAN_CHUNK", chunk)       # 97: many chunks and bands of one row
    rng = np.random.default_rng(chunk)
    for k, bright in enumerate((0.0, 0.02, 0.3, 0.9)):
        a = rng.integers(0, 150, (170 + 13 * k, 201 + 7 * k)).astype(np.uint8)
        marks = rng.random(a.shape) < bright
        a[marks] = rng.integers(150, 256, int(marks.sum()))
        a[20, 10:90] = 255                                       # a caliper line
        img = Image.fromarray(a)
        assert np.array_equal(np.asarray(overlays.remove_overlays(img)), np.asarray(_median_then(img))), bright


def test_overlay_cleaning_memory_is_bounded():
    from sonocad.data.overlays import remove_overlays

    white = Image.new("L", (1024, 1024), 255)      # every pixel bright: the unchunked median took 325 MB here
    tracemalloc.start()
    try:
        remove_overlays(white)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 * 2**20, f"{peak / 2**20:.0f} MiB"


def white_png(side: int) -> bytes:
    """An all-white 8-bit gray PNG of side x side pixels, written row by row (a few tens of kB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" + b"\xff" * side
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_a_64_megapixel_white_png_is_decoded_at_the_working_size(tmp_path):
    path = tmp_path / "white.png"
    path.write_bytes(white_png(7990))                # 63.8 megapixels: under the 64-megapixel limit
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    try:
        square = load_square(str(path), 64, clean_overlays=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert square.shape == (64, 64) and square.min() == 255
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"          # it asked for 9.6 GiB before the ceiling
    assert max(load_gray(str(path), working_size=True).size) <= WORK_SIDE
