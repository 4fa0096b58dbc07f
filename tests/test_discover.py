"""Dataset layouts: class folders with BUSI mask pairing, CSV manifests, BUS-BRA, class selection."""
import numpy as np
import pytest
from conftest import BUSBRA, BUSI, need
from PIL import Image

from sonocad.data import discover, resolve_classes
from sonocad.errors import OptionError, SonocadError


def _png(path, size=(40, 48), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)
    return path


@pytest.fixture
def busi_like(tmp_path):
    for cls in ("benign", "malignant", "normal"):
        for i in (1, 2, 10):
            _png(tmp_path / cls / f"{cls} ({i}).png")
            _png(tmp_path / cls / f"{cls} ({i})_mask.png", value=255)
    _png(tmp_path / "benign" / "benign (2)_mask_1.png", value=255)
    return tmp_path


def test_busi_masks_are_paired_not_samples(busi_like):
    samples = discover(busi_like)
    assert len(samples) == 9
    assert not any("_mask" in s.path.rsplit("/", 1)[1] for s in samples)
    by_name = {s.path.rsplit("/", 1)[1]: s for s in samples}
    assert [m.rsplit("/", 1)[1] for m in by_name["benign (2).png"].masks] == ["benign (2)_mask.png",
                                                                               "benign (2)_mask_1.png"]
    # natural order: (1), (2), (10)
    assert [s.path.rsplit("/", 1)[1] for s in samples if s.label == "benign"] == \
        ["benign (1).png", "benign (2).png", "benign (10).png"]


def test_class_selection_drops_normal_and_puts_positive_last(busi_like):
    samples = discover(busi_like, ["malignant", "benign"])
    assert {s.label for s in samples} == {"benign", "malignant"}
    assert resolve_classes(samples, ["malignant", "benign"], None) == (["benign", "malignant"], "malignant")
    assert resolve_classes(samples, None, "benign") == (["malignant", "benign"], "benign")


def test_unknown_class_and_single_class(busi_like):
    with pytest.raises(SonocadError, match=r"lymphoma not found in .* \(it has: benign, malignant, normal\)"):
        discover(busi_like, ["benign", "lymphoma"])       # every class folder named, not only those asked for
    with pytest.raises(SonocadError, match="at least two classes"):
        resolve_classes(discover(busi_like, ["benign"]), ["benign"], None)
    # a library caller reads the option's name, not a command-line flag it never passed
    with pytest.raises(OptionError, match="^positive: 'normal' is not one of the classes") as e:
        resolve_classes(discover(busi_like, ["benign", "malignant"]), None, "normal")
    assert e.value.option == "positive" and e.value.flag == "--positive"


def test_empty_class_folder_and_orphan_mask(tmp_path):
    _png(tmp_path / "benign" / "a.png")
    (tmp_path / "malignant").mkdir()
    with pytest.raises(SonocadError, match="malignant: class folder is empty"):
        discover(tmp_path)
    _png(tmp_path / "malignant" / "b_mask.png")
    with pytest.raises(SonocadError, match="b_mask.png: mask file has no image"):
        discover(tmp_path)


def test_manifest_relative_paths_groups_masks(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    _png(tmp_path / "img" / "b_m.png")
    (tmp_path / "m.csv").write_text("path,label,group,mask\nimg/a.png,benign,p1,\nimg/b.png,malignant,p1,img/b_m.png\n")
    samples = discover(tmp_path / "m.csv")
    assert [s.label for s in samples] == ["benign", "malignant"]
    assert samples[0].path == str(tmp_path / "img" / "a.png")
    assert samples[1].group == "p1" and samples[1].masks == (str(tmp_path / "img" / "b_m.png"),)


@pytest.mark.parametrize("text,match", [
    ("file,label\nimg/a.png,benign\n", "needs columns path,label"),
    ("path,label\n", "no rows"),
    ("path,label\nimg/nothere.png,benign\n", r"m.csv:2: image .*nothere.png does not exist"),
    ("path,label\nimg/a.png,\n", r"m.csv:2: row needs a path and a label"),
    ("path,label,mask\nimg/a.png,benign,nomask.png\n", r"mask .*nomask.png does not exist"),
    ("path,label,Label\nimg/a.png,benign,malignant\n", "column 'label' appears more than once"),
    ('path,label\n"img/a\nb.png",benign\n', r"m.csv:2: image .*a\\nb.png does not exist"),   # not img/ab.png
])
def test_bad_manifests(tmp_path, text, match):
    _png(tmp_path / "img" / "a.png")
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(SonocadError, match=match):
        discover(tmp_path / "m.csv")


def test_binary_manifest_file_is_refused(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    with pytest.raises(SonocadError, match="UTF-8"):
        discover(tmp_path / "m.csv")


def test_missing_path():
    with pytest.raises(SonocadError, match="no such file or folder"):
        discover("/nonexistent/data")


def test_real_busi_layout():
    samples = discover(need(BUSI), ["benign", "malignant"])
    assert len(samples) == 647
    assert sum(s.label == "benign" for s in samples) == 437
    assert all(s.masks for s in samples)
    # extra masks: 16 benign images and 1 malignant image, 18 extra mask files ("benign (195)" has two)
    assert sum(len(s.masks) > 1 for s in samples) == 17
    assert sum(len(s.masks) - 1 for s in samples) == 18


@pytest.mark.parametrize("row,match", [
    (b"bus_0001-l\n", r"bus_data.csv:3: row needs an ID, a Case and a Pathology"),
    (b"bus_0001-l,1,b\xe9nign,4\n", "bus_data.csv: not a UTF-8 text CSV file"),
    (b"bus_0001-l,1,malignant,4\n", r"bus_data.csv:3: image bus_0001-l is listed twice \(rows 2 and 3\)"),
])
def test_bad_busbra_tables(tmp_path, row, match):
    _png(tmp_path / "Images" / "bus_0001-l.png")
    (tmp_path / "bus_data.csv").write_bytes(b"ID,Case,Pathology,BIRADS\nbus_0001-l,1,benign,3\n" + row)
    with pytest.raises(SonocadError, match=match):
        discover(tmp_path, ["benign", "malignant"])


def test_real_busbra_layout_groups_patients():
    samples = discover(need(BUSBRA), ["benign", "malignant"])
    assert len(samples) == 761
    assert sum(s.label == "malignant" for s in samples) == 247
    assert len({s.group for s in samples}) == 425
    assert all(s.masks for s in samples)
