"""`sonocad serve` under hostile load, on this machine only: 200 POST /api/predict requests, 8 in flight, good
and bad files mixed.

Starts the server on 127.0.0.1 (a free port) in a process of its own, and sends from 8 client threads: BUSI PNGs
(or phantoms without ../shared), a 19 MB noise PNG (4400 x 4400), a 64-megapixel all-white PNG of 80 kB, and bad
files: PostScript named .png, a truncated PNG, a GIF, text, an empty file, an 81-megapixel bomb, a form without
its file. Prints the answers by kind, the p50/p95 latency, the throughput and the server's peak memory (VmHWM).
Exit code 1 on any 5xx, any bad file not answered 4xx with a JSON {"error": ...}, any good one not 200, or a peak
over --max-peak-mib. Bounded: a fixed number of requests, a timeout each; traffic goes to 127.0.0.1 only. Needs
sonocad's serve extra (pip install -e '.[serve]').

    .venv/bin/python bench/serve_load.py bus-base --requests 200 --in-flight 8
    .venv/bin/python bench/serve_load.py --smoke
"""
from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from harness import ROOT, Bench, add_run_argument, copy_images, run_for  # noqa: E402  (bench/ is on sys.path)
from PIL import Image

SERVER = ("import sys, uvicorn; from sonocad.runtime.allocator import tune_allocator; tune_allocator(); "
          "from sonocad.serve.app import create_app; "
          "uvicorn.run(create_app(sys.argv[1]), host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')")


def add_arguments(p) -> None:
    add_run_argument(p)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--in-flight", type=int, default=8)
    p.add_argument("--max-peak-mib", type=float, default=4096, help="fail when the server's peak memory is larger")


def uploads(bench: Bench) -> tuple[list, list, list, str]:
    """(good, large, bad) uploads, each (name, bytes, content type), or None for a form without the file; and what
    the good PNGs are."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_hostile import EPS, white_png

    folder = bench.tmp() / "scans"
    what = copy_images(bench, folder, 8 if bench.smoke else 50)
    good = [(f.name, f.read_bytes(), "image/png") for f in sorted(folder.iterdir())]
    side = 1000 if bench.smoke else 4400
    noise, bomb, gif = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side), np.uint8)).save(noise, "PNG")
    Image.new("L", (9000, 9000)).save(bomb, "PNG")
    Image.new("L", (64, 64)).save(gif, "GIF")
    large = [("noise.png", noise.getvalue(), "image/png"), ("white.png", white_png(7990), "image/png")]
    bad = [("scan.png", EPS, "image/png"), ("cut.png", good[0][1][:len(good[0][1]) // 2], "image/png"),
           ("anim.gif", gif.getvalue(), "image/gif"), ("notes.txt", b"hello", "text/plain"),
           ("empty.png", b"", "image/png"), ("bomb.png", bomb.getvalue(), "image/png"), None]
    return good, large, bad, what


def peak_mib(pid: int) -> tuple[float, float]:
    """(VmHWM, VmRSS) of process `pid` in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS"))


def main(argv=None) -> int:
    bench = Bench.start("serve_load", __doc__, argv, add_arguments, extra="serve")
    a = bench.args
    import httpx

    requests, in_flight = (12, 2) if bench.smoke else (a.requests, a.in_flight)
    run = run_for(bench)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-c", SERVER, run, str(port)])
    try:
        good, large, bad, what = uploads(bench)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        # every 4th request a bad file, every 25th a large one, the rest good scans
        plan = [(bad[i // 4 % len(bad)], "bad") if i % 4 == 3 else (large[i // 25 % 2], "large") if i % 25 == 12
                else (good[i % len(good)], "good") for i in range(requests)]
        print(f"run {run}; {requests} requests, {in_flight} in flight: {dict(Counter(k for _, k in plan))}; "
              f"good scans: {what}", flush=True)

        def one(job) -> tuple[float, int, str, bool]:
            upload, kind = job
            t0 = time.perf_counter()
            if upload is None:
                r = httpx.post(url + "/api/predict", data={"note": "no file"}, timeout=300)
            else:
                r = httpx.post(url + "/api/predict", files={"file": upload}, timeout=300)
            try:
                body = r.json()
            except ValueError:
                body = {}
            one_line = isinstance(body.get("error"), str) and "\n" not in body["error"]
            return time.perf_counter() - t0, r.status_code, kind, one_line

        one(plan[0])                                                # warm-up
        _, rss_warm = peak_mib(server.pid)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as pool:
            results = list(pool.map(one, plan))
        wall = time.perf_counter() - t0
        hwm, _ = peak_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    lat = np.asarray([r[0] for r in results]) * 1000
    answers = {f"{kind} {status}": n for (kind, status), n in sorted(Counter((r[2], r[1]) for r in results).items())}
    print("answers: " + ", ".join(f"{k}: {n}" for k, n in answers.items()))
    wrong = [r for r in results if r[1] >= 500 or (r[2] == "bad" and not (400 <= r[1] < 500 and r[3]))
             or (r[2] != "bad" and r[1] != 200)]
    print(f"wrong answers: {len(wrong)} of {requests} (5xx, a bad file without a JSON 4xx, a good one not 200)")
    print(f"latency p50 {np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms, max {lat.max():.0f} ms; "
          f"throughput {requests / wall:.1f} requests/s")
    print(f"server memory: {rss_warm:.0f} MiB after the warm-up, peak {hwm:.0f} MiB (bound {a.max_peak_mib:.0f} MiB)")
    bench.finish({"requests": requests, "wrong": len(wrong), "p50_ms": float(np.percentile(lat, 50)),
                  "p95_ms": float(np.percentile(lat, 95)), "requests_per_s": requests / wall,
                  "peak_mib": hwm}, {"run": run, "in_flight": in_flight, "source": what, "answers": answers})
    return 0 if not wrong and hwm <= a.max_peak_mib else 1


if __name__ == "__main__":
    raise SystemExit(main())
