"""Readers beside the model: a BI-RADS column in a manifest, or BUS-BRA's own, with a paired DeLong test."""
import csv
import json

import numpy as np
import pytest
from conftest import BUSBRA, need, one_line_error
from sklearn.metrics import roc_auc_score

from sonocad.cli.main import main
from sonocad.data import discover
from sonocad.evaluation.metrics import delong_test
from sonocad.evaluation.reader import reader_column, reader_scores


def _manifest(phantoms, path, value):
    rows = []
    for i, img in enumerate(sorted(phantoms.glob("*/*.png"))):
        label = img.parent.name
        rows.append({"path": str(img), "label": label, "birads": value(i, label)})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "birads"])
        w.writeheader()
        w.writerows(rows)
    return rows


def test_reader_column_gives_readers_auc_and_paired_test(tiny_run, phantoms, tmp_path, capsys):
    cats = ["2", "3", "4a", "4b", "4c", "5"]
    rows = _manifest(phantoms, tmp_path / "m.csv",
                     lambda i, label: cats[(i * 7) % 4 + (2 if label == "malignant" else 0)])
    assert main(["evaluate", str(tiny_run), str(tmp_path / "m.csv"), "--out", str(tmp_path / "ev"),
                 "--reader-score", "BIRADS"]) == 0
    assert "readers (BIRADS) on the same images: AUC" in capsys.readouterr().out
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    r = m["reader"]
    with open(tmp_path / "ev" / "predictions.csv") as f:
        pred = list(csv.DictReader(f))
    y = np.asarray([p["label"] == "malignant" for p in pred], int)
    score = np.asarray([float(p["reader_BIRADS"]) for p in pred])
    by_path = {row["path"]: row["birads"] for row in rows}
    assert sorted(set(by_path[p["path"]] for p in pred)) == cats
    assert r["auc"] == pytest.approx(roc_auc_score(y, score))
    d = delong_test(y, np.asarray([float(p["prob"]) for p in pred]), score)
    assert r["p_value"] == pytest.approx(d["p_value"]) and r["model_auc"] == pytest.approx(m["auc"])
    op = r["operating_point"]
    assert op["rule"] == "BIRADS >= 4"
    assert op["sensitivity"] == pytest.approx(((score >= 4) & (y == 1)).sum() / y.sum())
    assert "Readers on the same images" in (tmp_path / "ev" / "report.html").read_text()


def test_bad_reader_column_is_one_line(tiny_run, phantoms, tmp_path, capsys):
    _manifest(phantoms, tmp_path / "m.csv", lambda i, label: "3")
    err = one_line_error(capsys, ["evaluate", str(tiny_run), str(tmp_path / "m.csv"), "--out", str(tmp_path / "a"),
                                  "--reader-score", "suspicion"])
    assert "--reader-score" in err and "'suspicion'" in err and "birads" in err
    _manifest(phantoms, tmp_path / "m.csv", lambda i, label: "high" if i == 5 else "3")
    err = one_line_error(capsys, ["evaluate", str(tiny_run), str(tmp_path / "m.csv"), "--out", str(tmp_path / "b"),
                                  "--reader-score", "birads"])
    assert "'high', not a number or a BI-RADS category" in err
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    for value in ("nan", "inf"):
        assert f"--reader-threshold: must be a number, not {value}" in one_line_error(
            capsys, ["evaluate", str(tiny_run), str(tmp_path / "m.csv"), "--out", str(tmp_path / "c"),
                     "--reader-threshold", value])


def test_busbra_birads_is_used_by_itself():
    samples = discover(need(BUSBRA), ["benign", "malignant"])
    assert reader_column(samples, None) == "birads" and reader_column(samples, "none") is None
    y = np.asarray([s.label == "malignant" for s in samples], int)
    auc = roc_auc_score(y, reader_scores(samples, "birads"))
    assert round(auc, 3) == 0.916          # ../shared/data/README.md


def test_cv_sets_the_readers_beside_a_sites_out_of_fold_predictions(phantoms, tmp_path):
    from sonocad.workflows.cv import _add_readers

    rows = _manifest(phantoms, tmp_path / "m.csv", lambda i, label: "4c" if label == "malignant" else "3")
    samples = discover(str(tmp_path / "m.csv"), ["benign", "malignant"])
    y = np.asarray([s.label == "malignant" for s in samples], int)
    prob = np.linspace(0, 1, len(y))
    site = {}
    _add_readers(site, samples, y, prob)
    r = site["reader"]
    assert r["column"] == "birads" and r["n"] == len(rows) and r["auc"] == 1.0
    assert r["p_value"] == pytest.approx(delong_test(y, prob, reader_scores(samples, "birads"))["p_value"])
    _manifest(phantoms, tmp_path / "bad.csv", lambda i, label: "high" if i == 0 else "3")
    bad, site = discover(str(tmp_path / "bad.csv"), ["benign", "malignant"]), {}
    _add_readers(site, bad, y, prob)        # an unreadable category costs the comparison, not the finished folds
    assert "'high'" in site["reader"]["error"] and "auc" not in site["reader"]
