"""Candidates for bus-base v2 (docs/base-model.md), leave one site out: runs trained on one site alone, each and
their ensembles scored on every benign and malignant scan of the other site.

Each run's probabilities (its own test-time augmentation) are computed once and cached in --work; an ensemble
averages its members' logits, as a cv folder does. Every candidate is compared with the first run (today's
recipe, the reference) by a paired DeLong test on the same scans. Named ensembles: `--ensemble NAME=RUN,RUN`;
without any, the mean of all runs given.

    .venv/bin/python bench/base_screen.py --train busi --runs runs/loso/busi-s0 runs/loso/busi-s1 runs/loso/busi-s2
    .venv/bin/python bench/base_screen.py --train busbra --runs runs/loso/busbra-s0 runs/loso/busbra-lite1-s0 \
        --ensemble seeds=runs/loso/busbra-s0,runs/loso/busbra-s1 lite01=runs/loso/busbra-s0,runs/loso/busbra-lite1-s0
    .venv/bin/python bench/base_screen.py --train busi --smoke      # stand-in sites of phantoms, two tiny runs
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from scipy.special import expit  # noqa: E402

from sonocad.data import discover  # noqa: E402
from sonocad.deploy.predictor import Predictor  # noqa: E402
from sonocad.evaluation.metrics import binary_metrics, delong_test  # noqa: E402
from sonocad.evaluation.operating import to_logits  # noqa: E402

from harness import CLASSES, ROOT, SHARED, SITES, Bench, fake_sites, other_site, tiny_run  # noqa: E402, I001


def run_logits(run: str, paths: list[str], cache: Path) -> tuple[np.ndarray, float]:
    """The run's logit of P(malignant) for each path (cached), and the seconds it took (0 when cached)."""
    if cache.is_file():
        return np.load(cache), 0.0
    t0 = time.perf_counter()
    z = to_logits(Predictor.load(run).predict_proba(paths)[:, 1])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, z)
    return z, time.perf_counter() - t0


def add_arguments(ap) -> None:
    ap.add_argument("--train", required=True, choices=list(SITES), help="the site the runs were trained on")
    ap.add_argument("--runs", nargs="+", help="runs trained on --train alone; the first is the reference "
                    "(--smoke: two tiny ones)")
    ap.add_argument("--ensemble", nargs="*", default=[], metavar="NAME=RUN,RUN", help="named ensembles")
    ap.add_argument("--work", help="cached scores and the result (default runs/base-screen)")
    ap.add_argument("--data", type=Path, default=SHARED, help="the folder of the two sites (default ../shared/data)")


def main(argv=None) -> int:
    bench = Bench.start("base_screen", __doc__, argv, add_arguments)
    a = bench.args
    if bench.smoke:
        a.work = str(a.work or bench.tmp())
        a.data = fake_sites(Path(a.work), n=48)
        a.runs = a.runs or [str(tiny_run(Path(a.work) / f"run{e}", a.data / SITES[a.train], head_epochs=e))
                            for e in (1, 2)]
    elif not a.runs:
        raise SystemExit("bench/base_screen.py: --runs RUN [RUN ...] is required")
    other = other_site(a.train)
    work = Path(a.work or ROOT / "runs" / "base-screen") / f"{a.train}-to-{other}"
    samples = discover(a.data / SITES[other], CLASSES)
    paths = [s.path for s in samples]
    y = np.asarray([s.label == CLASSES[1] for s in samples], int)
    names = {r: Path(r).name for r in a.runs}
    if len(set(names.values())) < len(names):           # runs/a/run, runs/b/run
        names = {r: "/".join(Path(r).parts[-2:]) for r in a.runs}
    logits, seconds = {}, {}
    for run, name in names.items():
        cache = work / f"logits-{str(Path(run).resolve()).strip('/').replace('/', '_')}.npy"
        logits[run], seconds[run] = run_logits(run, paths, cache)
        print(f"{name}: scored {len(paths)} scans of {other} in {seconds[run]:.0f} s (0: cached)", flush=True)
    groups = dict(g.split("=", 1) for g in a.ensemble) if a.ensemble else {"all": ",".join(a.runs)}
    candidates = {names[r]: logits[r] for r in a.runs}
    for name, members in groups.items():
        missing = [m for m in members.split(",") if m not in logits]
        if missing:
            raise SystemExit(f"bench/base_screen.py: ensemble {name}: {', '.join(missing)} not among --runs")
        candidates[f"ensemble {name}"] = np.mean([logits[m] for m in members.split(",")], axis=0)
    reference = names[a.runs[0]]
    out = {"train": a.train, "target": other, "n": len(y), "n_malignant": int(y.sum()), "candidates": {}}
    for name, z in candidates.items():
        m = binary_metrics(y, expit(z))
        row = out["candidates"][name] = {"auc": m["auc"], "auc_ci": m["auc_ci"]}
        line = f"{name:28s} AUC {m['auc']:.3f} ({m['auc_ci'][0]:.3f}-{m['auc_ci'][1]:.3f})"
        if name != reference:
            row["delong_vs_reference"] = d = delong_test(y, expit(z), expit(candidates[reference]))
            line += f"  minus {reference}: {d['diff']:+.3f} (p={d['p_value']:.3g})"
        print(line, flush=True)
    out["seconds_scoring"] = {names[r]: round(s, 1) for r, s in seconds.items()}
    work.mkdir(parents=True, exist_ok=True)
    (work / "result.json").write_text(json.dumps(out, indent=1, default=float))
    return bench.finish({n.replace(" ", "_"): c["auc"] for n, c in out["candidates"].items()}, details=out)


if __name__ == "__main__":
    raise SystemExit(main())
