"""What heatmaps cost: `sonocad predict` on a folder of 100 scans, alone and with `--heatmaps DIR`.

The target (issue: heatmaps cost at most one extra forward pass per image) is `predict --heatmaps` at most
1.5x `predict` alone. Both run through `sonocad.workflows.evaluate.predict_paths` on the same files (BUSI PNGs, or
synthetic phantoms without ../shared), each timed after a warm-up; the machine is named in the output.

    .venv/bin/python bench/explain_speed.py runs/busi
    .venv/bin/python bench/explain_speed.py runs/busi --images 100 --repeats 3
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from cpumeter import CpuMeter  # noqa: E402  (bench/ is on sys.path when a script runs)
from predict_folder import write_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))   # run from a checkout without installing

from sonocad.runtime.allocator import tune_allocator  # noqa: E402
from sonocad.workflows.evaluate import predict_paths  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def setup(doc: str, argv, images: int) -> argparse.Namespace:
    """RUN, --images, --repeats; the allocator tuned as the sonocad command tunes it; the machine printed."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--images", type=int, default=images)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    tune_allocator()
    import torch

    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads; run {a.run}", flush=True)
    return a


def main(argv=None) -> int:
    a = setup(__doc__, argv, 100)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "scans"
        what = write_folder(folder, a.images)
        predict_paths(a.run, [folder])                                    # warm-up
        print(f"{a.images} images ({what}); machine check: {CpuMeter.busy_now()}", flush=True)
        plain, heat = [], []
        for r in range(a.repeats):
            t0 = time.perf_counter()
            predict_paths(a.run, [folder])
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rows = predict_paths(a.run, [folder], heatmaps=Path(tmp) / f"heat-{r}")
            heat.append(time.perf_counter() - t0)
            assert len(rows) == a.images and all("heatmap" in row for row in rows)
    p, h = min(plain), min(heat)
    print(f"predict alone:        {p:.2f} s ({a.images / p:.1f} img/s), best of {a.repeats}")
    print(f"predict --heatmaps:   {h:.2f} s ({a.images / h:.1f} img/s), best of {a.repeats}")
    print(f"ratio: {h / p:.2f} (target at most 1.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
