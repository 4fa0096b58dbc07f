"""Every maintained benchmark in bench/ still runs: each one's --smoke mode, on a few synthetic phantoms, ends with
its result line (bench/harness.py); bench/speed.py also from the shell, ending with its speedup line."""
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "harness")
TIMES_A_RUN = {"predict_folder", "explain_speed", "onnx_speed", "serve_load"}    # RUN argument: the tiny run


@pytest.fixture(autouse=True)
def bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)          # a smoke run sets one thread, and puts it back when it ends well


def smoke(name: str, *argv: str) -> int:
    return importlib.import_module(name).main([*argv, "--smoke"])


def test_every_script_in_bench_is_smoke_tested():
    assert set(SCRIPTS) == {"speed", "predict_folder", "explain_speed", "onnx_speed", "serve_load", "ddp_speed",
                            "dedup_scale", "dedup_calibrate", "loso", "adapt_curve", "adapt_speed",
                            "region_stage", "decode_digest", "base_screen"}, SCRIPTS


SITE_ARGUMENTS = {"adapt_curve": ["busbra", "--both-site"], "region_stage": ["--train", "busi"],
                  "base_screen": ["--train", "busi", "--tta", "full", "none"]}


@pytest.mark.parametrize("name", [s for s in SCRIPTS if s not in ("loso", "speed")])
def test_smoke(name, tiny_run, tmp_path, capsys):
    argv = [str(tiny_run)] if name in TIMES_A_RUN else SITE_ARGUMENTS.get(name, [])
    if name == "adapt_speed":
        argv = ["--base", str(tiny_run)]          # the suite's tiny run: no base of its own to train
    if name == "predict_folder":
        argv += ["--tta", "none", "full"]
    assert smoke(name, *argv, "--json", str(tmp_path / "r.json")) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^result {name} \(smoke\): \S+=", out, re.M), out[-2000:]
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["benchmark"] == name and record["smoke"] and record["summary"] and record["machine"]["cpu"]


def test_loso_smoke_runs_each_experiment(tmp_path, capsys):
    work = str(tmp_path / "loso")
    assert smoke("loso", "learning", "busbra", "--work", work, "--arms", "imagenet", "no-averaging") == 0
    assert smoke("loso", "weight-averaging", "busbra", "--work", work, "--alphas", "0", "0.5") == 0
    assert smoke("loso", "calibration", "busbra", "--work", work) == 0
    names = sorted(p.name for p in Path(work).glob("*.json"))
    assert names == ["calibration-busbra-8-d5.json", "learning-busbra-12-s0.json",
                     "weight-averaging-busbra-12-s0-a0-0.5.json"], names
    learned = json.loads((Path(work) / "learning-busbra-12-s0.json").read_text())
    assert {"imagenet", "no-averaging", "init_alone"} <= set(learned["arms"][0])


def test_speed_prints_its_speedup_line_from_the_shell(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "speed.py"), "--smoke", "--json", "speed.json"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.fullmatch(r"speedup train=\d+\.\d\d infer=\d+\.\d\d", r.stdout.strip().splitlines()[-1]), r.stdout[-2000:]
    summary = json.loads((tmp_path / "speed.json").read_text())["summary"]
    assert summary["train_sonocad_images_per_s"] > 0 and summary["infer_sonocad_images_per_s"] > 0
