"""Leave one site out: `sonocad adapt` against the base model as it is, calibration alone, and the same adapt
procedure started from ImageNet, with k local scans of the target site.

The target sites and their split (bench/loso.py's `target_split`): BUS-BRA dev, pool = official fold 1, held-back
part = fold 2 (grouped by patient); BUSI, two halves of its duplicate groups. k scans are drawn from the pool as
whole groups (bench/loso.py's `draw`, seed 1000 k + d for draw d); every arm uses the same scans. Figures on the
held-back part (where the learning curve is reported) and on the pool's undrawn rest (the selection part,
where adapt's settings were chosen).

Each arm runs adapt's own core, `sonocad.workflows.adapt.cross_fit` (folds by group, head fine-tuned in each, the
schedule chosen on the pooled out-of-fold scores, Platt scaling, the final head on all k scans), on backbone
features computed once per base and site (`training.headfit.view_features`): the backbone is frozen, so the
adapted model's score of a held-back image is its head applied to those features. A standalone `sonocad adapt`
draws its augmented views image by image and also groups the k scans' duplicates; this bench groups by the
site's groups alone. The operating point is `high_sensitivity` as adapt chooses it (`--target`).

    .venv/bin/python bench/adapt_curve.py busbra --base runs/loso/busi-s0 --sizes 20 40 80 --draws 5 10 5
    .venv/bin/python bench/adapt_curve.py busi --base runs/loso/busbra-s0 --sizes 40 --draws 10 --arms adapt
    .venv/bin/python bench/adapt_curve.py busbra --base runs/loso/busi-s0 --sizes 80 --draws 5 --both-site
    .venv/bin/python bench/adapt_curve.py busbra --smoke       # seconds: stand-in sites of phantoms, a tiny base

--both-site also trains (once, then reused from --work) the model adapt is measured against at the largest k: the
default recipe, seed 0, on the other site and the target site's whole pool, tested on the same held-back part.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402
from scipy.special import expit  # noqa: E402

from harness import ROOT, SHARED, SITES, SMOKE_TRAINING, Bench, fake_sites, other_site, tiny_run  # noqa: E402
from loso import CLASSES, draw, target_split, write_manifest  # noqa: E402
from sonocad.config import DEFAULT_KEEP_INIT  # noqa: E402
from sonocad.deploy.predictor import Predictor  # noqa: E402
from sonocad.evaluation.metrics import binary_metrics, fit_temperature  # noqa: E402
from sonocad.evaluation.operating import choose_thresholds  # noqa: E402
from sonocad.io.rundir import kind  # noqa: E402
from sonocad.models.classifier import create_model, trained_model  # noqa: E402
from sonocad.models.infer import InputPipeline, resolve_precision  # noqa: E402
from sonocad.training.headfit import Tail, tail_logits, view_features  # noqa: E402
from sonocad.workflows.adapt import BLOCKS, cross_fit  # noqa: E402
from sonocad.workflows.train import fit as train  # noqa: E402

# arm -> (start, backbone blocks fine-tuned beside the head, share of the start kept); base and calibration
# train nothing
ARMS = {"base": None, "calibration": None, "adapt": ("base", BLOCKS, DEFAULT_KEEP_INIT),
        "adapt-head": ("base", 0, DEFAULT_KEEP_INIT), "adapt-no-averaging": ("base", BLOCKS, 0.0),
        "imagenet": ("imagenet", BLOCKS, 0.0)}
PARTS = ("test", "selection")


def both_site(a, pool: list[dict], test: list[dict]) -> dict:
    """The model trained on the other site and the target site's whole pool (sonocad train, default recipe, seed 0),
    tested on the held-back part: test AUC with its DeLong CI, at its own high-sensitivity point."""
    work = Path(a.work) / f"both-site-{a.site}"
    run = work / "run"
    if kind(run) != "train":
        t0 = time.perf_counter()
        train([a.data / SITES[other_site(a.site)], write_manifest(pool, work / "pool.csv")], run,
              test_data=write_manifest(test, work / "test.csv"), classes=CLASSES, seed=0, progress=False,
              overwrite=run.exists(), **a.training)
        (work / "seconds.txt").write_text(f"{time.perf_counter() - t0:.0f}\n")
    m = json.loads((run / "metrics.json").read_text())
    hs = m["operating_points"]["high_sensitivity"]
    out = {"run": str(run), "auc": m["auc"], "auc_ci": m["auc_ci"], "n": m["n"],
           "sensitivity": hs["sensitivity"], "specificity": hs["specificity"]}
    if (work / "seconds.txt").is_file():
        out["seconds"] = float((work / "seconds.txt").read_text())
    print(f"both-site model (other site + the whole pool, {len(pool)} scans) on the held-back part: AUC "
          f"{out['auc']:.3f} ({out['auc_ci'][0]:.3f}-{out['auc_ci'][1]:.3f}), high-sensitivity point: sensitivity "
          f"{out['sensitivity']:.3f}, specificity {out['specificity']:.3f}", flush=True)
    return out


def site_features(tail: Tail, model, info, rows: list[dict], cache: Path, seed: int = 0):
    """The bottom's output for every image of `rows` (adapt's views), cached on disk."""
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    prec = resolve_precision("auto")
    pipeline = InputPipeline(info.mean, info.std, prec, info.config.appearance)
    predictor = Predictor(info, [(model.to(prec.device).eval(), pipeline)])
    images = predictor.decode([r["path"] for r in rows])[0]
    feats = view_features(tail, images, pipeline, info.config, seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, cache)
    return feats


def imagenet_base(info, seed: int):
    """The adapt procedure's start without an ultrasound model: the base's backbone architecture with ImageNet
    weights and a new head (drawn with `seed`), nothing to average back to."""
    torch.manual_seed(seed)
    cfg = info.config
    return create_model(cfg.model, 1, True, None, cfg.hidden, cfg.dropout).eval()


def figures(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict:
    m = binary_metrics(y, prob, threshold=threshold, ci=None)
    return {"auc": float(m["auc"]), "sensitivity": float(m["sensitivity"]), "specificity": float(m["specificity"])}


def run(a) -> dict:
    pool, test = target_split(a.site, a.data)
    rows = pool + test
    y = np.asarray([r["label"] == CLASSES[1] for r in rows], int)
    groups = np.asarray([r["group"] for r in rows])
    is_test = np.r_[np.zeros(len(pool), bool), np.ones(len(test), bool)]
    info, model = trained_model(a.base)
    work = Path(a.work)
    key = Path(a.base).resolve().name
    starts = {"base": model, "imagenet": imagenet_base(info, 0)}
    tails, feats = {}, {}
    for arm in a.arms:
        if ARMS[arm] is None:
            continue
        start, blocks, _ = ARMS[arm]
        if (start, blocks) not in tails:
            tails[start, blocks] = Tail(starts[start], blocks)
            name = key if start == "base" else start
            feats[start, blocks] = site_features(tails[start, blocks], starts[start], info, rows,
                                                 work / f"features-{a.site}-{name}-b{blocks}.pt")
    base_tail = Tail(model, 0)
    base_feats = site_features(base_tail, model, info, rows, work / f"features-{a.site}-{key}-b0.pt")
    z_base = tail_logits(base_tail, base_feats.score)
    prec = resolve_precision("auto")
    own = info.thresholds["high_sensitivity"]
    out = {"site": a.site, "base": str(a.base), "target": a.target, "n_test": int(is_test.sum()),
           "n_pool": len(pool), "base_alone": figures(y[is_test], expit(z_base[is_test] / info.temperature), own),
           "draws": []}
    print(json.dumps({k: v for k, v in out.items() if k != "draws"}), flush=True)
    for k, n_draws in zip(a.sizes, a.draws):
        for d in range(n_draws):
            local = draw(pool, k, 1000 * k + d)
            drawn = {r["path"] for r in local}
            idx = np.asarray([i for i, r in enumerate(rows) if r["path"] in drawn])
            parts = {"test": is_test, "selection": ~is_test & ~np.isin(groups, groups[idx])}
            row = {"k": k, "draw": d, "n_local": len(idx), "n_local_malignant": int(y[idx].sum())}
            for arm in a.arms:
                t0 = time.perf_counter()
                if arm == "base":
                    prob, threshold = expit(z_base / info.temperature), own
                elif arm == "calibration":          # sonocad calibrate: temperature, thresholds on the k scans
                    temp = fit_temperature(y[idx], z_base[idx])
                    prob = expit(z_base / temp)
                    threshold = choose_thresholds(y[idx], prob[idx], a.target)["high_sensitivity"]
                else:
                    start, blocks, keep = ARMS[arm]
                    f = feats[start, blocks]
                    fit = cross_fit(tails[start, blocks], f.take(idx), y[idx], groups[idx], info.config, d, keep=keep,
                                    precision=prec)
                    prob = expit(tail_logits(fit.tail, f.score, prec))
                    threshold = choose_thresholds(y[idx], fit.prob, a.target)["high_sensitivity"]
                    row.setdefault("epochs", {})[arm] = fit.epochs
                row[arm] = {part: figures(y[m], prob[m], threshold) for part, m in parts.items()}
                row[arm]["seconds"] = round(time.perf_counter() - t0, 2)
            print(json.dumps(row), flush=True)
            out["draws"].append(row)
    out["summary"] = summarise(out["draws"], a.arms, a.sizes)
    if a.both_site:
        out["both_site"] = both_site(a, pool, test)
        if "adapt" in a.arms:
            k = str(a.sizes[-1])
            gap = out["both_site"]["auc"] - out["summary"][k]["adapt"]["test"]["auc"][0]
            print(f"k={k}: the both-site model minus adapt, test AUC {gap:+.3f}", flush=True)
    return out


def summarise(draws: list[dict], arms, sizes) -> dict:
    """Per k, arm and part: mean ± sd over draws of AUC, sensitivity and specificity at high_sensitivity, the
    share of draws with sensitivity >= 0.90; adapt against every other arm: mean AUC difference, paired t."""
    out: dict = {}
    for k in sizes:
        rows = [r for r in draws if r["k"] == k]
        for arm in arms:
            for part in PARTS:
                v = {m: np.asarray([r[arm][part][m] for r in rows]) for m in ("auc", "sensitivity", "specificity")}
                s = out.setdefault(str(k), {}).setdefault(arm, {})[part] = {
                    m: [float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0] for m, x in v.items()}
                s["share_sensitivity_0.90"] = float((v["sensitivity"] >= 0.90).mean())
                s["draws"] = len(rows)
                if arm != "adapt" and "adapt" in arms and len(rows) > 1:
                    diff = np.asarray([r["adapt"][part]["auc"] - r[arm][part]["auc"] for r in rows])
                    s["adapt_minus_this_auc"] = [float(diff.mean()), float(stats.ttest_1samp(diff, 0).pvalue)]
                print(f"k={k} {arm:18s} {part:9s} AUC {s['auc'][0]:.3f} ± {s['auc'][1]:.3f}  sensitivity "
                      f"{s['sensitivity'][0]:.3f} ± {s['sensitivity'][1]:.3f} (>= 0.90 in "
                      f"{s['share_sensitivity_0.90']:.0%})  specificity {s['specificity'][0]:.3f} ± "
                      f"{s['specificity'][1]:.3f}" + (f"  adapt - this: {s['adapt_minus_this_auc'][0]:+.3f} "
                                                     f"(p={s['adapt_minus_this_auc'][1]:.3g})"
                                                     if "adapt_minus_this_auc" in s else ""), flush=True)
    return out


def add_arguments(ap) -> None:
    ap.add_argument("site", choices=["busbra", "busi"], help="the target site")
    ap.add_argument("--base", help="a run trained on the other site (required; --smoke trains a tiny one)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 40, 80])
    ap.add_argument("--draws", type=int, nargs="+", default=[5, 10, 5], help="draws at each size")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=["base", "calibration", "adapt", "imagenet"])
    ap.add_argument("--target", type=float, default=0.95, help="high-sensitivity target")
    ap.add_argument("--work", help="results and cached features (default runs/adapt-curve; --smoke: a temporary "
                    "folder)")
    ap.add_argument("--data", type=Path, default=SHARED, help="the folder of the two sites (default ../shared/data)")
    ap.add_argument("--both-site", action="store_true", help="also the model trained on the other site and the "
                    "target's whole pool, tested on the held-back part (trained once per --work)")


def main(argv=None) -> int:
    bench = Bench.start("adapt_curve", __doc__, argv, add_arguments)
    a = bench.args
    a.training = {}
    if len(a.draws) != len(a.sizes):
        raise SystemExit("bench/adapt_curve.py: --draws needs one number per size")
    if bench.smoke:
        work = Path(a.work or bench.tmp())
        a.data, a.sizes, a.draws = fake_sites(work, n=48), [12], [1]
        a.base = a.base or str(tiny_run(work / f"base-{a.site}", a.data / SITES[other_site(a.site)]))
        a.training = dict(SMOKE_TRAINING)
        a.work = str(work)
    elif not a.base:
        raise SystemExit("bench/adapt_curve.py: --base RUN is required")
    a.work = a.work or str(ROOT / "runs" / "adapt-curve")
    t0 = time.perf_counter()
    out = run(a)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    name = f"curve-{a.site}-{Path(a.base).resolve().name}-k{'-'.join(map(str, a.sizes))}-d{'-'.join(map(str, a.draws))}"
    path, n = Path(a.work) / f"{name}.json", 1
    while path.exists():
        n += 1
        path = Path(a.work) / f"{name}-{n}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path} ({out['seconds']:.0f} s)")
    k = str(a.sizes[-1])
    summary = {f"{arm}_auc_k{k}": out["summary"][k][arm]["test"]["auc"][0] for arm in a.arms}
    return bench.finish({**summary, "results": str(path), "seconds": out["seconds"]})


if __name__ == "__main__":
    raise SystemExit(main())
