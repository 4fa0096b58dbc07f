"""`sonocad calibrate`: fit a trained run to a new hospital with a small labelled set of its scans.

The model's weights stay as they are. On the local set, the temperature is fitted again (sharper or softer
probabilities) and the operating points are chosen again (default 0.5, Youden, high sensitivity with its
statistical margin, see sonocad.evaluation.operating). The result is a new run directory that evaluate, predict, serve and
export use as they use any run. How uncertain the chosen thresholds are is measured by bootstrap: each resample
of the local set chooses its own thresholds, which are scored on the local cases that resample left out.

>>> from sonocad.workflows.calibrate import calibrate_run
>>> m = calibrate_run("bus-base", "our_40_scans/", "runs/bus-base-local")        # doctest: +SKIP
>>> m["operating_points"]["high_sensitivity"]["promised_sensitivity"]           # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit

from ..data import discover
from ..deploy.predictor import Predictor
from ..errors import OptionError, SonocadError
from ..evaluation.metrics import binary_metrics, calibration, fit_temperature
from ..evaluation.operating import choose_operating_points, choose_thresholds
from ..evaluation.results import data_source, score_predictions, write_evaluation
from ..io.files import atomic_write_bytes, ensure_writable_dir
from ..io.rundir import RunLock, finish, prepare_output, read_finished, refuse_writing_into_runs, remove, swap_in
from ..models.infer import run_batches
from ..zoo import resolve

CALIBRATED_FILES = ("config.json", "model.safetensors", "metrics.json", "predictions.csv", "report.html")


def calibrate_run(run: str | Path, data, out: str | Path, skip_bad: bool = False, precision: str = "auto",
                  overwrite: bool = False, n_boot: int = 1000, seed: int = 0) -> dict:
    """Calibrate the binary run `run` (a run directory or a shipped model's name) on the labelled local data
    `data` and write the calibrated run to `out` (a finished result there is replaced only with `overwrite`,
    once the new one is complete). Returns its metrics (figures on the local set itself, where the thresholds
    were chosen: evaluate the new run on other local scans for honest figures)."""
    source = resolve(run)
    refuse_writing_into_runs(out, [source, data], "out")
    with RunLock(out) as lock:
        out = lock.run
        work = ensure_writable_dir(prepare_output(out, allowed_kind="", overwrite=overwrite, in_place=False))
        try:
            metrics = _calibrate(run, source, data, work, skip_bad, precision, n_boot, seed)
            finish(work, list(CALIBRATED_FILES), kind="calibrate")
        except BaseException:
            remove(work)
            raise
        swap_in(work, out)
    return metrics


def _calibrate(name, run: Path, data, out: Path, skip_bad: bool, precision: str, n_boot: int, seed: int) -> dict:
    predictor = Predictor.load(run, precision)
    info = predictor.info
    if len(predictor.members) > 1:
        raise SonocadError(f"{name}: an ensemble of {len(predictor.members)} fold models; calibrate one run")
    if not info.binary:
        raise SonocadError(f"{name}: a {len(info.classes)}-class model; calibration chooses thresholds of a "
                           "binary one")
    samples = discover(data, info.classes, allow_missing_classes=True, frames=info.config.frames)
    images, samples, y, bad = predictor.decode_samples(samples, skip_bad)
    counts = {c: int((y == i).sum()) for i, c in enumerate(info.classes)}
    if min(counts.values()) == 0:
        raise OptionError("data", f"{data}: calibration needs scans of both classes; found {counts}")
    model, pipeline = predictor.members[0]
    cfg = info.config
    logits = run_batches(model, images, pipeline, tta=cfg.tta, zooms=cfg.tta_zooms)[:, 0].astype(float)
    temperature = fit_temperature(y, logits)
    before, prob = expit(logits / info.temperature), expit(logits / temperature)    # as models.probabilities
    described = f"the local calibration set {data_source(data)} (n={len(y)}: {counts[info.classes[1]]} " \
                f"{info.classes[1]}, {counts[info.classes[0]]} {info.classes[0]})"
    new = dataclasses.replace(info, temperature=temperature, data={
        "source": info.data.get("source"), "calibrated_from": str(name), "base_data": info.data,
        "calibration_data": {"source": data_source(data), "n_per_class": counts, "skipped_bad_images": bad}})
    figures = choose_operating_points(new, y, prob, described)
    new.save(out / "config.json")
    _save_weights(run / "model.safetensors", out / "model.safetensors", temperature)

    probs = np.stack([1 - prob, prob], axis=1)
    metrics = score_predictions(y, probs, new)
    spread = threshold_spread(y, prob, n_boot, seed)
    for name_, op in metrics["operating_points"].items():
        op.update({k: v for k, v in figures.get(name_, {}).items() if k not in op})
        op.update(spread.get(name_, {}))
    before_points = score_predictions(y, np.stack([1 - before, before], axis=1), info)["operating_points"]
    metrics.update(
        note="figures on the calibration set itself, where the thresholds were chosen; evaluate this run on "
             "other scans of the site for honest figures",
        calibrated_from=str(name), temperature={"before": info.temperature, "after": temperature},
        calibration={"before": _cal(y, before), "after": _cal(y, prob)},
        before_calibration={"thresholds": info.thresholds, "operating_points": {
            k: {f: v[f] for f in ("threshold", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci")}
            for k, v in before_points.items()}},
        data={"source": data_source(data), "run": str(name), "skipped_bad_images": bad})
    write_evaluation(out, metrics, samples, y, probs, new, title=f"sonocad calibration of {name} on {data}")
    return metrics


def threshold_spread(y: np.ndarray, prob: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """How uncertain the operating points chosen on (y, prob) are: over `n_boot` stratified resamples, each
    choosing its own thresholds, the 95% percentile interval of the threshold and of the sensitivity and
    specificity it gives on the cases the resample left out."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    draws: dict[str, list] = {}
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        left = np.setdiff1d(np.arange(len(y)), idx)
        if not (y[left] == 1).any() or not (y[left] == 0).any():
            continue
        for name, t in choose_thresholds(y[idx], prob[idx]).items():
            if np.isfinite(t):
                m = binary_metrics(y[left], prob[left], threshold=t, ci=None)
                draws.setdefault(name, []).append((t, m["sensitivity"], m["specificity"]))
    out = {}
    for name, rows in draws.items():
        a = np.asarray(rows)
        out[name] = {"bootstrap": {"draws": len(a), **{
            key: [float(v) for v in np.percentile(a[:, j], [2.5, 97.5])]
            for j, key in enumerate(("threshold_95", "left_out_sensitivity_95", "left_out_specificity_95"))}}}
    return out


def _cal(y: np.ndarray, prob: np.ndarray) -> dict:
    c = calibration(y, prob)
    return {"ece": c["ece"], "brier": c["brier"]}


def _save_weights(src: Path, dst: Path, temperature: float) -> None:
    """The run's weights, unchanged, with the new temperature (stored with the weights, as training does)."""
    from safetensors.torch import load, save

    state = load(read_finished(src.parent, [src.name])[src.name])     # the bytes the run committed
    state["temperature"] = torch.tensor(float(temperature), dtype=state.get("temperature", torch.ones(())).dtype)
    atomic_write_bytes(dst, save(state))
