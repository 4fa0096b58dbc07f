"""`sonocad serve` under hostile load, on this machine only: 200 POST /api/predict requests, 8 in flight, good
and bad files mixed.

Starts the server on 127.0.0.1 (a free port) in a process of its own, and sends from 8 client threads: BUSI PNGs
(or phantoms without ../shared), a 19 MB noise PNG (4400 x 4400), a 64-megapixel all-white PNG of 80 kB, and bad
files: PostScript named .png, a truncated PNG, a GIF, text, an empty file, an 81-megapixel bomb, a form without
its file. Prints the answers by kind, the p50/p95 latency, the throughput and the server's peak memory (VmHWM).
Exit code 1 on any 5xx, any bad file not answered 4xx with a JSON {"error": ...}, any good one not 200, or a peak
over --max-peak-mib. Bounded: a fixed number of requests, a timeout each; traffic goes to 127.0.0.1 only.

    .venv/bin/python bench/serve_load.py bus-base --requests 200 --in-flight 8
"""
from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from explain_speed import cpu_name  # noqa: E402
from predict_folder import write_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

SERVER = ("import sys, uvicorn; from sonocad.runtime.allocator import tune_allocator; tune_allocator(); "
          "from sonocad.serve.app import create_app; "
          "uvicorn.run(create_app(sys.argv[1]), host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')")


def uploads(folder: Path) -> tuple[list, list, list, str]:
    """(good, large, bad) uploads, each (name, bytes, content type), or None for a form without the file; and what
    the good PNGs are."""
    from test_hostile import EPS, white_png

    what = write_folder(folder, 50)
    good = [(f.name, f.read_bytes(), "image/png") for f in sorted(folder.iterdir())]
    noise, bomb, gif = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (4400, 4400), np.uint8)).save(noise, "PNG")
    Image.new("L", (9000, 9000)).save(bomb, "PNG")
    Image.new("L", (64, 64)).save(gif, "GIF")
    large = [("noise.png", noise.getvalue(), "image/png"), ("white.png", white_png(7990), "image/png")]
    bad = [("scan.png", EPS, "image/png"), ("cut.png", good[0][1][:4000], "image/png"),
           ("anim.gif", gif.getvalue(), "image/gif"), ("notes.txt", b"hello", "text/plain"),
           ("empty.png", b"", "image/png"), ("bomb.png", bomb.getvalue(), "image/png"), None]
    return good, large, bad, what


def peak_mib(pid: int) -> tuple[float, float]:
    """(VmHWM, VmRSS) of process `pid` in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--in-flight", type=int, default=8)
    ap.add_argument("--max-peak-mib", type=float, default=4096, help="fail when the server's peak memory is larger")
    a = ap.parse_args(argv)
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-c", SERVER, a.run, str(port)])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            good, large, bad, what = uploads(Path(tmp) / "scans")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        # every 4th request a bad file, every 25th a large one, the rest good scans
        plan = [(bad[i // 4 % len(bad)], "bad") if i % 4 == 3 else (large[i // 25 % 2], "large") if i % 25 == 12
                else (good[i % len(good)], "good") for i in range(a.requests)]
        print(f"machine: {cpu_name()}; run {a.run}; {a.requests} requests, {a.in_flight} in flight: "
              f"{Counter(k for _, k in plan)}; good scans: {what}", flush=True)

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
        with ThreadPoolExecutor(a.in_flight) as pool:
            results = list(pool.map(one, plan))
        wall = time.perf_counter() - t0
        hwm, _ = peak_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    lat = np.asarray([r[0] for r in results]) * 1000
    print("answers: " + ", ".join(f"{kind} {status}: {n}" for (kind, status), n in
                                  sorted(Counter((r[2], r[1]) for r in results).items())))
    wrong = [r for r in results if r[1] >= 500 or (r[2] == "bad" and not (400 <= r[1] < 500 and r[3]))
             or (r[2] != "bad" and r[1] != 200)]
    print(f"wrong answers: {len(wrong)} of {a.requests} (5xx, a bad file without a JSON 4xx, a good one not 200)")
    print(f"latency p50 {np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms, max {lat.max():.0f} ms; "
          f"throughput {a.requests / wall:.1f} requests/s")
    print(f"server memory: {rss_warm:.0f} MiB after the warm-up, peak {hwm:.0f} MiB (bound {a.max_peak_mib:.0f} MiB)")
    return 0 if not wrong and hwm <= a.max_peak_mib else 1


if __name__ == "__main__":
    raise SystemExit(main())
