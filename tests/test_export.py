"""ONNX export: one file with the preprocessing contract, the same probabilities under ONNX Runtime, int8."""
import json

import numpy as np
import pytest
from conftest import one_line_error

from sonocad.cli.main import main


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    assert main(["export", str(tiny_run), "--out", str(out / "m.onnx")]) == 0
    assert main(["export", str(tiny_run), "--out", str(out / "m8.onnx"), "--int8"]) == 0
    return out / "m.onnx", out / "m8.onnx"


def test_onnx_runtime_gives_the_pytorch_probabilities(exported, tiny_run, phantoms):
    import onnx

    from sonocad.deploy.predictor import Predictor
    from sonocad.workflows.evaluate import load

    fp32, int8 = exported
    props = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    info = json.loads(props["sonocad_run"])
    assert info["img_size"] == 64 and info["classes"] == ["benign", "malignant"] and "default" in info["thresholds"]
    assert not list(fp32.parent.glob("*.data"))                       # one file, no external data
    paths = [str(p) for p in sorted(phantoms.rglob("*).png"))]
    torch_p = Predictor.load(tiny_run, precision="fp32").predict_proba(paths)     # the run's six views
    onnx_p = load(fp32).predict_proba(paths)
    assert np.abs(torch_p - onnx_p).max() < 1e-3
    one = load(fp32).predict_proba(paths[:1])                          # the batch dimension is dynamic
    assert np.abs(one - onnx_p[:1]).max() < 1e-5
    q = load(int8).predict_proba(paths)
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size and np.abs(q - onnx_p).mean() < 0.05


def test_predict_and_evaluate_with_the_onnx_engine(exported, tiny_run, phantoms, tmp_path, capsys):
    fp32, _ = exported
    capsys.readouterr()
    assert main(["predict", str(fp32), str(phantoms / "benign"), "--csv", str(tmp_path / "o.csv")]) == 0
    # the site notice names the command that adapts it, with the run the file came from (adapt refuses the file)
    assert "sonocad adapt RUN LOCAL_SCANS --out NEW_RUN" in capsys.readouterr().err
    assert main(["predict", str(tiny_run), str(phantoms / "benign"), "--precision", "fp32", "--csv",
                 str(tmp_path / "t.csv")]) == 0
    import csv

    with open(tmp_path / "o.csv") as f, open(tmp_path / "t.csv") as g:
        a, b = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert max(abs(float(r["prob_malignant"]) - float(s["prob_malignant"])) for r, s in zip(a, b)) < 1e-3
    assert main(["evaluate", str(fp32), str(phantoms), "--out", str(tmp_path / "e"), "--engine", "onnx"]) == 0


def test_export_bad_input(exported, tiny_run, phantoms, tmp_path, capsys):
    fp32, _ = exported
    assert "--out: " in one_line_error(capsys, ["export", str(tiny_run), "--out", str(tmp_path / "m.txt")])
    assert "which this command reads" in one_line_error(capsys, ["export", str(tiny_run), "--out",
                                                                 str(tiny_run / "m.onnx")])
    assert "export it first" in one_line_error(capsys, ["predict", str(tiny_run), str(tmp_path), "--engine", "onnx"])
    assert "Grad-CAM needs the PyTorch model" in one_line_error(
        capsys, ["predict", str(fp32), str(tmp_path), "--heatmaps", str(tmp_path / "h")])
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    assert "x.onnx: not a readable ONNX file" in one_line_error(capsys, ["predict", str(tmp_path / "x.onnx"),
                                                                       str(tmp_path)])
    for argv in (["explain", str(fp32), str(phantoms), "--out", str(tmp_path / "e")],
                 ["train", str(phantoms), "--init", str(fp32), "--out", str(tmp_path / "t")],
                 ["adapt", str(fp32), str(phantoms), "--out", str(tmp_path / "a")]):
        assert "m.onnx: an ONNX file holds the model for predict, evaluate and serve only" in one_line_error(capsys,
                                                                                                            argv)


def test_edited_onnx_metadata_is_refused(exported, tmp_path):
    """An input size or a threshold in the metadata that the model cannot have had: refused on loading, never a
    runtime error or every scan called benign."""
    import onnx

    from sonocad.deploy.export import METADATA_KEY, load_onnx
    from sonocad.errors import SonocadError

    for edit, words in ((lambda d: d.update(img_size=d["img_size"] + 32), "px images, its sonocad_run metadata says"),
                        (lambda d: d["thresholds"].update(default=float("nan")), "thresholds: probabilities"),
                        (lambda d: d["thresholds"].update(youden=2.0), "thresholds: probabilities")):
        model = onnx.load(str(exported[0]))
        prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
        info = json.loads(prop.value)
        edit(info)
        prop.value = json.dumps(info)
        onnx.save(model, str(tmp_path / "edited.onnx"))
        with pytest.raises(SonocadError, match=words):
            load_onnx(tmp_path / "edited.onnx")
