"""sonocad adapt: fine-tuning to a new site's few labelled scans, thresholds chosen on them by cross-fitting."""
import csv
import json

import numpy as np
import pytest
import torch
from conftest import one_line_error
from scipy.special import expit

from sonocad.cli.main import main
from sonocad.data.synth import write_phantom_set
from sonocad.deploy.predictor import Predictor
from sonocad.evaluation.scaling import fit_platt
from sonocad.io.rundir import kind
from sonocad.models.classifier import trained_model
from sonocad.models.infer import InputPipeline, resolve_precision
from sonocad.training.headfit import Tail, tail_logits, view_features
from sonocad.workflows import adapt as adapt_mod
from sonocad.workflows.adapt import MIN_PER_CLASS, adapt, fold_of


@pytest.fixture(scope="module")
def local_scans(tmp_path_factory):
    """40 phantoms of another seed as a manifest in which two scans share each patient."""
    root = tmp_path_factory.mktemp("local")
    write_phantom_set(root / "scans", n=40, seed=7, size=64)
    rows = [{"path": str(p), "label": p.parent.name, "group": f"{p.parent.name}-{i // 2}"}
            for c in ("benign", "malignant")
            for i, p in enumerate(sorted((root / "scans" / c).glob(f"{c} (*).png")))]
    with open(root / "local.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    return root / "local.csv", rows


@pytest.fixture(scope="module")
def adapted(tiny_run, local_scans, tmp_path_factory):
    """An adapted run, with every training and scoring call of the cross-fitting recorded."""
    manifest, _ = local_scans
    calls, seen = [], {}
    real = adapt_mod.view_features, adapt_mod.train_tail, adapt_mod.tail_logits
    patch = pytest.MonkeyPatch()

    def view_spy(*args, **kw):
        feats = real[0](*args, **kw)
        seen["plain"] = {row.float().numpy().tobytes(): i for i, row in enumerate(feats.train[0])}
        return feats

    def rows(plain: torch.Tensor) -> frozenset:
        return frozenset(seen["plain"][r.float().numpy().tobytes()] for r in plain)

    patch.setattr(adapt_mod, "view_features", view_spy)
    patch.setattr(adapt_mod, "train_tail", lambda tail, train, *a, **k: (calls.append(("train", rows(train[0]))),
                                                                            real[1](tail, train, *a, **k))[1])
    patch.setattr(adapt_mod, "tail_logits", lambda tail, score, *a, **k: (calls.append(("score", score)),
                                                                          real[2](tail, score, *a, **k))[1])
    out = tmp_path_factory.mktemp("adapted") / "run"
    try:
        metrics = adapt(tiny_run, str(manifest), out, seed=0, dedup=False, blocks=1)
    finally:
        patch.undo()
    return out, metrics, calls, seen


def test_no_scan_is_scored_by_a_model_that_saw_it(adapted, local_scans):
    out, metrics, calls, seen = adapted
    plain = {i: b for b, i in seen["plain"].items()}
    trained, scored_by_fold = None, []
    for what, x in calls:
        if what == "train":
            trained = x
            continue
        if x.shape[1] == len(plain):          # the base model scoring every scan: it never trained on them
            continue
        # the plain view is one of the test-time views: which scans this call scored
        ids = {i for v in range(x.shape[0]) for i in (seen["plain"].get(r.float().numpy().tobytes()) for r in x[v])
               if i is not None}
        assert trained is not None and ids and not ids & trained, "a fold model scored a scan it trained on"
        scored_by_fold.append(frozenset(ids))
    folds = sorted(set(scored_by_fold), key=min)
    assert metrics["adapt"]["mode"] == "cross-fitted" and len(folds) == metrics["adapt"]["folds"] >= 2
    assert sorted(i for f in folds for i in f) == list(range(len(plain)))       # every scan scored exactly once
    # the final model trained on every scan
    assert calls and any(w == "train" and len(x) == len(plain) for w, x in calls)


def test_groups_never_cross_folds_and_the_run_is_ordinary(adapted, local_scans, tmp_path, capsys):
    out, metrics, _, _ = adapted
    _, rows = local_scans
    group = {r["path"]: r["group"] for r in rows}
    with open(out / "predictions.csv", newline="") as f:
        pred = list(csv.DictReader(f))
    assert len(pred) == len(rows) and len({r["path"] for r in pred}) == len(rows)
    fold_of_group = {}
    for r in pred:
        assert fold_of_group.setdefault(group[r["path"]], r["fold"]) == r["fold"]
    assert kind(out) == "adapt"
    info = Predictor.load(out).info
    assert info.data["adapted_from"]["name"].endswith("tiny") and info.data["adapted_from"]["weights_sha256"]
    assert info.data["local_data"]["n_per_class"] == metrics["n_per_class"] == {"benign": 20, "malignant": 20}
    hs = metrics["operating_points"]["high_sensitivity"]
    assert "out-of-fold" in info.operating_points["chosen_on"] and "promised_sensitivity" in hs
    assert info.thresholds["high_sensitivity"] == hs["threshold"] and len(metrics["auc_ci"]) == 2
    # evaluate, predict and calibrate take it like any run
    assert main(["evaluate", str(out), str(local_scans[0]), "--out", str(tmp_path / "ev")]) == 0
    assert main(["predict", str(out), rows[0]["path"]]) == 0
    assert main(["calibrate", str(out), str(local_scans[0]), "--out", str(tmp_path / "cal")]) == 0


def test_the_saved_model_is_the_cut_model_put_back_together(adapted, local_scans):
    out, metrics, _, _ = adapted
    new = Predictor.load(out, precision="fp32")
    images = new.decode([r["path"] for r in local_scans[1][:6]])[0]
    info, model = trained_model(out)
    tail = Tail(model, metrics["adapt"]["blocks"])
    pipeline = InputPipeline(info.mean, info.std, resolve_precision("fp32"))
    z = tail_logits(tail, view_features(tail, images, pipeline, info.config, seed=0).score)
    assert metrics["adapt"]["blocks"] == 1 and new.info.temperature == 1.0
    np.testing.assert_allclose(new.predict_proba(images)[:, 1], expit(z), atol=1e-4)


def test_same_seed_same_numbers(adapted, tiny_run, local_scans, tmp_path):
    out, metrics, _, _ = adapted
    again = adapt(tiny_run, str(local_scans[0]), tmp_path / "again", seed=0, dedup=False, blocks=1)
    for key in ("auc", "operating_points", "adapt"):
        assert json.dumps(again[key], sort_keys=True) == json.dumps(metrics[key], sort_keys=True)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_too_few_scans_of_a_class_only_recalibrates_and_says_so(tiny_run, local_scans, tmp_path, capsys):
    _, rows = local_scans
    few = [r for r in rows if r["label"] == "benign"][:12] + [r for r in rows if r["label"] == "malignant"][:4]
    manifest = tmp_path / "few.csv"          # 2 malignant patients (4 scans): fewer than MIN_PER_CLASS groups
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "group"])
        w.writeheader()
        w.writerows(few)
    assert main(["adapt", str(tiny_run), str(manifest), "--out", str(tmp_path / "r"), "--no-dedup"]) == 0
    captured = capsys.readouterr()
    note = [line for line in captured.err.splitlines() if "too few to cross-fit" in line]
    assert len(note) == 1 and "recalibrated" in note[0] and f"at least {MIN_PER_CLASS}" in note[0]
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["adapt"]["mode"] == "recalibrated" and m["adapt"]["epochs"] == 0
    assert "high_sensitivity" in m["operating_points"]


def test_bad_input_is_one_line_and_nothing_is_lost(adapted, tiny_run, local_scans, tmp_path, capsys):
    out, _, _, _ = adapted
    manifest = str(local_scans[0])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    err = one_line_error(capsys, ["adapt", str(tiny_run), manifest, "--out", str(out)])
    assert "--out" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    benign = tmp_path.parent / f"{tmp_path.name}-benign.csv"
    benign.write_text("path,label\n" + "".join(f"{r['path']},benign\n" for r in local_scans[1][:6]))
    cases = [
        (["adapt", str(tmp_path / "nope"), manifest, "--out", str(tmp_path / "a")], "not found"),
        (["adapt", str(tiny_run), str(tmp_path / "missing"), "--out", str(tmp_path / "b")], "missing"),
        (["adapt", str(tiny_run), str(benign), "--out", str(tmp_path / "c")], "both classes"),
        (["adapt", str(tiny_run), manifest, "--out", str(tiny_run / "x")], "inside"),
        (["adapt", str(tiny_run), manifest, "--out", str(tmp_path / "d"), "--target-sensitivity", "1.5"],
         "--target-sensitivity"),
        (["adapt", str(tiny_run), manifest, "--out", str(tmp_path / "e"), "--folds", "1"], "--folds"),
        (["adapt", str(tiny_run), manifest, "--out", str(tmp_path / "f"), "--seed", "-1"], "--seed: must be between"),
        (["adapt", str(tiny_run), manifest, "--out", str(tmp_path / "g"), "--seed", str(2**64)], "--seed"),
    ]
    for argv, words in cases:
        err = one_line_error(capsys, argv)
        assert words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a refused adapt left files behind"
    assert not (tiny_run / "x").exists()


def test_fold_of_keeps_groups_whole_and_both_classes_in_every_training_part():
    y = np.r_[np.zeros(30, int), np.ones(12, int)]
    groups = np.r_[np.arange(30) // 3, 100 + np.arange(12) // 2]
    fold = fold_of(y, groups, 5, seed=0)
    assert fold.max() + 1 == 5
    for g in np.unique(groups):
        assert len(np.unique(fold[groups == g])) == 1
    for f in range(5):
        assert set(y[fold == f]) == {0, 1} and set(y[fold != f]) == {0, 1}
    # 3 malignant patients: 3 folds; 2: nothing to cross-fit
    assert fold_of(y[:36], groups[:36], 5, 0).max() + 1 == 3
    assert len(fold_of(y[:34], groups[:34], 5, 0)) == 0


def test_platt_scaling_recovers_shift_and_spread_and_stays_finite_when_separated():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)
    y = rng.random(4000) < expit(0.5 * z - 1.0)
    slope, intercept = fit_platt(y, z)
    assert slope == pytest.approx(0.5, abs=0.06) and intercept == pytest.approx(-1.0, abs=0.1)
    s, c = fit_platt([0, 0, 0, 1, 1, 1], [-3.0, -2, -1, 1, 2, 3])      # separated: finite, not infinite
    assert 0 < s < 20 and np.isfinite(c)


def test_runs_whose_thresholds_come_from_elsewhere_say_so_and_name_adapt(adapted, tiny_run, local_scans, tmp_path,
                                                                          capsys):
    out = adapted[0]
    scan = local_scans[1][0]["path"]
    assert main(["predict", str(tiny_run), scan]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1 and f"sonocad adapt {tiny_run}" in notes[0] and "another hospital" in notes[0]
    assert main(["predict", str(out), scan]) == 0
    assert "note:" not in capsys.readouterr().err
    assert main(["evaluate", str(tiny_run), str(local_scans[0]), "--out", str(tmp_path / "e1")]) == 0
    assert "sonocad adapt" in capsys.readouterr().out
    assert "sonocad adapt" in json.loads((tmp_path / "e1" / "metrics.json").read_text())["site_notice"]
    assert 'id="site-notice"' in (tmp_path / "e1" / "report.html").read_text()
    assert main(["evaluate", str(out), str(local_scans[0]), "--out", str(tmp_path / "e2")]) == 0
    assert "site_notice" not in json.loads((tmp_path / "e2" / "metrics.json").read_text())
    for report in (tmp_path / "e2" / "report.html", out / "report.html"):
        assert 'id="site-notice"' not in report.read_text()
    assert 'id="site-notice"' in (tiny_run / "report.html").read_text()
