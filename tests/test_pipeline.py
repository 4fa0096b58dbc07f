"""End to end on synthetic phantoms: train -> evaluate -> predict, through the CLI and the library."""
import csv
import json

import numpy as np
import pytest
from scipy import stats

from sonocad.cli.main import main
from sonocad.config import TrainConfig

RUN_FILES = ["config.json", "model.safetensors", "log.csv", "metrics.json", "predictions.csv", "report.html",
             "plots/roc.png", "plots/confusion_matrix.png", "plots/training_curves.png"]


def test_train_writes_a_complete_run(tiny_run):
    for f in RUN_FILES:
        assert (tiny_run / f).is_file(), f
    m = json.loads((tiny_run / "metrics.json").read_text())
    for key in ("auc", "auc_ci", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "threshold", "n",
                "n_per_class", "confusion_matrix", "operating_points"):
        assert key in m, key
    assert m["n"] == sum(m["n_per_class"].values()) == np.sum(m["confusion_matrix"])
    hs = m["operating_points"]["high_sensitivity"]       # the promise, whether kept, and how surprising a miss is
    tp, n_pos = hs["confusion_matrix"][1][1], m["n_per_class"]["malignant"]
    assert hs["promise_kept"] == (tp / n_pos >= hs["promised_sensitivity"])
    assert hs["promise_p"] == pytest.approx(stats.binom.cdf(tp, n_pos, hs["promised_sensitivity"]))
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["classes"] == ["benign", "malignant"] and cfg["positive"] == "malignant"
    assert cfg["config"]["seed"] == 0 and cfg["img_size"] == 64
    with open(tiny_run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["phase"] for r in rows} == {"head", "finetune"}
    assert set(rows[0]) >= {"loss", "val_loss", "val_auc", "val_accuracy", "lr", "seconds"}
    html = (tiny_run / "report.html").read_text()
    assert "data:image/png;base64" in html and "not a diagnosis" in html


def test_test_split_is_disjoint_from_training(tiny_run, phantoms):
    with open(tiny_run / "predictions.csv") as f:
        test_paths = {r["path"] for r in csv.DictReader(f)}
    cfg = json.loads((tiny_run / "config.json").read_text())
    n_test = sum(cfg["data"]["n_test"].values())
    assert len(test_paths) == n_test
    assert sum(cfg["data"]["n_train"].values()) + sum(cfg["data"]["n_val"].values()) + n_test == 48


def test_evaluate_on_other_data_ignores_other_classes(tiny_run, tmp_path, capsys):
    from sonocad.data.synth import write_phantom_set

    other = tmp_path / "other"
    write_phantom_set(other, n=12, seed=11, size=80, classes=("benign", "malignant", "normal"))
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_run), str(other), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_per_class"] == {"benign": 4, "malignant": 4}
    assert (out / "report.html").is_file() and (out / "plots" / "roc.png").is_file()
    assert "AUC" in capsys.readouterr().out


def test_predict_prints_and_writes_csv(tiny_run, phantoms, tmp_path, capsys):
    img = phantoms / "malignant" / "malignant (1).png"
    inputs = [str(tiny_run), str(img), str(phantoms / "benign")]
    assert main(["predict", *inputs]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "path,prob_benign,prob_malignant,predicted"
    assert len(lines) == 1 + 1 + 24            # masks in the folder are not predicted
    printed = list(csv.DictReader(lines))
    out = tmp_path / "p.csv"
    assert main(["predict", *inputs, "--csv", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    threshold = json.loads((tiny_run / "config.json").read_text())["thresholds"]["default"]
    assert [r["path"] for r in rows] == [r["path"] for r in printed]
    assert rows[0]["path"] == str(img) and rows[1]["path"].endswith("benign (1).png")   # natural order
    for r, shown in zip(rows, printed):
        p_benign, p_malignant = float(r["prob_benign"]), float(r["prob_malignant"])
        assert p_benign + p_malignant == pytest.approx(1, abs=1e-5)
        assert float(shown["prob_malignant"]) == pytest.approx(p_malignant, abs=5e-5)   # stdout: 4 decimals
        assert r["predicted"] == shown["predicted"] == ("malignant" if p_malignant >= threshold else "benign")
    assert {r["predicted"] for r in rows} == {"benign", "malignant"}     # the threshold separates something


def test_same_seed_same_metrics(phantoms, tmp_path):
    from sonocad.workflows.train import fit

    args = dict(img_size=48, head_epochs=2, finetune_epochs=1, batch_size=8, seed=5)
    a = fit(phantoms, tmp_path / "a", progress=False, **args)
    b = fit(phantoms, tmp_path / "b", progress=False, **args)
    a.pop("timing_seconds"), b.pop("timing_seconds")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert (tmp_path / "a" / "predictions.csv").read_text() == (tmp_path / "b" / "predictions.csv").read_text()


def test_notebook_recipe_runs(phantoms, tmp_path):
    """The notebook's settings (undersampling, offline augmentation, Adagrad) on a tiny backbone."""
    import torch

    from sonocad.models.infer import InputPipeline, resolve_precision
    from sonocad.training.prepare import prepare_data, split_train_val
    from sonocad.training.starting import build_model
    from sonocad.training.trainer import Trainer
    from sonocad.workflows.train import fit

    cfg = TrainConfig.from_recipe("notebook", model="resnet18", pretrained=False, img_size=48,
                                  head_epochs=1, finetune_epochs=1, offline_augment=2)
    assert cfg.balance == "undersample" and cfg.optimizer == "adagrad" and cfg.batch_size == 8
    # more benign than malignant images, so that undersampling has something to do
    data = [p for p in sorted(phantoms.rglob("*).png"))
            if p.parent.name == "benign" or int(p.stem.split("(")[1].rstrip(")")) <= 12]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in data))
    train, val = split_train_val(prepare_data(manifest, cfg).full, cfg)
    counts = np.bincount(train.y)
    assert counts[0] == counts[1]                                       # undersampled to the smaller class
    prec = resolve_precision("fp32")
    trainer = Trainer(build_model(cfg, 2, prec), train, val, 2, cfg, prec, InputPipeline([0.5] * 3, [0.5] * 3, prec),
                      tmp_path / "t", progress=False)
    n = len(train.y)
    assert len(trainer.train.y) == 3 * n and np.array_equal(trainer.train.y, np.tile(train.y, 3))
    assert np.array_equal(trainer.train.images[:n], train.images)        # the originals, then 2 copies each
    assert not np.array_equal(trainer.train.images[n:2 * n], train.images)
    assert torch.equal(torch.from_numpy(trainer.train.images[n:]),       # fixed copies: the same every time
                       torch.from_numpy(Trainer(build_model(cfg, 2, prec), train, val, 2, cfg, prec, trainer.pipeline,
                                                tmp_path / "t2", progress=False).train.images[n:]))
    m = fit(manifest, tmp_path / "nb", cfg, progress=False)
    summary = json.loads((tmp_path / "nb" / "config.json").read_text())["data"]
    assert summary["n_train"]["benign"] == summary["n_train"]["malignant"]
    assert summary["n_train_with_offline_copies"] == {c: 3 * k for c, k in summary["n_train"].items()}
    assert m["n"] == sum(summary["n_test"].values()) and np.isfinite(m["auc"])


def test_multiclass_softmax_run(tmp_path, capsys):
    """Three classes (softmax) through train (both phases, default precision), evaluate, predict and cv."""
    from sonocad.data.synth import write_phantom_set
    from sonocad.workflows.train import fit

    classes = ["benign", "malignant", "normal"]
    write_phantom_set(tmp_path / "d", n=36, seed=2, size=48, classes=tuple(classes))
    m = fit(tmp_path / "d", tmp_path / "r", img_size=48, head_epochs=2, finetune_epochs=1, batch_size=8,
            progress=False)
    with open(tmp_path / "r" / "log.csv") as f:
        assert {r["phase"] for r in csv.DictReader(f)} == {"head", "finetune"}
    assert set(m["per_class"]) == set(classes) and m["n"] == np.sum(m["confusion_matrix"])
    with open(tmp_path / "r" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == m["n"] and "prob" not in rows[0]
    for r in rows:
        p = [float(r[f"prob_{c}"]) for c in classes]
        assert sum(p) == pytest.approx(1, abs=1e-5) and r["predicted"] == classes[int(np.argmax(p))]
    assert main(["evaluate", str(tmp_path / "r"), str(tmp_path / "d"), "--out", str(tmp_path / "e")]) == 0
    e = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert e["n_per_class"] == {c: 12 for c in classes} and len(e["confusion_matrix"]) == 3
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "r"), str(tmp_path / "d" / "normal")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "path,prob_benign,prob_malignant,prob_normal,predicted" and len(out) == 1 + 12
    assert main(["cv", str(tmp_path / "d"), "--folds", "2", "--out", str(tmp_path / "cv"), "--img-size", "48",
                 "--head-epochs", "1", "--unfreeze", "0", "--no-dedup", "--quiet"]) == 0
    cv = json.loads((tmp_path / "cv" / "metrics.json").read_text())
    assert len(cv["per_fold"]) == 2 and all("auc" in f and "sensitivity" not in f for f in cv["per_fold"])
    assert cv["pooled"]["n"] == 36 and "macro AUC" in capsys.readouterr().out
    assert "Folds" in (tmp_path / "cv" / "report.html").read_text()


def test_shortcut_check_on_phantoms(tiny_run, phantoms, tmp_path, capsys):
    out = tmp_path / "sc"
    assert main(["evaluate", str(tiny_run), str(phantoms), "--out", str(out), "--shortcut-check"]) == 0
    m = json.loads((out / "metrics.json").read_text())["shortcut_check"]
    assert m["n"] == 48
    assert m["original"]["mean_abs_change"] == 0
    # the phantoms' class cues are the lesion's shape, margin and posterior shadowing: hidden, they are gone
    assert m["original"]["auc"] > 0.7, m["original"]
    for k in ("lesion_masked", "lesion_textured", "box_textured"):
        assert m[k]["mean_abs_change"] > 0.02, (k, m[k])
        assert m[k]["auc"] < m["original"]["auc"] - 0.1, (k, m[k], m["original"])
    assert "Shortcut check" in (out / "report.html").read_text()
    assert "lesion masked" in capsys.readouterr().out


def test_mask_out_hides_the_lesion():
    from sonocad.analysis.shortcut import mask_out

    img = np.full((64, 64), 120, np.uint8)
    img[20:40, 20:40] = 10
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    out = mask_out(img, mask)
    assert abs(int(out[30, 30]) - 120) < 5 and out[0, 0] == 120


def test_temperature_scaling_and_bootstrap_ci(phantoms, tmp_path):
    """Temperature fitted on validation data is saved with the model and used by predict."""
    from sonocad.deploy.predictor import load_run
    from sonocad.workflows.train import fit

    m = fit(phantoms, tmp_path / "t", img_size=48, head_epochs=3, finetune_epochs=1, batch_size=8,
            temperature_scaling=True, ci="bootstrap", progress=False)
    info, model, _ = load_run(tmp_path / "t")
    assert info.temperature > 0 and float(model.temperature) == pytest.approx(info.temperature)
    assert info.temperature != 1.0
    assert m["auc_ci_method"].startswith("bootstrap")
    for f in ("pr.png", "confusion_youden.png", "confusion_high_sensitivity.png"):
        assert (tmp_path / "t" / "plots" / f).is_file(), f


def test_tissue_fill_hides_the_lesion_and_keeps_speckle():
    from sonocad.analysis.shortcut import fill_with_tissue, lesion_box

    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(120, 25, (96, 96)), 0, 255).astype(np.uint8)   # speckled tissue
    img[40:60, 40:60] = 15                                                    # a dark lesion
    mask = np.zeros((96, 96), bool)
    mask[40:60, 40:60] = True
    out = fill_with_tissue(img, mask)
    inner = out[42:58, 42:58].astype(float)
    assert abs(inner.mean() - 120) < 15                 # as bright as the tissue around it
    assert 10 < inner.std() < 40                        # and as speckled (a smooth fill has std ~0)
    assert np.array_equal(out[~mask], img[~mask])
    box = lesion_box(mask)
    assert box[35:65, 35:65].all() and not box[:30].any() and box.sum() < 40 * 40
    assert np.array_equal(fill_with_tissue(img, np.zeros_like(mask)), img)


def test_weight_averaging_runs_the_full_schedule_and_keeps_the_average(phantoms, tmp_path):
    """With ema_epochs, phase 2 ignores patience and saves the moving average, not the last raw weights."""
    import torch

    from sonocad.models.classifier import read_state_dict
    from sonocad.training.trainer import read_checkpoint
    from sonocad.workflows.train import fit

    fit(phantoms, tmp_path / "r", img_size=48, head_epochs=2, finetune_epochs=4, patience=0, ema_epochs=1,
        batch_size=8, seed=1, progress=False)
    with open(tmp_path / "r" / "log.csv") as f:
        assert sum(r["phase"] == "finetune" for r in csv.DictReader(f)) == 4
    saved = read_state_dict(tmp_path / "r" / "model.safetensors")
    ckpt = read_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    ema = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    raw = ckpt["model"]
    trained = [k for k in saved if k.startswith("head.") and saved[k].is_floating_point()]
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.allclose(saved[k], raw[k]) for k in trained)


def test_impossible_ema_is_refused():
    from sonocad.errors import SonocadError

    with pytest.raises(SonocadError, match="^ema_epochs: "):
        TrainConfig.from_recipe(ema_epochs=-1)


def test_train_with_separate_test_data(phantoms, tmp_path):
    """--test DATA: all of the training data trains (train + validation), DATA alone is the test part."""
    from sonocad.data.synth import write_phantom_set

    other = tmp_path / "other"
    write_phantom_set(other, n=10, seed=21, size=70)
    run = tmp_path / "r"
    assert main(["train", str(phantoms), "--test", str(other), "--out", str(run), "--img-size", "48",
                 "--head-epochs", "1", "--unfreeze", "0", "--quiet"]) == 0
    with open(run / "predictions.csv") as f:
        tested = {r["path"] for r in csv.DictReader(f)}
    assert tested == {str(p) for p in other.rglob("*).png")}
    data = json.loads((run / "config.json").read_text())["data"]
    assert data["test_source"] == str(other) and data["n_test"] == {"benign": 5, "malignant": 5}
    assert sum(data["n_train"].values()) + sum(data["n_val"].values()) == 48


def test_report_shows_the_metrics_and_config_it_was_written_from(tiny_run):
    """Every number in the report's tables is metrics.json's or config.json's, at its shown precision;
    small learning rates keep their significant digits."""
    import re

    html = (tiny_run / "report.html").read_text()
    m = json.loads((tiny_run / "metrics.json").read_text())
    cfg = json.loads((tiny_run / "config.json").read_text())["config"]

    def cell(label):
        found = re.search(rf"<tr><th>{re.escape(label)}</th><td>([^<]*)</td></tr>", html)
        assert found, label
        return found.group(1)

    for label, key in (("AUC", "auc"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
                       ("balanced accuracy", "balanced_accuracy"), ("PPV", "ppv"), ("NPV", "npv")):
        assert cell(label) == f"{m[key]:.3f}", label
    lo, hi = m["auc_ci"]
    assert cell("AUC 95% CI (delong)") == f"{lo:.3f} – {hi:.3f}"
    assert cell("n") == str(m["n"])
    assert float(cell("head_lr")) == cfg["head_lr"] == 3e-4 and cell("head_lr") != "0.000"
    assert float(cell("weight_decay")) == cfg["weight_decay"] == 1e-4
    assert float(cell("finetune_lr")) == cfg["finetune_lr"]
