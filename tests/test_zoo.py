"""The shipped base model: found by name, whole, small, documented, and usable with no training."""
import csv
import io
from pathlib import Path

import numpy as np
from conftest import BUSI, need, one_line_error
from PIL import Image

from sonocad import zoo
from sonocad.cli.main import main
from sonocad.deploy.predictor import Predictor
from sonocad.io.rundir import check_finished, kind

BASE = zoo.HERE / "bus-base" / zoo.versions("bus-base")[-1]


def test_bus_base_is_shipped_whole_and_small():
    assert "bus-base" in zoo.names() and "bus-base@1" in zoo.names() and zoo.resolve("bus-base") == BASE
    assert kind(BASE) == "train" and set(check_finished(BASE)) >= {"config.json", "model.safetensors", "MODEL_CARD.md"}
    assert sum(f.stat().st_size for f in BASE.iterdir()) <= 10 * 2**20
    card = (BASE / "MODEL_CARD.md").read_text()
    assert "not a diagnostic device" in card and "Al-Dhabyani" in card and "Gómez-Flores" in card
    assert "scripts/train_bus_base.py" in card


def test_a_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bus-base").mkdir()
    assert zoo.resolve("bus-base") == Path("bus-base")          # the folder here, not the shipped one
    assert zoo.resolve("no-such-model") == Path("no-such-model")


def test_predict_with_bus_base_needs_no_training(phantoms, capsys, tmp_path):
    image = phantoms / "malignant" / "malignant (1).png"
    assert main(["predict", "bus-base", str(image)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["prob_malignant"]) <= 1.0
    model = Predictor.load("bus-base")
    assert model.classes == ["benign", "malignant"] and model.info.img_size == 224
    assert model.info.operating_points["high_sensitivity"]["promised_sensitivity"] > 0
    assert main(["predict", "bus-base", str(image), "--masks", str(tmp_path / "masks")]) == 0    # lesion-aware
    written = list((tmp_path / "masks").glob("*.png"))
    assert len(written) == 1 and np.asarray(Image.open(written[0])).shape == Image.open(image).size[::-1]


def test_bus_base_on_a_busi_scan():
    scans = sorted((need(BUSI) / "malignant").glob("malignant (1*).png"))[:4] + \
        sorted((BUSI / "benign").glob("benign (1*).png"))[:4]
    scans = [s for s in scans if "_mask" not in s.name]
    p = Predictor.load("bus-base").predict_proba([str(s) for s in scans])[:, 1]
    assert p[:len(scans) // 2].mean() > p[len(scans) // 2:].mean()     # a sanity check, not a measurement


# the SHA-256 of bus-base v1's weights as first shipped (2026-11-27): bus-base@1 keeps them byte for byte
V1_WEIGHTS = "4f2611de041c71a497031144e185e0f3e55ca303016506fbf7d7616bed2cf09e"


def test_versions_resolve_and_an_unknown_one_lists_the_known(phantoms, capsys):
    import hashlib

    from sonocad.training.starting import init_record

    newest = zoo.versions("bus-base")[-1]
    assert zoo.versions("bus-base")[0] == "1" and zoo.resolve("bus-base@1") == zoo.HERE / "bus-base" / "1"
    assert zoo.shipped_version(zoo.resolve("bus-base")) == f"bus-base@{newest}"
    assert zoo.shipped_version(zoo.resolve("bus-base@1")) == "bus-base@1"
    assert hashlib.sha256((zoo.resolve("bus-base@1") / "model.safetensors").read_bytes()).hexdigest() == V1_WEIGHTS
    image = str(phantoms / "malignant" / "malignant (1).png")
    err = one_line_error(capsys, ["predict", "bus-base@99", image])
    assert "bus-base@99" in err and "known: bus-base@1" in err and f"bus-base names bus-base@{newest}" in err
    assert main(["predict", "bus-base@1", image]) == 0
    record = init_record("bus-base@1")
    assert record["zoo_version"] == "bus-base@1" and record["weights_sha256"] == V1_WEIGHTS
    assert init_record("bus-base")["zoo_version"] == f"bus-base@{newest}"


def test_shipped_versions_pass_the_packing_scripts_check(tmp_path):
    import importlib.util
    import json
    import shutil

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("train_bus_base", root / "scripts" / "train_bus_base.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.check() == []
    shared = Path("/data/shared")
    assert script.without_paths({"source": ["/data/shared/busi/X", "/elsewhere/a/b/c"]}, shared) == \
        {"source": ["busi/X", "b/c"]}
    # a version with a machine path in its files fails the check
    copy = tmp_path / "bus-base"
    shutil.copytree(script.ZOO, copy)
    config = copy / "1" / "config.json"
    config.write_text(config.read_text().replace('"busi/Dataset_BUSI_with_GT"', '"/home/me/busi"'))
    script.ZOO = copy
    problems = script.check()
    assert any("changed after the run finished" in p for p in problems), problems
    data = json.loads(config.read_text())
    assert data["data"]["source"][0] == "/home/me/busi"
