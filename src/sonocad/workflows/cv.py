"""Cross-validation: stratified group K-fold with the `train` recipe, pooled out-of-fold metrics, and
optionally every fold model (and their ensemble) on an external site.

>>> from sonocad.workflows.cv import cross_validate
>>> m = cross_validate("Dataset_BUSI_with_GT", "runs/busi-cv", folds=5, classes=["benign", "malignant"],
...                    external="BUSBRA")                                         # doctest: +SKIP
>>> m["pooled"]["auc"], m["pooled"]["auc_ci"], m["external"]["ensemble"]["auc"]  # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from ..config import RunInfo, TrainConfig
from ..data import discover
from ..data.discover import shared_images
from ..data.split import group_ids
from ..deploy.predictor import predict_images
from ..errors import OptionError, SonocadError
from ..evaluation.operating import choose_operating_points, fold_operating_points, promise_check
from ..evaluation.reader import reader_column, reader_scores, score_reader
from ..evaluation.report import html_table
from ..evaluation.results import read_predictions, score_predictions, write_evaluation
from ..io import rundir
from ..io.files import ensure_writable_dir
from ..io.rundir import RunLock
from ..models.classifier import parameter_count
from ..models.infer import InputPipeline, resolve_precision
from ..training.prepare import (
    Prepared,
    Split,
    data_summary,
    decode_split,
    decode_task,
    find_task,
    grouping,
    split_train_val,
)
from ..training.starting import build_model, check_disk_space, seed_everything
from .train import run_info, train_and_evaluate

# per-fold figures (multi-class tasks have no CI, sensitivity or specificity)
FOLD_KEYS = ("auc", "auc_ci", "sensitivity", "specificity", "balanced_accuracy", "accuracy", "n")


def fold_indices(y: np.ndarray, groups: list, sites: list, folds: int, seed: int) -> np.ndarray:
    """Fold number (0..folds-1) of every sample: stratified by site and class, groups never split."""
    strata = np.asarray([f"{s}|{c}" for s, c in zip(sites, y)])
    counts = {k: int((strata == k).sum()) for k in set(strata)}
    if min(counts.values()) < folds:
        raise OptionError("folds", f"{folds}: the smallest class (per site) has only {min(counts.values())} "
                          "images; use fewer folds")
    fold = np.empty(len(y), int)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(y)), strata, group_ids(groups))):
        fold[held] = k
    return fold


def _mean_sd(values: list[float]) -> list[float]:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return [float(v.mean()), float(v.std(ddof=1))] if len(v) > 1 else [float("nan")] * 2


def cross_validate(data, out, cfg: TrainConfig | None = None, folds: int = 5, repeats: int = 1,
                   external=None, progress: bool = True, workers: int = 1, **overrides) -> dict:
    """K-fold cross-validation of the training recipe on `data` (one folder/manifest or a list: sites).

    Each fold is a complete run directory (out/fold-K, or out/repeat-R/fold-K) usable with evaluate
    and predict; finished folds are reused when the command is run again. Writes out/metrics.json,
    out/oof_predictions.csv (path,label,group,fold,prob), plots and report.html. `workers`: folds trained at
    once, each in its own process (the same figures as one after the other, given the same threads per process:
    cfg.threads)."""
    cfg = (cfg or TrainConfig.from_recipe(overrides.pop("recipe", "default"), **overrides)).validate()
    if folds < 2:
        raise OptionError("folds", f"must be at least 2, not {folds}")
    if repeats < 1:
        raise OptionError("repeats", f"must be at least 1, not {repeats}")
    if not 1 <= workers <= 256:
        raise OptionError("workers", f"must be between 1 and 256, not {workers}")
    rundir.refuse_writing_into_runs(out, [data, external], "out")
    with RunLock(out) as lock:
        out = lock.run
        st = rundir.state(out)
        if st == "other" or (st == "finished" and rundir.kind(out) != "cv") or (out / "config.json").exists():
            raise OptionError("out", f"{out} holds something other than a cross-validation; choose a new folder")
        _refuse_other_folds(out, folds, repeats)
        metrics = _cross_validate(data, ensure_writable_dir(out), cfg, folds, repeats, external, progress, workers)
        rundir.finish(out, ["metrics.json", "oof_predictions.csv", "report.html"], kind="cv")
    return metrics


def _cross_validate(data, out: Path, cfg: TrainConfig, folds: int, repeats: int, external, progress: bool,
                    workers: int = 1) -> dict:
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    task = find_task(data, cfg)
    classes, img_size = task.classes, task.img_size
    resolve_precision(cfg.precision)       # an impossible precision fails before any image is decoded
    check_disk_space(out, folds * repeats * parameter_count(cfg.model, 1 if len(classes) == 2 else len(classes),
                                                            cfg.hidden))
    prepared = decode_task(task, cfg, progress)
    full, bad = prepared.full, list(prepared.bad)
    groups = list(full.groups)
    sites = prepared.sites
    ext = None
    if external:
        ext_samples = discover(external, classes, allow_missing_classes=True, frames=cfg.frames)
        shared = shared_images(task.samples, ext_samples)
        if shared:
            raise OptionError("external", f"{external} shares {len(shared)} image(s) with the cross-validated data "
                              f"(e.g. {shared[0]}): an external site holds other scans")
        ext, bad_ext = decode_split(ext_samples, classes, cfg, img_size, "external")
        bad += bad_ext

    oof = np.zeros((repeats, len(full.y), len(classes)))
    fold_thresholds: list[dict] = [{} for _ in full.y]      # each sample's fold's operating points (repeat 1)
    promises: list = []                                      # each fold's promised sensitivity (repeat 1)
    fold_of = np.zeros((repeats, len(full.y)), int)
    ext_probs = []
    per_fold = []
    jobs: list[FoldJob] = []        # the folds to train (finished ones are reused)
    for r in range(repeats):
        seed = cfg.seed + 1000 * r
        fold_of[r] = fold_indices(full.y, groups, sites, folds, seed)
        for k in range(folds):
            fold_dir = out / fold_name(r, k, repeats)
            held = np.flatnonzero(fold_of[r] == k)
            rest = np.flatnonzero(fold_of[r] != k)
            ext_csv = fold_dir / "external" / "predictions.csv"
            fold_cfg = TrainConfig.from_dict({**cfg.to_dict(), "seed": seed + k})
            done = rundir.kind(fold_dir) == "train" and (not ext or ext_csv.is_file())
            if done:
                _check_reused_fold(fold_dir, fold_cfg, [full.samples[i].path for i in held], classes)
            else:
                name = f"fold {k + 1}/{folds}" + (f" (repeat {r + 1})" if repeats > 1 else "")
                jobs.append(FoldJob(data, prepared, rest, held, fold_cfg, f"fold {k + 1} of {folds}", fold_dir,
                                    bad[len(prepared.bad):], ext, external, name))
    # every check passed, nothing touched yet: from here the folder is in progress until its summary is rewritten
    for path in (out, *(job.fold_dir for job in jobs)):
        (path / rundir.MARKER).unlink(missing_ok=True)
    run_folds(jobs, workers, progress)
    for r in range(repeats):
        for k in range(folds):
            fold_dir = out / fold_name(r, k, repeats)
            held = np.flatnonzero(fold_of[r] == k)
            test = full.take(held)
            ext_csv = fold_dir / "external" / "predictions.csv"
            # fresh and reused folds alike are read back from their files, so a re-run gives the same numbers
            paths, probs = read_predictions(fold_dir / "predictions.csv", classes)
            if paths != [s.path for s in test.samples]:
                raise SonocadError(f"{fold_dir}: finished fold holds other images than this split; "
                                   "use a new --out folder")
            info = RunInfo.load(fold_dir / "config.json")
            if r == 0:
                for i in held:
                    fold_thresholds[i] = info.thresholds or {}
                promises.append((info.operating_points.get("high_sensitivity") or {}).get("promised_sensitivity"))
            if ext:
                ext_probs.append(read_predictions(ext_csv, classes)[1])
            oof[r, held] = probs
            fm = score_predictions(test.y, probs, info)
            row = {"repeat": r + 1, "fold": k + 1, **{key: fm[key] for key in FOLD_KEYS if key in fm}}
            if ext:
                em = score_predictions(ext.y, ext_probs[-1], info)
                row["external_auc"] = em["auc"]
                row["external_auc_ci"] = em.get("auc_ci", [float("nan")] * 2)
            per_fold.append(row)

    pooled_info = run_info(cfg, prepared, {})
    pooled_info.thresholds = {"default": 0.5}
    pooled = score_predictions(full.y, oof[0], pooled_info)
    metrics: dict = {"pooled": pooled, "auc": pooled["auc"], "auc_ci": pooled.get("auc_ci"),
                     "folds": folds, "repeats": repeats, "per_fold": per_fold,
                     "mean_sd": {key: _mean_sd([f[key] for f in per_fold])
                                 for key in ("auc", "sensitivity", "specificity", "balanced_accuracy")
                                 if key in per_fold[0]}}
    if len(classes) == 2:
        points = metrics["pooled"]["fold_operating_points"] = fold_operating_points(full.y, oof[0, :, 1], fold_thresholds)
        # the cv folder's ensemble uses operating points chosen on all out-of-fold predictions at once
        ens = run_info(cfg, prepared, {})
        choose_operating_points(ens, full.y, oof[0, :, 1], f"the pooled out-of-fold predictions (n={len(full.y)})")
        metrics["ensemble_operating_points"] = {"thresholds": ens.thresholds, **ens.operating_points}
        if "high_sensitivity" in points and promises and None not in promises:
            # pooled, the folds' points should keep at least the weakest of their promises
            hs = points["high_sensitivity"]
            hs.update(promise_check(hs["confusion_matrix"][1][1], int((full.y == 1).sum()), min(promises)))
    if repeats > 1:
        metrics["pooled_per_repeat_auc"] = [score_predictions(full.y, oof[r], pooled_info)["auc"]
                                            for r in range(repeats)]
    if len(set(sites)) > 1:
        metrics["per_site"] = {}
        for site in sorted(set(sites)):
            idx = np.flatnonzero(np.asarray(sites) == site)
            metrics["per_site"][site] = score_predictions(full.y[idx], oof[0, idx], pooled_info)
            if len(classes) == 2:
                metrics["per_site"][site]["fold_operating_points"] = fold_operating_points(
                    full.y[idx], oof[0, idx, 1], [fold_thresholds[i] for i in idx])
                _add_readers(metrics["per_site"][site], [full.samples[i] for i in idx], full.y[idx], oof[0, idx, 1])
    if ext:
        ens = np.mean(ext_probs, axis=0)
        metrics["external"] = {
            "source": str(external), "n": len(ext.y),
            "per_fold_auc_mean_sd": _mean_sd([f["external_auc"] for f in per_fold]),
            "ensemble": score_predictions(ext.y, ens, pooled_info),
        }
    metrics["data"] = {
        "source": [str(d) for d in data] if isinstance(data, (list, tuple)) else str(data),
        "n_per_class": {c: int((full.y == i).sum()) for i, c in enumerate(classes)},
        "sites": {s: int((np.asarray(sites) == s).sum()) for s in sorted(set(sites))} if any(sites) else {},
        "grouping": grouping(prepared),
        "skipped_bad_images": bad,
    }
    metrics["seconds"] = round(time.perf_counter() - t0, 1)

    sections = [_fold_section(per_fold, metrics, bool(ext)), _site_section(metrics), _operating_section(metrics)]
    extra_cols = {"fold": [int(f) + 1 for f in fold_of[0]], "site": sites}
    write_evaluation(out, metrics | pooled, full.samples, full.y, oof[0], pooled_info,
                     title=f"sonocad {folds}-fold cross-validation", extra_columns=extra_cols,
                     extra_sections=[s for s in sections if s], predictions_name="oof_predictions.csv")
    return metrics


@dataclass
class FoldJob:
    """Everything one fold's training needs, picklable so that a worker process can run it."""

    data: object
    prepared: Prepared
    rest: np.ndarray
    held: np.ndarray
    cfg: TrainConfig
    test_source: str
    fold_dir: Path
    bad: list
    ext: Split | None
    external: object
    name: str


def train_fold(job: FoldJob, progress: bool = False) -> str:
    """Train one fold into its run directory (and predict the external data with it); returns its name."""
    cfg, prepared = job.cfg, job.prepared
    classes, full = prepared.classes, prepared.full
    precision = resolve_precision(cfg.precision)
    test = full.take(job.held)
    train, val = split_train_val(full.take(job.rest), cfg)
    summary = data_summary(job.data, job.test_source, prepared, train, val, test, job.bad, cfg.offline_augment)
    info = run_info(cfg, prepared, summary)
    # the fold's own seed before its head is drawn: a fold trained again alone, or in another process, or
    # after a fresh instead of a cached duplicate search, starts where it started the first time
    seed_everything(cfg.seed)
    model = build_model(cfg, len(classes), precision, classes, info.mask_head)
    ensure_writable_dir(job.fold_dir)
    if progress:
        print(job.name, flush=True)
    train_and_evaluate(model, info, train, val, test, job.fold_dir, precision, progress)
    if job.ext is not None:
        pipeline = InputPipeline(info.mean, info.std, precision)
        p_ext = predict_images(model, pipeline, job.ext.images, cfg.tta, zooms=cfg.tta_zooms)
        write_evaluation(job.fold_dir / "external", score_predictions(job.ext.y, p_ext, info), job.ext.samples,
                         job.ext.y, p_ext, info, title=f"{job.name} model on {job.external}")
    return job.name


def _worker_start(threads: int, counter) -> None:
    """A fold worker: its share of the CPU threads, and on CUDA a GPU of its own (worker i takes GPU i mod N)."""
    torch.set_num_threads(threads)
    with counter.get_lock():
        index, counter.value = counter.value, counter.value + 1
    if torch.cuda.is_available():
        torch.cuda.set_device(index % torch.cuda.device_count())


def run_folds(jobs: list[FoldJob], workers: int = 1, progress: bool = True) -> None:
    """Train `jobs` one after the other, or `workers` at a time in separate processes (each with its share of
    the CPU threads unless cfg.threads says otherwise). Each fold seeds itself, so the order does not matter."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            train_fold(job, progress)
        return
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = jobs[0].cfg.threads or max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_worker_start,
                             initargs=(threads, context.Value("i", 0))) as pool:
        for done in as_completed([pool.submit(train_fold, job) for job in jobs]):
            name = done.result()        # a fold's error stops the cross-validation, as in one process
            if progress:
                print(f"{name}: done", flush=True)


def _check_reused_fold(fold_dir: Path, fold_cfg: TrainConfig, held_out: list[str], classes: list[str]) -> None:
    """A finished fold is reused only when it is whole, was trained with this cross-validation's settings and
    holds out this split's images."""
    rundir.check_finished(fold_dir)
    stored = RunInfo.load(fold_dir / "config.json").config
    differ = [k for k, v in fold_cfg.to_dict().items() if getattr(stored, k) != v]
    if differ:
        raise SonocadError(f"{fold_dir}: finished fold was trained with other settings ({', '.join(differ)}); "
                           "use a new --out folder")
    if read_predictions(fold_dir / "predictions.csv", classes)[0] != held_out:
        raise SonocadError(f"{fold_dir}: finished fold holds other images than this split (another number of "
                           "folds, or other data); use a new --out folder")


def _refuse_other_folds(out: Path, folds: int, repeats: int) -> None:
    """Refuse, before anything is written, a folder holding folds that this cross-validation would not write
    (another number of folds or repeats): left beside the new ones, an ensemble would load them too."""
    found = {str(p.relative_to(out)) for p in [*out.glob("fold-*"), *out.glob("repeat-*/fold-*")] if p.is_dir()}
    other = sorted(found - {fold_name(r, k, repeats) for r in range(repeats) for k in range(folds)})
    if other:
        raise SonocadError(f"{out} holds folds of another cross-validation ({', '.join(other[:3])}"
                           f"{', ...' if len(other) > 3 else ''}; this one has {folds} folds"
                           f"{f' x {repeats} repeats' if repeats > 1 else ''}); use a new --out folder")


def fold_name(r: int, k: int, repeats: int) -> str:
    """The folder of repeat r's fold k (both from 0) in a cv folder."""
    return f"repeat-{r + 1}/fold-{k + 1}" if repeats > 1 else f"fold-{k + 1}"


def _fold_section(per_fold: list[dict], metrics: dict, external: bool) -> str:
    columns = [(k, h) for k, h in (("n", "n"), ("auc", "AUC"), ("auc_ci", "AUC 95% CI"), ("sensitivity", "sensitivity"),
                                   ("specificity", "specificity"), ("balanced_accuracy", "balanced accuracy"),
                                   ("accuracy", "accuracy")) if k in per_fold[0]]
    if external:
        columns += [("external_auc", "external AUC"), ("external_auc_ci", "external 95% CI")]
    rows = [[f["repeat"], f["fold"], *(f[k] for k, _ in columns)] for f in per_fold]
    ms = metrics["mean_sd"]
    spread = ", ".join(f"{k.replace('_', ' ')} {v[0]:.3f} ± {v[1]:.3f}" for k, v in ms.items())
    text = (f"<h2>Folds</h2><p>Mean ± sd over folds: {spread}. A binary fold's sensitivity and specificity use "
            "the operating point (threshold 0.5 of the class-weighted model) on its own held-out fold; pooled "
            "figures above use all out-of-fold predictions at once.</p>"
            + html_table(["repeat", "fold", *(h for _, h in columns)], rows))
    if external:
        e = metrics["external"]
        en = e["ensemble"]
        detail = (f" (95% CI {en['auc_ci'][0]:.3f}–{en['auc_ci'][1]:.3f}), sensitivity {en['sensitivity']:.3f}, "
                  f"specificity {en['specificity']:.3f}" if "auc_ci" in en else f", accuracy {en['accuracy']:.3f}")
        text += (f"<h2>External site</h2><p>{e['source']} (n={e['n']}): per-fold models AUC "
                 f"{e['per_fold_auc_mean_sd'][0]:.3f} ± {e['per_fold_auc_mean_sd'][1]:.3f}; ensemble of the "
                 f"{len(per_fold)} fold models (mean probability) AUC {en['auc']:.3f}{detail}.</p>")
    return text


def _add_readers(site_metrics: dict, samples: list, y: np.ndarray, prob: np.ndarray) -> None:
    """The readers' BI-RADS beside the out-of-fold predictions of a site whose images all carry it (BUS-BRA):
    their AUC on the same images and the paired DeLong test (sonocad.evaluation.reader)."""
    column = reader_column(samples, None)
    if column:
        try:
            site_metrics["reader"] = score_reader(y, prob, reader_scores(samples, column), column)
        except OptionError as e:     # an unreadable category costs the comparison, never the finished folds
            site_metrics["reader"] = {"column": column, "error": str(e)}


def _site_section(metrics: dict) -> str:
    if "per_site" not in metrics:
        return ""
    rows = [[site, m["n"], m["auc"], m.get("auc_ci"), m.get("sensitivity"), m.get("specificity")]
            for site, m in metrics["per_site"].items()]
    readers = [f"<p>{site}: readers' {r['column']} AUC {r['auc']:.3f} ({r['auc_ci'][0]:.3f}–{r['auc_ci'][1]:.3f}) "
               f"on the same images; model minus readers {r['model_minus_reader']:+.3f}, paired DeLong "
               f"p={r['p_value']:.3g}.</p>" for site, m in metrics["per_site"].items()
               if (r := m.get("reader")) and "auc" in r]
    return "<h2>Per site (out-of-fold)</h2>" + html_table(
        ["site", "n", "AUC", "AUC 95% CI", "sensitivity", "specificity"], rows) + "".join(readers)


def _operating_section(metrics: dict) -> str:
    scopes = [("all", metrics["pooled"])] + list(metrics.get("per_site", {}).items())
    rows = [[scope, name, op["sensitivity"], op["sensitivity_ci"], op["specificity"], op["specificity_ci"]]
            for scope, m in scopes for name, op in m.get("fold_operating_points", {}).items()]
    if not rows:
        return ""
    return ("<h2>Operating points chosen on each fold's validation data</h2><p>Every out-of-fold prediction "
            "called at its own fold model's threshold (default 0.5, Youden, sensitivity ≥ 0.95 on validation), "
            "then pooled; 95% Wilson intervals.</p>"
            + html_table(["scope", "operating point", "sensitivity", "95% CI", "specificity", "95% CI"], rows))
