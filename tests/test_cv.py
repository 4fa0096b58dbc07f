"""Cross-validation: folds keep duplicate groups and patients together; pooled OOF metrics; external site."""
import csv
import json
import shutil

import numpy as np
import pytest
from conftest import one_line_error
from PIL import Image

from sonocad.cli.main import main
from sonocad.data.synth import write_phantom_set
from sonocad.io import rundir
from sonocad.evaluation.operating import fold_operating_points
from sonocad.workflows.cv import fold_indices
from sonocad.workflows.evaluate import site_notice


def test_fold_indices_keep_groups_and_strata():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    groups = [f"p{i // 3}" for i in range(200)]
    sites = ["a" if i < 120 else "b" for i in range(200)]
    fold = fold_indices(y, groups, sites, 5, seed=0)
    for g in set(groups):
        assert len({fold[i] for i in range(200) if groups[i] == g}) == 1
    assert sorted(set(fold)) == [0, 1, 2, 3, 4]
    for k in range(5):
        assert 25 <= (fold == k).sum() <= 55


def test_fold_operating_points_use_each_folds_own_threshold():
    y = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    prob = np.array([0.1, 0.3, 0.35, 0.9, 0.6, 0.7, 0.8, 0.95])
    thresholds = [{"default": 0.5, "youden": 0.3}] * 4 + [{"default": 0.5, "youden": 0.75}] * 4
    ops = fold_operating_points(y, prob, thresholds)
    # fold 1 at 0.3: 0.3 (benign) and both malignant positive; fold 2 at 0.75: 0.8 and 0.95 positive
    assert ops["youden"]["sensitivity"] == 1.0 and ops["youden"]["specificity"] == 0.75
    # one threshold of 0.5 for all: 0.6 and 0.7 (benign) positive, 0.35 (malignant) negative
    assert ops["default"]["sensitivity"] == 0.75 and ops["default"]["specificity"] == 0.5
    assert ops["youden"]["fold_thresholds"] == [0.3, 0.75]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Phantoms plus resized, cropped and shifted copies of some of them, planted under new names."""
    root = tmp_path_factory.mktemp("planted")
    write_phantom_set(root, n=40, seed=4, size=96)
    copies = {}
    for cls in ("benign", "malignant"):
        for i in range(1, 5):
            src = root / cls / f"{cls} ({i}).png"
            img = Image.open(src)
            variants = {"resized": img.resize((140, 140)),
                        "cropped": img.crop((8, 6, 90, 92)),
                        "shifted": Image.fromarray(np.roll(np.asarray(img), 5, axis=1))}
            for kind, v in variants.items():
                dst = root / cls / f"copy-{kind}-{i}.png"
                v.save(dst)
                copies[str(dst)] = str(src)
    return root, copies


def test_cv_keeps_planted_copies_in_one_fold(planted, tmp_path, capsys):
    root, copies = planted
    ext = tmp_path / "ext"
    write_phantom_set(ext, n=8, seed=9, size=80)
    out = tmp_path / "cv"
    rc = main(["cv", str(root), "--folds", "3", "--out", str(out), "--img-size", "48", "--head-epochs", "2",
               "--finetune-epochs", "1", "--batch-size", "8", "--external", str(ext), "--quiet"])
    assert rc == 0
    with open(out / "oof_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:5] == ["path", "label", "group", "fold", "site"] and "prob" in rows[0]
    fold = {r["path"]: r["fold"] for r in rows}
    assert len(fold) == 40 + 24
    for copy, src in copies.items():
        assert fold[copy] == fold[src], f"{copy} and its original {src} are in different folds"
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["per_fold"]) == 3 and len(m["pooled"]["auc_ci"]) == 2
    assert m["external"]["n"] == 8 and "ensemble" in m["external"]
    assert set(m["pooled"]["fold_operating_points"]) >= {"default", "youden"}
    for k in (1, 2, 3):
        assert (out / f"fold-{k}" / "model.safetensors").is_file()
        assert (out / f"fold-{k}" / "external" / "predictions.csv").is_file()
    assert "external" in capsys.readouterr().out
    before = (out / "fold-1" / "model.safetensors").stat().st_mtime_ns
    # run again: finished folds are reused, not retrained
    assert main(["cv", str(root), "--folds", "3", "--out", str(out), "--img-size", "48", "--head-epochs", "2",
                 "--finetune-epochs", "1", "--batch-size", "8", "--external", str(ext), "--quiet"]) == 0
    assert (out / "fold-1" / "model.safetensors").stat().st_mtime_ns == before
    assert json.loads((out / "metrics.json").read_text())["pooled"]["auc"] == m["pooled"]["auc"]
    # a fold trained again on its own (fold 1 reused, not trained) gives the same predictions
    fold2 = (out / "fold-2" / "predictions.csv").read_text()
    shutil.rmtree(out / "fold-2")
    assert main(["cv", str(root), "--folds", "3", "--out", str(out), "--img-size", "48", "--head-epochs", "2",
                 "--finetune-epochs", "1", "--batch-size", "8", "--external", str(ext), "--quiet"]) == 0
    assert (out / "fold-2" / "predictions.csv").read_text() == fold2
    # finished folds are never mixed with folds of other settings
    assert main(["cv", str(root), "--folds", "3", "--out", str(out), "--img-size", "48", "--head-epochs", "3",
                 "--finetune-epochs", "1", "--batch-size", "8", "--external", str(ext), "--quiet"]) == 2
    assert "trained with other settings (head_epochs)" in capsys.readouterr().err
    # refused before anything is trained or touched: another number of folds or repeats
    for more, message in ((["--folds", "4"], "fold-1: finished fold holds other images than this split"),
                          (["--folds", "2"], "holds folds of another cross-validation (fold-3; this one has 2 folds)"),
                          (["--folds", "3", "--repeats", "2"], "another cross-validation (fold-1, fold-2, fold-3;")):
        argv = ["cv", str(root), "--out", str(out), "--img-size", "48", "--head-epochs", "2", "--finetune-epochs",
                "1", "--batch-size", "8", "--external", str(ext), "--quiet", *more]
        assert message in one_line_error(capsys, argv)
    assert rundir.kind(out) == "cv" and not (out / "fold-4").exists() and not (out / "repeat-1").exists()
    assert (out / "fold-1" / "model.safetensors").stat().st_mtime_ns == before
    # the cv folder is an ensemble for evaluate and predict: same AUC as the cv's external figure
    assert main(["evaluate", str(out), str(ext), "--out", str(tmp_path / "ens")]) == 0
    ens = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    assert ens["auc"] == pytest.approx(m["external"]["ensemble"]["auc"], abs=1e-6)
    capsys.readouterr()
    assert main(["predict", str(out), str(ext / "benign")]) == 0
    assert "chosen on the pooled out-of-fold predictions" in capsys.readouterr().err     # the site notice
    assert ens["site_notice"] == site_notice(out)
    # ... at operating points chosen on all out-of-fold predictions at once, with their figures there
    from sonocad.deploy.predictor import Predictor
    from sonocad.evaluation.operating import choose_thresholds

    y = np.asarray([r["label"] == "malignant" for r in rows], int)
    expected = choose_thresholds(y, np.asarray([float(r["prob"]) for r in rows]))
    info = Predictor.load(out).info
    assert info.thresholds == pytest.approx(expected) and info.thresholds == m["ensemble_operating_points"]["thresholds"]
    assert info.operating_points["high_sensitivity"]["n_pos"] == int(y.sum())
    assert "pooled out-of-fold" in info.operating_points["chosen_on"]


def test_compare_two_runs(tiny_run, phantoms, tmp_path, capsys):
    """Two different runs on the same images: the paired DeLong test of their own predictions; runs that
    see the task differently are refused."""
    from sonocad.data import discover
    from sonocad.deploy.predictor import Predictor
    from sonocad.evaluation.metrics import delong_test
    from sonocad.workflows.evaluate import compare_runs
    from sonocad.workflows.train import fit

    other = tmp_path / "other"
    fit(phantoms, other, img_size=48, head_epochs=2, unfreeze="0", batch_size=8, seed=7, progress=False)
    r = compare_runs(tiny_run, other, phantoms)
    probs, ys = [], []
    for run in (tiny_run, other):
        p = Predictor.load(run)
        images, _, y, _ = p.decode_samples(discover(phantoms, p.classes))
        probs.append(p.predict_proba(images)[:, 1])
        ys.append(y)
    want = delong_test(ys[0], probs[0], probs[1])
    assert r["n"] == 48 and r["diff"] != 0 and 0 < r["p_value"] < 1
    assert r["p_value"] == pytest.approx(want["p_value"]) and r["auc_a"] == pytest.approx(want["auc_a"])
    assert main(["compare", str(tiny_run), str(other), str(phantoms)]) == 0
    assert f"p={want['p_value']:.4f}" in capsys.readouterr().out
    benign = tmp_path / "benign.csv"
    benign.write_text("path,label\n" + "".join(f"{p},benign\n" for p in (phantoms / "benign").glob("*).png")))
    assert "compare needs images of both classes" in one_line_error(capsys, ["compare", str(tiny_run), str(other),
                                                                           str(benign)])
    # the same weights with the classes the other way round: a different task, refused
    flipped = tmp_path / "flipped"
    shutil.copytree(other, flipped)
    for name in ("run.json", "checkpoints/data.json"):    # a run from before finished runs were recorded;
        (flipped / name).unlink()                         # else refused earlier: its config.json changed
    cfg = json.loads((flipped / "config.json").read_text())
    cfg["classes"], cfg["positive"] = ["malignant", "benign"], "benign"
    (flipped / "config.json").write_text(json.dumps(cfg))
    assert main(["compare", str(tiny_run), str(flipped), str(phantoms)]) == 2
    assert "see different images or classes" in capsys.readouterr().err
