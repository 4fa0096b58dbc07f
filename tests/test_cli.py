"""Bad input through the CLI: one line on stderr naming the problem, exit code 2, no traceback."""
import subprocess
import sys

import numpy as np
import pytest
from conftest import one_line_error as _err
from PIL import Image

from sonocad.cli.main import main


def _dataset(root, n=4, size=48):
    for cls in ("benign", "malignant"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (size, size), np.uint8)).save(
                root / cls / f"{cls} ({i}).png")
    return root



@pytest.mark.parametrize("setup,extra,match", [
    (lambda d: (d / "benign" / "benign (0).png").write_bytes(b"garbage"), [], "benign (0).png: not an image"),
    (lambda d: (d / "malignant" / "notes.txt").write_text("hi"), [], "notes.txt: not an image"),
    (lambda d: Image.new("L", (20, 20)).save(d / "benign" / "tiny.png"), [], "tiny.png: image is 20x20"),
    (lambda d: [p.unlink() for p in (d / "malignant").iterdir()], [], "malignant: class folder is empty"),
    (lambda d: None, ["--classes", "benign", "lymphoma"], "lymphoma not found"),
    (lambda d: None, ["--classes", "benign"], "--classes: need at least two classes"),
    (lambda d: None, ["--unfreeze", "some"], "--unfreeze"),
    (lambda d: None, ["--recipe", "fancy"], "unknown recipe"),
    (lambda d: None, ["--model", "no_such_net"], "unknown model"),
    (lambda d: None, ["--test-size", "0.9"], "--test-size"),
    (lambda d: None, ["--batch-size", "x"], "invalid int value"),
])
def test_train_bad_input(tmp_path, capsys, setup, extra, match):
    data = _dataset(tmp_path / "d")
    setup(data)
    err = _err(capsys, ["train", str(data), "--out", str(tmp_path / "run"), "--img-size", "48", *extra])
    assert match in err
    assert not (tmp_path / "run" / "model.safetensors").exists()   # stopped before any training


def test_unwritable_output(tmp_path, capsys):
    data = _dataset(tmp_path / "d")
    (tmp_path / "file").write_text("x")
    err = _err(capsys, ["train", str(data), "--out", str(tmp_path / "file" / "run")])
    assert "--out" in err and "cannot write" in err


def test_skip_bad_warns_and_trains(tmp_path, capsys):
    data = _dataset(tmp_path / "d", n=6)
    (data / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    rc = main(["train", str(data), "--out", str(tmp_path / "run"), "--img-size", "48", "--head-epochs", "1",
               "--unfreeze", "0", "--skip-bad", "--quiet", "--model", "resnet18", "--no-pretrained"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "skipped 1 bad image" in err and "broken.png" in err


def test_manifest_row_pointing_nowhere(tmp_path, capsys):
    _dataset(tmp_path / "d")
    (tmp_path / "m.csv").write_text("path,label\nd/benign/benign (0).png,benign\nd/nothere.png,malignant\n")
    err = _err(capsys, ["train", str(tmp_path / "m.csv"), "--out", str(tmp_path / "run")])
    assert "m.csv:3" in err and "nothere.png does not exist" in err


def test_evaluate_and_predict_bad_run(tmp_path, capsys):
    data = _dataset(tmp_path / "d")
    assert "run directory not found" in _err(capsys, ["evaluate", str(tmp_path / "none"), str(data),
                                                      "--out", str(tmp_path / "e")])
    (tmp_path / "run").mkdir()
    assert "no config.json" in _err(capsys, ["predict", str(tmp_path / "run"), str(data)])


def test_predict_missing_image(tiny_run, tmp_path, capsys):
    assert "no such file or folder" in _err(capsys, ["predict", str(tiny_run), str(tmp_path / "x.png")])


def test_tampered_model_file(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "model.safetensors").write_bytes(b"\x00" * 100)
    err = _err(capsys, ["predict", str(run), str(tmp_path)])
    assert "model.safetensors" in err


def test_module_entry_point_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sonocad", "train", str(tmp_path / "missing"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"sonocad: error: {tmp_path / 'missing'}: no such file or folder"


def test_predict_on_folders(tiny_run, tmp_path, capsys):
    """Folders are searched recursively, in natural order; masks, hidden files and hidden folders and
    non-images are left out; a folder without images is an error."""
    scans = tmp_path / "scans"
    for rel in ("a/scan (2).png", "a/scan (10).png", "a/b/deep.jpg", ".hidden/x.png", "a/.y.png",
                "a/scan (2)_mask.png"):
        (scans / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(len(rel)).integers(0, 255, (50, 60), np.uint8)).save(scans / rel)
    (scans / "a" / "notes.txt").write_text("not a scan")
    assert main(["predict", str(tiny_run), str(scans)]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [str(scans / p) for p in ("a/b/deep.jpg", "a/scan (2).png",
                                                                         "a/scan (10).png")]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert "no images in this folder" in _err(capsys, ["predict", str(tiny_run), str(tmp_path / "empty")])


def test_summary_prints_parameters(capsys):
    import json

    from sonocad.models.classifier import create_model, set_trainable

    model = create_model("tf_efficientnet_lite0", 1, pretrained=False)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert head == 1280 * 256 + 256 + 256 + 1
    top2 = set_trainable(model, "2")["trainable"]
    assert main(["summary", "--model", "tf_efficientnet_lite0", "--batch-size", "8", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["parameters"] == total and s["img_size"] == 224 and s["batch_size"] == 8
    p1, p2 = s["phases"]["phase1_frozen_backbone"], s["phases"]["phase2_top_2_blocks"]
    assert (p1["trainable"], p1["frozen"]) == (head, total - head)
    assert (p2["trainable"], p2["frozen"]) == (top2, total - top2) and head < top2 < total
    assert p1["activation_bytes_fp32"] == 2 * p1["activation_bytes_bf16"] == 4 * 8 * s["activation_elements_per_image"]
    assert main(["summary", "--model", "tf_efficientnet_lite0", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert f"parameters {total:,}" in out and f"trainable {head:,}" in out and f"trainable {top2:,}" in out
    for option, value in (("--batch-size", "0"), ("--batch-size", "-1"), ("--img-size", "5000")):   # as train's
        assert f"{option}: must be between" in _err(capsys, ["summary", option, value])
