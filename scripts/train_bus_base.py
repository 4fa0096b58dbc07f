"""Train, pack and check bus-base, the ultrasound base model shipped in src/sonocad/zoo/bus-base/VERSION/.

train: the default recipe on all labelled data in ../shared (BUSI benign/malignant and BUS-BRA's development
part, each its own site), seed 0; a held-out test part of each site (20%, grouped by patient in BUS-BRA and by
duplicate group in BUSI) is kept out of training so that the model card's figures are honest. The trained run is
then packed as version N: weights in fp16, its figures measured again with the packed weights, a model card, and
no path of the machine that trained it (data named relative to the data folder). Reproducible: the same seed on
the same machine gives the same weights.
repack: a shipped version's config, figures and card written again by this script (paths removed, the card
regenerated from its figures), its weights untouched (checked byte for byte), its run.json hashes recomputed.
check: every shipped version is whole (run.json's hashes match its files), holds no absolute path, has a card that
states its version and that its thresholds are not calibrated for a new site; all versions together fit 25 MB.

    .venv/bin/python scripts/train_bus_base.py train --version 2     # about 15 minutes on 2 cores
    .venv/bin/python scripts/train_bus_base.py repack 1
    .venv/bin/python scripts/train_bus_base.py check
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
from safetensors.torch import load, save  # noqa: E402

from sonocad import zoo  # noqa: E402
from sonocad.analysis.segment import has_mask_head, predict_masks, segmentation_metrics, true_masks  # noqa: E402
from sonocad.config import RunInfo  # noqa: E402
from sonocad.deploy.predictor import Predictor  # noqa: E402
from sonocad.evaluation.results import score_predictions  # noqa: E402
from sonocad.io import rundir  # noqa: E402
from sonocad.io.files import atomic_write_bytes, atomic_write_text  # noqa: E402
from sonocad.training.prepare import find_task  # noqa: E402
from sonocad.workflows.train import fit  # noqa: E402

NAME = "bus-base"
SITES = {"BUSI": "busi/Dataset_BUSI_with_GT", "BUS-BRA": "busbra/BUSBRA"}
FIELDS = ("n", "n_per_class", "auc", "auc_ci", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci")


ZOO = ROOT / "src" / "sonocad" / "zoo" / NAME
MAX_ZOO_BYTES = 25 * 2**20
SHIPPED = ("config.json", "model.safetensors", "metrics.json", "MODEL_CARD.md")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("train", help="train and pack a new version")
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="the data folder")
    p.add_argument("--work", default=str(ROOT / "runs" / "bus-base-train"), help="the training run")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("repack", help="write a shipped version's config, figures and card again")
    p.add_argument("version", type=int)
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="the data folder it was trained on")
    sub.add_parser("check", help="check every shipped version")
    a = ap.parse_args(argv)
    if a.verb == "train":
        data = [str(Path(a.shared) / p) for p in SITES.values()]
        work = Path(a.work)
        if rundir.kind(work) != "train":
            fit(data, work, classes=["benign", "malignant"], seed=a.seed)
        pack(work, ZOO / str(a.version), Path(a.shared))
    elif a.verb == "repack":
        repack(ZOO / str(a.version), Path(a.shared))
    problems = check()
    for line in problems:
        print(f"check: {line}", file=sys.stderr)
    if not problems:
        print(f"check: {', '.join(zoo.names())} whole, no machine paths, "
              f"{sum(f.stat().st_size for f in ZOO.rglob('*') if f.is_file()) / 2**20:.1f} MiB in all")
    return 1 if problems else 0


def without_paths(value, shared: Path):
    """`value` with every absolute path replaced by its path inside the data folder `shared` (or its last two
    parts): what the shipped files say about the data, without the machine that trained on it."""
    if isinstance(value, dict):
        return {k: without_paths(v, shared) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v, shared) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        path = Path(value)
        for root in (shared, shared.resolve()):
            if path.is_relative_to(root):
                return str(path.relative_to(root))
        return str(Path(*path.parts[-2:]))
    return value


def _write_shipped(out: Path, info: RunInfo, metrics: dict, shared: Path, version: str) -> None:
    """config.json, metrics.json and MODEL_CARD.md of a version, without machine paths; run.json last."""
    info = dataclasses.replace(info, data=without_paths(info.data, shared),
                               operating_points=without_paths(info.operating_points, shared))
    metrics = without_paths(metrics, shared)
    metrics["data"] = info.data
    info.save(out / "config.json")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, default=float))
    atomic_write_text(out / "MODEL_CARD.md", model_card(info, metrics, (out / "model.safetensors").stat().st_size,
                                                       version))
    rundir.finish(out, list(SHIPPED))


def repack(out: Path, shared: Path) -> None:
    """A shipped version's files written again by this script; its weights are kept byte for byte."""
    weights = (out / "model.safetensors").read_bytes()
    rundir.check_finished(out)                   # whole before: refuses a hand-edited version
    info = RunInfo.load(out / "config.json")
    metrics = json.loads((out / "metrics.json").read_text())
    _write_shipped(out, info, metrics, shared, out.name)
    assert (out / "model.safetensors").read_bytes() == weights


def check() -> list[str]:
    """What is wrong with the shipped versions (empty: nothing)."""
    problems = []
    for version in zoo.versions(NAME):
        folder = ZOO / version
        try:
            files = rundir.check_finished(folder)
        except Exception as e:
            problems.append(f"{NAME}@{version}: {e}")
            continue
        if set(files) != set(SHIPPED):
            problems.append(f"{NAME}@{version}: run.json commits {sorted(files)}, not {sorted(SHIPPED)}")
        for name in ("config.json", "metrics.json", "MODEL_CARD.md"):
            text = (folder / name).read_text()
            if any(root in text for root in ('"/', "/work/", "/home/", "/tmp/")):
                problems.append(f"{NAME}@{version}/{name}: holds a machine path")
        card = (folder / "MODEL_CARD.md").read_text()
        if f"{NAME}@{version}" not in card or "not calibrated for a new site" not in card:
            problems.append(f"{NAME}@{version}/MODEL_CARD.md: does not state its version and that its thresholds "
                            "are not calibrated for a new site")
    size = sum(f.stat().st_size for f in ZOO.rglob("*") if f.is_file())
    if size > MAX_ZOO_BYTES:
        problems.append(f"the shipped versions take {size / 2**20:.1f} MiB, over {MAX_ZOO_BYTES / 2**20:.0f}")
    return problems


def pack(work: Path, out: Path, shared: Path) -> None:
    """The finished run `work` as the shipped version `out`: fp16 weights, figures re-measured, model card."""
    tmp = out.parent / f".{out.name}.new"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info = RunInfo.load(work / "config.json")
    info.save(tmp / "config.json")
    state = load((work / "model.safetensors").read_bytes())
    half = {k: (v.half() if v.is_floating_point() and k != "temperature" else v).contiguous() for k, v in state.items()}
    atomic_write_bytes(tmp / "model.safetensors", save(half))
    rundir.finish(tmp, ["config.json", "model.safetensors"])           # loadable for the re-measurement below

    with open(work / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    packed = Predictor.load(tmp)                   # as `sonocad predict bus-base` runs it on this machine
    paths = [r["path"] for r in rows]
    y = np.asarray([packed.classes.index(r["label"]) for r in rows])
    images = packed.decode(paths)[0]
    probs = packed.predict_proba(images)
    fp32 = {name: Predictor.load(run, precision="fp32").predict_proba(images)[:, 1] for name, run in
            (("trained", work), ("packed", tmp))}
    metrics = {"precision": packed.members[0][1].precision.name,
               "max_abs_change_fp16_weights": float(np.abs(fp32["packed"] - fp32["trained"]).max()),
               "max_abs_change_from_fp32_compute": float(np.abs(probs[:, 1] - fp32["packed"]).max())}
    scopes = {"test_part": set(range(len(paths))),
              **{f"test_part_{site}": {i for i, p in enumerate(paths) if folder in p} for site, folder in SITES.items()}}
    for scope, idx in scopes.items():
        rows = sorted(idx)
        metrics[scope] = _figures(score_predictions(y[rows], probs[rows], info))
    if has_mask_head(packed):                      # lesion Dice of the packed mask decoder on the test part
        by_path = {s.path: s for s in find_task(info.data["source"], info.config).samples}
        masks, kept = true_masks([by_path[p] for p in paths], info.img_size, info.config.resize)
        lesion = predict_masks(packed, images[kept])
        for scope, idx in scopes.items():
            with_mask = [k for k, i in enumerate(kept) if i in idx]
            metrics[scope]["segmentation"] = segmentation_metrics(lesion[with_mask], masks[with_mask])[0]
    metrics["training_seconds"] = json.loads((work / "metrics.json").read_text())["timing_seconds"]["total"]
    metrics["operating_points_chosen_on"] = info.operating_points
    _write_shipped(tmp, info, metrics, shared, out.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith(("test_part", "max", "precision"))},
                     indent=1, default=float))


def _figures(m: dict) -> dict:
    out = {k: m[k] for k in FIELDS}
    out["operating_points"] = {name: {k: op[k] for k in ("threshold", "sensitivity", "sensitivity_ci", "specificity",
                                                         "specificity_ci", *(("promised_sensitivity", "promise_kept", "promise_p")
                                                                             if "promised_sensitivity" in op else ()))}
                               for name, op in m["operating_points"].items()}
    return out


def _ci(v) -> str:
    return f"{v[0]:.3f}–{v[1]:.3f}"


def _scope_name(scope: str) -> str:
    """'test_part' -> 'both sites', 'test_part_BUSI' -> 'BUSI'."""
    return scope.replace("test_part_", "").replace("test_part", "both sites")


def model_card(info: RunInfo, m: dict, size: int, version: str) -> str:
    rows = []
    scopes = [scope for scope in m if scope.startswith("test_part")]
    for scope in scopes:
        f = m[scope]
        rows.append(f"| {_scope_name(scope)} | {f['n']} "
                    f"({f['n_per_class']['malignant']} malignant) | {f['auc']:.3f} ({_ci(f['auc_ci'])}) | "
                    f"{f['sensitivity']:.3f} ({_ci(f['sensitivity_ci'])}) | {f['specificity']:.3f} "
                    f"({_ci(f['specificity_ci'])}) |")
    seg = [f"| {_scope_name(scope)} | {g['n']} | "
           f"{g['dice_mean']:.3f} ({_ci(g['dice_ci'])}) | {g['dice_median']:.3f} |"
           for scope in scopes if (g := m[scope].get("segmentation"))]
    seg_table = ("\n\nLesion masks (the second output, `sonocad predict --masks`): Dice at P(lesion) ≥ 0.5 against the "
                 "sites' own masks, at the model's input size.\n\n| test part | images with a mask | Dice mean (95% CI, "
                 "bootstrap) | Dice median |\n|---|---|---|---|\n" + "\n".join(seg)) if seg else ""
    c = info.config
    recipe = (f"lesion-aware (a mask decoder trained jointly, Dice + BCE where a mask exists, weight {c.seg_weight})"
              if info.mask_head else "classification only (no lesion masks)") + f", {c.appearance} appearance augmentation"
    hs = m["test_part"]["operating_points"].get("high_sensitivity", {})
    d = info.data
    vp = info.operating_points.get("high_sensitivity", {})
    points = "\n".join(
        f"| {name} | {op['threshold']:.4f} | {op['sensitivity']:.3f} ({_ci(op['sensitivity_ci'])}) | "
        f"{op['specificity']:.3f} ({_ci(op['specificity_ci'])}) | "
        + (f"≥ {op['promised_sensitivity']:.3f} on new cases of these sites (95% confidence)"
           if "promised_sensitivity" in op else "") + " |"
        for name, op in info.operating_points.items() if isinstance(op, dict))
    return f"""# {NAME}@{version}: a breast-ultrasound base model (benign vs malignant)

**Research tool, not a diagnostic device.** Its output is not a diagnosis and must not guide the care of a patient.
`{NAME}` names the newest shipped version; `{NAME}@{version}` names this one for good.

- Architecture: {info.config.model} (ImageNet weights, then fine-tuned), input {info.img_size} px gray, letterboxed,
  overlays cleaned; a sigmoid output for `malignant`; six test-time views. Weights in fp16 ({size / 2**20:.1f} MiB):
  on the test part they change probabilities by at most {m['max_abs_change_fp16_weights']:.4f} against the trained
  fp32 weights (both computed in fp32). The figures below were computed as `sonocad` runs the model by default on
  the machine that packed it ({m['precision']}); fp32 computation differs by at most
  {m['max_abs_change_from_fp32_compute']:.4f} per image.
- Trained by `scripts/train_bus_base.py` (sonocad's default recipe, seed 0; {m['training_seconds']:.0f} s on the 2 CPU cores that packed it):
  {recipe}.
- Intended use: a starting point for fine-tuning (`sonocad train DATA --init bus-base`) or local calibration
  (`sonocad calibrate bus-base LOCAL --out RUN`) by research teams, and for trying sonocad without training.

## Data

| site | images used | licence, citation |
|---|---|---|
| BUSI (Baheya Hospital, Cairo, 2018) | benign 437, malignant 210 | Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. Data in Brief 28 (2020) 104863. doi:10.1016/j.dib.2019.104863 |
| BUS-BRA, development part (INCA, Rio de Janeiro; 4 scanners) | benign 514, malignant 247 (425 patients) | Gómez-Flores W, Gregorio-Calas MJ, Coelho de Albuquerque Pereira W. BUS-BRA: A Breast Ultrasound Dataset for Assessing Computer-aided Diagnosis Systems. Medical Physics (2023/2024); permissive licence, citation required |

Split ({d.get('grouped_by', '')}): training {d.get('n_train')}, validation {d.get('n_val')}, held-out test {d.get('n_test')}.
Operating points were chosen on the validation part ({vp.get('n_pos', '?')} malignant, {vp.get('n_neg', '?')} benign): the
high-sensitivity threshold is at or below its lowest malignant score, which promises sensitivity ≥ {vp.get('promised_sensitivity', float('nan')):.3f}
on new cases from these sites with 95% confidence (59 malignant validation cases would be needed to promise 0.95).

## Measured figures (held-out test part, never trained or tuned on; fp16 weights as shipped)

| test part | n | AUC (95% CI, DeLong) | sensitivity at 0.5 (95% CI) | specificity at 0.5 (95% CI) |
|---|---|---|---|---|
{chr(10).join(rows)}{seg_table}

High-sensitivity point (threshold {hs.get('threshold', float('nan')):.4f}): sensitivity {hs.get('sensitivity', float('nan')):.3f}
({_ci(hs.get('sensitivity_ci', [float('nan')] * 2))}), specificity {hs.get('specificity', float('nan')):.3f}; it promised
sensitivity ≥ {hs.get('promised_sensitivity', float('nan')):.3f} (95% confidence) and {'kept it here.' if hs.get('promise_kept') else
f"did not keep it here (p = {hs.get('promise_p') or float('nan'):.2g} for a sensitivity this low or lower, were the promise true)."}

## Operating points, chosen on the validation part (never on the test part)

| point | threshold | sensitivity (95% CI) | specificity (95% CI) | promise |
|---|---|---|---|---|
{points}

**Its thresholds are not calibrated for a new site.** At another hospital these figures do not hold unchanged: its
scanners, presets and patients differ, and a threshold that keeps its promise here can miss many cancers there or
flag most benign lesions. Adapt it to a few of that hospital's labelled scans (`sonocad adapt {NAME}@{version} LOCAL
--out RUN`: fine-tuning, calibration and thresholds chosen on them by cross-fitting), and evaluate the result on
other local scans before any use in research.
"""


if __name__ == "__main__":
    raise SystemExit(main())
