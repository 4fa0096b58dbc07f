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


# --- option values and config.json fields ---------------------------------------------------------------------

def _value_options():
    from sonocad.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    return sorted(a.option_strings[0] for a in sub.choices["train"]._actions
                  if a.option_strings and a.nargs != 0 and a.dest not in ("out", "resume", "test_data", "help"))


values = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats().map(repr), st.text(max_size=8),
                   st.sampled_from(["inf", "-inf", "nan", "1e309", "0", "-0", "1", "all", "abc", "", "-1"]))


@SETTINGS
@given(option=st.sampled_from(_value_options()), value=values, extra=st.lists(values, max_size=2))
def test_fuzzed_option_values(option, value, extra):
    """Any value of any option: a one-line error naming it, or a config that validates and survives a
    round trip through config.json."""
    import json

    from sonocad.cli.commands import _config
    from sonocad.cli.main import build_parser
    from sonocad.config import TrainConfig

    try:
        args = build_parser().parse_args(["train", "data", "--out", "o", option, value, *extra])
        cfg = _config(args)
    except SonocadError as e:
        assert "\n" not in str(e)
        return
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).validate()
    assert again == cfg


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                          max_size=2), max_leaves=6)


@SETTINGS
@given(where=st.sampled_from(["config", "top"]), data=st.data(), value=json_values)
def test_fuzzed_config_json(tiny_run, where, data, value):
    """Any value in any field of a run's config.json: a one-line error, or a run whose settings validate."""
    import json
    import tempfile
    from pathlib import Path

    from sonocad.config import RunInfo

    d = json.loads((tiny_run / "config.json").read_text())
    target = d["config"] if where == "config" else d
    target[data.draw(st.sampled_from(sorted(target)))] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(d))
        try:
            info = RunInfo.load(path)
        except SonocadError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            return
        info.config.validate()
        assert isinstance(info.img_size, int) and len(info.mean) == len(info.std) == 3
