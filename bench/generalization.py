"""Cross-site experiments: train on BUSI (benign vs malignant), test on its held-out part and on BUS-BRA.

Each experiment is a named set of TrainConfig overrides on top of the default recipe. Results are
appended as JSON lines (one per experiment) and printed:

    .venv/bin/python bench/generalization.py baseline clean_overlays --out runs/gen
    .venv/bin/python bench/generalization.py --list
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSI = ROOT.parent / "shared/data/busi/Dataset_BUSI_with_GT"
BUSBRA = ROOT.parent / "shared/data/busbra/BUSBRA"

EXPERIMENTS: dict[str, dict] = {
    "default": {},
    "baseline": {"clean_overlays": False},          # the default recipe before overlay removal
    "clean_overlays": {"clean_overlays": True},
    "no_dedup": {"dedup": False},
    "img288": {"img_size": 288},
    "unfreeze4": {"unfreeze": "4"},
    "unfreeze_all": {"unfreeze": "all", "finetune_lr": 1e-4, "clean_overlays": False},
    "stretch": {"resize": "stretch"},
    "no_augment": {"augment": False},
    "no_tta": {"tta": False},
    "flip_tta_only": {"tta_zooms": []},                        # test-time mirror image only (before zooms)
    "no_weight_averaging": {"ema_epochs": 0},                  # phase 2 keeps its best epoch, early stopping
    "head_only": {"unfreeze": "0"},
    "lite2": {"model": "tf_efficientnet_lite2"},
}


def run(name: str, overrides: dict, out: Path, seed: int) -> dict:
    from sonocad.config import TrainConfig
    from sonocad.workflows.evaluate import evaluate_run
    from sonocad.workflows.train import fit

    cfg = TrainConfig.from_recipe("default", classes=["benign", "malignant"], seed=seed, **overrides)
    run_dir = out / name
    t0 = time.perf_counter()
    m_in = fit(BUSI, run_dir, cfg, progress=False, overwrite=True)
    t_train = time.perf_counter() - t0
    m_ext = evaluate_run(run_dir, BUSBRA, out / f"{name}-on-busbra")
    row = {"experiment": name, "overrides": overrides, "seed": seed, "train_seconds": round(t_train, 1)}
    for where, m in (("busi_test", m_in), ("busbra", m_ext)):
        row[where] = {k: m[k] for k in ("n", "auc", "auc_ci", "sensitivity", "specificity", "balanced_accuracy")}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*")
    ap.add_argument("--out", default=str(ROOT / "runs" / "gen"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list or not a.names:
        for k, v in EXPERIMENTS.items():
            print(f"{k:16s} {v}")
        return 0
    if not BUSI.exists() or not BUSBRA.exists():
        print(f"needs {BUSI} and {BUSBRA}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in a.names:
        row = run(name, EXPERIMENTS[name], out, a.seed)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        b, x = row["busi_test"], row["busbra"]
        print(f"{name:16s} BUSI test AUC {b['auc']:.3f} [{b['auc_ci'][0]:.3f}-{b['auc_ci'][1]:.3f}]  "
              f"BUS-BRA AUC {x['auc']:.3f} [{x['auc_ci'][0]:.3f}-{x['auc_ci'][1]:.3f}]  "
              f"train {row['train_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
