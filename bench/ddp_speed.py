"""Phase-2 training throughput of sonocad's Trainer in one process and in N processes (DistributedDataParallel:
gloo on CPU, NCCL on GPUs), on the same synthetic 224 px images, the same global batch and the same steps.

    .venv/bin/python bench/ddp_speed.py                     # 1 and 2 processes on this machine's CPU cores
    .venv/bin/python bench/ddp_speed.py --procs 1 2 4 --images 256 --epochs 2
    .venv/bin/python bench/ddp_speed.py --smoke             # 1 process, 16 images of 64 px, 1 epoch

Each process gets cpu_count / N torch threads on CPU (one GPU each on CUDA). Prints images/s per setting, the
speed-up over one process, and the machine.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from harness import ROOT, Bench  # noqa: E402  (bench/ is on sys.path when a script runs)

# smoke: one process, this one (seconds instead of a spawn's imports; two gloo processes train in
# tests/test_distributed.py)
SMOKE = {"procs": [1], "images": 16, "size": 64, "batch": 8, "epochs": 1, "threads": 1, "in_process": True}


def _worker(rank: int, world: int, port: int, a: dict, out: str) -> None:
    sys.path.insert(0, str(ROOT / "src"))      # a spawned process: run from a checkout without installing
    from sonocad.config import TrainConfig
    from sonocad.models.classifier import create_model
    from sonocad.models.infer import InputPipeline, resolve_precision
    from sonocad.runtime import dist
    from sonocad.training.prepare import Split
    from sonocad.training.trainer import Trainer

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        torch.set_num_threads(a.get("threads") or max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (a["images"], a["size"], a["size"]), dtype=np.uint8)
    y = np.arange(a["images"]) % 2
    train, val = Split(images, y, [None] * len(y)), Split(images[:8], y[:8], [None] * 8)
    cfg = TrainConfig(head_epochs=0, finetune_epochs=a["epochs"], batch_size=a["batch"] // world, ema_epochs=0,
                      patience=a["epochs"], seed=0)
    prec = resolve_precision("auto")
    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", 1, pretrained=False).to(prec.device)
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainer = Trainer(model, train, val, 2, cfg, prec, InputPipeline([0.5] * 3, [0.5] * 3, prec), out, progress=False)
    trainer.phase, trainer.epoch = "finetune", 0
    dist.barrier()
    t0 = time.perf_counter()
    trainer.run()
    dist.barrier()
    if rank == 0:
        seconds = time.perf_counter() - t0
        Path(out, "result.json").write_text(json.dumps({"seconds": seconds, "precision": prec.name}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_arguments(ap) -> None:
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32, help="global batch (split over the processes)")
    ap.add_argument("--epochs", type=int, default=2)


def main(argv=None) -> int:
    bench = Bench.start("ddp_speed", __doc__, argv, add_arguments)
    a = {**vars(bench.args), **(SMOKE if bench.smoke else {})}
    base, rates = None, {}
    for n in a["procs"]:
        with tempfile.TemporaryDirectory() as tmp:
            if a.get("in_process"):
                saved = dict(os.environ)
                try:
                    _worker(0, 1, _free_port(), a, tmp)
                finally:
                    os.environ.clear()
                    os.environ.update(saved)
            else:
                mp.spawn(_worker, args=(n, _free_port(), a, tmp), nprocs=n, join=True)
            r = json.loads(Path(tmp, "result.json").read_text())
        rate = a["images"] * a["epochs"] / r["seconds"]
        base = base or rate
        rates[n] = rate
        print(f"{n} process(es): {rate:.1f} images/s of phase-2 training (incl. validation of 8 images per epoch), "
              f"{r['precision']}, global batch {a['batch']}, speed-up {rate / base:.2f}x")
    return bench.finish({f"images_per_s_{n}_procs": v for n, v in rates.items()},
                        {"speedup": {n: v / base for n, v in rates.items()}, "settings": a})


if __name__ == "__main__":
    sys.exit(main())
