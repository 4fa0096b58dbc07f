"""Test-time views: which ones, that zooms and mirrors really change the input, and runs saved before them."""
import json

import numpy as np
import pytest

from sonocad.config import RunInfo, TrainConfig
from sonocad.models.infer import InputPipeline, resolve_precision, run_batches, tta_views


def test_default_views_are_the_image_zoomed_out_and_in_each_mirrored():
    cfg = TrainConfig.from_recipe()
    views = tta_views(cfg.tta, cfg.tta_zooms)
    assert len(views) == 6 and len(set(views)) == 6
    assert {z for z, _ in views} == {1.0, 0.87, 1.15} and (1.0, False) in views
    assert tta_views(False, [0.87, 1.15]) == [(1.0, False)]
    assert tta_views(True, []) == [(1.0, False), (1.0, True)]


def _mean_right_half(x):
    return x[:, :1, :, x.shape[-1] // 2:].flatten(1).mean(1, keepdim=True)


def test_zoom_and_mirror_change_what_the_model_sees():
    pipe = InputPipeline([0.0] * 3, [1.0] * 3, resolve_precision("fp32", "cpu"))
    img = np.zeros((1, 64, 64), np.uint8)
    img[:, :, 48:] = 255                         # a bright band at the right edge
    plain = run_batches(_mean_right_half, img, pipe)[0, 0]
    mirrored = _mean_right_half(pipe(img, flip=True))[0, 0].item()
    zoomed_out = _mean_right_half(pipe(img, zoom=0.5))[0, 0].item()
    assert plain == pytest.approx(0.5, abs=0.02) and mirrored == pytest.approx(0.0, abs=0.02)
    assert 0.05 < zoomed_out < 0.4               # the band moves inwards and shrinks; black enters at the edge
    both = run_batches(_mean_right_half, img, pipe, tta=True, zooms=[0.5])[0, 0]
    assert both == pytest.approx((plain + mirrored + zoomed_out + _mean_right_half(
        pipe(img, zoom=0.5, flip=True))[0, 0].item()) / 4, abs=1e-5)


def test_runs_saved_before_the_options_keep_their_behaviour(tmp_path):
    cfg = TrainConfig.from_recipe().to_dict()
    del cfg["tta_zooms"], cfg["ema_epochs"]
    info = {"config": cfg, "classes": ["benign", "malignant"], "positive": "malignant", "img_size": 224,
            "mean": [0.5] * 3, "std": [0.5] * 3}
    (tmp_path / "config.json").write_text(json.dumps(info))
    loaded = RunInfo.load(tmp_path / "config.json").config
    assert loaded.tta_zooms == [] and loaded.ema_epochs == 0.0


def test_impossible_zoom_is_refused():
    from sonocad.errors import SonocadError

    with pytest.raises(SonocadError, match="^tta_zooms: "):
        TrainConfig.from_recipe(tta_zooms=[0.0])


def test_views_are_resampled_in_full_precision_under_bf16():
    """The zoom's resampling grid must not run under autocast: in bf16 it lands pixels in the wrong place."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 96, 96), dtype=np.uint8)
    bf16 = InputPipeline([0.0] * 3, [1.0] * 3, resolve_precision("bf16", "cpu"))
    fp32 = InputPipeline([0.0] * 3, [1.0] * 3, resolve_precision("fp32", "cpu"))
    got = run_batches(lambda x: x[:, 0].flatten(1).float(), img, bf16, tta=True, zooms=[0.87])
    want = np.mean([fp32(img, zoom=z, flip=f)[:, 0].flatten(1).numpy() for z, f in tta_views(True, [0.87])], 0)
    np.testing.assert_allclose(got, want, atol=1e-5)
