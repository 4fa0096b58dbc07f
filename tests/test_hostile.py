"""Hostile input: files that are not what their names say, inputs a command could write over, images made to
exhaust memory. Each case came from trying sonocad as a hostile user would (docs/reliability.md)."""
import io
import os
import stat
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from conftest import one_line_error
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
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)      # Pillow caches whether it found one
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


# --- nothing written over an input or a foreign file --------------------------------------------------------

def test_predict_csv_never_replaces_an_image_or_a_foreign_file(tiny_run, phantoms, tmp_path, capsys):
    typo = tmp_path / "typo"
    typo.mkdir()
    scan1, scan2 = typo / "scan1.png", typo / "scan2.png"
    for dst, src in ((scan1, "benign (1).png"), (scan2, "benign (2).png")):
        dst.write_bytes((phantoms / "benign" / src).read_bytes())
    before = scan1.read_bytes()
    assert "is named like an image" in one_line_error(capsys, ["predict", str(tiny_run), "--csv", str(scan1),
                                                               str(scan2)])
    disguised = tmp_path / "scan.csv"                  # an image given as input and as --csv
    disguised.write_bytes(before)
    err = one_line_error(capsys, ["predict", str(tiny_run), str(disguised), "--csv", str(disguised)])
    assert "is one of the images to predict" in err
    notes = tmp_path / "notes.csv"
    notes.write_text("my notes, not predictions\n")
    assert "is not a predictions CSV" in one_line_error(capsys, ["predict", str(tiny_run), str(scan2), "--csv",
                                                                 str(notes)])
    for target in ("-", f"{tmp_path}/new/", str(typo)):         # standard output, or a folder: not file names
        assert "is not a file name" in one_line_error(capsys, ["predict", str(tiny_run), str(scan2), "--csv", target])
    assert not (tmp_path / "new").exists() and not (tmp_path / "-").exists()
    assert scan1.read_bytes() == before == disguised.read_bytes()
    assert notes.read_text() == "my notes, not predictions\n"
    out = tmp_path / "p.csv"
    for _ in range(2):                                 # an earlier predictions CSV is replaced
        assert main(["predict", str(tiny_run), str(scan2), "--csv", str(out)]) == 0
    assert out.read_text().count("scan2.png") == 1
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    one_line_error(capsys, ["predict", str(tiny_run), str(bad), "--csv", str(tmp_path / "new" / "dir" / "p.csv")])
    assert not (tmp_path / "new").exists()             # a refused command leaves nothing behind


def test_output_folders_are_never_inputs_or_foreign(tiny_run, phantoms, tmp_path, capsys):
    err = one_line_error(capsys, ["evaluate", str(tiny_run), str(phantoms), "--out", str(phantoms / "eval")])
    assert "which this command reads" in err
    err = one_line_error(capsys, ["predict", str(tiny_run), str(phantoms / "benign"), "--heatmaps",
                                  str(phantoms / "benign")])
    assert "which this command reads" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    err = one_line_error(capsys, ["explain", str(tiny_run), str(phantoms / "benign" / "benign (1).png"), "--out",
                                  str(mine)])
    assert "holds files that are not pictures" in err
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    assert not (phantoms / "eval").exists() and not list(phantoms.rglob("*heat*"))


def test_synth_never_writes_over_files(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "benign").mkdir(parents=True)
    real = data / "benign" / "benign (1).png"
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(real)
    before = real.read_bytes()
    assert "already holds files" in one_line_error(capsys, ["synth", str(data), "--n", "4", "--size", "32"])
    assert "exists and is not this phantom" in one_line_error(capsys, ["synth", str(data), "--n", "4", "--size",
                                                                       "32", "--add"])
    assert real.read_bytes() == before and [p.name for p in data.rglob("*") if p.is_file()] == [real.name]
    real.rename(data / "scan.png")
    assert main(["synth", str(data), "--n", "4", "--size", "32", "--add"]) == 0
    assert main(["synth", str(data), "--n", "4", "--size", "32", "--add"]) == 0    # the same phantoms: kept
    assert "8 of their files were there already" in capsys.readouterr().out
    assert (data / "scan.png").read_bytes() == before and len(list(data.rglob("*.png"))) == 9


def test_one_image_is_never_counted_twice(tiny_run, phantoms, tmp_path, capsys):
    """Training data as their own test set, an external site that is the training data, or one folder given twice
    to evaluate: refused before any work."""
    for argv, words in ((["train", str(phantoms), "--test", str(phantoms), "--out", str(tmp_path / "t")],
                         "--test: "), (["cv", str(phantoms), "--external", str(phantoms / "benign" / ".."), "--out",
                                        str(tmp_path / "c"), "--no-dedup"], "--external: "),
                        (["evaluate", str(tiny_run), str(phantoms), str(phantoms), "--out", str(tmp_path / "e")],
                         "48 image(s) already in")):
        err = one_line_error(capsys, argv)
        assert words in err and ("with the" in err or "give each image once" in err), err
    assert list(tmp_path.iterdir()) == []


def test_adding_files_to_a_result_folder_is_refused(tiny_run, phantoms, tmp_path, capsys):
    """dedup --out and synth --add add files to a folder; a finished run is not such a folder."""
    before = sorted(p.name for p in tiny_run.iterdir())
    (tmp_path / "notes.txt").write_text("mine")
    assert "is a file, not a folder" in one_line_error(capsys, ["dedup", str(phantoms), "--out",
                                                                str(tmp_path / "notes.txt")])
    for argv in (["dedup", str(phantoms), "--method", "phash", "--quiet", "--out", str(tiny_run)],
                 ["synth", str(tiny_run), "--n", "4", "--size", "32", "--add"]):
        assert f"{tiny_run} is a sonocad result folder; write elsewhere" in one_line_error(capsys, argv)
    assert sorted(p.name for p in tiny_run.iterdir()) == before


def test_refused_train_leaves_nothing_behind(phantoms, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_class = tmp_path / "one"
    (one_class / "benign").mkdir(parents=True)
    for i in (1, 2, 3):
        (one_class / "benign" / f"{i}.png").write_bytes((phantoms / "benign" / f"benign ({i}).png").read_bytes())
    for data in (empty, one_class):
        one_line_error(capsys, ["train", str(data), "--out", str(tmp_path / "runs" / "a" / "run")])
        assert not (tmp_path / "runs").exists()            # no run folder, no lock file, no parent folders


def test_killed_writers_temporary_files_go_with_the_next_writer(tmp_path):
    from sonocad.io.rundir import RunLock

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "data.json").write_text("{}")             # a training run that started
    leftover = run / "checkpoints" / ".last.pt.k3x_9a2b.tmp"          # what a SIGKILL mid-write leaves
    leftover.write_bytes(b"\0" * 1024)
    (run / "notes.tmp").write_text("the user's")
    other = tmp_path / "other"
    other.mkdir()
    (other / ".x.abcdefgh.tmp").write_text("not sonocad's folder")
    for folder in (run, other):
        with RunLock(folder):
            pass
    assert not leftover.exists() and (run / "notes.tmp").exists() and (other / ".x.abcdefgh.tmp").exists()
    assert not (tmp_path / ".run.lock").exists()


def test_model_weights_follow_the_umask(tmp_path):
    import torch

    from sonocad.models.classifier import save_model

    old = os.umask(0o022)
    try:
        save_model(torch.nn.Linear(2, 2), tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o644


def test_manifest_rows_say_what_is_wrong_with_a_path(tmp_path):
    from sonocad.data import discover

    (tmp_path / "folder").mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone.png")
    for target, why in (("folder", "is a folder, not a file"), ("loop", "is a symbolic link loop"),
                        ("dangling", "is a symbolic link to a missing file"), ("nothere.png", "does not exist")):
        (tmp_path / "m.csv").write_text(f"path,label\n{target},benign\n")
        with pytest.raises(SonocadError, match=f"m.csv:2: image .*{target} {why}"):
            discover(tmp_path / "m.csv")


def test_an_empty_argument_is_refused_not_read_as_the_current_folder(tiny_run, phantoms, tmp_path, capsys,
                                                                      monkeypatch):
    from sonocad.data.discover import image_files

    monkeypatch.chdir(phantoms)              # "" would otherwise be this folder, read whole
    assert "an empty argument was given" in one_line_error(capsys, ["predict", str(tiny_run), ""])
    assert "an empty argument was given" in one_line_error(capsys, ["train", str(phantoms), "--out", ""])
    with pytest.raises(SonocadError, match="an empty path was given"):
        image_files([str(phantoms / "benign"), ""])
