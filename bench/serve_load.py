"""`sonocad serve` under load, on this machine only: 200 POST /api/predict requests with 8 in flight.

Starts the server on 127.0.0.1 (a free port) in this process, sends BUSI PNGs (or phantoms without ../shared)
from 8 client threads, and prints the errors, the p50/p95 latency and the throughput. Bounded: a fixed number of
requests, a timeout each; traffic goes to 127.0.0.1 only. Needs sonocad's serve extra (pip install -e '.[serve]').

    .venv/bin/python bench/serve_load.py runs/busi --requests 200 --in-flight 8
    .venv/bin/python bench/serve_load.py --smoke
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from harness import Bench, add_run_argument, copy_images, run_for  # noqa: E402  (bench/ is on sys.path)



def add_arguments(p) -> None:
    add_run_argument(p)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--in-flight", type=int, default=8)


def main(argv=None) -> int:
    bench = Bench.start("serve_load", __doc__, argv, add_arguments, extra="serve")
    a = bench.args
    import httpx

    from sonocad.serve.app import create_app, serve_in_background

    requests, in_flight = (8, 2) if bench.smoke else (a.requests, a.in_flight)
    run = run_for(bench)
    url, server = serve_in_background(create_app(run))
    what = copy_images(bench, bench.tmp() / "scans", 8 if bench.smoke else 50)
    bodies = [f.read_bytes() for f in sorted((bench.tmp() / "scans").iterdir())]
    print(f"run {run}; {requests} requests, {in_flight} in flight, {what}", flush=True)

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = httpx.post(url + "/api/predict", files={"file": (f"{i}.png", bodies[i % len(bodies)], "image/png")},
                       timeout=120)
        return time.perf_counter() - t0, r.status_code

    one(0)                                                      # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    server.should_exit = True
    lat = np.asarray([r[0] for r in results]) * 1000
    errors = sum(r[1] != 200 for r in results)
    print(f"errors: {errors} of {requests}")
    print(f"latency p50 {np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms; "
          f"throughput {requests / wall:.1f} requests/s (six views and a heatmap each)")
    bench.finish({"requests": requests, "errors": errors, "p50_ms": float(np.percentile(lat, 50)),
                  "p95_ms": float(np.percentile(lat, 95)), "requests_per_s": requests / wall},
                 {"run": run, "in_flight": in_flight, "source": what})
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
