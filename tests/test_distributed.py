"""Distributed training with gloo on CPU: two processes with batch B step like one with batch 2B, and a whole tiny
run under two processes gives one run directory and the same figures on every rank, also after a rank was killed
and the run resumed."""
import json
import os
import signal
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import can_fork, one_line_error

from sonocad.cli.commands import _launch
from sonocad.config import RunInfo, TrainConfig

B = 4


def _start(fn, args: tuple, nprocs: int) -> None:
    """torch.multiprocessing.spawn, but the ranks forked where conftest.can_fork()."""
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="fork" if can_fork() else "spawn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")   # gloo on the CPU, also on a GPU machine
    torch.set_num_threads(1)
    from sonocad.runtime import dist

    dist.init()


def _one_step(rank: int, world: int, port: int, out: str) -> None:
    """Phase 2 for one step on 2B images (frozen BatchNorm, fp32, no augmentation, no dropout); rank 0 saves the
    weights. SGD, whose step is linear in the gradient: Adam's first step divides each gradient by its own size,
    which turns float rounding in near-zero gradients (summation order differs across CPUs) into full steps."""
    from sonocad.models.classifier import create_model
    from sonocad.models.infer import InputPipeline, resolve_precision
    from sonocad.training.prepare import Split
    from sonocad.training.trainer import Trainer

    if world > 1:
        _join(rank, world, port)
    gen = np.random.default_rng(0)
    images = gen.integers(0, 255, (2 * B, 32, 32), dtype=np.uint8)
    y = np.array([0, 1] * B)
    train = Split(images, y, [None] * len(y))
    val = Split(images[:4], y[:4], [None] * 4)
    cfg = TrainConfig(head_epochs=0, finetune_epochs=1, batch_size=2 * B // world, augment=False, ema_epochs=0,
                      dropout=0.0, unfreeze="2", precision="fp32", seed=0, optimizer="sgd",
                      finetune_lr=1.0)
    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", 1, pretrained=False, dropout=0.0)
    prec = resolve_precision("fp32", "cpu")      # gloo ranks on the CPU, also on a GPU machine
    trainer = Trainer(model, train, val, 2, cfg, prec, InputPipeline([0.5] * 3, [0.5] * 3, prec), out, progress=False)
    trainer.phase, trainer.epoch = "finetune", 0
    trainer.run()
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(out, "weights.pt"))


def test_two_processes_step_like_one_with_twice_the_batch(tmp_path):
    port = _free_port()
    _start(_one_step, (2, port, str(tmp_path / "two")), 2)
    _start(_one_step, (1, port, str(tmp_path / "one")), 1)
    two = torch.load(tmp_path / "two" / "weights.pt")
    one = torch.load(tmp_path / "one" / "weights.pt")
    start = {}
    torch.manual_seed(0)
    from sonocad.models.classifier import create_model
    start = create_model("tf_efficientnet_lite0", 1, pretrained=False, dropout=0.0).state_dict()
    moved = [k for k in one if one[k].is_floating_point() and not torch.equal(one[k], start[k])]
    assert moved, "the step changed no weight: the comparison would prove nothing"
    for k in moved:     # the same step: averaging the ranks' gradients wrongly (a sum, one rank's) differs by ~100%
        step_one, step_two = one[k] - start[k], two[k] - start[k]
        assert torch.linalg.norm(step_one - step_two) <= 1e-3 * torch.linalg.norm(step_one), k
    for k in one:
        if k not in moved:
            assert torch.equal(one[k], two[k]), k


def _tiny_run(rank: int, world: int, port: int, data: str, out: str, mode: str = "") -> None:
    from sonocad.training.trainer import Trainer
    from sonocad.workflows.train import fit

    _join(rank, world, port)
    if mode == "kill":          # rank 1 dies with SIGKILL as phase 2's second epoch starts (after rank 0 wrote
        from sonocad.runtime import dist  # the first one's checkpoint: both ranks wait for each other there)
        draw = Trainer._augment_gen

        def killed(self):
            if self.phase == "finetune" and self.epoch == 1:
                dist.barrier()
                if rank == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
            return draw(self)
        Trainer._augment_gen = killed
    if mode == "resume":
        m = fit(data, out, resume=True, progress=False)
    else:
        m = fit(data, out, img_size=32, head_epochs=1, finetune_epochs=2, batch_size=8, seed=0, dedup=False,
                progress=False)
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(m, f, sort_keys=True)


def test_a_tiny_run_under_two_processes(phantoms, tmp_path):
    run = tmp_path / "run"
    _start(_tiny_run, (2, _free_port(), str(phantoms), str(run)), 2)
    ranks = [json.loads((tmp_path / f"run.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and 0.0 <= ranks[0]["auc"] <= 1.0
    assert (run / "run.json").is_file() and (run / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run"]       # one run directory
    info = RunInfo.load(run / "config.json")
    assert info.distributed == {"world_size": 2, "backend": "gloo"}
    log = (run / "log.csv").read_text().splitlines()
    assert len(log) == 1 + 3         # one row per epoch, written by rank 0 alone

    cut = tmp_path / "cut"           # rank 1 killed in phase 2, then resumed: it ends as the uninterrupted run
    with pytest.raises(mp.ProcessExitedException):
        _start(_tiny_run, (2, _free_port(), str(phantoms), str(cut), "kill"), 2)
    assert not (cut / "run.json").exists() and len((cut / "log.csv").read_text().splitlines()) == 1 + 2
    _start(_tiny_run, (2, _free_port(), str(phantoms), str(cut), "resume"), 2)
    assert (cut / "predictions.csv").read_text() == (run / "predictions.csv").read_text()


def test_devices_launches_torchrun(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("subprocess.run", lambda cmd: calls.append(cmd) or SimpleNamespace(returncode=0))
    _launch(SimpleNamespace(devices=2, argv=["train", "data", "--devices", "2", "--out", "r", "--devices=2"]))
    cmd = calls[0]
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[5:] == ["-m", "sonocad", "train", "data", "--out", "r"]
    err = one_line_error(capsys, ["train", "data", "--out", "r", "--devices", "0"])
    assert "--devices" in err


def test_cv_workers_give_the_sequential_figures(phantoms, tmp_path, capsys):
    from sonocad.cli.main import main

    args = [str(phantoms), "--folds", "2", "--img-size", "32", "--head-epochs", "2", "--finetune-epochs", "1",
            "--batch-size", "8", "--threads", "1", "--no-dedup", "--quiet"]
    assert main(["cv", *args, "--out", str(tmp_path / "one")]) == 0
    assert main(["cv", *args, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    for name in ("oof_predictions.csv", "fold-1/predictions.csv", "fold-2/predictions.csv"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name
    capsys.readouterr()
    err = one_line_error(capsys, ["cv", *args, "--out", str(tmp_path / "bad"), "--workers", "0"])
    assert "--workers" in err
