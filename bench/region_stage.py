"""A second look at the lesion: a candidate for bus-base v2 (docs/base-model.md), measured leave one site out.

Stage 1 is a trained run with the lesion-mask head. For every scan of both sites it predicts the lesion mask;
the largest predicted region's box, widened by --margin on each side and made square, is cut from the scan at
its own resolution (the lesion at up to 224 px instead of a fraction of it). Stage 2 is sonocad's default recipe
trained on the training site's crops (the same split seed: the crops of stage 1's test part stay out), and
the combined prediction averages the two stages' logits. Scored on every scan of the other site, against
stage 1 alone (paired DeLong).

    .venv/bin/python bench/region_stage.py --stage1 runs/loso/busi-s0 --train busi --work runs/region
    .venv/bin/python bench/region_stage.py --train busi --smoke       # stand-in sites of phantoms, tiny runs
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402
from scipy.special import expit, logit  # noqa: E402

from sonocad.analysis.segment import predict_masks  # noqa: E402
from sonocad.data import discover  # noqa: E402
from sonocad.data.images import from_square, load_gray  # noqa: E402
from sonocad.deploy.predictor import Predictor  # noqa: E402
from sonocad.evaluation.metrics import binary_metrics, delong_test  # noqa: E402
from sonocad.workflows.train import fit  # noqa: E402

from harness import (  # noqa: E402, I001
    CLASSES, ROOT, SHARED, SITES, SMOKE_TRAINING, Bench, fake_sites, other_site, tiny_run,
)

MIN_CROP = 64           # px: smaller crops are enlarged (bicubic)


def crop_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the largest region of `mask` (H, W), widened by `margin` of its size on each
    side and made square, clipped to the image; None without a region."""
    labels, n = ndimage.label(mask)
    if not n:
        return None
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    half = max(ys.max() - ys.min(), xs.max() - xs.min(), 16) * (0.5 + margin)
    h, w = mask.shape
    return (max(0, int(cx - half)), max(0, int(cy - half)), min(w, int(cx + half) + 1), min(h, int(cy + half) + 1))


def write_crops(predictor: Predictor, data: Path, site: str, out: Path, margin: float) -> Path:
    """A manifest of every scan of `site` cut to its predicted lesion (the whole scan where none is found)."""
    samples = discover(data / SITES[site], CLASSES)
    rows = []
    for i in range(0, len(samples), 64):
        part = samples[i:i + 64]
        images = predictor.decode([s.path for s in part])[0]
        prob = predict_masks(predictor, images)
        for s, p in zip(part, prob):
            img = load_gray(s.path)
            box = crop_box(from_square(p, img.size, predictor.info.config.resize), margin)
            name = out / "crops" / site / f"{len(rows):05d}.png"
            name.parent.mkdir(parents=True, exist_ok=True)
            crop = img.crop(box) if box else img
            if min(crop.size) < MIN_CROP:       # a small lesion, enlarged to what sonocad reads
                scale = MIN_CROP / min(crop.size)
                crop = crop.resize((round(crop.size[0] * scale), round(crop.size[1] * scale)), 3)
            crop.save(name)
            rows.append({"path": str(name), "label": s.label, "group": f"{site}/{s.group or s.path}",
                         "source": s.path})
    manifest = out / f"{site}.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "group", "source"])
        w.writeheader()
        w.writerows(rows)
    return manifest


def add_arguments(ap) -> None:
    ap.add_argument("--stage1", help="a run with the mask head, trained on --train alone (--smoke: a tiny one)")
    ap.add_argument("--train", required=True, choices=list(SITES))
    ap.add_argument("--margin", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="crops, stage 2 and the result (default runs/region)")
    ap.add_argument("--data", type=Path, default=SHARED, help="the folder of the two sites (default ../shared/data)")


def main(argv=None) -> int:
    bench = Bench.start("region_stage", __doc__, argv, add_arguments)
    a = bench.args
    training = {}
    if bench.smoke:
        a.work = str(a.work or bench.tmp())
        a.data = fake_sites(Path(a.work), n=48)
        a.stage1 = a.stage1 or str(tiny_run(Path(a.work) / "stage1", a.data / SITES[a.train]))
        training = SMOKE_TRAINING
    elif not a.stage1:
        raise SystemExit("bench/region_stage.py: --stage1 RUN is required")
    other = other_site(a.train)
    work = Path(a.work or ROOT / "runs" / "region") / f"{a.train}-m{a.margin:g}-s{a.seed}"
    t0 = time.perf_counter()
    stage1 = Predictor.load(a.stage1)
    manifests = {site: work / f"{site}.csv" for site in SITES}
    for site, manifest in manifests.items():
        if not manifest.is_file():
            write_crops(stage1, a.data, site, work, a.margin)
    run2 = work / "stage2"
    if not (run2 / "run.json").is_file():
        fit(str(manifests[a.train]), run2, **{"classes": CLASSES, "seed": a.seed, **training}, progress=False,
            overwrite=run2.exists())
    with open(manifests[other], newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.asarray([r["label"] == CLASSES[1] for r in rows], int)
    p1 = stage1.predict_proba([r["source"] for r in rows])[:, 1]
    p2 = Predictor.load(run2).predict_proba([r["path"] for r in rows])[:, 1]
    clip = lambda p: np.clip(p, 1e-6, 1 - 1e-6)  # noqa: E731
    both = expit((logit(clip(p1)) + logit(clip(p2))) / 2)
    out = {"train": a.train, "target": other, "stage1": a.stage1, "margin": a.margin, "seed": a.seed, "n": len(y)}
    for name, p in (("stage1", p1), ("stage2_region", p2), ("combined", both)):
        m = binary_metrics(y, p)
        out[name] = {"auc": m["auc"], "auc_ci": m["auc_ci"]}
        if name != "stage1":
            out[name]["delong_vs_stage1"] = delong_test(y, p, p1)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    (work / "result.json").write_text(json.dumps(out, indent=1, default=float))
    print(json.dumps(out, default=float))
    return bench.finish({k: out[k]["auc"] for k in ("stage1", "stage2_region", "combined")} | {
        "seconds": out["seconds"]}, details=out)


if __name__ == "__main__":
    raise SystemExit(main())
