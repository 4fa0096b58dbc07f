"""`sonocad serve` under load, on this machine only: 200 POST /api/predict requests with 8 in flight.

Starts the server on 127.0.0.1 (a free port) in this process, sends BUSI PNGs (or phantoms without ../shared)
from 8 client threads, and prints the errors, the p50/p95 latency and the throughput. Bounded: a fixed number of
requests, a timeout each; traffic goes to 127.0.0.1 only.

    .venv/bin/python bench/serve_load.py runs/busi --requests 200 --in-flight 8
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from explain_speed import cpu_name  # noqa: E402
from predict_folder import write_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--in-flight", type=int, default=8)
    a = ap.parse_args(argv)
    import httpx

    from sonocad.runtime.allocator import tune_allocator
    from sonocad.serve.app import create_app, serve_in_background

    tune_allocator()
    url, server = serve_in_background(create_app(a.run))
    with tempfile.TemporaryDirectory() as tmp:
        what = write_folder(Path(tmp) / "scans", 50)
        files = sorted((Path(tmp) / "scans").iterdir())
        bodies = [f.read_bytes() for f in files]
    print(f"machine: {cpu_name()}; run {a.run}; {a.requests} requests, {a.in_flight} in flight, {what}", flush=True)

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = httpx.post(url + "/api/predict", files={"file": (f"{i}.png", bodies[i % len(bodies)], "image/png")},
                       timeout=120)
        return time.perf_counter() - t0, r.status_code

    one(0)                                                      # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.in_flight) as pool:
        results = list(pool.map(one, range(a.requests)))
    wall = time.perf_counter() - t0
    server.should_exit = True
    lat = np.asarray([r[0] for r in results]) * 1000
    errors = sum(r[1] != 200 for r in results)
    print(f"errors: {errors} of {a.requests}")
    print(f"latency p50 {np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms; "
          f"throughput {a.requests / wall:.1f} requests/s (six views and a heatmap each)")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
