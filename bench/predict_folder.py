"""Is `sonocad predict` on a folder of images limited by the model or by reading the images?

Writes N images (BUSI benign + malignant PNGs copied, cycled, under new names; synthetic phantoms without
../shared) into a temporary folder, then times `sonocad.workflows.evaluate.predict_paths` on it end to end, and
separately its two parts on the same files: decoding + resizing + overlay removal (`load_many`), and the
model (`Predictor.predict`, with the run's test-time augmentation; with --tta, also under each choice given,
harness.TTA_CHOICES). Prints
images/s for each and the share of the wall time the model takes.

    .venv/bin/python bench/predict_folder.py runs/busi               # 1,000 images
    .venv/bin/python bench/predict_folder.py runs/busi --images 200
    .venv/bin/python bench/predict_folder.py runs/busi --tta none mirror full   # the model part of each choice too
    .venv/bin/python bench/predict_folder.py --smoke                 # a tiny run of its own, 12 phantoms
"""
from __future__ import annotations

import dataclasses
import sys
import time

# bench/ is on sys.path when a script runs
from harness import TTA_CHOICES, TTA_HELP, Bench, add_run_argument, copy_images, run_for, tta_setting  # noqa: E402

from sonocad.data import load_many  # noqa: E402
from sonocad.data.discover import image_files  # noqa: E402
from sonocad.deploy.predictor import load_predictor  # noqa: E402
from sonocad.errors import SonocadError  # noqa: E402
from sonocad.workflows.evaluate import predict_paths  # noqa: E402


def add_arguments(p) -> None:
    add_run_argument(p)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--tta", nargs="*", default=[], choices=TTA_CHOICES,
                   help=f"also time the model under these {TTA_HELP}")


def main(argv=None) -> int:
    bench = Bench.start("predict_folder", __doc__, argv, add_arguments)
    args = bench.args
    n = 12 if bench.smoke else args.images
    run = run_for(bench)
    try:
        predictor = load_predictor(run)
    except SonocadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = predictor.info
    folder = bench.tmp() / "scans"
    what = copy_images(bench, folder, n)
    files = [str(f) for f in image_files([folder])]
    print(f"{len(files)} images ({what}); run {run}: {info.config.model}, {info.img_size} px, "
          f"test-time augmentation {'on' if info.config.tta else 'off'}", flush=True)
    predict_paths(run, files[:64])          # warm-up: kernels, file cache
    t0 = time.perf_counter()
    rows = predict_paths(run, [folder])
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    images, _, _ = load_many(files, info.img_size, info.config.resize, clean_overlays=info.config.clean_overlays)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    predictor.predict_proba(images)
    t_model = time.perf_counter() - t0
    n = len(rows)
    print(f"sonocad predict (predict_paths), end to end: {wall:.1f} s, {n / wall:.1f} img/s")
    print(f"  reading (decode, resize, overlay removal; load_many, 2 threads): {t_read:.1f} s, "
          f"{n / t_read:.1f} img/s")
    print(f"  model (Predictor.predict, batch 64{', with TTA' if info.config.tta else ''}): {t_model:.1f} s, "
          f"{n / t_model:.1f} img/s")
    print(f"  the model's share of reading + model: {t_model / (t_read + t_model):.0%}")
    summary = {"images": n, "end_to_end_images_per_s": n / wall, "reading_images_per_s": n / t_read,
               "model_images_per_s": n / t_model, "model_share": t_model / (t_read + t_model)}
    own = info.config
    for choice in args.tta:
        predictor.info.config = dataclasses.replace(own, **tta_setting(choice, own.tta_zooms))
        t0 = time.perf_counter()
        predictor.predict_proba(images)
        t_choice = time.perf_counter() - t0
        print(f"  model with test-time augmentation {choice}: {t_choice:.1f} s, {n / t_choice:.1f} img/s")
        summary[f"model_images_per_s_tta_{choice}"] = n / t_choice
    predictor.info.config = own
    return bench.finish(summary, {"run": run, "source": what, "tta": info.config.tta})


if __name__ == "__main__":
    raise SystemExit(main())
