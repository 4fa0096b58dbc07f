"""Candidates for bus-base v2 (docs/base-model.md), leave one site out: runs trained on one site alone, each and
their ensembles scored on every benign and malignant scan of the other site.

Each run's logits are computed once per test-time view (the image, its mirror image, each zoom and its mirror
image) and cached in --work; a test-time augmentation choice (--tta: none, mirror, full = the image and its mirror
image at each zoom of the run's config) averages its views' logits, an ensemble its members' logits, as a cv
folder does. Every candidate is compared with the first run (today's
recipe, the reference) by a paired DeLong test on the same scans. Named ensembles: `--ensemble NAME=RUN,RUN`;
without any, the mean of all runs given.

    .venv/bin/python bench/base_screen.py --train busi --runs runs/loso/busi-s0 runs/loso/busi-s1 runs/loso/busi-s2
    .venv/bin/python bench/base_screen.py --train busbra --runs runs/loso/busbra-s0 runs/loso/busbra-lite1-s0 \
        --ensemble seeds=runs/loso/busbra-s0,runs/loso/busbra-s1 lite01=runs/loso/busbra-s0,runs/loso/busbra-lite1-s0
    .venv/bin/python bench/base_screen.py --train busi --runs runs/loso/busi-s0 --tta full mirror none
    .venv/bin/python bench/base_screen.py --train busi --smoke      # stand-in sites of phantoms, two tiny runs
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.special import expit  # noqa: E402

from sonocad.data import discover  # noqa: E402
from sonocad.deploy.predictor import Predictor  # noqa: E402
from sonocad.evaluation.metrics import binary_metrics, delong_test  # noqa: E402
from sonocad.evaluation.operating import to_logits  # noqa: E402
from sonocad.models.infer import run_batches, tta_views  # noqa: E402

from harness import (  # noqa: E402, I001
    CLASSES, ROOT, SHARED, SITES, TTA_CHOICES, TTA_HELP, Bench, fake_sites, other_site, tiny_run, tta_setting)

View = tuple[float, bool]       # (zoom, mirrored), as infer.tta_views


def view_logits(run: str, paths: list[str], cache: Path) -> tuple[np.ndarray, list[View], float]:
    """The run's logit of P(malignant) for each test-time view of its config and each path, (views, N), with
    those views (cached), and the seconds it took (0 when cached). A cv folder's members are averaged per view."""
    if cache.is_file():
        with np.load(cache) as f:
            return f["logits"], [(float(zoom), bool(flip)) for zoom, flip in f["views"]], 0.0
    t0 = time.perf_counter()
    p = Predictor.load(run)
    images = p.decode(paths)[0]
    views = tta_views(True, p.info.config.tta_zooms)
    z = np.zeros((len(views), len(paths)))
    for model, pipeline in p.members:          # BatchNorm folded already (deploy.predictor.load_run)
        for k, view in enumerate(views):
            raw = torch.from_numpy(run_batches(model, images, pipeline, views=[view]))
            z[k] += to_logits(model.probabilities(raw)[:, 1].double().numpy()) / len(p.members)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, logits=z, views=np.asarray(views, float))
    return z, views, time.perf_counter() - t0


def choice_logits(logits: np.ndarray, views: list[View], choice: str) -> np.ndarray:
    """The mean logit over the views a test-time augmentation choice (harness.TTA_CHOICES) takes, for the run
    whose views are `views` (its zooms: the views' other than 1)."""
    setting = tta_setting(choice, sorted({zoom for zoom, _ in views} - {1.0}))
    return logits[[views.index(v) for v in tta_views(setting["tta"], setting["tta_zooms"])]].mean(0)


def add_arguments(ap) -> None:
    ap.add_argument("--train", required=True, choices=list(SITES), help="the site the runs were trained on")
    ap.add_argument("--runs", nargs="+", help="runs trained on --train alone; the first is the reference "
                    "(--smoke: two tiny ones)")
    ap.add_argument("--ensemble", nargs="*", default=[], metavar="NAME=RUN,RUN", help="named ensembles")
    ap.add_argument("--tta", nargs="+", default=["full"], choices=TTA_CHOICES,
                    help=f"{TTA_HELP}; each candidate is scored under each (default full), the first choice of the "
                    "first run is the reference")
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
    views, seconds = {}, {}
    for run, name in names.items():
        cache = work / f"views-{str(Path(run).resolve()).strip('/').replace('/', '_')}.npz"
        logits, run_views, seconds[run] = view_logits(run, paths, cache)
        views[run] = logits, run_views
        print(f"{name}: scored {len(paths)} scans of {other} in {len(run_views)} views in {seconds[run]:.0f} s "
              "(0: cached)", flush=True)
    groups = dict(g.split("=", 1) for g in a.ensemble) if a.ensemble else {"all": ",".join(a.runs)}
    for name, members in groups.items():
        missing = [m for m in members.split(",") if m not in views]
        if missing:
            raise SystemExit(f"bench/base_screen.py: ensemble {name}: {', '.join(missing)} not among --runs")
    candidates = {}
    for tta in a.tta:
        logits = {r: choice_logits(z, v, tta) for r, (z, v) in views.items()}
        tag = f" [{tta}]" if len(a.tta) > 1 else ""
        candidates.update({names[r] + tag: logits[r] for r in a.runs})
        candidates.update({f"ensemble {name}{tag}": np.mean([logits[m] for m in members.split(",")], axis=0)
                           for name, members in groups.items()})
    reference = next(iter(candidates))
    out = {"train": a.train, "target": other, "n": len(y), "n_malignant": int(y.sum()), "tta": a.tta,
           "views": {names[r]: len(v) for r, v in views.items()}, "candidates": {}}
    for name, z in candidates.items():
        m = binary_metrics(y, expit(z))
        row = out["candidates"][name] = {"auc": m["auc"], "auc_ci": m["auc_ci"]}
        line = f"{name:36s} AUC {m['auc']:.3f} ({m['auc_ci'][0]:.3f}-{m['auc_ci'][1]:.3f})"
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
