"""Is `sonocad predict` on a folder of images limited by the model or by reading the images?

Writes N images (BUSI benign + malignant PNGs copied, cycled, under new names; synthetic phantoms without
../shared) into a temporary folder, then times `sonocad.workflows.evaluate.predict_paths` on it end to end, and
separately its two parts on the same files: decoding + resizing + overlay removal (`load_many`), and the
model (`Predictor.predict`, with the run's test-time augmentation). Prints images/s for each and the
share of the wall time the model takes.

    .venv/bin/python bench/predict_folder.py runs/busi               # 1,000 images
    .venv/bin/python bench/predict_folder.py runs/busi --images 200
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cpumeter import CpuMeter  # noqa: E402  (bench/ is on sys.path when a script runs)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))   # run from a checkout without installing

from sonocad.data import discover, load_many  # noqa: E402
from sonocad.data.discover import image_files  # noqa: E402
from sonocad.deploy.predictor import load_predictor  # noqa: E402
from sonocad.errors import SonocadError  # noqa: E402
from sonocad.runtime.allocator import tune_allocator  # noqa: E402
from sonocad.workflows.evaluate import predict_paths  # noqa: E402

BUSI = ROOT.parent / "shared" / "data" / "busi" / "Dataset_BUSI_with_GT"


def write_folder(folder: Path, n: int) -> str:
    """`n` image files in `folder`; returns where they came from."""
    folder.mkdir(parents=True)
    if BUSI.is_dir():
        sources, what = [s.path for s in discover(BUSI, ["benign", "malignant"])], "BUSI benign+malignant PNGs"
    else:
        from sonocad.data.synth import write_phantom_set

        write_phantom_set(folder.parent / "phantoms", n=200, seed=0, size=500)
        sources = [s.path for s in discover(folder.parent / "phantoms", ["benign", "malignant"])]
        what = "synthetic phantoms, 500 px (../shared not found)"
    for i in range(n):
        src = Path(sources[i % len(sources)])
        shutil.copyfile(src, folder / f"scan-{i:05d}{src.suffix}")
    return what


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a sonocad run directory (e.g. runs/busi from `sonocad train`)")
    p.add_argument("--images", type=int, default=1000)
    args = p.parse_args(argv)
    tune_allocator()     # as the sonocad command does
    try:
        predictor = load_predictor(args.run)
    except SonocadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = predictor.info
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "scans"
        what = write_folder(folder, args.images)
        files = [str(f) for f in image_files([folder])]
        print(f"{len(files)} images ({what}); run {args.run}: {info.config.model}, {info.img_size} px, "
              f"test-time augmentation {'on' if info.config.tta else 'off'}", flush=True)
        predict_paths(args.run, files[:64])          # warm-up: kernels, file cache
        print(f"machine check: {CpuMeter.busy_now()}", flush=True)
        meter = CpuMeter()
        t0 = time.perf_counter()
        rows = predict_paths(args.run, [folder])
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
    print(CpuMeter.describe(meter.report()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
