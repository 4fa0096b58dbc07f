"""Grad-CAM: the closed form against autograd, the randomisation check, explain and predict --heatmaps."""
import csv
import json

import numpy as np
import pytest
import torch
from conftest import one_line_error
from PIL import Image

from sonocad.analysis.explain import gradcam, lesion_agreement
from sonocad.cli.main import main
from sonocad.errors import SonocadError
from sonocad.models.classifier import create_model


def _models():
    torch.manual_seed(0)
    binary = create_model("resnet18", 1, pretrained=False).eval()
    multi = create_model("tf_efficientnet_lite0", 3, pretrained=False, hidden=32).eval()
    for m in (binary, multi):           # a head with some negative pre-activations, so the ReLU gate matters
        torch.nn.init.normal_(m.head[0].bias, 0, 0.5)
    return binary, multi


@pytest.mark.parametrize("which,target", [("binary", "positive"), ("binary", "other"), ("multi", 2),
                                          ("multi", [0, 1, 2, 1]), ("multi", "predicted")])
def test_closed_form_equals_autograd(which, target):
    binary, multi = _models()
    model = binary if which == "binary" else multi
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    closed, logits_c = gradcam(model, x, target, method="closed", relu=False)
    auto, logits_a = gradcam(model, x, target, method="autograd", relu=False)
    assert closed.shape == auto.shape == (4, 2, 2) and closed.abs().sum() > 0
    torch.testing.assert_close(closed, auto, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits_c, logits_a)


def test_both_classes_of_a_binary_model_are_explained():
    """The trap of targets=None: index 0 of one logit is always the positive class; 'other' negates it."""
    binary, _ = _models()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    pos, _ = gradcam(binary, x, "positive", relu=False)
    other, _ = gradcam(binary, x, "other", relu=False)
    torch.testing.assert_close(other, -pos)          # the other class's evidence is the positive's, negated
    assert pos.abs().sum() > 0
    with pytest.raises(SonocadError, match="positive' or 'other"):
        gradcam(binary, x, 1)


def test_closed_form_on_a_folded_trained_run(tiny_run, phantoms):
    from sonocad.deploy.predictor import Predictor

    p = Predictor.load(tiny_run)
    model, pipeline = p.members[0]
    x = pipeline(p.decode([str(f) for f in sorted(phantoms.glob("malignant/*).png"))[:4]])[0])
    closed, _ = gradcam(model, x, method="closed", relu=False)
    auto, _ = gradcam(model, x, method="autograd", relu=False)
    torch.testing.assert_close(closed, auto, rtol=1e-3, atol=1e-5)


def test_agreement_measures():
    cams = np.zeros((2, 32, 32), np.float32)
    cams[0, 10, 10] = 1.0                       # on the lesion
    cams[1, 30, 30] = 1.0                       # far from it
    masks = np.zeros((2, 32, 32), bool)
    masks[:, 8:13, 8:13] = True
    a = lesion_agreement(cams, masks)
    assert a["hit"].tolist() == [1, 0] and a["energy"].tolist() == [1, 0]
    assert a["chance_energy"] == pytest.approx([25 / 1024] * 2) and (a["chance_hit"] > a["chance_energy"]).all()


def test_explain_predict_heatmaps_and_evaluate(tiny_run, phantoms, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["explain", str(tiny_run), str(phantoms / "malignant"), "--out", str(out)]) == 0
    assert "pointing game" in capsys.readouterr().out
    with open(out / "explanations.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and all((out / r["heatmap"]).is_file() for r in rows)
    assert all(r["pointing_hit"] in ("0", "1") for r in rows)            # the masks beside the images were found
    img = Image.open(out / rows[0]["heatmap"])
    assert img.mode == "RGB" and img.width == 2 * 64
    assert main(["explain", str(tiny_run), str(phantoms / "benign" / "benign (1).png"), "--out",
                 str(tmp_path / "o"), "--target", "benign"]) == 0
    heat = tmp_path / "h"
    assert main(["predict", str(tiny_run), str(phantoms / "benign"), "--heatmaps", str(heat), "--csv",
                 str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv") as f:
        pred = list(csv.DictReader(f))
    assert len(pred) == 24 and all((heat / r["heatmap"]).is_file() for r in pred)
    assert main(["evaluate", str(tiny_run), str(phantoms), "--out", str(tmp_path / "e")]) == 0
    e = json.loads((tmp_path / "e" / "metrics.json").read_text())["explanation"]
    assert e["n"] == 48 and set(e["per_class"]) == {"benign", "malignant"}
    assert 0 <= e["pointing_game"] <= 1 and 0 < e["energy_in_mask_chance"] < e["pointing_game_chance"] < 1
    assert e["pointing_game_ci"][0] <= e["pointing_game"] <= e["pointing_game_ci"][1]
    report = (tiny_run / "report.html").read_text()
    assert "Where the model looked" in report and json.loads((tiny_run / "metrics.json").read_text())["explanation"]


def test_explain_on_a_multiclass_run(tmp_path):
    from sonocad.data.synth import write_phantom_set
    from sonocad.workflows.train import fit

    write_phantom_set(tmp_path / "d", n=24, seed=5, size=64, classes=("benign", "malignant", "normal"))
    fit(tmp_path / "d", tmp_path / "r", img_size=64, head_epochs=2, unfreeze="0", batch_size=8, dedup=False,
        progress=False)
    for target in ("default", "normal"):
        assert main(["explain", str(tmp_path / "r"), str(tmp_path / "d" / "normal"), "--out",
                     str(tmp_path / f"x-{target}"), "--target", target]) == 0
        assert len(list((tmp_path / f"x-{target}").glob("*.png"))) == 8


def test_explain_bad_inputs(tiny_run, phantoms, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.open(phantoms / "benign" / "benign (1).png").save(scans / "a.png")          # no mask: no outline
    assert main(["explain", str(tiny_run), str(scans), "--out", str(tmp_path / "o1")]) == 0
    with open(tmp_path / "o1" / "explanations.csv") as f:
        assert next(csv.DictReader(f))["pointing_hit"] == ""
    Image.new("L", (30, 50)).resize((100, 100)).save(scans / "a_mask.png")             # a mask of another size
    err = one_line_error(capsys, ["explain", str(tiny_run), str(scans), "--out", str(tmp_path / "o2")])
    assert "a_mask.png: mask is 100x100 px, its image" in err
    (scans / "a_mask.png").unlink()
    (scans / "b.png").write_bytes(b"not an image")
    assert "b.png: not an image" in one_line_error(capsys, ["explain", str(tiny_run), str(scans), "--out",
                                                            str(tmp_path / "o3")])
    assert main(["explain", str(tiny_run), str(scans), "--out", str(tmp_path / "o4"), "--skip-bad"]) == 0
    assert "b.png" in capsys.readouterr().err
    assert "--target: 'cyst' is not one of the classes" in one_line_error(
        capsys, ["explain", str(tiny_run), str(scans / "a.png"), "--out", str(tmp_path / "o5"), "--target", "cyst"])
    assert "which this command reads" in one_line_error(
        capsys, ["explain", str(tiny_run), str(scans / "a.png"), "--out", str(tiny_run / "x")])
