"""Training and inference speed of sonocad's default recipe against a plain fp32 timm + PyTorch loop.

Everything runs in one process on the same images (BUSI benign + malignant at 224 px, decoded once;
synthetic phantoms when ../shared is absent) and reports images/s, the model's achieved TFLOP/s as a
fraction of a bf16 / fp32 matmul peak measured in the same run, and the phase-1 feature-caching effect.
The last line is always `speedup train=X.XX infer=Y.YY`.

    .venv/bin/python bench/speed.py                       # ~3 minutes on 2 idle cores
    .venv/bin/python bench/speed.py --images 64 --head-epochs 2 --json speed.json
    .venv/bin/python bench/speed.py --auc                 # + AUC bf16 vs fp32 on BUSI (long: 10+ min)
    .venv/bin/python bench/speed.py --smoke               # seconds, on 16 phantoms of 64 px: does it run?
"""
from __future__ import annotations

import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import CLASSES, Bench, image_source  # noqa: E402  (bench/ is on sys.path when a script runs)
from torch import nn

from sonocad.config import TrainConfig  # noqa: E402
from sonocad.data import discover, load_many  # noqa: E402
from sonocad.models.classifier import fold_batchnorm, freeze_batchnorm, input_config, set_trainable  # noqa: E402
from sonocad.models.infer import InputPipeline, cpu_has_fast_bf16, resolve_precision, run_batches  # noqa: E402
from sonocad.runtime.allocator import tune_allocator  # noqa: E402
from sonocad.training.optim import make_loss, make_optimizer, weight_average  # noqa: E402
from sonocad.training.prepare import Split  # noqa: E402
from sonocad.training.starting import build_model  # noqa: E402
from sonocad.training.trainer import Trainer  # noqa: E402

MODEL = "tf_efficientnet_lite0"
SMOKE = {"images": 16, "size": 64, "batch": 8, "infer_batch": 8, "warmup": 1, "steps": 1, "infer_reps": 1, "head_epochs": 1,
         "matmul_size": 128, "matmul_reps": 1}


# -- data ------------------------------------------------------------------------------------------
def load_images(root: Path, n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` images of both classes (a seeded random subset, classes in their dataset proportion), decoded
    once into uint8 (n, size, size); cycled if the dataset has fewer than `n`."""
    samples = discover(root, CLASSES)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(samples))
    order = np.resize(order, n) if n > len(order) else order[:n]
    chosen = [samples[i] for i in order]
    images, _, _ = load_many([s.path for s in chosen], size, "pad")
    y = np.asarray([CLASSES.index(s.label) for s in chosen])
    return images, y


# -- timing helpers --------------------------------------------------------------------------------
def matmul_peak(size: int, dtype: torch.dtype, reps: int) -> float:
    """TFLOP/s of a size x size x size torch.matmul in `dtype` (best of `reps`, after one warm-up)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e12


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """convolution_backward FLOPs: one forward's worth per gradient computed (input, weight). torch's own
    formula multiplies the weight gradient of grouped convs by the group count (65x for a 64-channel
    depthwise layer), which would inflate EfficientNet's training FLOPs about tenfold."""
    from torch.utils.flop_counter import conv_flop_count

    fwd = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(model: nn.Module, x: torch.Tensor, backward: bool) -> float:
    """FLOPs per image of one forward (+ backward) pass, counted by torch.utils.flop_counter (fp32;
    convolutions, matmuls; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    fix = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=fix) as fc:
        if backward:
            model(x).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / len(x)


def timed_steps(step, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` calls of step(), after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def rates(sizes: list[int], times: list[float]) -> dict:
    """images/s from per-step (or per-batch) sizes and seconds: median step (the headline figure), best
    step (closest to an idle machine when others load it in bursts) and overall."""
    per = sorted(n / t for n, t in zip(sizes, times))
    return {"images_per_s": float(np.median(per)), "best_images_per_s": per[-1],
            "overall_images_per_s": sum(sizes) / sum(times), "seconds": sum(times), "steps": len(times)}


# -- sonocad's default recipe ----------------------------------------------------------------------
def sonocad_train(images, y, args, precision):
    """Phase 2 of the default recipe, step for step as Trainer.phase_finetune: top 2 blocks + head,
    frozen BatchNorm, on-the-fly augmentation of cached uint8 images, bf16 autocast, channels_last, the
    moving average of the weights updated after every step."""
    cfg = TrainConfig.from_recipe("default", **({"batch_size": args.batch} if args.batch else {}))
    _, mean, std = input_config(cfg.model)
    model = build_model(cfg, 2, precision)
    set_trainable(model, cfg.unfreeze)
    model.train()
    freeze_batchnorm(model)
    pipeline = InputPipeline(mean, std, precision)
    opt = make_optimizer(model.parameters(), cfg, cfg.finetune_lr)
    loss_fn = make_loss(y, 2, cfg.balance)
    gen = torch.Generator().manual_seed(0)
    yt = torch.from_numpy(y)
    bs = cfg.batch_size
    ema = weight_average(model, cfg, max(1, len(y) // bs))

    def batches():
        while True:
            order = torch.randperm(len(y), generator=gen).numpy()
            yield from (order[i:i + bs] for i in range(0, len(y) - bs + 1, bs))

    it = batches()

    def step():
        idx = next(it)
        x = pipeline(images[idx], gen)
        with precision.autocast():
            logits = model(x)
        loss = loss_fn(logits, yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)

    times = timed_steps(step, args.warmup, args.steps)
    x = pipeline(images[:2])
    flops = count_flops(model, x.float(), backward=True)
    return model, pipeline, {**rates([bs] * len(times), times), "gflop_per_image": flops / 1e9, "batch": bs,
                             "precision": precision.name,
                             "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def sonocad_infer(model, images, pipeline, args):
    """As evaluate/predict run a model: BatchNorm folded into the convolutions, bf16, batches of 64."""
    bs = args.infer_batch
    t0 = time.perf_counter()
    model = fold_batchnorm(model)
    fold_seconds = time.perf_counter() - t0
    run_batches(model, images[:bs], pipeline, batch_size=bs)    # warm-up
    sizes, times = [], []
    for _ in range(max(1, args.infer_reps)):
        for i in range(0, len(images), bs):     # run_batches one batch at a time, to time each
            t0 = time.perf_counter()
            run_batches(model, images[i:i + bs], pipeline, batch_size=bs)
            times.append(time.perf_counter() - t0)
            sizes.append(len(images[i:i + bs]))
    flops = count_flops(model, pipeline(images[:2]).float(), backward=False)
    return {**rates(sizes, times), "gflop_per_image": flops / 1e9, "fold_batchnorm_seconds": fold_seconds,
            "batch": bs, "precision": pipeline.precision.name}


def phase1_caching(images, y, args, precision, tmp: Path) -> dict:
    """Phase 1 through sonocad's own Trainer (head on a frozen backbone, early stopping off so both run
    every epoch): features cached once (images + 4 augmented views) vs. the backbone run every epoch."""
    _, mean, std = input_config(MODEL)
    pipeline = InputPipeline(mean, std, precision)
    val_idx = np.arange(0, len(y), 8)
    if len(set(y[val_idx])) < 2:
        val_idx = np.concatenate([np.flatnonzero(y == 0)[:8], np.flatnonzero(y == 1)[:8]])
    train = Split(images, y, [None] * len(y))
    val = Split(images[val_idx], y[val_idx], [None] * len(val_idx))
    out = {}
    for cached in (True, False):
        cfg = TrainConfig.from_recipe("default", head_epochs=args.head_epochs, patience=10_000,   # no early stop
                                      cache_features=cached, unfreeze="0")
        torch.manual_seed(0)
        model = build_model(cfg, 2, precision)
        trainer = Trainer(model, train, val, 2, cfg, precision, pipeline, tmp / f"phase1-{cached}", progress=False)
        t0 = time.perf_counter()
        trainer.phase_head()
        total = time.perf_counter() - t0
        epochs = sum(r["seconds"] for r in trainer.log)
        out["cached" if cached else "uncached"] = {
            "seconds": total, "epoch_seconds": epochs, "setup_seconds": total - epochs,
            "median_epoch_seconds": float(np.median([r["seconds"] for r in trainer.log])), "epochs": len(trainer.log)}
    return out


# -- the plain fp32 loop a user writes by default --------------------------------------------------
class PILDataset(torch.utils.data.Dataset):
    """The same decoded images as PIL images, with per-image torchvision transforms."""

    def __init__(self, images, y, transform):
        from PIL import Image

        self.images = [Image.fromarray(a) for a in images]
        self.y, self.transform = y, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i].convert("RGB")), float(self.y[i])


def plain_transforms(model, train: bool, size: int):
    from torchvision import transforms as T

    cfg = model.pretrained_cfg
    aug = [T.RandomHorizontalFlip(), T.RandomRotation(10), T.RandomResizedCrop(size, scale=(0.8, 1.0)),
           T.ColorJitter(brightness=0.2, contrast=0.2)] if train else []
    return T.Compose(aug + [T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])


def plain_train(images, y, args):
    """timm.create_model(..., num_classes=1), everything trainable, fp32 NCHW, AdamW, BCEWithLogits,
    DataLoader(num_workers=0) with per-image transforms."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=1)
    bs = args.batch or 32
    loader = torch.utils.data.DataLoader(PILDataset(images, y, plain_transforms(model, True, images.shape[-1])),
                                         batch_size=bs, shuffle=True, num_workers=0, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    it = itertools.chain.from_iterable(itertools.repeat(loader))

    def step():
        x, t = next(it)
        loss = loss_fn(model(x)[:, 0], t.float())
        opt.zero_grad()
        loss.backward()
        opt.step()

    times = timed_steps(step, args.warmup, args.steps)
    flops = count_flops(model, next(it)[0][:2], backward=True)
    return model, {**rates([bs] * len(times), times), "gflop_per_image": flops / 1e9,
                   "batch": bs, "precision": "fp32",
                   "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def plain_infer(model, images, y, args):
    model.eval()
    loader = torch.utils.data.DataLoader(PILDataset(images, y, plain_transforms(model, False, images.shape[-1])),
                                         batch_size=args.infer_batch, num_workers=0)

    sizes, times = [], []

    def one_pass(limit=None):
        it = iter(loader)
        with torch.no_grad():
            for k in itertools.count():
                if limit is not None and k >= limit:
                    break
                t0 = time.perf_counter()        # a batch's time includes its per-image transforms
                try:
                    x, _ = next(it)
                except StopIteration:
                    break
                model(x)
                times.append(time.perf_counter() - t0)
                sizes.append(len(x))

    one_pass(limit=1)   # warm-up
    sizes.clear(), times.clear()
    for _ in range(max(1, args.infer_reps)):
        one_pass()
    flops = count_flops(model, next(iter(loader))[0][:2], backward=False)
    return {**rates(sizes, times), "gflop_per_image": flops / 1e9,
            "batch": args.infer_batch, "precision": "fp32"}


# -- AUC parity (opt-in) ---------------------------------------------------------------------------
def auc_parity(data: Path, args) -> dict:
    """The default recipe trained twice with sonocad.workflows.train.fit, bf16 and fp32, same seed and split."""
    from sonocad.workflows.train import fit

    over = {}
    if args.auc_img_size:
        over["img_size"] = args.auc_img_size
    if args.auc_epochs is not None:
        over.update(head_epochs=args.auc_epochs, finetune_epochs=args.auc_epochs)
    res = {}
    with tempfile.TemporaryDirectory(prefix="sonocad-auc-") as tmp:
        for prec in ("bf16", "fp32"):
            print(f"  training the default recipe in {prec}{' ' + str(over) if over else ''} ...", flush=True)
            t0 = time.perf_counter()
            m = fit(data, Path(tmp) / prec, classes=CLASSES, seed=args.seed, precision=prec, progress=False, **over)
            res[prec] = {"auc": m["auc"], "auc_ci": m.get("auc_ci"), "seconds": time.perf_counter() - t0,
                         "precision_used": m.get("precision")}
            print(f"  {prec}: test AUC {m['auc']:.4f}  ({res[prec]['seconds']:.0f} s)", flush=True)
    res["difference"] = res["bf16"]["auc"] - res["fp32"]["auc"]
    res["within_0.01"] = abs(res["difference"]) <= 0.01
    res["overrides"] = over
    return res


# -- main ------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--images", type=int, default=256, help="images to benchmark on (default 256)")
    p.add_argument("--size", type=int, default=224, help="their input size in px (default 224, the recipe's)")
    p.add_argument("--batch", type=int, help="training batch (default: the recipe's 32)")
    p.add_argument("--infer-batch", type=int, default=64, help="inference batch (default 64)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first (default 2)")
    p.add_argument("--steps", type=int, default=8, help="timed training steps (default 8)")
    p.add_argument("--infer-reps", type=int, default=2, help="timed inference passes over the images (default 2)")
    p.add_argument("--head-epochs", type=int, default=10,
                   help="phase-1 epochs for the caching comparison (default 10; the recipe uses 60)")
    p.add_argument("--matmul-size", type=int, default=4096)
    p.add_argument("--matmul-reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="leave glibc's allocator as it is for sonocad too (see sonocad.runtime.allocator.tune_allocator)")
    p.add_argument("--auc", action="store_true", help="also train the default recipe in bf16 and fp32 on "
                   "the same split and compare test AUCs (long)")
    p.add_argument("--auc-img-size", type=int, help="input size for --auc (quick checks only)")
    p.add_argument("--auc-epochs", type=int, help="head and finetune epochs for --auc (quick checks only)")


def main(argv=None) -> int:
    bench = Bench.start("speed", __doc__, argv, add_arguments)
    args = bench.args
    if bench.smoke:
        vars(args).update(SMOKE)
    if args.threads:
        torch.set_num_threads(args.threads)

    precision = resolve_precision("auto")
    tmp = bench.tmp()
    data, data_name = image_source(bench)
    t0 = time.perf_counter()
    images, y = load_images(data, args.images, args.size, args.seed)
    t_decode = time.perf_counter() - t0

    print(f"sonocad speed benchmark: {len(images)} {data_name} images at {args.size} px "
          f"({int(y.sum())} malignant), decoded once in {t_decode:.1f} s")
    print(f"fast bf16: {cpu_has_fast_bf16()}; precision auto -> {precision.name}"
          f"{' + channels_last' if precision.channels_last else ''}")
    if precision.dtype is None:
        print("note: this CPU has no native bf16, so sonocad's recipe runs in fp32 here")

    print(f"measuring matmul peak ({args.matmul_size}^3, best of {args.matmul_reps}) ...", flush=True)
    peak = {"bf16": matmul_peak(args.matmul_size, torch.bfloat16, args.matmul_reps),
            "fp32": matmul_peak(args.matmul_size, torch.float32, args.matmul_reps)}
    # the plain loop first, in the process as Python starts it; then sonocad, which (as the sonocad
    # command does) switches glibc's allocator to keeping freed memory (allocator.tune_allocator)
    print("measuring plain fp32 training and inference ...", flush=True)
    p_model, p_train = plain_train(images, y, args)
    p_infer = plain_infer(p_model, images, y, args)
    del p_model
    allocator = tune_allocator() if not args.no_tune_allocator else False
    print(f"measuring sonocad training and inference (allocator tuned: {allocator}) ...", flush=True)
    s_model, s_pipe, s_train = sonocad_train(images, y, args, precision)
    s_infer = sonocad_infer(s_model, images, s_pipe, args)
    del s_model
    print(f"measuring phase 1: {args.head_epochs} head epochs, cached features vs. backbone every epoch ...",
          flush=True)
    phase1 = phase1_caching(images, y, args, precision, tmp)

    rows = [("train", "sonocad default (bf16, top 2 blocks)", s_train),
            ("train", "plain timm fp32 (all layers)", p_train),
            ("infer", f"sonocad predict path (BN folded, bf16, batch {args.infer_batch})", s_infer),
            ("infer", f"plain timm fp32 eval (batch {args.infer_batch})", p_infer)]
    print()
    print(f"matmul peak: bf16 {peak['bf16']:.3f} TFLOP/s, fp32 {peak['fp32']:.3f} TFLOP/s "
          f"(bf16/fp32 = {peak['bf16'] / peak['fp32']:.2f})")
    print()
    print(f"{'':6}{'recipe':40}{'img/s':>8}{'best':>8}{'GFLOP/img':>11}{'TFLOP/s':>9}{'% bf16 pk':>11}"
          f"{'% fp32 pk':>11}")
    for kind, name, r in rows:
        r["tflops"] = r["images_per_s"] * r["gflop_per_image"] / 1e3
        r["frac_bf16_peak"] = r["tflops"] / peak["bf16"]
        r["frac_fp32_peak"] = r["tflops"] / peak["fp32"]
        print(f"{kind:6}{name:40}{r['images_per_s']:8.1f}{r['best_images_per_s']:8.1f}{r['gflop_per_image']:11.3f}"
              f"{r['tflops']:9.3f}"
              f"{100 * r['frac_bf16_peak']:10.1f}%{100 * r['frac_fp32_peak']:10.1f}%")
    print("(img/s: median step or batch; best: fastest one; TFLOP/s and % of peak from the median)")
    print("(GFLOP/img: forward+backward for training, forward for inference, from FlopCounterMode; sonocad's "
          "backward stops at the unfrozen blocks,\n so its training does less work per image by design)")
    speed_train = s_train["images_per_s"] / p_train["images_per_s"]
    speed_infer = s_infer["images_per_s"] / p_infer["images_per_s"]
    best_train = s_train["best_images_per_s"] / p_train["best_images_per_s"]
    best_infer = s_infer["best_images_per_s"] / p_infer["best_images_per_s"]
    c, u = phase1["cached"], phase1["uncached"]
    n = args.head_epochs
    print()
    print(f"phase 1, {n} head epochs on {len(images)} images (sonocad Trainer, early stopping off):")
    print(f"  cached features:    {c['seconds']:6.1f} s  (features once: {c['setup_seconds']:.1f} s, epochs: "
          f"{c['epoch_seconds']:.1f} s, median epoch {c['median_epoch_seconds']:.2f} s)")
    print(f"  backbone per epoch: {u['seconds']:6.1f} s  (epochs: {u['epoch_seconds']:.1f} s, median epoch "
          f"{u['median_epoch_seconds']:.2f} s)")
    print(f"  caching speedup: {u['seconds'] / c['seconds']:.2f}x")
    if n and n != 60:
        est_c = c["setup_seconds"] + 60 * c["median_epoch_seconds"]
        est_u = u["setup_seconds"] + 60 * u["median_epoch_seconds"]
        phase1["extrapolated_60"] = {"cached": est_c, "uncached": est_u}
        print(f"  extrapolated to the recipe's 60 epochs (median epoch x 60): cached {est_c:.0f} s, "
              f"uncached {est_u:.0f} s ({est_u / est_c:.2f}x)")
    print()
    print(f"ratios (sonocad / plain), median steps: training {speed_train:.2f}x, inference {speed_infer:.2f}x; "
          f"best steps: training {best_train:.2f}x, inference {best_infer:.2f}x")

    result = {"fast_bf16": cpu_has_fast_bf16(), "precision_auto": precision.name,
              "data": {"source": data_name, "images": len(images), "malignant": int(y.sum()),
                       "decode_seconds": t_decode},
              "matmul_peak_tflops": peak,
              "train": {"sonocad": s_train, "plain": p_train}, "infer": {"sonocad": s_infer, "plain": p_infer},
              "phase1": phase1, "allocator_tuned": allocator,
              "speedup": {"train": speed_train, "infer": speed_infer,
                          "train_best": best_train, "infer_best": best_infer}}
    if args.auc:
        print()
        print("AUC parity: default recipe, bf16 vs fp32, same seed and split (sonocad.workflows.train.fit) ...", flush=True)
        result["auc"] = auc_parity(data, args)
        a = result["auc"]
        print(f"  test AUC bf16 {a['bf16']['auc']:.4f}, fp32 {a['fp32']['auc']:.4f}, difference "
              f"{a['difference']:+.4f} ({'within' if a['within_0.01'] else 'NOT within'} 0.01)")
        if a["overrides"]:
            print(f"  note: quick-check settings {a['overrides']}, not the recipe: this difference says nothing "
                  "about parity; run --auc without them")
    summary = {f"{kind}_{who}_images_per_s": r["images_per_s"]
               for kind, pair in (("train", (s_train, p_train)), ("infer", (s_infer, p_infer)))
               for who, r in zip(("sonocad", "plain"), pair)}
    summary.update(speedup_train=speed_train, speedup_infer=speed_infer)
    return bench.finish(summary, result, headline=f"speedup train={speed_train:.2f} infer={speed_infer:.2f}")


if __name__ == "__main__":
    sys.exit(main())
