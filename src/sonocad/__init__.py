"""sonocad: train, evaluate, explain and serve CNN classifiers of breast-ultrasound lesions.

A research tool, not a diagnostic device. The common case in a few names:

>>> import sonocad
>>> metrics = sonocad.fit("scans/", "runs/ours", classes=["benign", "malignant"], seed=0)   # doctest: +SKIP
>>> model = sonocad.load("runs/ours")            # or a shipped model: sonocad.load("bus-base")  # doctest: +SKIP
>>> model.predict_proba(["scan.png"])[:, 1]      # P(malignant)                             # doctest: +SKIP
>>> model.predict(["scan.png"])                  # class at the run's default operating point  # doctest: +SKIP
>>> sonocad.evaluate("runs/ours", "other_scans/", "runs/ours-on-other")                   # doctest: +SKIP
>>> sonocad.adapt("bus-base", "our_40_scans/", "runs/bus-base-ours")                      # doctest: +SKIP

Each name wraps the library function that does the work (sonocad.workflows.*, sonocad.deploy.predictor); their
docstrings list every option. Nothing heavy is imported until one is called.
"""
from __future__ import annotations

from .version import __version__

__all__ = ["__version__", "adapt", "calibrate", "cross_validate", "evaluate", "fit", "load"]


def fit(data, out, **options) -> dict:
    """Train a classifier on `data` (class folders, a CSV manifest, or a list of them) into the run directory
    `out`, evaluated on a held-out test part; returns its metrics. Options are TrainConfig's fields
    (`classes`, `seed`, `model`, `init`, `img_size`, ...) and those of sonocad.workflows.train.fit.

    >>> m = sonocad.fit("scans/", "runs/ours", classes=["benign", "malignant"], seed=0)   # doctest: +SKIP
    >>> m["auc"], m["auc_ci"], m["operating_points"]["high_sensitivity"]                # doctest: +SKIP
    """
    from .workflows.train import fit as _fit

    return _fit(data, out, **options)


def load(run, precision: str = "auto"):
    """A finished run, a cv folder (an ensemble), a shipped model's name or an exported .onnx file as a
    predictor: `.predict_proba(images)` (N, classes), `.predict(images)`, `.classes`, `.info`.

    >>> model = sonocad.load("bus-base")                                  # doctest: +SKIP
    >>> model.predict_proba(["scan.png"])                                 # doctest: +SKIP
    """
    from .workflows.evaluate import load as _load

    return _load(run, precision)


def evaluate(run, data, out, **options) -> dict:
    """Evaluate `run` on labelled `data`, written to `out` (metrics.json, predictions.csv, report.html); returns
    the metrics: AUC with its CI, sensitivity and specificity at the run's operating points. Options: those of
    sonocad.workflows.evaluate.evaluate_run.

    >>> sonocad.evaluate("runs/ours", "other_scans/", "runs/ours-on-other")["auc"]   # doctest: +SKIP
    """
    from .workflows.evaluate import evaluate_run

    return evaluate_run(run, data, out, **options)


def calibrate(run, data, out, **options) -> dict:
    """Refit a binary run's temperature and operating points on a new site's labelled scans `data`, written as
    the new run `out` (the weights unchanged); returns its metrics on those scans.

    >>> sonocad.calibrate("bus-base", "our_40_scans/", "runs/bus-base-calibrated")   # doctest: +SKIP
    """
    from .workflows.calibrate import calibrate_run

    return calibrate_run(run, data, out, **options)


def adapt(base, data, out, **options) -> dict:
    """Adapt the binary model `base` to a new site's few labelled scans `data`: fine-tuned on them, with its
    calibration and operating points chosen on them by cross-fitting; written as the run `out`. Returns the
    out-of-fold metrics. Options: `seed`, `folds`, `target_sensitivity`, ... (sonocad.workflows.adapt.adapt).

    >>> m = sonocad.adapt("bus-base", "our_40_scans/", "runs/bus-base-ours", seed=0)  # doctest: +SKIP
    >>> m["operating_points"]["high_sensitivity"]["promised_sensitivity"]            # doctest: +SKIP
    """
    from .workflows.adapt import adapt as _adapt

    return _adapt(base, data, out, **options)


def cross_validate(data, out, **options) -> dict:
    """Stratified group K-fold cross-validation of the training recipe on `data` into `out`; returns the pooled
    out-of-fold metrics. Options: `folds`, `external`, and TrainConfig's fields.

    >>> sonocad.cross_validate("scans/", "runs/ours-cv", folds=5, classes=["benign", "malignant"])  # doctest: +SKIP
    """
    from .workflows.cv import cross_validate as _cv

    return _cv(data, out, **options)
