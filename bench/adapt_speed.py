"""How long `sonocad adapt` takes, end to end, on 40 local scans: the shipped bus-base adapted to 40 BUS-BRA scans
(whole patients of official fold 1, drawn with --seed), as a user runs it (a new process: imports, model, decoding,
duplicate search, cross-fitting, the run's files). The issue's target: at most 2 minutes on 2 cores.

    .venv/bin/python bench/adapt_speed.py                   # bus-base, 40 BUS-BRA scans
    .venv/bin/python bench/adapt_speed.py --smoke           # a tiny run on 40 phantoms (seconds; the test suite)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
SONOCAD = [sys.executable, "-m", "sonocad"]


def machine() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    return f"{name}, {os.cpu_count()} CPUs"


def local_scans(work: Path, n: int, seed: int, smoke: bool) -> tuple[str, Path]:
    """(base, manifest of n labelled local scans)."""
    if smoke:
        from sonocad.data.synth import write_phantom_set

        write_phantom_set(work / "base-data", n=48, seed=3, size=64)
        write_phantom_set(work / "local", n=n, seed=7, size=64)
        subprocess.run([*SONOCAD, "train", str(work / "base-data"), "--out", str(work / "base"), "--img-size", "64",
                        "--head-epochs", "2", "--finetune-epochs", "1", "--batch-size", "8", "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        return str(work / "base"), work / "local"
    from loso import draw, target_split

    pool, _ = target_split("busbra")
    rows = draw(pool, n, seed)
    manifest = work / "local.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "group"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return "bus-base", manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="the model to adapt (default bus-base)")
    ap.add_argument("--n", type=int, default=40, help="local scans")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a tiny base and 40 phantoms of 64 px")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sonocad-adapt-speed-") as tmp:
        work = Path(tmp)
        base, data = local_scans(work, a.n, a.seed, a.smoke)
        env = {**os.environ, "SONOCAD_CACHE": str(work / "cache")}      # a cold duplicate search, as a new user
        t0 = time.perf_counter()
        r = subprocess.run([*SONOCAD, "adapt", a.base or base, str(data), "--out", str(work / "adapted"),
                            "--seed", str(a.seed)], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if r.returncode:
            print(r.stdout + r.stderr, file=sys.stderr)
            return r.returncode
        m = json.loads((work / "adapted" / "metrics.json").read_text())
    print(r.stdout, end="")
    print(f"adapt {a.base or base} on {m['n']} scans ({m['adapt']['mode']}, {m['adapt']['folds']} folds, "
          f"{m['adapt']['epochs']} epochs): {seconds:.1f} s end to end ({m['timing_seconds']['total']:.1f} s inside); "
          f"{machine()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
