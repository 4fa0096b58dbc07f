"""Tests for the synthetic breast-ultrasound phantom generator."""

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from sonocad.data.synth import make_phantom, write_phantom_set
from sonocad.errors import SonocadError


def _read(path):
    with Image.open(path) as im:
        return im.mode, im.size, np.asarray(im)


def test_layout_counts_and_formats(tmp_path):
    out = tmp_path / "phantoms"
    info = write_phantom_set(out, n=9, seed=1, size=48)
    assert info == {"out": str(out), "n": 9, "n_per_class": {"benign": 5, "malignant": 4}, "written": 18}
    for cls, count in info["n_per_class"].items():
        expected = {f"{cls} ({i}).png" for i in range(1, count + 1)}
        expected |= {f"{cls} ({i})_mask.png" for i in range(1, count + 1)}
        assert {p.name for p in (out / cls).iterdir()} == expected
        for i in range(1, count + 1):
            mode, size, img = _read(out / cls / f"{cls} ({i}).png")
            assert (mode, size, img.dtype) == ("L", (48, 48), np.uint8)
            assert img.std() > 10  # speckled, not flat
            mode, size, mask = _read(out / cls / f"{cls} ({i})_mask.png")
            assert (mode, size) == ("L", (48, 48))
            assert set(np.unique(mask)) == {0, 255}


def test_normal_class_has_empty_masks(tmp_path):
    info = write_phantom_set(tmp_path, n=6, seed=0, size=32, classes=("benign", "malignant", "normal"))
    assert info["n_per_class"] == {"benign": 2, "malignant": 2, "normal": 2}
    assert _read(tmp_path / "normal" / "normal (2)_mask.png")[2].max() == 0


def test_same_seed_same_bytes_different_seed_different_images(tmp_path):
    a = write_phantom_set(tmp_path / "a", n=4, seed=3, size=40)
    write_phantom_set(tmp_path / "b", n=4, seed=3, size=40)
    c = write_phantom_set(tmp_path / "c", n=4, seed=4, size=40)
    files = sorted(p.relative_to(a["out"]) for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 8
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    for rel in files:
        if "_mask" not in rel.name:
            assert not np.array_equal(_read(tmp_path / "a" / rel)[2], _read(tmp_path / "c" / rel)[2])
    assert c["n_per_class"] == {"benign": 2, "malignant": 2}


def test_make_phantom_output():
    for label in ("benign", "malignant"):
        img, mask = make_phantom(label, np.random.default_rng(0), size=64)
        assert img.shape == mask.shape == (64, 64)
        assert img.dtype == mask.dtype == np.uint8
        assert 0.01 < (mask == 255).mean() < 0.4
        # Lesions are hypo- or anechoic.
        assert img[mask == 255].mean() < img[mask == 0].mean()


def _features(img, mask):
    """(bounding-box height/width, mean below the lesion / mean beside it at the same depth)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = y1 - y0 + 1, x1 - x0 + 1
    img = img.astype(float)
    rows = slice(y1 + 3, y1 + 3 + max(h, 8))
    below = img[rows, x0 + w // 4 : x1 + 1 - w // 4]
    left = img[rows, max(0, x0 - w) : max(0, x0 - 3)]
    right = img[rows, x1 + 4 : x1 + 1 + w]
    beside = np.concatenate([left.ravel(), right.ravel()])
    return h / w, below.mean() / beside.mean()


def test_classes_separable_by_hand_crafted_features():
    feats, labels = [], []
    for malignant, label in enumerate(("benign", "malignant")):
        for i in range(30):
            feats.append(_features(*make_phantom(label, np.random.default_rng([7, malignant, i]))))
            labels.append(malignant)
    feats = np.array(feats)
    # Malignant: taller than wide (higher ratio) and posterior shadowing (lower ratio below/beside).
    assert roc_auc_score(labels, feats[:, 0]) > 0.85
    assert roc_auc_score(labels, -feats[:, 1]) > 0.85


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 3},
        {"n": 0},
        {"n": 5, "classes": ("benign", "malignant", "normal")},
        {"n": 2.5},
        {"size": 31},
        {"size": 64.0},
        {"classes": ("benign", "cancer")},
        {"classes": ()},
        {"classes": ("benign", "benign")},
        {"seed": -1},
    ],
)
def test_bad_options_raise(tmp_path, kwargs):
    with pytest.raises(SonocadError) as e:
        write_phantom_set(tmp_path / "out", **kwargs)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_make_phantom_bad_options():
    with pytest.raises(SonocadError):
        make_phantom("cancer", np.random.default_rng(0))
    with pytest.raises(SonocadError):
        make_phantom("benign", np.random.default_rng(0), size=16)


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(SonocadError, match="cannot write phantoms") as e:
            write_phantom_set(out, n=4, size=32)
        assert "\n" not in str(e.value)
