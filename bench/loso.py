"""Leave one site out: how much an ultrasound init helps a hospital with few labelled scans, and how local
calibration keeps the high-sensitivity point's promise at another site.

Two target sites, each with a fixed split into a local pool and a test part that no arm trains on:
- BUS-BRA (dev part): the pool is official fold 1 (5-fold-cv.csv), the test part fold 2; grouped by patient.
- BUSI (benign/malignant): two halves of its duplicate groups (StratifiedGroupKFold, seed 0); grouped by them.

learning: for each size N and seed s, N local images (whole groups, drawn with seed s) fine-tuned from ImageNet
and from `--init RUN` (a model trained on the other site) with each recipe of `--arms` (RECIPES below), the
same images for every arm; AUC on three parts: the selection part (the rest of the local pool, which that
seed did not draw), the test part, and both together (the rest of the site, every image not fine-tuned on).
Reports mean ± sd over seeds, and for each ultrasound-init arm a paired t-test of its seed-wise differences
from the ImageNet arm and a paired DeLong test per seed. Recipes are compared on the
selection part (BUS-BRA: the rest of fold 1); the one chosen is confirmed once on the test part (fold 2).

calibration: the init model alone on the target site; local sets of 20, 40, 80 cases drawn from the pool
(`--draws` times each): temperature and high-sensitivity threshold chosen on the local set (sonocad.workflows.calibrate's
choice, and the other rules of THRESHOLD_RULES), then sensitivity and specificity at that threshold on the same
three parts: the pool's patients not drawn (selection, where rules are compared), the test part, and both
(the rest of the site); against the init run's own point.

weight-averaging: WiSE-FT (Wortsman et al., 2022) on finished `learning` runs of the arm no-averaging: its
fine-tuned weights averaged with the init's at the shares `--alphas` (how --keep-init was chosen: 0.5, now the
default with --init), AUC on the three parts against the ImageNet arm.

    .venv/bin/python bench/loso.py learning busbra --init runs/busi --sizes 100 --seeds 0 1 2 \
        --arms imagenet ultrasound gentle head-only
    .venv/bin/python bench/loso.py calibration busbra --init runs/busi
    .venv/bin/python bench/loso.py learning busbra --init runs/busi --sizes 100 --arms imagenet no-averaging
    .venv/bin/python bench/loso.py weight-averaging busbra --init runs/busi --sizes 100
    .venv/bin/python bench/loso.py learning busbra --smoke     # seconds: stand-in sites of phantoms, a tiny init

--smoke runs an experiment on two stand-in sites of 32 phantoms each (bench/harness.py fake_sites) with a tiny
init run and one-epoch training; with --work DIR the stand-ins are kept there and reused, so that learning
(--arms imagenet no-averaging), then weight-averaging, can run on the same work folder.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np  # noqa: E402
from harness import ROOT, SHARED, SITES, SMOKE_TRAINING, Bench, fake_sites, other_site, tiny_run  # noqa: E402
from scipy import stats  # noqa: E402
from scipy.special import expit  # noqa: E402
from sklearn.model_selection import StratifiedGroupKFold  # noqa: E402

from sonocad.config import RunInfo, TrainConfig  # noqa: E402
from sonocad.data.split import group_ids  # noqa: E402
from sonocad.deploy.predictor import Predictor  # noqa: E402
from sonocad.evaluation.metrics import binary_metrics, delong_test, fit_temperature  # noqa: E402
from sonocad.evaluation.operating import TARGET_SENSITIVITY, choose_thresholds, to_logits  # noqa: E402
from sonocad.models.classifier import fold_batchnorm, trained_model  # noqa: E402
from sonocad.models.infer import InputPipeline, resolve_precision, run_batches  # noqa: E402
from sonocad.training.optim import average_with_init  # noqa: E402
from sonocad.training.prepare import decode_task, find_task  # noqa: E402
from sonocad.workflows.train import fit  # noqa: E402

CLASSES = ["benign", "malignant"]
# Fine-tuning recipes compared: the train options each arm adds to sonocad's default recipe; "imagenet" alone
# starts from ImageNet weights, the others from --init.
RECIPES = {
    "imagenet": {},
    "ultrasound": {},                                          # the default recipe, from --init (--keep-init 0.5)
    "no-averaging": {"keep_init": 0.0},                        # the fine-tuned weights alone (the default before)
    "gentle": {"head_epochs": 0, "finetune_lr": 5e-5, "keep_init": 0.0},   # the head kept, phase 2 at 1/4 the rate
    "head-only": {"unfreeze": "0", "keep_init": 0.0},          # phase 1 only: the ultrasound backbone frozen
}


def _tail_logits(y, p) -> np.ndarray:
    return to_logits(p[y == 1])


def _kde_quantile(y, p) -> float:
    z = _tail_logits(y, p)
    try:
        kde = stats.gaussian_kde(z)
    except (ValueError, np.linalg.LinAlgError):             # fewer than 2 distinct cancer scores
        return float(p[y == 1].min())
    grid = np.linspace(z.min() - 4 * z.std() - 1, z.max(), 200)
    cdf = np.asarray([kde.integrate_box_1d(-np.inf, g) for g in grid])
    return float(min(p[y == 1].min(), expit(np.interp(1 - TARGET_SENSITIVITY, cdf, grid))))


def _normal_tolerance(y, p) -> float:
    z = _tail_logits(y, p)
    if len(z) < 3:
        return float(p[y == 1].min())
    k = stats.nct.ppf(0.95, len(z) - 1, stats.norm.ppf(TARGET_SENSITIVITY) * np.sqrt(len(z))) / np.sqrt(len(z))
    return float(min(p[y == 1].min(), expit(z.mean() - k * z.std(ddof=1))))


def _lowest_minus_gap(y, p) -> float:
    z = np.sort(_tail_logits(y, p))
    return float(min(p[y == 1].min(), expit(z[0] - (z[1] - z[0]))) if len(z) > 1 else p[y == 1].min())


# High-sensitivity rules compared in calibration, for local sets with fewer cancers than the 59 on which the
# Clopper-Pearson bound promises 0.95 (every draw here): each maps the local labels and calibrated probabilities
# to a threshold at or below the lowest local cancer's score. "sonocad" is sonocad.evaluation.operating's choice.
THRESHOLD_RULES = {
    "sonocad": lambda y, p: choose_thresholds(y, p)["high_sensitivity"],   # normal prediction bound (logits)
    "lowest": lambda y, p: float(p[y == 1].min()),                        # sonocad's rule before: n/(n+1) on average
    "kde": _kde_quantile,                                                 # 5% quantile of a Gaussian KDE (logits)
    "normal-tolerance": _normal_tolerance,                               # 95%-confidence bound of the 5% quantile
    "lowest-minus-gap": _lowest_minus_gap,                               # lowest minus its gap to the next
}


def target_split(site: str, shared: Path = SHARED) -> tuple[list[dict], list[dict]]:
    """(local pool, test) rows of the target site under `shared`; each row path, label, group. BUS-BRA: official
    folds 1 and 2; BUSI: two halves of its duplicate groups."""
    if site == "busbra":
        root = shared / "busbra" / "BUSBRA"
        with open(root / "5-fold-cv.csv", newline="", encoding="utf-8-sig") as f:
            fold = {r["ID"]: int(r["kFold"]) for r in csv.DictReader(f)}
        with open(root / "bus_data.csv", newline="", encoding="utf-8-sig") as f:
            rows = [{"path": str(root / "Images" / f"{r['ID']}.png"), "label": r["Pathology"], "group": f"busbra-{r['Case']}",
                     "fold": fold[r["ID"]]} for r in csv.DictReader(f)]
        return [r for r in rows if r["fold"] == 1], [r for r in rows if r["fold"] == 2]
    cfg = TrainConfig(classes=CLASSES)
    prepared = decode_task(find_task(str(shared / "busi" / "Dataset_BUSI_with_GT"), cfg), cfg, progress=False)
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


PARTS = ("selection", "test", "rest")


def _prediction_rows(run: Path) -> list[dict]:
    with open(run / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def scored(rows: list[dict], parts: dict[str, set[str]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(labels, probabilities) of a run's test predictions (`_prediction_rows`), per part (a set of image paths),
    in the rows' order."""
    out = {}
    for name, paths in parts.items():
        part = [r for r in rows if r["path"] in paths]
        out[name] = (np.asarray([r["label"] == "malignant" for r in part], int), np.asarray([float(r["prob"]) for r in part]))
    return out


def mean_sd(v: np.ndarray) -> list[float]:
    return [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]


def compare(arms: list[dict], name: str, part: str) -> dict:
    """Arm `name` against the ImageNet arm on one part: mean ± sd over seeds, paired t, DeLong per seed."""
    us = np.asarray([x[name][part]["auc"] for x in arms])
    im = np.asarray([x["imagenet"][part]["auc"] for x in arms])
    t = stats.ttest_rel(us, im) if len(arms) > 1 else None
    return {"imagenet": mean_sd(im), name: mean_sd(us),
            "diff_mean": float((us - im).mean()), "diff_per_seed": (us - im).round(4).tolist(),
            "paired_t_p": float(t.pvalue) if t else None,
            "delong_p_per_seed": [x[name][part]["delong_p"] for x in arms], "seeds": len(arms)}


def _finished_from(run: Path, init: str | None, model: str, recipe: dict) -> bool:
    """Whether `run` is a finished arm of backbone `model` that started from `init` with `recipe`."""
    if not (run / "run.json").is_file():
        return False
    have = RunInfo.load(run / "config.json").config
    want = TrainConfig(init=init, model=model, **recipe).validate()
    return all(getattr(have, k) == getattr(want, k) for k in ("init", "model", "keep_init", *recipe))


def init_logits(predictor: Predictor, rows: list[dict]) -> np.ndarray:
    """The (first) model's logits for the rows' images, with the run's own test-time augmentation."""
    model, pipeline = predictor.members[0]
    images = predictor.decode([r["path"] for r in rows])[0]
    cfg = predictor.info.config
    return run_batches(model, images, pipeline, tta=cfg.tta, zooms=cfg.tta_zooms)[:, 0].astype(float)


def learning(a) -> dict:
    pool, test = target_split(a.site, a.data)
    work = Path(a.work) / f"learning-{a.site}"
    # the init model alone, no local training: the reference every fine-tuning arm should pass
    alone = dict(zip([r["path"] for r in pool + test], init_logits(Predictor.load(a.init), pool + test)))

    def alone_auc(rows: list[dict]) -> float:
        y = np.asarray([r["label"] == "malignant" for r in rows], int)
        return float(binary_metrics(y, expit(np.asarray([alone[r["path"]] for r in rows])), ci=None)["auc"])

    results = {"site": a.site, "init": a.init, "model": a.model, "n_test": len(test),
               "recipes": {k: RECIPES[k] for k in a.arms},
               "arms": []}
    for n in a.sizes:
        for seed in a.seeds:
            local = draw(pool, n, 1000 * n + seed)
            drawn = {r["path"] for r in local}
            selection = [r for r in pool if r["path"] not in drawn]
            part_rows = dict(zip(PARTS, (selection, test, test + selection)))   # "rest": the rest of the site
            parts = {part: {r["path"] for r in rows} for part, rows in part_rows.items()}
            local_csv = write_manifest(local, work / f"n{n}-s{seed}" / "local.csv")
            test_csv = write_manifest(part_rows["rest"], work / f"n{n}-s{seed}" / "scored.csv")
            arm = {"n": n, "seed": seed, "n_local": len(local), "n_selection": len(selection),
                   "n_local_malignant": sum(r["label"] == "malignant" for r in local),
                   "init_alone": {part: {"auc": alone_auc(rows)} for part, rows in part_rows.items()}}
            probs = {}
            for name in sorted(a.arms, key=lambda k: k != "imagenet"):     # ImageNet first: the others pair with it
                out = work / f"n{n}-s{seed}" / name
                init = None if name == "imagenet" else a.init
                if not _finished_from(out, init, a.model, RECIPES[name]):   # interrupted, or set otherwise: trained again
                    fit(str(local_csv), out, test_data=str(test_csv), progress=False, classes=CLASSES, seed=seed,
                        init=init, dedup=False, overwrite=out.exists(), model=a.model,
                        **{**a.training, **RECIPES[name]})
                seconds = json.loads((out / "metrics.json").read_text()).get("timing_seconds", {}).get("total")
                probs[name] = scored(_prediction_rows(out), parts)
                arm[name] = {"seconds": seconds}
                for part, (y, p) in probs[name].items():
                    arm[name][part] = {"auc": float(binary_metrics(y, p, ci=None)["auc"])}
                    if name != "imagenet" and "imagenet" in probs:
                        arm[name][part]["delong_p"] = float(delong_test(y, p, probs["imagenet"][part][1])["p_value"])
            print(json.dumps(arm), flush=True)
            results["arms"].append(arm)
    summary = {}
    for n in a.sizes:
        arms = [x for x in results["arms"] if x["n"] == n]
        for name in (k for k in a.arms if k != "imagenet" and "imagenet" in a.arms):
            for part in PARTS:
                c = summary.setdefault(str(n), {}).setdefault(name, {})[part] = compare(arms, name, part)
                print(f"N={n} {part} part: ImageNet init AUC {c['imagenet'][0]:.3f} ± "
                      f"{c['imagenet'][1]:.3f}, {name} {c[name][0]:.3f} ± {c[name][1]:.3f}, difference "
                      f"{c['diff_mean']:+.3f} (per seed {c['diff_per_seed']}; paired t over {c['seeds']} seeds "
                      f"p={c['paired_t_p']}; DeLong per seed {', '.join(f'{p:.3g}' for p in c['delong_p_per_seed'])})",
                      flush=True)
        for part in PARTS:
            v = np.asarray([x["init_alone"][part]["auc"] for x in arms])
            summary.setdefault(str(n), {}).setdefault("init_alone", {})[part] = mean_sd(v)
            print(f"N={n} {part} part: the init model alone AUC {v.mean():.3f}", flush=True)
    results["summary"] = summary
    return results


def weight_averaging(a) -> dict:
    """WiSE-FT on the `learning` runs in --work: each no-averaging arm's fine-tuned weights averaged with the init's
    (share `alpha` of the init; 0 is the arm as trained, 1 the init alone); AUC on the three parts, each share
    compared with the ImageNet arm as `learning` compares its arms."""
    pool, test = target_split(a.site, a.data)
    rows = pool + test
    paths = np.asarray([r["path"] for r in rows])
    images = Predictor.load(a.init).decode(list(paths))[0]
    init_state = trained_model(a.init)[1].state_dict()
    in_test = np.arange(len(rows)) >= len(pool)
    precision = resolve_precision("auto")
    results = {"site": a.site, "init": a.init, "alphas": a.alphas, "arms": []}
    names = [f"share {alpha}" for alpha in a.alphas]
    for n in a.sizes:
        for seed in a.seeds:
            run = Path(a.work) / f"learning-{a.site}" / f"n{n}-s{seed}"
            if not _finished_from(run / "no-averaging", a.init, a.model, RECIPES["no-averaging"]):
                raise SystemExit(f"{run / 'no-averaging'}: no finished no-averaging arm from {a.init}; run learning "
                                 "with --arms imagenet no-averaging first")
            with open(run / "local.csv", newline="") as f:
                drawn = np.isin(paths, [r["path"] for r in csv.DictReader(f)])
            part_paths = {part: set(paths[m]) for part, m in {"selection": ~drawn & ~in_test, "test": in_test,
                                                               "rest": ~drawn}.items()}
            rows_imagenet = _prediction_rows(run / "imagenet")
            imagenet = scored(rows_imagenet, part_paths)
            # each part in the ImageNet arm's order of images, as `scored` gives it, for the paired DeLong test
            orders = {part: [r["path"] for r in rows_imagenet if r["path"] in keep]
                      for part, keep in part_paths.items()}
            arm = {"n": n, "seed": seed, "imagenet": {part: {"auc": float(binary_metrics(*yp, ci=None)["auc"])}
                                                      for part, yp in imagenet.items()}}
            info, model = trained_model(run / "no-averaging")
            model = model.to(precision.device)
            tuned = {k: v.clone() for k, v in model.state_dict().items()}    # state_dict() shares the live tensors
            from_init = {k: init_state[k] for k, v in tuned.items() if v.is_floating_point() and k != "temperature"}
            pipeline = InputPipeline(info.mean, info.std, precision)
            for alpha, name in zip(a.alphas, names):
                model.load_state_dict(tuned)
                average_with_init(model, from_init, alpha)      # as `sonocad train --init RUN --keep-init alpha` ends
                prob = expit(run_batches(fold_batchnorm(model.eval()), images[~drawn], pipeline, tta=info.config.tta,
                                         zooms=info.config.tta_zooms)[:, 0])
                by_path = dict(zip(paths[~drawn], prob))
                arm[name] = {}
                for part, order in orders.items():
                    yi, pi = imagenet[part]
                    pu = np.asarray([by_path[q] for q in order])
                    arm[name][part] = {"auc": float(binary_metrics(yi, pu, ci=None)["auc"]),
                                       "delong_p": float(delong_test(yi, pu, pi)["p_value"])}
            print(json.dumps(arm), flush=True)
            results["arms"].append(arm)
    results["summary"] = {}
    for n in a.sizes:
        arms = [x for x in results["arms"] if x["n"] == n]
        for name in names:
            for part in PARTS:
                c = results["summary"].setdefault(str(n), {}).setdefault(name, {})[part] = compare(arms, name, part)
                print(f"N={n} {part} part, {name} of the init: AUC {c[name][0]:.4f} ± {c[name][1]:.4f} against ImageNet "
                      f"init {c['imagenet'][0]:.4f} ± {c['imagenet'][1]:.4f}, difference {c['diff_mean']:+.4f} (per seed "
                      f"{c['diff_per_seed']}; paired t p={c['paired_t_p']})", flush=True)
    return results


def calibration(a) -> dict:
    pool, test = target_split(a.site, a.data)
    predictor = Predictor.load(a.init)
    info = predictor.info
    zp, zt = init_logits(predictor, pool), init_logits(predictor, test)
    yp = np.asarray([r["label"] == "malignant" for r in pool], int)
    yt = np.asarray([r["label"] == "malignant" for r in test], int)
    own = binary_metrics(yt, expit(zt / info.temperature), threshold=info.thresholds["high_sensitivity"], ci=None)
    out = {"site": a.site, "init": a.init, "n_test": len(yt), "auc_test": float(binary_metrics(yt, expit(zt), ci=None)["auc"]),
           "uncalibrated_high_sensitivity": {"threshold": info.thresholds["high_sensitivity"],
                                             "sensitivity": own["sensitivity"], "specificity": own["specificity"]},
           "uncalibrated_default": {k: binary_metrics(yt, expit(zt / info.temperature), ci=None)[k]
                                    for k in ("sensitivity", "specificity")}, "local": {}}
    print(json.dumps(out), flush=True)
    groups = np.asarray([r["group"] for r in pool])
    rng = np.random.default_rng(0)
    for n in a.local_sizes:
        figures: dict[str, dict[str, list]] = {rule: {part: [] for part in PARTS} for rule in a.rules}
        for _ in range(a.draws):
            idx = rng.choice(len(yp), n, replace=False)
            if yp[idx].min() == yp[idx].max():
                continue
            temp = fit_temperature(yp[idx], zp[idx])
            undrawn = ~np.isin(groups, groups[idx])        # the pool's images of patients (groups) not drawn
            pp, pt = expit(zp / temp), expit(zt / temp)     # calibrated probabilities, once per draw
            parts = {"selection": (yp[undrawn], pp[undrawn]), "test": (yt, pt),
                     "rest": (np.r_[yp[undrawn], yt], np.r_[pp[undrawn], pt])}
            for rule in a.rules:
                t = THRESHOLD_RULES[rule](yp[idx], pp[idx])
                for part, (y, prob) in parts.items():
                    m = binary_metrics(y, prob, threshold=t, ci=None)
                    figures[rule][part].append((m["sensitivity"], m["specificity"]))
        out["local"][n] = {}
        for rule, by_part in figures.items():
            for part, rows in by_part.items():
                s, sp = np.asarray(rows).T
                out["local"][n].setdefault(rule, {})[part] = {
                    "draws": len(s), "sensitivity_mean": float(s.mean()), "sensitivity_p5_p95": np.percentile(s, [5, 95]).tolist(),
                    "share_with_sensitivity_at_least_0.90": float((s >= 0.90).mean()),
                    "specificity_mean": float(sp.mean()), "specificity_p5_p95": np.percentile(sp, [5, 95]).tolist()}
                print(f"local set of {n}, rule {rule}: calibrated high-sensitivity point on the {part} part: sensitivity "
                      f"{s.mean():.3f} (5-95%: {np.percentile(s, 5):.3f}-{np.percentile(s, 95):.3f}; >= 0.90 in "
                      f"{(s >= 0.9).mean():.0%} of {len(s)} draws), specificity {sp.mean():.3f}", flush=True)
    return out


EXPERIMENTS = {"learning": learning, "calibration": calibration, "weight-averaging": weight_averaging}


def results_path(a) -> Path:
    """WORK/EXPERIMENT-SITE-SIZES-sSEEDS[-aALPHAS].json (calibration: -dDRAWS for the seeds, which it does not use);
    a finished results file is never overwritten (a rerun with the same settings gets -2, -3, ...)."""
    if a.experiment == "calibration":
        name = f"{a.experiment}-{a.site}-{'-'.join(map(str, a.local_sizes))}-d{a.draws}"
    else:
        name = f"{a.experiment}-{a.site}-{'-'.join(map(str, a.sizes))}-s{'-'.join(map(str, a.seeds))}"
    if a.experiment == "weight-averaging":
        name += f"-a{'-'.join(f'{x:g}' for x in a.alphas)}"
    path, n = Path(a.work) / f"{name}.json", 1
    while path.exists():
        n += 1
        path = Path(a.work) / f"{name}-{n}.json"
    return path


SMOKE = {"sizes": [12], "seeds": [0], "local_sizes": [8], "draws": 5}


def add_arguments(ap) -> None:
    ap.add_argument("experiment", choices=list(EXPERIMENTS))
    ap.add_argument("site", choices=["busbra", "busi"], help="the target site")
    ap.add_argument("--init", help="a run trained on the other site (required; --smoke trains a tiny one)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", choices=sorted(RECIPES), default=["imagenet", "ultrasound"])
    ap.add_argument("--model", default=TrainConfig.model, help="the backbone of every arm (--init's must match)")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 1.0],
                    help="weight-averaging: the init's shares")
    ap.add_argument("--local-sizes", type=int, nargs="+", default=[20, 40, 80])
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--rules", nargs="+", choices=list(THRESHOLD_RULES), default=list(THRESHOLD_RULES))
    ap.add_argument("--work", help="where the runs and results go (default runs/loso; --smoke: a temporary folder)")
    ap.add_argument("--data", type=Path, default=SHARED, help="the folder of the two sites, busi/ and busbra/ "
                    "(default ../shared/data)")


def main(argv=None) -> int:
    bench = Bench.start("loso", __doc__, argv, add_arguments)
    a = bench.args
    a.rules = list(dict.fromkeys(a.rules))
    a.training = {}
    if bench.smoke:
        work = Path(a.work or bench.tmp())
        training = {k: v for k, v in SMOKE_TRAINING.items() if k != "dedup"}     # the arms train without it anyway
        vars(a).update(SMOKE, work=str(work), data=fake_sites(work, n=48), training=training)
        a.init = a.init or str(tiny_run(work / f"init-{a.site}", a.data / SITES[other_site(a.site)]))
    elif not a.init:
        raise SystemExit("bench/loso.py: --init RUN is required")
    a.work = a.work or str(ROOT / "runs" / "loso")
    t0 = time.perf_counter()
    res = EXPERIMENTS[a.experiment](a)
    res["seconds"] = round(time.perf_counter() - t0)
    path = results_path(a)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {path} ({res['seconds']} s)")
    return bench.finish({"results": str(path), "seconds": res["seconds"]})


if __name__ == "__main__":
    raise SystemExit(main())
