"""`sonocad train`: prepare the data, train both phases, choose operating points on validation data,
evaluate on the held-out test part and write the run directory.

>>> from sonocad.workflows.train import fit
>>> metrics = fit("Dataset_BUSI_with_GT", "runs/busi", classes=["benign", "malignant"], seed=0)  # doctest: +SKIP
>>> metrics["auc"], metrics["auc_ci"]                                                           # doctest: +SKIP
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..analysis.explain import explanation_metrics, gallery_section
from ..analysis.segment import segmentation_report
from ..config import RunInfo, TrainConfig
from ..data import discover
from ..data.discover import shared_images
from ..deploy.predictor import Predictor, predict_images
from ..errors import OptionError, SonocadError
from ..evaluation.metrics import fit_temperature
from ..evaluation.operating import choose_operating_points
from ..evaluation.results import score_predictions, write_evaluation
from ..io import rundir
from ..io.files import ensure_writable_dir
from ..io.rundir import RunLock, prepare_output, swap_in
from ..models.classifier import Classifier, count_parameters, fold_batchnorm, save_model
from ..models.infer import InputPipeline, Precision, resolve_precision, run_batches
from ..runtime import dist
from ..training.datarecord import check_same_data, data_record, write_data_record
from ..training.prepare import (
    Prepared,
    Split,
    data_summary,
    decode_split,
    decode_task,
    find_task,
    hold_out_test,
    split_train_val,
    trains_mask_head,
)
from ..training.starting import (
    build_model,
    check_disk_space,
    init_record,
    seed_everything,
)
from ..training.trainer import Trainer, read_checkpoint
from ..version import __version__

# a finished run's files, committed together by run.json
RUN_FILES = ("config.json", "model.safetensors", "log.csv", "metrics.json", "predictions.csv", "report.html")


def train_and_evaluate(model: Classifier, info: RunInfo, train: Split, val: Split, test: Split, out: Path,
                       precision: Precision, progress: bool = True, resume: bool = False,
                       t_data: float = 0.0) -> dict:
    """Train `model` on train/val, pick operating points on val, evaluate on test and write the run
    directory. Returns the test metrics."""
    cfg = info.config
    info.distributed = dist.record()
    if dist.is_main():
        info.save(out / "config.json")
    pipeline = InputPipeline(info.mean, info.std, precision, cfg.appearance)
    # seed again here: whatever ran before (a cached or a fresh duplicate search) must not change training
    seed_everything(cfg.seed)
    trainer = Trainer(model, train, val, len(info.classes), cfg, precision, pipeline, out,
                      progress and dist.is_main(), resume)
    model = trainer.run()
    if not dist.is_main():      # rank 0 evaluates and writes the run; the others return its figures
        return dist.broadcast(None)
    fast = fold_batchnorm(model)     # the same inference model that evaluate and predict load
    if cfg.temperature_scaling and info.binary:
        val_logits = run_batches(fast, val.images, pipeline, tta=cfg.tta, zooms=cfg.tta_zooms)[:, 0]
        info.temperature = fit_temperature(val.y, val_logits)
        model.temperature.fill_(info.temperature)
        fast.temperature.fill_(info.temperature)
        save_model(model, out / "model.safetensors")
    val_prob = predict_images(fast, pipeline, val.images, cfg.tta, zooms=cfg.tta_zooms)
    test_prob = predict_images(fast, pipeline, test.images, cfg.tta, zooms=cfg.tta_zooms)
    if info.binary:
        choose_operating_points(info, val.y, val_prob[:, 1], "the validation part")
    info.save(out / "config.json")
    metrics = score_predictions(test.y, test_prob, info)
    predictor = Predictor(info, [(fast, pipeline)])
    with_masks = [i for i, s in enumerate(test.samples) if s.masks]
    if with_masks:
        metrics["explanation"] = explanation_metrics(predictor, test.images[with_masks],
                                                     [test.samples[i] for i in with_masks], test.y[with_masks])
    sections = [segmentation_report(predictor, metrics, test.images, test.samples, test.y)]
    metrics["timing_seconds"] = {"data": round(t_data, 1), "phase1_head": round(trainer.seconds["head"], 1),
                                 "phase2_finetune": round(trainer.seconds["finetune"], 1)}
    metrics["timing_seconds"]["total"] = round(sum(metrics["timing_seconds"].values()), 1)
    metrics["precision"] = precision.name
    metrics["parameters"] = count_parameters(model)
    metrics["data"] = info.data
    sections.append(gallery_section(predictor, test.images, test.y, test_prob, test.samples))
    write_evaluation(out, metrics, test.samples, test.y, test_prob, info, trainer.log,
                     extra_sections=[s for s in sections if s] or None)
    rundir.finish(out, list(RUN_FILES))
    return dist.broadcast(metrics)


def run_info(cfg: TrainConfig, prepared: Prepared, summary: dict) -> RunInfo:
    """The RunInfo of a run trained with `cfg` on `prepared` data."""
    t = prepared.task
    return RunInfo(cfg, t.classes, t.positive, t.img_size, t.mean, t.std, summary, version=__version__,
                   mask_head=trains_mask_head(cfg, t.samples))


def fit(data, out, cfg: TrainConfig | None = None, test_data=None, progress: bool = True,
        resume: bool = False, overwrite: bool = False, **overrides) -> dict:
    """Train a classifier on `data` and evaluate it on a held-out test part (or `test_data`).

    `data`: a class-folder dataset, a CSV manifest, or a list of them (one per site). Writes the run
    directory `out` (config.json, model.safetensors, log.csv, metrics.json, predictions.csv, plots/,
    report.html, checkpoints/, and run.json last, which marks it finished) and returns the test metrics.
    `resume=True` continues an interrupted run in `out` with the data and settings it was started with.
    An existing run is replaced only with `overwrite=True`: the new run is built beside it and swapped in
    when finished, so the old run stays whole until then."""
    if resume and overwrite:
        raise OptionError("overwrite", "replaces a run; it cannot be combined with resume")
    dist.init()
    if not dist.is_main():      # under torchrun: rank 0 holds the lock and prepares the folder, then all train
        cfg, work = dist.broadcast(None)
        return _fit(data, Path(work), cfg, test_data, False, resume)
    if not resume:          # a run resumed is where it was started, checked then
        rundir.refuse_writing_into_runs(out, [data, test_data], "out")
    with RunLock(out) as lock:
        out = lock.run
        if resume:
            cfg = _resume_config(out, cfg, overrides)
            work = out
        else:
            cfg = (cfg or TrainConfig.from_recipe(overrides.pop("recipe", "default"), **overrides)).validate()
            work = prepare_output(out, allowed_kind="", overwrite=overwrite)
        try:
            work_dir = ensure_writable_dir(work)
            dist.broadcast((cfg, str(work_dir)))
            metrics = _fit(data, work_dir, cfg, test_data, progress, resume)
        except BaseException:
            if work != out:
                rundir.remove(work)      # a replacement that did not finish: the old run stays as it was
            raise
        if work != out:
            swap_in(work, out)
    return metrics


def _resume_config(out: Path, cfg: TrainConfig | None, overrides: dict) -> TrainConfig:
    """The interrupted run's own config; settings given with resume must agree with it."""
    if rundir.kind(out):
        raise SonocadError(f"{out}: this run is finished; there is nothing to resume")
    read_checkpoint(out / "checkpoints" / "last.pt")   # fail now, not after decoding the data
    info = RunInfo.load(out / "config.json")
    stored = info.config
    # None is "automatic" (img_size, keep_init ...): whatever the run resolved it to agrees with it
    given = {k: v for k, v in (cfg.to_dict() if cfg is not None else overrides).items() if v is not None}
    # what the run resolved its automatic settings to counts as its setting
    effective = {**stored.to_dict(), "img_size": info.img_size, "positive": info.positive}
    if stored.classes is None and isinstance(given.get("classes"), list) and sorted(given["classes"]) == sorted(info.classes):
        effective["classes"] = given["classes"]
    differ = [f"{k} (--{k.replace('_', '-')}) {v!r}, the run's {effective[k]!r}"
              for k, v in given.items() if k in effective and v != effective[k]]
    if differ:
        raise SonocadError(f"{out}: resume continues the run with the settings it was started with; these "
                           f"differ: {'; '.join(differ)} (leave them out, or start a new run)")
    return stored


def _fit(data, out: Path, cfg: TrainConfig, test_data, progress: bool, resume: bool) -> dict:
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    task = find_task(data, cfg)
    test_samples = discover(test_data, task.classes, frames=cfg.frames) if test_data else []
    shared = shared_images(task.samples, test_samples)
    if shared:
        raise OptionError("test", f"{test_data} shares {len(shared)} image(s) with the training data (e.g. "
                          f"{shared[0]}): a test on training images says nothing about new scans")
    record = data_record(task.samples, test_samples)
    if resume:
        check_same_data(out / "checkpoints" / "data.json", record)
    precision = resolve_precision(cfg.precision)
    # the model (and its weights) before decoding: missing weights fail in seconds, not minutes
    model = build_model(cfg, len(task.classes), precision, task.classes, trains_mask_head(cfg, task.samples))
    check_disk_space(out, sum(p.numel() for p in model.parameters()))
    prepared = decode_task(task, cfg, progress)
    bad_test: list[str] = []
    if test_data:
        test, bad_test = decode_split(test_samples, task.classes, cfg, task.img_size, "test")
        rest = prepared.full
    else:
        rest, test = hold_out_test(prepared.full, cfg)
    train, val = split_train_val(rest, cfg)
    if not resume and dist.is_main():      # written once the data proved readable: a run that fails before training leaves nothing
        write_data_record(out / "checkpoints" / "data.json", record)
    summary = data_summary(data, str(test_data) if test_data else "held-out part of the training data",
                           prepared, train, val, test, bad_test, cfg.offline_augment)
    if cfg.init:
        summary["init_from"] = init_record(cfg.init)
    return train_and_evaluate(model, run_info(cfg, prepared, summary), train, val, test, out, precision,
                              progress, resume, time.perf_counter() - t0)
