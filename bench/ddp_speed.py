"""Phase-2 training throughput of sonocad's Trainer in one process and in N processes (DistributedDataParallel:
gloo on CPU, NCCL on GPUs), on the same synthetic 224 px images, the same global batch and the same steps.

    .venv/bin/python bench/ddp_speed.py                     # 1 and 2 processes on this machine's CPU cores
    .venv/bin/python bench/ddp_speed.py --procs 1 2 4 --images 256 --epochs 2

Each process gets cpu_count / N torch threads on CPU (one GPU each on CUDA). Prints images/s per setting, the
speed-up over one process, and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _worker(rank: int, world: int, port: int, a: dict, out: str) -> None:
    from sonocad.config import TrainConfig
    from sonocad.models.classifier import create_model
    from sonocad.models.infer import InputPipeline, resolve_precision
    from sonocad.runtime import dist
    from sonocad.training.prepare import Split
    from sonocad.training.trainer import Trainer

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32, help="global batch (split over the processes)")
    ap.add_argument("--epochs", type=int, default=2)
    a = vars(ap.parse_args(argv))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"machine: {model}, {os.cpu_count()} logical CPUs, {gpu}")
    base = None
    for n in a["procs"]:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(n, _free_port(), a, tmp), nprocs=n, join=True)
            r = json.loads(Path(tmp, "result.json").read_text())
        rate = a["images"] * a["epochs"] / r["seconds"]
        base = base or rate
        print(f"{n} process(es): {rate:.1f} images/s of phase-2 training (incl. validation of 8 images per epoch), "
              f"{r['precision']}, global batch {a['batch']}, speed-up {rate / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
