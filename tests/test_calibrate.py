"""sonocad calibrate and train --init: a run fitted to a new site, and fine-tuning from a trained run."""
import json

import numpy as np
import pytest
import torch
from conftest import one_line_error

from sonocad.cli.main import main
from sonocad.config import RunInfo, TrainConfig
from sonocad.deploy.predictor import Predictor
from sonocad.errors import OptionError
from sonocad.io.rundir import kind
from sonocad.models.infer import resolve_precision
from sonocad.training.starting import build_model
from sonocad.workflows.calibrate import calibrate_run, threshold_spread


def test_calibrated_run_rescales_probabilities_and_chooses_points_on_the_local_set(tiny_run, phantoms, tmp_path, capsys):
    out = tmp_path / "local"
    assert main(["calibrate", str(tiny_run), str(phantoms), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "temperature" in printed and "high_sensitivity" in printed and "bootstrap" in printed
    assert kind(out) == "calibrate"
    old, new = Predictor.load(tiny_run), Predictor.load(out)
    t_old, t_new = old.info.temperature, new.info.temperature
    assert t_new != t_old
    images = old.decode([str(p) for p in sorted(phantoms.glob("*/*.png"))[:8]])[0]
    p_old, p_new = old.predict_proba(images)[:, 1], new.predict_proba(images)[:, 1]
    logit = np.log(p_old / (1 - p_old)) * t_old        # the same model: only the temperature differs
    np.testing.assert_allclose(p_new, 1 / (1 + np.exp(-logit / t_new)), atol=1e-4)
    m = json.loads((out / "metrics.json").read_text())
    hs = m["operating_points"]["high_sensitivity"]
    assert hs["threshold"] == new.info.thresholds["high_sensitivity"]
    assert "local calibration set" in new.info.operating_points["chosen_on"]
    assert hs["n_pos"] == 24 and 0 < hs["promised_sensitivity"] < 0.95 and not hs["target_promised"]   # 24 cancers
    lo, hi = hs["bootstrap"]["left_out_sensitivity_95"]
    assert 0 <= lo <= hi <= 1 and hs["bootstrap"]["draws"] > 900
    assert new.info.data["calibrated_from"] == str(tiny_run)
    # evaluate uses it as any run
    assert main(["evaluate", str(out), str(phantoms), "--out", str(tmp_path / "ev")]) == 0
    # a finished result is not replaced without --overwrite
    err = one_line_error(capsys, ["calibrate", str(tiny_run), str(phantoms), "--out", str(out)])
    assert "--out" in err and "--overwrite" in err


def test_calibrate_warns_about_few_cancers_and_refuses_one_class(tiny_run, phantoms, tmp_path, capsys):
    with pytest.warns(UserWarning, match="only 24 positive cases.*59 positives are needed"):
        calibrate_run(tiny_run, phantoms, tmp_path / "a", n_boot=50)
    err = one_line_error(capsys, ["calibrate", str(tiny_run), str(phantoms / "benign"), "--out", str(tmp_path / "b")])
    assert "needs scans of both classes" in err or "class" in err
    err = one_line_error(capsys, ["calibrate", str(tiny_run), str(phantoms), "--out", str(tiny_run / "x")])
    assert "inside" in err


def test_threshold_spread_narrows_with_more_cases():
    rng = np.random.default_rng(0)

    def width(n):
        y = np.r_[np.zeros(n), np.ones(n)]
        p = np.r_[rng.beta(2, 5, n), rng.beta(5, 2, n)]
        lo, hi = threshold_spread(y, p, n_boot=200)["youden"]["bootstrap"]["threshold_95"]
        return hi - lo

    assert width(400) < width(20)


def test_init_starts_from_the_runs_weights(tiny_run):
    prec = resolve_precision("fp32", "cpu")     # the saved weights are on the CPU
    info = RunInfo.load(tiny_run / "config.json")
    cfg = TrainConfig(init=str(tiny_run), img_size=64).validate()
    from safetensors.torch import load_file

    saved = load_file(str(tiny_run / "model.safetensors"))
    assert info.mask_head and any(k.startswith("mask_head.") for k in saved)
    state = build_model(cfg, 2, prec, info.classes, mask_head=True).state_dict()
    assert set(state) == set(saved)
    for k, v in saved.items():
        if k != "temperature":
            assert torch.equal(state[k].float(), v.float()), k
    without = build_model(cfg, 2, prec, info.classes).state_dict()         # --seg-weight 0: no decoder
    assert not any(k.startswith("mask_head.") for k in without)
    assert torch.equal(without["head.0.weight"], saved["head.0.weight"])
    assert float(without["temperature"]) == 1.0
    fresh_head = build_model(cfg, 2, prec, ["malignant", "benign"]).state_dict()      # other classes: new head
    assert not torch.equal(fresh_head["head.0.weight"], saved["head.0.weight"])
    assert torch.equal(fresh_head["backbone.conv_stem.weight"], saved["backbone.conv_stem.weight"])
    with pytest.raises(OptionError, match="init"):
        TrainConfig(init=str(tiny_run), weights="x.pt").validate()
    with pytest.raises(OptionError, match="--model tf_efficientnet_lite0"):
        build_model(TrainConfig(init=str(tiny_run), model="resnet18"), 2, prec)


def test_train_with_init_records_it_and_averages_with_the_init(tiny_run, phantoms, tmp_path):
    from safetensors.torch import load_file

    def fine_tune(name: str, *extra: str) -> dict:
        out = tmp_path / name
        assert main(["train", str(phantoms), "--out", str(out), "--init", str(tiny_run), "--img-size", "64",
                     "--head-epochs", "1", "--finetune-epochs", "1", "--batch-size", "8", "--quiet", *extra]) == 0
        return load_file(str(out / "model.safetensors"))

    averaged, tuned = fine_tune("ft"), fine_tune("ft0", "--keep-init", "0")
    init = load_file(str(tiny_run / "model.safetensors"))
    info = RunInfo.load(tmp_path / "ft" / "config.json")
    cfg = info.config
    assert cfg.init == str(tiny_run) and cfg.keep_init == 0.5            # the default with --init
    start = info.data["init_from"]                                        # which weights it started from
    assert start["name"] == str(tiny_run) and start["zoo_version"] is None
    assert start["weights_sha256"] == json.loads((tiny_run / "run.json").read_text())["files"]["model.safetensors"]
    moved = 0
    for k, v in averaged.items():
        if k.startswith(("backbone.", "head.")) and v.is_floating_point():
            assert torch.allclose(v, (tuned[k] + init[k]) / 2, atol=1e-6), k
            moved += not torch.equal(tuned[k], init[k])
    assert moved > 10                                                   # fine-tuning changed them: a real average
    assert TrainConfig().validate().keep_init == 0.0


@pytest.mark.parametrize("options, match", [({"keep_init": 0.5}, "give --init"),
                                             ({"keep_init": 1.0, "init": "run"}, r"\[0, 1\)"),
                                             ({"keep_init": -0.1, "init": "run"}, r"\[0, 1\)"),
                                             ({"keep_init": True, "init": "run"}, r"\[0, 1\)")])
def test_keep_init_refuses_impossible_values(options, match):
    with pytest.raises(OptionError, match=match):
        TrainConfig(**options).validate()
