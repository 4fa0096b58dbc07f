"""Image decoding: every PIL mode becomes 8-bit gray; bad files give one-line SonocadErrors."""
import numpy as np
import pytest
from PIL import Image

from sonocad.data.images import load_gray, load_many, to_square
from sonocad.errors import SonocadError


def test_modes_become_gray(tmp_path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))
    cases = {
        "l.png": Image.fromarray(gray),
        "rgb.png": Image.fromarray(np.stack([gray] * 3, -1)),
        "rgba.png": Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)])),
        "p.png": Image.fromarray(gray).convert("P"),
        "i16.png": Image.fromarray(gray.astype(np.uint16) * 257),
        "cmyk.jpg": Image.fromarray(np.stack([gray] * 3, -1)).convert("CMYK"),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = np.asarray(load_gray(str(tmp_path / name)))
        assert out.shape == (48, 64) and out.dtype == np.uint8, name
        assert abs(int(out[0, -1]) - 252) < 12 and int(out[0, 0]) < 12, name


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((40, 80), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_gray(str(tmp_path / "r.jpg")).size == (40, 80)


@pytest.mark.parametrize("content,match", [
    (b"this is not an image", "not an image"),
    (b"", "not an image"),
])
def test_non_images(tmp_path, content, match):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(SonocadError, match=match):
        load_gray(str(tmp_path / "x.png"))


def test_truncated_png(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SonocadError, match="t.png: corrupt or truncated"):
        load_gray(str(tmp_path / "t.png"))


def test_too_small_and_too_large(tmp_path):
    Image.fromarray(np.zeros((20, 100), np.uint8)).save(tmp_path / "s.png")
    with pytest.raises(SonocadError, match="under the minimum of 32 px"):
        load_gray(str(tmp_path / "s.png"))
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(SonocadError, match="over the limit"):
        load_gray(str(tmp_path / "big.png"), max_pixels=10_000)


def test_pad_keeps_aspect_stretch_does_not():
    img = Image.fromarray(np.full((50, 100), 200, np.uint8))
    padded = to_square(img, 64, "pad")
    assert padded.shape == (64, 64) and padded[0].max() == 0 and padded[32].min() == 200
    assert to_square(img, 64, "stretch").min() == 200


def test_load_many_skip_bad(tmp_path):
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"junk")
    paths = [str(tmp_path / "ok.png"), str(tmp_path / "bad.png")]
    with pytest.raises(SonocadError, match="bad.png"):
        load_many(paths, 32)
    arr, good, bad = load_many(paths, 32, skip_bad=True)
    assert arr.shape == (1, 32, 32) and good == [0] and "bad.png" in bad[0]


def test_multi_frame_uses_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((40, 40), v, np.uint8)) for v in (10, 200, 90)]
    frames[0].save(tmp_path / "m.tif", save_all=True, append_images=frames[1:])
    assert np.asarray(load_gray(str(tmp_path / "m.tif"))).mean() == 10


def test_remove_overlays_paints_over_marks_and_equals_a_median_filter():
    from scipy import ndimage

    from sonocad.data.images import remove_overlays

    rng = np.random.default_rng(0)
    a = rng.integers(60, 120, (180, 200)).astype(np.uint8)
    a[40, 20:60] = 250             # a caliper line
    a[10:14, 70:74] = 240          # a marker
    a[140:180, :] = 200            # a broad bright band: tissue, not a mark
    out = np.asarray(remove_overlays(Image.fromarray(a)))
    assert out[40, 20:60].max() < 130 and out[10:14, 70:74].max() < 130
    assert (out[150:180, 10:190] == 200).all()
    small = a[:120, :150].copy()   # thumbnails are left alone
    assert np.array_equal(np.asarray(remove_overlays(Image.fromarray(small))), small)
    # the sparse computation equals a full 9x9 median filter wherever it paints
    full = ndimage.median_filter(a.astype(np.int16), size=9)
    changed = out != a
    assert (out[changed] == full[changed]).all()
