"""scripts/gpu_check.py: on a machine without CUDA it says so and still runs every step on the CPU; its verdict
fails a check that is off; the data it carries to a GPU machine stay small."""
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import BUSI, need

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import gpu_check

    return gpu_check


def test_without_cuda_it_checks_the_cpu_path_and_says_so(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device: CPU-only check" in out
    assert re.search(r"^gpu-check \(smoke\): PASS \(4 passed, 0 skipped, 0 failed\) on no GPU", out, re.M), out
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["passed"] and results["environment"]["device"] is None
    assert (tmp_path / "real.onnx").is_file() and (tmp_path / "demo" / "run.json").is_file()


def _results(auc=0.97, onnx_diff=0.001, identical=True) -> dict:
    train = {"auc": auc, "n": 48, "seconds": 10.0, "precision": "bf16", "dice": None}
    return {"smoke": False, "environment": {"device": "NVIDIA H200", "torch": "2.11.0+cu130"},
            "checks": {"demo": train, "real": {**train, "n": 12}, "same_seed": {"identical": identical},
                       "predict": {"images": 12, "max_diff_against_cpu": 0.003},
                       "onnx": {"max_diff_against_torch": onnx_diff}}}


@pytest.mark.parametrize("change,failed", [({}, None), ({"auc": 0.80}, "demo phantoms: train"),
                                           ({"onnx_diff": 0.3}, "export: ONNX Runtime vs torch"),
                                           ({"identical": False}, "demo phantoms: same seed twice")])
def test_the_verdict_fails_a_check_that_is_off(gpu_check, capsys, change, failed):
    reference = {"checks": {"demo": {"auc": 0.975, "n": 48, "seconds": 33}, "real": {"auc": 0.9, "n": 12,
                                                                                    "seconds": 95}}}
    assert gpu_check.verdict(_results(**change), reference) is (failed is None)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("gpu-check: PASS" if failed is None else f"gpu-check: FAIL: {failed}"), last


def test_the_carried_subset_is_small_and_trains_as_the_original(gpu_check, tmp_path):
    from PIL import Image

    from sonocad.data import discover

    gpu_check.prepare(need(BUSI), tmp_path)
    samples = discover(tmp_path / "busi-60", ["benign", "malignant"])
    assert len(samples) == 60 and all(s.masks for s in samples)
    for s in samples:
        with Image.open(s.path) as img, Image.open(s.masks[0]) as mask:
            assert max(img.size) <= 256 and img.size == mask.size
    assert sum(f.stat().st_size for f in (tmp_path / "busi-60").rglob("*")) < 5 * 2 ** 20
