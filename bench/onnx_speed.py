"""ONNX Runtime against PyTorch on 2 cores: single-view throughput, one scan with six views and a heatmap, and
the int8 model's AUC against fp32 on the run's own test part.

Exports the run to fp32 and int8 ONNX files in a temporary folder (`sonocad.deploy.export.export_onnx`), then times
batches of 32 images at the run's input size (the run's test part, cycled): PyTorch as `predict` runs it
(BatchNorm folded, bf16 autocast on CPUs with native bf16), ONNX Runtime fp32 and int8, one view each.
Needs sonocad's onnx extra (pip install -e '.[onnx]').

    .venv/bin/python bench/onnx_speed.py runs/busi
    .venv/bin/python bench/onnx_speed.py --smoke        # a tiny run of its own, fp32 export only
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
from harness import Bench, add_run_argument, run_for  # noqa: E402  (bench/ is on sys.path)

from sonocad.analysis.explain import explained_views  # noqa: E402
from sonocad.deploy.export import export_onnx  # noqa: E402
from sonocad.evaluation.metrics import delong_auc_ci  # noqa: E402
from sonocad.models.infer import run_batches  # noqa: E402
from sonocad.workflows.evaluate import load  # noqa: E402


def add_arguments(p) -> None:
    add_run_argument(p)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    bench = Bench.start("onnx_speed", __doc__, argv, add_arguments, extra="onnx")
    a = bench.args
    n, repeats = (16, 1) if bench.smoke else (a.images, a.repeats)
    run = run_for(bench)
    files = {"onnx fp32": bench.tmp() / "m.onnx", "onnx int8": bench.tmp() / "m8.onnx"}
    if bench.smoke:                     # int8 calibration is export's slowest part; tests/test_export.py checks it
        del files["onnx int8"]
    for name, path in files.items():
        export_onnx(run, path, int8=name.endswith("int8"))
    engines = {"pytorch": load(run), **{name: load(path) for name, path in files.items()}}
    with open(Path(run) / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    test_paths = [r["path"] for r in rows]
    y = np.asarray([r["label"] == engines["pytorch"].classes[1] for r in rows], int)
    test = engines["pytorch"].decode(test_paths)[0]
    images = np.concatenate([test] * (n // len(test) + 1))[:n]
    print(f"{n} images of {images.shape[-1]} px (the run's test part, cycled)", flush=True)
    figures = {}
    for name, p in engines.items():
        model, pipeline = p.members[0]
        run_batches(model, images[:32], pipeline, batch_size=32)          # warm-up
        t = best(lambda: run_batches(model, images, pipeline, batch_size=32), repeats)
        figures[f"{name.replace(' ', '_')}_images_per_s"] = n / t
        print(f"single view, {name}: {n / t:.0f} img/s", flush=True)
    one = images[:1]
    t = best(lambda: explained_views(engines["pytorch"], one), 1 if bench.smoke else 5)
    figures["pytorch_six_views_heatmap_ms"] = 1000 * t
    print(f"one scan, six views + heatmap, pytorch: {1000 * t:.0f} ms")
    t = best(lambda: engines["onnx fp32"].predict_proba(one), 1 if bench.smoke else 5)
    figures["onnx_fp32_six_views_ms"] = 1000 * t
    print(f"one scan, six views, onnx fp32: {1000 * t:.0f} ms")
    for name in files:
        auc, lo, hi = delong_auc_ci(y, engines[name].predict_proba(test)[:, 1])
        figures[f"{name.replace(' ', '_')}_auc"] = auc
        print(f"AUC on the run's test part (n={len(y)}), {name}: {auc:.4f} ({lo:.3f}-{hi:.3f})")
    return bench.finish(figures, {"run": run, "images": n, "test_part": len(y)})


if __name__ == "__main__":
    raise SystemExit(main())
