"""What heatmaps cost: `sonocad predict` on a folder of 100 scans, alone and with `--heatmaps DIR`.

The target (issue: heatmaps cost at most one extra forward pass per image) is `predict --heatmaps` at most
1.5x `predict` alone. Both run through `sonocad.workflows.evaluate.predict_paths` on the same files (BUSI PNGs, or
synthetic phantoms without ../shared), each timed after a warm-up; the machine is named in the output.

    .venv/bin/python bench/explain_speed.py runs/busi
    .venv/bin/python bench/explain_speed.py runs/busi --images 100 --repeats 3
    .venv/bin/python bench/explain_speed.py --smoke
"""
from __future__ import annotations

import time

from harness import Bench, add_run_argument, copy_images, run_for  # noqa: E402  (bench/ is on sys.path)

from sonocad.workflows.evaluate import predict_paths  # noqa: E402


def add_arguments(p) -> None:
    add_run_argument(p)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)


def main(argv=None) -> int:
    bench = Bench.start("explain_speed", __doc__, argv, add_arguments)
    a = bench.args
    n, repeats = (8, 1) if bench.smoke else (a.images, a.repeats)
    run = run_for(bench)
    folder = bench.tmp() / "scans"
    what = copy_images(bench, folder, n)
    predict_paths(run, [folder])                                    # warm-up
    print(f"{n} images ({what}); run {run}", flush=True)
    plain, heat = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        predict_paths(run, [folder])
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows = predict_paths(run, [folder], heatmaps=bench.tmp() / f"heat-{r}")
        heat.append(time.perf_counter() - t0)
        assert len(rows) == n and all("heatmap" in row for row in rows)
    p, h = min(plain), min(heat)
    print(f"predict alone:        {p:.2f} s ({n / p:.1f} img/s), best of {repeats}")
    print(f"predict --heatmaps:   {h:.2f} s ({n / h:.1f} img/s), best of {repeats}")
    print(f"ratio: {h / p:.2f} (target at most 1.5)")
    return bench.finish({"images": n, "predict_images_per_s": n / p, "heatmaps_images_per_s": n / h,
                         "ratio": h / p}, {"run": run, "source": what, "repeats": repeats})


if __name__ == "__main__":
    raise SystemExit(main())
