"""`sonocad adapt`: a model for a new hospital from a few of its labelled scans, in one step.

The base model (a shipped model, a run, or a cv folder) is fine-tuned on the local scans, and its probability
calibration and operating points are chosen on those same scans by cross-fitting: the scans are split into k
folds by group (patients, duplicate sets), each fold is scored by a model fine-tuned on the other folds, and
the calibration (Platt scaling) and thresholds are fitted on these out-of-fold scores, where every scan was
scored exactly once by a model that did not see it. The final model is fine-tuned on all local scans with the
schedule the folds settled on. No test part is held out: evaluate the result on other scans of the site.

What is fine-tuned is the head, on the base's frozen backbone (features computed once), averaged with the
base's head afterwards (WiSE-FT, `keep_init`); the number of epochs (0: the base's head as it is) is the one
whose out-of-fold scores fit the labels best. With fewer than MIN_PER_CLASS scans of a class there is nothing
to cross-fit: the base is only recalibrated on the local scans, and the run says so.

>>> from sonocad.workflows.adapt import adapt
>>> m = adapt("bus-base", "our_40_scans/", "runs/bus-base-ours", seed=0)        # doctest: +SKIP
>>> m["auc"], m["operating_points"]["high_sensitivity"]["promised_sensitivity"]   # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from sklearn.model_selection import StratifiedGroupKFold

from ..config import DEFAULT_KEEP_INIT, MAX_SEED, RunInfo
from ..data import discover
from ..deploy.predictor import Predictor, check_folds_agree, cv_fold_dirs
from ..errors import OptionError, SonocadError
from ..evaluation.metrics import binary_metrics
from ..evaluation.operating import TARGET_SENSITIVITY, choose_operating_points
from ..evaluation.report import html_table
from ..evaluation.results import data_source, score_predictions, write_evaluation
from ..evaluation.scaling import fit_platt, platt_nll
from ..io import rundir
from ..io.files import ensure_writable_dir
from ..io.rundir import RunLock, prepare_output, refuse_writing_into_runs, swap_in
from ..models.classifier import Classifier, save_model, trained_model
from ..models.infer import InputPipeline, resolve_precision
from ..training.headfit import (
    Tail,
    ViewFeatures,
    averaged,
    fold_platt,
    tail_logits,
    train_tail,
    view_features,
)
from ..training.prepare import Split, with_duplicate_groups
from ..training.starting import init_record
from ..zoo import resolve

ADAPTED_FILES = ("config.json", "model.safetensors", "metrics.json", "predictions.csv", "report.html")
# schedules the folds compare: epochs at a constant rate, for the head alone and with backbone blocks
EPOCHS = {0: (0, 2, 5, 10, 20, 40, 80), "blocks": (0, 3, 6, 12)}
BLOCKS = 0                              # backbone blocks fine-tuned beside the head by default (docs/adapt.md)
FOLDS = 5
MIN_PER_CLASS = 3                       # independent scans of each class needed to cross-fit


def adapt(base: str | Path, data, out: str | Path, *, seed: int = 0, folds: int = FOLDS,
          target_sensitivity: float = TARGET_SENSITIVITY, keep_init: float = DEFAULT_KEEP_INIT, blocks: int = BLOCKS,
          dedup: bool = True, skip_bad: bool = False, precision: str = "auto", overwrite: bool = False) -> dict:
    """Adapt the binary model `base` to the labelled local scans `data` (any layout sonocad reads) and write the
    adapted run to `out` (a finished result there is replaced only with `overwrite`, once the new one is
    complete). Returns its metrics: out-of-fold figures on the local scans, where its calibration and
    thresholds were chosen."""
    if not 2 <= folds <= 20:
        raise OptionError("folds", f"must be between 2 and 20, not {folds}")
    if not 0 <= seed <= MAX_SEED:
        raise OptionError("seed", f"must be between 0 and {MAX_SEED}, not {seed}")
    if not 0.5 <= target_sensitivity < 1:
        raise OptionError("target_sensitivity", f"must be at least 0.5 and under 1, not {target_sensitivity}")
    if not 0 <= keep_init <= 1:
        raise OptionError("keep_init", f"must be between 0 and 1, not {keep_init}")
    source = resolve(base)
    refuse_writing_into_runs(out, [source], "out")
    t0 = time.perf_counter()
    info, model = base_model(source, str(base))
    tail = Tail(model, blocks)
    local = _local_scans(info, model, data, dedup, skip_bad, precision)
    with RunLock(out) as lock:
        work = ensure_writable_dir(prepare_output(lock.run, allowed_kind="", overwrite=overwrite, in_place=False))
        try:
            metrics = _adapt(str(base), info, model, tail, local, data, work, seed, folds, target_sensitivity,
                             keep_init, t0)
            rundir.finish(work, list(ADAPTED_FILES), kind="adapt")
        except BaseException:
            rundir.remove(work)
            raise
        swap_in(work, lock.run)
    return metrics


def base_model(source: Path, name: str) -> tuple[RunInfo, Classifier]:
    """(RunInfo, model) of a run, or of a cv folder: its fold models' weights averaged (they share one recipe
    and start), with the folds' common preprocessing."""
    if (source / "config.json").is_file() or not source.is_dir():
        return trained_model(source)
    found = cv_fold_dirs(source)
    if not found or rundir.kind(source) != "cv":
        raise SonocadError(f"{name}: not a finished sonocad run or cv folder")
    members = [trained_model(f) for f in found]
    check_folds_agree(name, [i for i, _ in members], "adapt one of them", also=("hidden",))
    info, model = members[0]
    states = [m.state_dict() for _, m in members]
    model.load_state_dict({k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
                           if v.is_floating_point() else v for k, v in states[0].items()})
    return info, model


@dataclasses.dataclass
class _Local:
    predictor: Predictor
    images: np.ndarray
    samples: list
    y: np.ndarray
    groups: np.ndarray
    bad: list[str]


def _local_scans(info: RunInfo, model: Classifier, data, dedup: bool, skip_bad: bool, precision: str) -> _Local:
    """The local scans decoded as the base was trained, labelled, and grouped (patients, duplicate sets)."""
    if not info.binary:
        raise SonocadError(f"a {len(info.classes)}-class model; adapt chooses the thresholds of a binary one")
    prec = resolve_precision(precision)
    model = model.to(prec.device).eval()
    predictor = Predictor(info, [(model, InputPipeline(info.mean, info.std, prec, info.config.appearance))])
    samples = discover(data, info.classes, allow_missing_classes=True, frames=info.config.frames)
    images, samples, y, bad = predictor.decode_samples(samples, skip_bad)
    counts = {c: int((y == i).sum()) for i, c in enumerate(info.classes)}
    if min(counts.values()) == 0:
        raise OptionError("data", f"{data}: adapting needs scans of both classes; found {counts}")
    split = Split(images, y, samples)
    split, _ = with_duplicate_groups(split, dataclasses.replace(info.config, dedup=dedup))
    return _Local(predictor, images, samples, y, split.groups, bad)


def fold_of(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number of every scan: stratified by class, groups never split; as many folds (at most `folds`) as
    the rarer class has groups, and fewer where a fold's training part would lack a class. Empty when fewer
    than MIN_PER_CLASS groups of a class exist: nothing to cross-fit."""
    per_class = min(len(np.unique(groups[y == c])) for c in (0, 1))
    if per_class < MIN_PER_CLASS:
        return np.zeros(0, int)
    for k in range(min(folds, per_class), 1, -1):
        fold = np.empty(len(y), int)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        for f, (_, held) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
            fold[held] = f
        if all(len(np.unique(y[fold != f])) == 2 for f in range(k)):
            return fold
    return np.zeros(0, int)


@dataclasses.dataclass
class CrossFit:
    """What cross-fitting settled on: each scan's fold (empty: recalibration only) and out-of-fold logit, the
    schedule (head epochs) and every schedule's out-of-fold figures, the final head (Platt scaling folded in)
    and the Platt parameters, and the calibrated out-of-fold probabilities the thresholds are chosen on."""

    fold: np.ndarray
    scores: np.ndarray
    epochs: int
    schedules: dict
    tail: Tail
    platt: dict
    prob: np.ndarray


def cross_fit(tail: Tail, feats: ViewFeatures, y: np.ndarray, groups: np.ndarray, cfg, seed: int,
              folds: int = FOLDS, keep: float = DEFAULT_KEEP_INIT, precision=None) -> CrossFit:
    """Adapt's core on the bottom's output computed once (training.headfit.view_features): fine-tune `tail` in
    each fold for every schedule of EPOCHS, score the held-out fold, keep the schedule whose pooled out-of-fold
    scores fit best after Platt scaling, fine-tune on all scans with it and fit the calibration on the
    out-of-fold scores. With too few scans of a class (fold_of is empty) the base is only recalibrated on its
    own scores. `precision`: the autocast the tail trains and scores under (training.headfit)."""
    init = tail.trained_state()
    grid = list(EPOCHS["blocks" if tail.depth else 0])
    fold = fold_of(y, groups, folds, seed)
    schedules: dict = {}
    if len(fold):
        oof = {e: np.zeros(len(y)) for e in grid}
        for f in range(int(fold.max()) + 1):
            tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            states = train_tail(tail, feats.train[:, tr], y[tr], grid, cfg, seed + 1 + f, precision)
            for e, state in states.items():
                oof[e][te] = tail_logits(tail.with_state(averaged(state, init, keep)), feats.score[:, te], precision)
        schedules = {e: _fit_quality(y, oof[e]) for e in grid}
        epochs = min(grid, key=lambda e: (round(schedules[e]["nll"], 9), e))
        final = train_tail(tail, feats.train, y, [epochs], cfg, seed, precision)[epochs]
        final = tail.with_state(averaged(final, init, keep))
        scores = oof[epochs]
    else:
        epochs, final, scores = 0, tail.with_state(init), tail_logits(tail, feats.score, precision)
    slope, intercept = fit_platt(y, scores)
    fold_platt(final, slope, intercept)
    return CrossFit(fold, scores, epochs, schedules, final, {"slope": slope, "intercept": intercept},
                    expit(slope * scores + intercept))


def _adapt(name: str, info: RunInfo, model: Classifier, tail: Tail, local: _Local, data, out: Path, seed: int,
           folds: int, target: float, keep: float, t0: float) -> dict:
    cfg, y = info.config, local.y
    pipeline = local.predictor.members[0][1]
    feats = view_features(tail, local.images, pipeline, cfg, seed)
    base_logits = tail_logits(tail, feats.score, pipeline.precision) / info.temperature
    fit = cross_fit(tail, feats, y, local.groups, cfg, seed, folds, keep, pipeline.precision)
    counts = {c: int((y == i).sum()) for i, c in enumerate(info.classes)}
    record = {"base": init_record(name), "n_per_class": counts,
              "groups": int(len(np.unique(local.groups))), "seed": seed, "keep_init": keep,
              "target_sensitivity": target, "blocks": tail.depth, "epochs": fit.epochs, "platt": fit.platt}
    crossed = bool(len(fit.fold))
    if crossed:
        k = int(fit.fold.max()) + 1
        how = f"out-of-fold scores of {k}-fold cross-fitting on the local scans {data_source(data)}"
        record.update(mode="cross-fitted", folds=k, schedules={str(e): q for e, q in fit.schedules.items()},
                      per_fold=[{c: int((y[fit.fold == f] == i).sum()) for i, c in enumerate(info.classes)}
                                for f in range(k)])
    else:
        how = f"the base model's scores of the local scans {data_source(data)} (recalibration only)"
        record.update(mode="recalibrated", folds=0, note=(
            f"only {min(counts.values())} {min(counts, key=counts.get)} scan(s): too few to cross-fit a fine-tuning "
            f"(at least {MIN_PER_CLASS} of each class); the base model was recalibrated on the local scans instead, "
            "and its figures are on the scans where calibration and thresholds were fitted"))
    new = dataclasses.replace(info, temperature=1.0, thresholds={}, operating_points={}, data={
        "source": info.data.get("source"), "adapted_from": record["base"], "base_data": info.data,
        "local_data": {"source": data_source(data), "n_per_class": counts, "skipped_bad_images": local.bad}})
    described = f"{how} (n={len(y)}: " + ", ".join(f"{n} {c}" for c, n in counts.items()) + ")"
    figures = choose_operating_points(new, y, fit.prob, described, target)
    new.save(out / "config.json")
    adapted = model.cpu()
    fit.tail.write_into(adapted)
    adapted.temperature.fill_(1.0)
    save_model(adapted, out / "model.safetensors")

    probs = np.stack([1 - fit.prob, fit.prob], axis=1)
    metrics = score_predictions(y, probs, new)
    for point, op in metrics["operating_points"].items():
        op.update({k: v for k, v in figures.get(point, {}).items() if k not in op})
    metrics.update(adapt=record, base_on_local=_base_figures(y, expit(base_logits), info), data={
        "source": data_source(data), "base": name, "skipped_bad_images": local.bad},
        note=("out-of-fold figures: each scan scored by a model fine-tuned without it; the calibration and "
              "thresholds were chosen on these same scores, so evaluate this run on other scans of the site "
              "for figures at its thresholds" if crossed else record["note"]),
        timing_seconds={"total": round(time.perf_counter() - t0, 1)})
    extra = {"fold": [int(f) + 1 for f in fit.fold]} if crossed else None
    write_evaluation(out, metrics, local.samples, y, probs, new, title=f"sonocad adapt of {name} to {data}",
                     extra_columns=extra, extra_sections=[_section(metrics)])
    return metrics


def _fit_quality(y: np.ndarray, logits: np.ndarray) -> dict:
    """How well out-of-fold logits separate the classes: AUC, and the likelihood after Platt scaling."""
    slope, intercept = fit_platt(y, logits)
    return {"auc": float(binary_metrics(y, expit(logits), ci=None)["auc"]),
            "nll": platt_nll(y, logits, slope, intercept)}


def _base_figures(y: np.ndarray, prob: np.ndarray, info: RunInfo) -> dict:
    """The base model as it is on the local scans: AUC with its CI, and its own thresholds' figures."""
    m = score_predictions(y, np.stack([1 - prob, prob], axis=1), info)
    return {"auc": m["auc"], "auc_ci": m["auc_ci"], "operating_points": {
        k: {f: v[f] for f in ("threshold", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci")}
        for k, v in m["operating_points"].items()}}


def _section(metrics: dict) -> str:
    a = metrics["adapt"]
    rows = [[e, q["auc"], q["nll"]] for e, q in a.get("schedules", {}).items()]
    what = f"the head and {a['blocks']} backbone block(s)" if a["blocks"] else "the head"
    chosen = (f"<p>{a['folds']}-fold cross-fitting; the folds settled on {a['epochs']} epoch(s) of training {what} "
              f"(0: the base as it is); Platt scaling slope {a['platt']['slope']:.3f}, intercept "
              f"{a['platt']['intercept']:.3f}.</p>" if a["mode"] == "cross-fitted" else f"<p>{a['note']}.</p>")
    base = metrics["base_on_local"]
    return (f"<h2>Adaptation</h2>{chosen}" + (html_table(["epochs", "out-of-fold AUC", "NLL after Platt scaling"],
                                                          rows) if rows else "")
            + f"<p>The base model as it is on these scans: AUC {base['auc']:.3f} "
              f"({base['auc_ci'][0]:.3f}-{base['auc_ci'][1]:.3f}).</p>")
