"""Leave one site out: how much an ultrasound init helps a hospital with few labelled scans, and how local
calibration keeps the high-sensitivity point's promise at another site.

Two target sites, each with a fixed split into a local pool and a test part that no arm trains on:
- BUS-BRA (dev part): the pool is official fold 1 (5-fold-cv.csv), the test part fold 2; grouped by patient.
- BUSI (benign/malignant): two halves of its duplicate groups (StratifiedGroupKFold, seed 0); grouped by them.

learning: for each size N and seed s, N local images (whole groups, drawn with seed s) fine-tuned with the
default recipe from ImageNet and from `--init RUN` (a model trained on the other site), the same images for
both; AUC on the test part. Reports mean ± sd over seeds, a paired t-test of the seed-wise differences and a
paired DeLong test per seed.

calibration: the init model alone on the target site; local sets of 20, 40, 80 cases drawn from the pool
(`--draws` times each): temperature and operating points chosen on the local set (sonocad.calibrate's choice),
then sensitivity and specificity at the calibrated high-sensitivity point on the test part, against the init
run's own point.

    .venv/bin/python bench/loso.py learning busbra --init runs/busi --sizes 100 --seeds 0 1 2
    .venv/bin/python bench/loso.py calibration busbra --init runs/busi
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402
from scipy.special import expit  # noqa: E402
from sklearn.model_selection import StratifiedGroupKFold  # noqa: E402

from sonocad.config import TrainConfig  # noqa: E402
from sonocad.data.split import group_ids  # noqa: E402
from sonocad.infer import run_batches  # noqa: E402
from sonocad.metrics import binary_metrics, delong_test, fit_temperature  # noqa: E402
from sonocad.operating import choose_thresholds  # noqa: E402
from sonocad.predictor import Predictor  # noqa: E402
from sonocad.prepare import decode_task, find_task  # noqa: E402
from sonocad.train import fit  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
CLASSES = ["benign", "malignant"]


def target_split(site: str) -> tuple[list[dict], list[dict]]:
    """(pool rows, test rows) of the target site; each row path, label, group."""
    if site == "busbra":
        root = SHARED / "busbra" / "BUSBRA"
        with open(root / "5-fold-cv.csv", newline="", encoding="utf-8-sig") as f:
            fold = {r["ID"]: int(r["kFold"]) for r in csv.DictReader(f)}
        with open(root / "bus_data.csv", newline="", encoding="utf-8-sig") as f:
            rows = [{"path": str(root / "Images" / f"{r['ID']}.png"), "label": r["Pathology"], "group": f"busbra-{r['Case']}",
                     "fold": fold[r["ID"]]} for r in csv.DictReader(f)]
        return [r for r in rows if r["fold"] == 1], [r for r in rows if r["fold"] == 2]
    cfg = TrainConfig(classes=CLASSES)
    prepared = decode_task(find_task(str(SHARED / "busi" / "Dataset_BUSI_with_GT"), cfg), cfg, progress=False)
    full = prepared.full
    rows = [{"path": s.path, "label": s.label, "group": f"g{g}"} for s, g in zip(full.samples, group_ids(full.groups))]
    y = np.asarray([r["label"] == "malignant" for r in rows])
    pool, test = next(StratifiedGroupKFold(2, shuffle=True, random_state=0).split(rows, y, [r["group"] for r in rows]))
    return [rows[i] for i in pool], [rows[i] for i in test]


def draw(rows: list[dict], n: int, seed: int) -> list[dict]:
    """About n rows, whole groups, in a random order of groups; at least 3 of each class."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    out: list[dict] = []
    for g in rng.permutation(sorted(groups)):
        if len(out) >= n and all(sum(r["label"] == c for r in out) >= 3 for c in CLASSES):
            break
        out += groups[g]
    return out


def write_manifest(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "group"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def test_probs(run: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return ([r["path"] for r in rows], np.asarray([r["label"] == "malignant" for r in rows], int),
            np.asarray([float(r["prob"]) for r in rows]))


def learning(a) -> dict:
    pool, test = target_split(a.site)
    work = Path(a.work) / f"learning-{a.site}"
    test_csv = write_manifest(test, work / "test.csv")
    results = {"site": a.site, "init": a.init, "n_test": len(test), "arms": []}
    for n in a.sizes:
        for seed in a.seeds:
            local = draw(pool, n, 1000 * n + seed)
            local_csv = write_manifest(local, work / f"n{n}-s{seed}" / "local.csv")
            arm = {"n": n, "seed": seed, "n_local": len(local),
                   "n_local_malignant": sum(r["label"] == "malignant" for r in local)}
            for name, init in (("imagenet", None), ("ultrasound", a.init)):
                out = work / f"n{n}-s{seed}" / name
                t0 = time.perf_counter()
                if not (out / "run.json").is_file():     # an arm interrupted earlier is trained again
                    fit(str(local_csv), out, test_data=str(test_csv), progress=False, classes=CLASSES, seed=seed,
                        init=init, dedup=False, overwrite=out.exists())
                paths, y, p = test_probs(out)
                arm[name] = {"auc": float(binary_metrics(y, p, ci=None)["auc"]), "seconds": round(time.perf_counter() - t0)}
                arm[f"{name}_probs"] = p
            d = delong_test(y, arm["ultrasound_probs"], arm["imagenet_probs"])
            arm["delong_p"] = float(d["p_value"])
            print(json.dumps({k: v for k, v in arm.items() if not k.endswith("_probs")}), flush=True)
            results["arms"].append(arm)
    summary = {}
    for n in a.sizes:
        arms = [x for x in results["arms"] if x["n"] == n]
        us = np.asarray([x["ultrasound"]["auc"] for x in arms])
        im = np.asarray([x["imagenet"]["auc"] for x in arms])
        t = stats.ttest_rel(us, im) if len(arms) > 1 else None
        summary[n] = {"imagenet": [float(im.mean()), float(im.std(ddof=1)) if len(im) > 1 else 0.0],
                      "ultrasound": [float(us.mean()), float(us.std(ddof=1)) if len(us) > 1 else 0.0],
                      "diff_mean": float((us - im).mean()), "paired_t_p": float(t.pvalue) if t else None,
                      "delong_p_per_seed": [x["delong_p"] for x in arms], "seeds": len(arms)}
        print(f"N={n}: ImageNet init AUC {im.mean():.3f} ± {summary[n]['imagenet'][1]:.3f}, ultrasound init "
              f"{us.mean():.3f} ± {summary[n]['ultrasound'][1]:.3f}, difference {(us - im).mean():+.3f} "
              f"(paired t over {len(arms)} seeds p={summary[n]['paired_t_p']}; DeLong per seed "
              f"{', '.join(f'{p:.3g}' for p in summary[n]['delong_p_per_seed'])})", flush=True)
    results["summary"] = summary
    for x in results["arms"]:
        x.pop("imagenet_probs"), x.pop("ultrasound_probs")
    return results


def calibration(a) -> dict:
    pool, test = target_split(a.site)
    predictor = Predictor.load(a.init)
    info = predictor.info
    model, pipeline = predictor.members[0]
    cfg = info.config

    def logits(rows):
        images = predictor.decode([r["path"] for r in rows])[0]
        return run_batches(model, images, pipeline, tta=cfg.tta, zooms=cfg.tta_zooms)[:, 0].astype(float)

    zp, zt = logits(pool), logits(test)
    yp = np.asarray([r["label"] == "malignant" for r in pool], int)
    yt = np.asarray([r["label"] == "malignant" for r in test], int)
    own = binary_metrics(yt, expit(zt / info.temperature), threshold=info.thresholds["high_sensitivity"], ci=None)
    out = {"site": a.site, "init": a.init, "n_test": len(yt), "auc_test": float(binary_metrics(yt, expit(zt), ci=None)["auc"]),
           "uncalibrated_high_sensitivity": {"threshold": info.thresholds["high_sensitivity"],
                                             "sensitivity": own["sensitivity"], "specificity": own["specificity"]},
           "uncalibrated_default": {k: binary_metrics(yt, expit(zt / info.temperature), ci=None)[k]
                                    for k in ("sensitivity", "specificity")}, "local": {}}
    print(json.dumps(out), flush=True)
    rng = np.random.default_rng(0)
    for n in a.local_sizes:
        sens, spec, promised = [], [], []
        for _ in range(a.draws):
            idx = rng.choice(len(yp), n, replace=False)
            if yp[idx].min() == yp[idx].max():
                continue
            temp = fit_temperature(yp[idx], zp[idx])
            t = choose_thresholds(yp[idx], expit(zp[idx] / temp))["high_sensitivity"]
            m = binary_metrics(yt, expit(zt / temp), threshold=t, ci=None)
            sens.append(m["sensitivity"]), spec.append(m["specificity"])
        s, sp = np.asarray(sens), np.asarray(spec)
        out["local"][n] = {"draws": len(s), "sensitivity_mean": float(s.mean()), "sensitivity_p5_p95": np.percentile(s, [5, 95]).tolist(),
                           "share_with_sensitivity_at_least_0.90": float((s >= 0.90).mean()),
                           "specificity_mean": float(sp.mean()), "specificity_p5_p95": np.percentile(sp, [5, 95]).tolist()}
        print(f"local set of {n}: calibrated high-sensitivity point on the test part: sensitivity {s.mean():.3f} "
              f"(5-95%: {np.percentile(s, 5):.3f}-{np.percentile(s, 95):.3f}; >= 0.90 in {(s >= 0.9).mean():.0%} of "
              f"{len(s)} draws), specificity {sp.mean():.3f}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=["learning", "calibration"])
    ap.add_argument("site", choices=["busbra", "busi"], help="the target site")
    ap.add_argument("--init", required=True, help="a run trained on the other site")
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--local-sizes", type=int, nargs="+", default=[20, 40, 80])
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--work", default=str(ROOT / "runs" / "loso"))
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = learning(a) if a.experiment == "learning" else calibration(a)
    res["seconds"] = round(time.perf_counter() - t0)
    path = Path(a.work) / f"{a.experiment}-{a.site}-{'-'.join(map(str, a.sizes if a.experiment == 'learning' else a.local_sizes))}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {path} ({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
