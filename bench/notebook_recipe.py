"""Seconds per training epoch: the original notebook (Keras/TensorFlow, InceptionV3) next to sonocad's
`--recipe notebook` and sonocad's default recipe, on the same images and the same machine.

TensorFlow never goes into the project's venv: the Keras part runs as a subprocess with the interpreter
of a separate venv, bench/.venv-tf (git-ignored), made with

    python3 -m venv bench/.venv-tf && bench/.venv-tf/bin/pip install tensorflow-cpu

Without it the script says so and times the two sonocad recipes only.

    .venv/bin/python bench/notebook_recipe.py --images 200

What one "epoch" is here, for all three: one pass of training over the same --images images (batch 8
for the notebook and `--recipe notebook`, 32 for the default recipe), then a prediction over the same
--val validation images. sonocad's figure is one phase-2 epoch of sonocad.training.trainer.Trainer (top 2 blocks
unfrozen; on-the-fly augmentation in the default recipe, none in the notebook recipe), as log.csv
records it. The notebook recipe's 7 offline copies are switched off here so that every recipe sees the
same images; with them its real epochs are 8x as long. Each is timed after a short untimed warm-up
(Keras: graph tracing; PyTorch: first-call kernel set-up).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cpumeter import CpuMeter  # noqa: E402  (bench/ is on sys.path when a script runs)

ROOT = Path(__file__).resolve().parents[1]
TF_VENV = ROOT / "bench" / ".venv-tf"
BUSI = ROOT.parent / "shared" / "data" / "busi" / "Dataset_BUSI_with_GT"
CLASSES = ["benign", "malignant"]


def warmup_count(n: int, batch_size: int) -> int:
    """Images for the untimed warm-up epoch: enough for a full batch and the epoch's last, partial one,
    so the timed epoch meets no new tensor shape."""
    rest = n % batch_size
    return min(n, batch_size + (rest if rest > 1 else 0))


# -- the Keras side (runs under bench/.venv-tf's interpreter; imports no torch and no sonocad) --------
def keras_worker(npz: str, result: str, batch_size: int, dropout: float) -> None:
    """The notebook's model for one timed epoch: InceptionV3 (weights=None) + GAP -> Dense 256 relu ->
    Dropout -> Dense 1 sigmoid; top 2 inception blocks (mixed9, mixed10) trainable; Adagrad; BCE."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf
    from keras import layers

    d = np.load(npz)

    def prep(a):   # gray uint8 -> 3 channels in InceptionV3's [-1, 1]
        return np.repeat(a[..., None].astype(np.float32) / 127.5 - 1.0, 3, axis=-1)

    x, y, xv, yv = prep(d["x"]), d["y"].astype(np.float32), prep(d["xv"]), d["yv"].astype(np.float32)
    size = x.shape[1]
    base = keras.applications.InceptionV3(weights=None, include_top=False, input_shape=(size, size, 3))
    h = layers.GlobalAveragePooling2D()(base.output)
    h = layers.Dense(256, activation="relu")(h)
    h = layers.Dropout(dropout)(h)
    out = layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model(base.input, out)
    first = [layer.name for layer in model.layers].index("mixed8") + 1   # mixed9 and mixed10 onwards
    for i, layer in enumerate(model.layers):
        layer.trainable = i >= first
    model.compile(optimizer=keras.optimizers.Adagrad(learning_rate=1e-3), loss="binary_crossentropy",
                  metrics=["accuracy"])
    w = warmup_count(len(x), batch_size)
    t0 = time.perf_counter()
    model.fit(x[:w], y[:w], batch_size=batch_size, epochs=1, verbose=0, validation_data=(xv, yv))
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=True, validation_data=(xv, yv))
    epoch = time.perf_counter() - t0
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    Path(result).write_text(json.dumps({
        "epoch_seconds": epoch, "warmup_seconds": warm, "images": len(x), "val_images": len(xv),
        "trainable_layers": len(model.layers) - first, "first_trainable": model.layers[first].name,
        "trainable_params": trainable, "tensorflow": tf.__version__, "keras": keras.__version__,
        "threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                    "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}}))


def run_keras(x, y, xv, yv, tmp: Path, tf_python: Path, args) -> dict | None:
    """The Keras epoch in a subprocess; None (after saying why) when TensorFlow is not available."""
    import numpy as np

    if not tf_python.is_file():
        print(f"Keras/TensorFlow: not measured: no TensorFlow venv at {tf_python.parents[1]}; create it with\n"
              f"  python3 -m venv bench/.venv-tf && bench/.venv-tf/bin/pip install tensorflow-cpu")
        return None
    check = subprocess.run([str(tf_python), "-c", "import tensorflow"], capture_output=True, text=True,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        print(f"Keras/TensorFlow: not measured: {tf_python} cannot import tensorflow ({last})")
        return None
    npz, result = tmp / "images.npz", tmp / "keras.json"
    np.savez(npz, x=x, y=y, xv=xv, yv=yv)
    cmd = [str(tf_python), str(Path(__file__).resolve()), "--keras-worker", str(npz), str(result),
           "--batch-size", "8", "--dropout", str(args.dropout)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if proc.returncode != 0 or not result.is_file():
        tail = "\n  ".join(proc.stderr.strip().splitlines()[-8:])
        print(f"Keras/TensorFlow: failed (exit {proc.returncode}):\n  {tail}")
        return None
    return json.loads(result.read_text())


# -- the sonocad side --------------------------------------------------------------------------------
def sonocad_epoch(recipe: str, paths_train, y, paths_val, yv, tmp: Path, **overrides) -> dict:
    """One phase-2 epoch of sonocad's Trainer for `recipe`: phase 1 skipped (head_epochs=0), one
    finetune epoch, no early stop, no offline copies; after a warm-up epoch on a few images."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from sonocad.config import TrainConfig
    from sonocad.data import load_many
    from sonocad.models.classifier import input_config
    from sonocad.models.infer import InputPipeline, resolve_precision
    from sonocad.training.prepare import Split
    from sonocad.training.starting import build_model
    from sonocad.training.trainer import Trainer

    cfg = TrainConfig.from_recipe(recipe, head_epochs=0, finetune_epochs=1, patience=10 ** 6, offline_augment=0,
                                  **overrides)
    size, mean, std = input_config(cfg.model, cfg.img_size)
    images, _, _ = load_many(paths_train, size, cfg.resize)
    val_images, _, _ = load_many(paths_val, size, cfg.resize)
    precision = resolve_precision(cfg.precision)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, 2, precision)
    pipeline = InputPipeline(mean, std, precision)
    val = Split(val_images, yv, [None] * len(yv))

    def trainer(n, out):
        train = Split(images[:n], y[:n], [None] * n)
        return Trainer(model, train, val, 2, cfg, precision, pipeline, tmp / out, progress=False)

    t0 = time.perf_counter()
    trainer(warmup_count(len(images), cfg.batch_size), f"{recipe}-warmup").run()
    warm = time.perf_counter() - t0
    tr = trainer(len(images), recipe)
    tr.run()
    row = tr.log[-1]
    return {"epoch_seconds": row["seconds"], "phase2_seconds_incl_checkpoint": tr.seconds["finetune"],
            "warmup_seconds": warm, "images": len(images), "val_images": len(val_images), "model": cfg.model,
            "batch_size": cfg.batch_size, "optimizer": cfg.optimizer, "augment": cfg.augment,
            "precision": precision.name, "img_size": size, "resize": cfg.resize,
            "pretrained": cfg.pretrained,
            "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
            "threads": torch.get_num_threads()}


def pick_images(n: int, n_val: int, tmp: Path, seed: int = 0):
    """Paths and labels of `n` training and `n_val` validation images: BUSI benign+malignant (a seeded
    random subset, stratified), or synthetic phantoms when ../shared is absent."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "src"))
    from sonocad.data import discover

    root, name = BUSI, "BUSI benign+malignant"
    if not BUSI.is_dir():
        from sonocad.data.synth import write_phantom_set

        print(f"note: {BUSI} not found; using synthetic phantoms (sonocad.data.synth) instead of BUSI")
        root, name = tmp / "phantoms", "synthetic phantoms"
        write_phantom_set(root, n=max(2 * (n + n_val), 40), seed=seed, size=256)
    samples = discover(root, CLASSES)
    rng = np.random.default_rng(seed)
    y_all = np.asarray([CLASSES.index(s.label) for s in samples])
    val_idx = np.concatenate([rng.permutation(np.flatnonzero(y_all == c))[:n_val // 2 + c * (n_val % 2)]
                              for c in (0, 1)])
    rest = np.setdiff1d(np.arange(len(samples)), val_idx)
    train_idx = rng.permutation(rest)
    train_idx = np.resize(train_idx, n) if n > len(train_idx) else train_idx[:n]
    pick = lambda idx: ([samples[i].path for i in idx], y_all[idx])  # noqa: E731
    return (*pick(train_idx), *pick(val_idx), name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="training images per epoch (default 200)")
    p.add_argument("--val", type=int, default=32, help="validation images predicted after the epoch")
    p.add_argument("--tf-python", default=str(TF_VENV / "bin" / "python"),
                   help="interpreter with TensorFlow (default bench/.venv-tf/bin/python)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of all three, interleaved; median and best are reported (default 1)")
    p.add_argument("--skip-keras", action="store_true")
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    p.add_argument("--keras-worker", nargs=2, metavar=("NPZ", "RESULT"), help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.keras_worker:
        keras_worker(*args.keras_worker, args.batch_size, args.dropout)
        return 0

    import numpy as np

    rounds: dict[str, list[dict]] = {"keras_notebook": [], "sonocad_notebook": [], "sonocad_default": []}
    meter = CpuMeter()
    with tempfile.TemporaryDirectory(prefix="sonocad-nb-") as tmpdir:
        tmp = Path(tmpdir)
        paths, y, vpaths, yv, data_name = pick_images(args.images, args.val, tmp)
        print(f"one training epoch on {len(paths)} {data_name} images ({int(y.sum())} malignant) at 224 px, "
              f"then prediction on {len(vpaths)} validation images; {os.cpu_count()} CPUs")
        print(f"machine check: {CpuMeter.busy_now()}")
        print("note: pretrained weights cannot be downloaded here: InceptionV3 runs with random weights in "
              "both Keras (weights=None)\n      and sonocad (--no-pretrained); weights do not change timing")
        keras = not args.skip_keras
        if keras:
            sys.path.insert(0, str(ROOT / "src"))
            from sonocad.data import load_many

            x, _, _ = load_many(paths, 224, "stretch")          # the notebook stretched to a square
            xv, _, _ = load_many(vpaths, 224, "stretch")
        else:
            print("Keras/TensorFlow: skipped (--skip-keras)")
        for r in range(args.repeat):
            tag = f" (round {r + 1} of {args.repeat})" if args.repeat > 1 else ""
            if keras:
                print(f"timing the notebook (Keras/TensorFlow subprocess){tag} ...", flush=True)
                k = run_keras(x, y, xv, yv, tmp, Path(args.tf_python), args)
                if k is None:
                    keras = False
                else:
                    rounds["keras_notebook"].append(k)
            print(f"timing sonocad --recipe notebook (inception_v3, --no-pretrained){tag} ...", flush=True)
            rounds["sonocad_notebook"].append(
                sonocad_epoch("notebook", paths, y, vpaths, yv, tmp / f"r{r}", pretrained=False))
            print(f"timing sonocad default recipe (tf_efficientnet_lite0){tag} ...", flush=True)
            rounds["sonocad_default"].append(sonocad_epoch("default", paths, y, vpaths, yv, tmp / f"r{r}"))

    def summary(runs: list[dict]) -> dict | None:
        """The fastest round's figures, with every round's epoch time and their median."""
        if not runs:
            return None
        times = [r["epoch_seconds"] for r in runs]
        best = dict(min(runs, key=lambda r: r["epoch_seconds"]))
        best.update(best_epoch_seconds=min(times), epoch_seconds=float(np.median(times)), rounds_seconds=times)
        return best

    results = {name: summary(runs) for name, runs in rounds.items()}
    k = results["keras_notebook"]
    rows = [("notebook: Keras/TF InceptionV3, fp32, batch 8, Adagrad", k),
            ("sonocad --recipe notebook (inception_v3, batch 8)", results["sonocad_notebook"]),
            ("sonocad default (tf_efficientnet_lite0, batch 32)", results["sonocad_default"])]
    print()
    print(f"{'recipe':56}{'s/epoch':>9}{'best':>7}{'img/s':>8}{'precision':>11}{'trainable':>12}")
    for name, r in rows:
        if r is None:
            print(f"{name:56}{'n/a':>9}")
            continue
        print(f"{name:56}{r['epoch_seconds']:9.1f}{r['best_epoch_seconds']:7.1f}{r['images'] / r['epoch_seconds']:8.1f}"
              f"{r.get('precision', 'fp32'):>11}{r['trainable_params']:12,}")
    print(f"(s/epoch: median of {args.repeat} round(s); best: fastest round; img/s from the median)")
    if k:
        print(f"\nKeras: TensorFlow {k['tensorflow']}, Keras {k['keras']}; trainable: the mixed9 and mixed10 blocks "
              f"(layers from {k['first_trainable']!r} on, {k['trainable_layers']} layers); warm-up incl. tracing "
              f"{k['warmup_seconds']:.1f} s")
    for key in ("sonocad_notebook", "sonocad_default"):
        r = results[key]
        print(f"{key}: {r['precision']}, {r['resize']} to {r['img_size']} px, augment={r['augment']}; phase 2 incl. "
              f"checkpoint write {r['phase2_seconds_incl_checkpoint']:.1f} s (fastest round)")
    results["load"] = meter.report()
    print()
    print(CpuMeter.describe(results["load"]))
    if k:
        nb, df = results["sonocad_notebook"], results["sonocad_default"]
        print(f"\nepoch time, notebook / sonocad (median rounds): --recipe notebook "
              f"{k['epoch_seconds'] / nb['epoch_seconds']:.2f}x, "
              f"default {k['epoch_seconds'] / df['epoch_seconds']:.2f}x"
              f"; best rounds: {k['best_epoch_seconds'] / nb['best_epoch_seconds']:.2f}x, "
              f"{k['best_epoch_seconds'] / df['best_epoch_seconds']:.2f}x  (above 1: sonocad is faster)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=lambda o: o.item()
                                              if isinstance(o, np.generic) else str(o)))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
