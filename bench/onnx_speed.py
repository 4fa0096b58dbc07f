"""ONNX Runtime against PyTorch on 2 cores: single-view throughput, one scan with six views and a heatmap, and
the int8 model's AUC against fp32 on the run's own test part.

Exports the run to fp32 and int8 ONNX files in a temporary folder (`sonocad.deploy.export.export_onnx`), then times
batches of 32 images at the run's input size (BUSI PNGs, or phantoms without ../shared): PyTorch as `predict`
runs it (BatchNorm folded, bf16 autocast on CPUs with native bf16), ONNX Runtime fp32 and int8, one view each.

    .venv/bin/python bench/onnx_speed.py runs/busi
"""
from __future__ import annotations

import csv
import sys
import tempfile
import time
from pathlib import Path

from cpumeter import CpuMeter  # noqa: E402
from explain_speed import setup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402

from sonocad.analysis.explain import explained_views  # noqa: E402
from sonocad.deploy.export import export_onnx  # noqa: E402
from sonocad.evaluation.metrics import delong_auc_ci  # noqa: E402
from sonocad.models.infer import run_batches  # noqa: E402
from sonocad.workflows.evaluate import load  # noqa: E402


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    a = setup(__doc__, argv, 256)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "m.onnx", Path(tmp) / "m8.onnx"
        export_onnx(a.run, fp32)
        export_onnx(a.run, int8, int8=True)
        engines = {"pytorch": load(a.run), "onnx fp32": load(fp32), "onnx int8": load(int8)}
        with open(Path(a.run) / "predictions.csv") as f:
            rows = list(csv.DictReader(f))
        test_paths = [r["path"] for r in rows]
        y = np.asarray([r["label"] == engines["pytorch"].classes[1] for r in rows], int)
        images = engines["pytorch"].decode(test_paths)[0]
        images = np.concatenate([images] * (a.images // len(images) + 1))[:a.images]
        print(f"{a.images} images of {images.shape[-1]} px (the run's test part, cycled); machine check: "
              f"{CpuMeter.busy_now()}", flush=True)
        for name, p in engines.items():
            model, pipeline = p.members[0]
            run_batches(model, images[:32], pipeline, batch_size=32)          # warm-up
            t = best(lambda: run_batches(model, images, pipeline, batch_size=32), a.repeats)
            print(f"single view, {name}: {a.images / t:.0f} img/s", flush=True)
        one = images[:1]
        p = engines["pytorch"]
        t = best(lambda: explained_views(p, one), 5)
        print(f"one scan, six views + heatmap, pytorch: {1000 * t:.0f} ms")
        t = best(lambda: engines["onnx fp32"].predict_proba(one), 5)
        print(f"one scan, six views, onnx fp32: {1000 * t:.0f} ms")
        test = engines["pytorch"].decode(test_paths)[0]
        for name in ("onnx fp32", "onnx int8"):
            auc, lo, hi = delong_auc_ci(y, engines[name].predict_proba(test)[:, 1])
            print(f"AUC on the run's test part (n={len(y)}), {name}: {auc:.4f} ({lo:.3f}-{hi:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
