"""Recipe candidates for the other site, measured with the project's discipline (issue 18): train on BUSI (benign vs
malignant) with each candidate's settings and several seeds, choose on BUS-BRA fold 1 (the official partition in
5-fold-cv.csv), and look at fold 2 only with --confirm, once per candidate one would ship.

    .venv/bin/python bench/candidates.py no_masks masks masks_adabn --seeds 0 1 2 --out runs/cand
    .venv/bin/python bench/candidates.py no_masks masks --seeds 0 1 2 --out runs/cand --confirm
    .venv/bin/python bench/candidates.py --list

Each (candidate, seed) trains once (runs/cand/<training>-s<seed>, reused when finished) and is evaluated on fold 1
(and fold 2 with --confirm). One JSON line per evaluation goes to runs/cand/results.jsonl. The summary prints, per
candidate, mean +- sd over seeds of BUS-BRA fold AUC, lesion Dice on BUS-BRA, BUSI held-out AUC and training time,
and against the reference candidate (the first named): the paired t-test over seeds and each seed's paired DeLong
test on the same images.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUSI = ROOT.parent / "shared/data/busi/Dataset_BUSI_with_GT"
BUSBRA = ROOT.parent / "shared/data/busbra/BUSBRA"

# name -> (training overrides, evaluation options); candidates sharing their training overrides share the trained
# runs. The overrides apply to BASE: the default recipe as it stood when these candidates were first measured
# (standard appearance augmentation), so a candidate keeps its meaning when a default changes.
BASE = {"appearance": "standard"}
CANDIDATES: dict[str, tuple[dict, dict]] = {
    "no_masks": ({"seg_weight": 0.0}, {}),           # the recipe before lesion-aware training
    "masks": ({"seg_weight": 1.0}, {}),               # lesion-aware training (the default since it landed)
    "masks_w0.3": ({"seg_weight": 0.3}, {}),
    "no_masks_adabn": ({"seg_weight": 0.0}, {"adapt_bn": True}),
    "masks_adabn": ({"seg_weight": 1.0}, {"adapt_bn": True}),
    "masks_unfreeze4": ({"seg_weight": 1.0, "unfreeze": "4"}, {}),
    "masks_scanner": ({"seg_weight": 1.0, "appearance": "scanner"}, {}),   # scanner-like appearance augmentation
    # BUSI and the *other* official fold of BUS-BRA in one training set (sites mixed in every batch); evaluated
    # on the fold it did not train on
    "masks_mixed": ({"seg_weight": 1.0, "other_fold": True}, {}),
    "masks_lite1": ({"seg_weight": 1.0, "model": "tf_efficientnet_lite1"}, {}),     # 240 px, its native size
    "masks_lite2": ({"seg_weight": 1.0, "model": "tf_efficientnet_lite2"}, {}),     # 260 px
    "masks_scanner_lite1": ({"seg_weight": 1.0, "appearance": "scanner", "model": "tf_efficientnet_lite1"}, {}),
    "masks_scanner_lite2": ({"seg_weight": 1.0, "appearance": "scanner", "model": "tf_efficientnet_lite2"}, {}),
}


def training_name(overrides: dict) -> str:
    return "_".join(f"{k}-{v}" for k, v in sorted(overrides.items())) or "default"


def fold_manifest(fold: int, out: Path) -> Path:
    """A CSV manifest of BUS-BRA's development images of one official fold (path, label, group = patient, mask,
    site, BIRADS for the readers' reference)."""
    path = out / f"busbra-fold{fold}.csv"
    if path.is_file():
        return path
    folds = {r["ID"]: r["kFold"] for r in csv.DictReader(open(BUSBRA / "5-fold-cv.csv"))}
    rows = []
    for r in csv.DictReader(open(BUSBRA / "bus_data.csv")):
        if folds.get(r["ID"]) == str(fold):
            mask = BUSBRA / "Masks" / f"{r['ID'].replace('bus_', 'mask_', 1)}.png"
            rows.append({"path": str(BUSBRA / "Images" / f"{r['ID']}.png"), "label": r["Pathology"],
                         "group": f"patient-{r['Case']}", "mask": str(mask) if mask.is_file() else "",
                         "site": "busbra", "BIRADS": r["BIRADS"]})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def train(overrides: dict, seed: int, out: Path, fold: int) -> tuple[Path, dict, float]:
    """(run, its held-out metrics, training seconds), trained once and reused. With `other_fold`, the training
    data are BUSI and BUS-BRA's other official fold (so the run depends on the evaluation fold)."""
    from sonocad.config import TrainConfig
    from sonocad.io.rundir import kind
    from sonocad.workflows.train import fit

    overrides = dict(overrides)
    data = [str(BUSI), str(fold_manifest(3 - fold, out))] if overrides.pop("other_fold", False) else BUSI
    run = out / f"{training_name(overrides)}{'-with-fold%d' % (3 - fold) if isinstance(data, list) else ''}-s{seed}"
    if kind(run) == "train":
        metrics = json.loads((run / "metrics.json").read_text())
        return run, metrics, metrics["timing_seconds"]["total"]
    cfg = TrainConfig.from_recipe("default", classes=["benign", "malignant"], seed=seed, **{**BASE, **overrides})
    t0 = time.perf_counter()
    metrics = fit(data, run, cfg, progress=False, overwrite=True)
    return run, metrics, time.perf_counter() - t0


def busi_auc(run: Path, metrics: dict) -> float:
    """AUC on the run's held-out BUSI images (its whole held-out part when it trained on BUSI alone)."""
    from sklearn.metrics import roc_auc_score

    rows = [r for r in csv.DictReader(open(run / "predictions.csv")) if Path(r["path"]).is_relative_to(BUSI)]
    if len(rows) == metrics["n"]:
        return metrics["auc"]
    return float(roc_auc_score([r["label"] == "malignant" for r in rows], [float(r["prob"]) for r in rows]))


def evaluate(run: Path, fold: int, options: dict, out: Path) -> tuple[dict, Path]:
    from sonocad.workflows.evaluate import evaluate_run

    where = out / f"{run.name}-fold{fold}{'-adabn' if options.get('adapt_bn') else ''}"
    if (where / "run.json").is_file():
        return json.loads((where / "metrics.json").read_text()), where
    return evaluate_run(run, str(fold_manifest(fold, out)), where, reader_score="BIRADS", **options), where


def measure(names: list[str], seeds: list[int], out: Path, folds: list[int]) -> list[dict]:
    results = out / "results.jsonl"
    done = {(r["candidate"], r["seed"], r["fold"]): r for r in map(json.loads, results.open())} if results.is_file() else {}
    rows = []
    for seed in seeds:          # seed by seed: the paired comparisons fill in as the runs finish
        for name in names:
            overrides, options = CANDIDATES[name]
            for fold in folds:
                if (name, seed, fold) in done:
                    rows.append(done[(name, seed, fold)])
                    continue
                run, m_busi, seconds = train(overrides, seed, out, fold)
                m, where = evaluate(run, fold, options, out)
                row = {"candidate": name, "seed": seed, "fold": fold, "train_seconds": round(seconds, 1),
                       "busi_auc": busi_auc(run, m_busi), "busi_dice": m_busi.get("segmentation", {}).get("dice_mean"),
                       "auc": m["auc"], "auc_ci": m["auc_ci"], "n": m["n"],
                       "dice": m.get("segmentation", {}).get("dice_mean"),
                       "readers_auc": m.get("reader", {}).get("auc"),
                       "predictions": str(where / "predictions.csv")}
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def _predictions(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    rows = list(csv.DictReader(open(path)))
    return ([r["path"] for r in rows], np.asarray([r["label"] == "malignant" for r in rows], int),
            np.asarray([float(r["prob"]) for r in rows]))


def _paired_over_seeds(mine: dict[int, float], ref: dict[int, float]) -> tuple[float, float] | None:
    """(mean difference, paired t-test p) of two candidates' AUCs over the seeds both have; None with fewer
    than 2 such seeds."""
    from scipy.stats import ttest_rel

    shared = sorted(set(mine) & set(ref))
    if len(shared) < 2:
        return None
    a, b = [mine[s] for s in shared], [ref[s] for s in shared]
    return float(np.mean(a) - np.mean(b)), float(ttest_rel(a, b).pvalue)


def summarize(rows: list[dict], reference: str) -> None:
    from sonocad.evaluation.metrics import delong_test

    def fmt(v):
        v = [x for x in v if x is not None]
        return f"{np.mean(v):.3f} +- {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}" if v else "n/a"

    for fold in sorted({r["fold"] for r in rows}):
        print(f"\nBUS-BRA fold {fold} (candidate: AUC, lesion Dice, BUSI held-out AUC, BUSI Dice, train s; mean +- sd "
              "over seeds; vs the reference: paired t over seeds, DeLong p per seed)")
        ref = {r["seed"]: r for r in rows if r["candidate"] == reference and r["fold"] == fold}
        for name in dict.fromkeys(r["candidate"] for r in rows):
            mine = {r["seed"]: r for r in rows if r["candidate"] == name and r["fold"] == fold}
            line = (f"  {name:18s} n_seeds={len(mine)}  AUC {fmt([r['auc'] for r in mine.values()])}  Dice "
                    f"{fmt([r['dice'] for r in mine.values()])}  BUSI {fmt([r['busi_auc'] for r in mine.values()])}  "
                    f"BUSI Dice {fmt([r['busi_dice'] for r in mine.values()])}  "
                    f"{np.mean([r['train_seconds'] for r in mine.values()]):.0f} s")
            paired = _paired_over_seeds({s: r["auc"] for s, r in mine.items()}, {s: r["auc"] for s, r in ref.items()})
            if name != reference and paired:
                delong = []
                for s in sorted(set(mine) & set(ref)):
                    pa, ya, a = _predictions(mine[s]["predictions"])
                    pb, _, b = _predictions(ref[s]["predictions"])
                    assert pa == pb, "paired tests need the same images"
                    delong.append(delong_test(ya, a, b)["p_value"])
                line += (f"  diff {paired[0]:+.3f} (t-test p={paired[1]:.3f}; DeLong p "
                         f"{', '.join(f'{q:.3f}' for q in delong)})")
            print(line)
        for r in list(ref.values())[:1]:
            reader = json.loads((Path(r["predictions"]).parent / "metrics.json").read_text()).get("reader")
            if reader:
                print(f"  readers' BI-RADS AUC on these images: {reader['auc']:.3f} ({reader['auc_ci'][0]:.3f}-"
                      f"{reader['auc_ci'][1]:.3f})")


def summarize_pooled(rows: list[dict], reference: str) -> None:
    """Folds 1 and 2 together (all of BUS-BRA's development part, as `sonocad evaluate RUN BUSBRA` sees it): each
    seed's AUC with its DeLong CI, the mean over seeds, the paired t-test against the reference, and each seed
    against the readers' BI-RADS on the same images (paired DeLong)."""
    from sonocad.evaluation.metrics import delong_auc_ci, delong_test

    birads = {str(BUSBRA / "Images" / f"{r['ID']}.png"): float(r["BIRADS"])
              for r in csv.DictReader(open(BUSBRA / "bus_data.csv"))}
    pooled: dict[str, dict[int, float]] = {}
    print("\nBUS-BRA folds 1 + 2 (the whole development part): per seed AUC (DeLong 95% CI), Dice weighted by "
          "images; the model minus the readers' BI-RADS AUC, paired DeLong p")
    for name in dict.fromkeys(r["candidate"] for r in rows):
        by_seed = {}
        for r in rows:
            if r["candidate"] == name:
                by_seed.setdefault(r["seed"], {})[r["fold"]] = r
        for seed, folds in sorted(by_seed.items()):
            if set(folds) != {1, 2}:
                continue
            paths, y, p = [], [], []
            for f in (1, 2):
                pa, ya, a = _predictions(folds[f]["predictions"])
                paths += pa
                y.append(ya)
                p.append(a)
            y, p = np.concatenate(y), np.concatenate(p)
            auc, lo, hi = delong_auc_ci(y, p)
            pooled.setdefault(name, {})[seed] = auc
            dice = [folds[f]["dice"] for f in (1, 2)]
            dice = (np.average(dice, weights=[folds[f]["n"] for f in (1, 2)]) if None not in dice else None)
            vs = delong_test(y, p, np.asarray([birads[q] for q in paths]))
            print(f"  {name:18s} seed {seed}: n={len(y)} AUC {auc:.3f} ({lo:.3f}-{hi:.3f})"
                  + (f"  Dice {dice:.3f}" if dice is not None else "")
                  + f"  vs readers {vs['auc_a'] - vs['auc_b']:+.3f} (p={vs['p_value']:.2g}, readers {vs['auc_b']:.3f})")
    ref = pooled.get(reference, {})
    for name, aucs in pooled.items():
        paired = _paired_over_seeds(aucs, ref) if name != reference else None
        print(f"  {name:18s} mean over {len(aucs)} seeds: {np.mean(list(aucs.values())):.3f}"
              + (f"  diff vs {reference} {paired[0]:+.3f} (paired t p={paired[1]:.3f})" if paired else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "runs" / "cand"))
    ap.add_argument("--confirm", action="store_true", help="also evaluate on fold 2 (once per candidate to ship)")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list or not a.names:
        for name, (overrides, options) in CANDIDATES.items():
            print(f"{name:18s} train {overrides} evaluate {options}")
        return 0
    unknown = [n for n in a.names if n not in CANDIDATES]
    if unknown:
        print(f"unknown candidate(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import subprocess

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    print(f"machine: {model}")
    rows = measure(a.names, a.seeds, out, [1, 2] if a.confirm else [1])
    summarize(rows, a.names[0])
    if a.confirm:
        summarize_pooled(rows, a.names[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
