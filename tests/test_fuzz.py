"""Property-based: random and corrupted bytes and malformed CSVs give only the documented errors."""
import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sonocad.data import discover
from sonocad.data.images import load_gray
from sonocad.errors import SonocadError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _png_bytes(fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48), np.uint8)).save(buf, fmt)
    return buf.getvalue()


PNG, JPEG = _png_bytes("PNG"), _png_bytes("JPEG")


def _check_image(path, data):
    path.write_bytes(data)
    try:
        img = load_gray(str(path))
    except SonocadError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    else:
        assert img.mode == "L" and min(img.size) >= 32


@SETTINGS
@given(data=st.binary(max_size=2048))
def test_random_bytes(tmp_path, data):
    _check_image(tmp_path / "x.png", data)


@SETTINGS
@given(base=st.sampled_from([PNG, JPEG]), cut=st.integers(0, 2000),
       flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8))
def test_corrupted_images(tmp_path, base, cut, flips):
    data = bytearray(base[: max(8, len(base) - cut)])
    for pos, val in flips:
        data[pos % len(data)] = val
    _check_image(tmp_path / "x.img", bytes(data))


cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@SETTINGS
@given(header=st.lists(st.sampled_from(["path", "label", "group", "mask", "site", "x", ""]), max_size=5),
       rows=st.lists(st.lists(cells, max_size=5), max_size=6), raw=st.binary(max_size=64))
def test_malformed_manifests(tmp_path, header, rows, raw):
    (tmp_path / "a.png").write_bytes(PNG)
    text = ",".join(header) + "\n" + "\n".join(",".join(r) for r in rows)
    for content in (text.encode("utf-8", "surrogatepass"), raw):
        (tmp_path / "m.csv").write_bytes(content)
        try:
            samples = discover(tmp_path / "m.csv")
        except SonocadError as e:
            assert "\n" not in str(e)
        else:
            assert all(s.path and s.label for s in samples)
