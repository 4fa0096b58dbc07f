"""Peak memory of a training run with the decoded images in memory and in the on-disk cache (--image-cache).

Writes N synthetic B-mode phantoms (sonocad.data.synth, a few hundred drawn and re-used with a per-file gain so
every file differs), then trains the default model on them twice, each in a fresh process, and prints each run's
peak RSS, the size of the decoded images, and the time of building and of reusing the cache.

    .venv/bin/python bench/cache_memory.py --n 4000 --size 224 --out /tmp/cache-bench
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def write_set(folder: Path, n: int, size: int) -> None:
    from sonocad.data.synth import make_phantom

    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) >= n:
        return
    rng = np.random.default_rng(0)
    base = {label: [make_phantom(label, rng, size)[0] for _ in range(100)] for label in ("benign", "malignant")}
    for i in range(n):
        label = ("benign", "malignant")[i % 2]
        img = base[label][(i // 2) % 100].astype(np.float32) * rng.uniform(0.8, 1.2)
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / label / f"{label} ({i}).png")


def child(data: str, out: str, cache: str) -> None:
    from sonocad.workflows.train import fit

    t0 = time.perf_counter()
    m = fit(data, out, image_cache=cache, head_epochs=1, finetune_epochs=1, seed=0, dedup=False, progress=False,
            overwrite=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cache": cache, "peak_rss_mb": round(peak), "seconds": round(time.perf_counter() - t0, 1),
                      "data_seconds": m["timing_seconds"]["data"], "auc": m["auc"]}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", default="/tmp/sonocad-cache-bench")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(*a.child)
        return 0
    out = Path(a.out)
    write_set(out / "data", a.n, a.size)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print("machine:", next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?"))
    print(f"{a.n} images; decoded at 224 px they take {a.n * 224 * 224 / 2**20:.0f} MiB")
    env = {**os.environ, "SONOCAD_CACHE": str(out / "cache"), "PYTHONPATH": str(ROOT / "src")}
    for cache in ("memory", "disk", "disk"):       # the second disk run reuses the cache the first built
        r = subprocess.run([sys.executable, __file__, "--child", str(out / "data"), str(out / f"run-{cache}"), cache],
                           capture_output=True, text=True, env=env)
        line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 else r.stderr.strip().splitlines()[-1]
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
