"""How long `sonocad adapt` takes, end to end, on 40 local scans: the shipped bus-base adapted to 40 BUS-BRA scans
(whole patients of official fold 1, drawn with --seed), as a user runs it (a new process: imports, model, decoding,
a cold duplicate search, cross-fitting, the run's files). The target: at most 2 minutes on 2 cores.

    .venv/bin/python bench/adapt_speed.py                   # bus-base, 40 BUS-BRA scans
    .venv/bin/python bench/adapt_speed.py --smoke           # a tiny base on 20 phantoms (the test suite)
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import SHARED, SMOKE_SIZE, Bench, phantoms, tiny_run  # noqa: E402  (bench/ on sys.path)


def add_arguments(ap) -> None:
    ap.add_argument("--base", help="the model to adapt (default bus-base; --smoke: a tiny run of its own unless given)")
    ap.add_argument("--n", type=int, default=40, help="local scans")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=SHARED, help="the folder holding busbra/ (default ../shared/data)")


def local_scans(bench: Bench) -> tuple[str, Path]:
    """(base, n labelled local scans: BUS-BRA patients of fold 1 as a manifest, or phantoms under --smoke)."""
    a = bench.args
    if bench.smoke:
        return a.base or str(tiny_run(bench.tmp() / "base")), phantoms(bench.tmp() / "local", min(a.n, 20), SMOKE_SIZE, seed=7)
    from loso import draw, target_split

    pool, _ = target_split("busbra", a.data)
    manifest = bench.tmp() / "local.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "group"], extrasaction="ignore")
        w.writeheader()
        w.writerows(draw(pool, a.n, a.seed))
    return a.base or "bus-base", manifest


def main(argv=None) -> int:
    bench = Bench.start("adapt_speed", __doc__, argv, add_arguments)
    a = bench.args
    base, data = local_scans(bench)
    out = bench.tmp() / "adapted"
    env = {**os.environ, "SONOCAD_CACHE": str(bench.tmp() / "cache")}      # a cold duplicate search, as a new user
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sonocad", "adapt", base, str(data), "--out", str(out), "--seed",
                        str(a.seed)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"bench/adapt_speed.py: sonocad adapt failed: {(r.stderr or r.stdout).strip()[-2000:]}")
    print(r.stdout, end="")
    m = json.loads((out / "metrics.json").read_text())
    ad = m["adapt"]
    return bench.finish({"seconds": round(seconds, 1), "inside_s": m["timing_seconds"]["total"], "n": m["n"],
                         "folds": ad["folds"], "blocks": ad["blocks"], "epochs": ad["epochs"],
                         "auc_out_of_fold": m["auc"]},
                        headline=f"adapt {base} on {m['n']} scans: {seconds:.1f} s end to end")


if __name__ == "__main__":
    raise SystemExit(main())
