"""What the code needs on a GPU, checked on the CPU (CI has none): class weights follow the logits' device, the
GPU's random generator is checkpointed, fp16 trains through a loss scaler, more processes than GPUs is a clear
error, and the deterministic-kernel settings. Checked on an H200 in docs/reliability.md."""
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import one_line_error

from sonocad.cli.commands import _launch
from sonocad.errors import OptionError, SonocadError
from sonocad.models.infer import deterministic_cuda, resolve_precision
from sonocad.training.optim import make_loss, optimizer_step


def test_class_weights_follow_the_logits_device():
    # the 'meta' device stands in for a GPU: a loss whose class weights stayed on the CPU refuses its logits
    loss = make_loss(np.array([0, 0, 1, 2]), 3, "weighted")
    out = loss(torch.zeros(4, 3, device="meta"), torch.zeros(4, dtype=torch.long, device="meta"))
    assert out.device.type == "meta"


def test_rng_state_round_trip_and_old_checkpoints():
    prec = resolve_precision("fp32", "cpu")
    saved = prec.rng_state()
    first = torch.rand(3)
    prec.set_rng_state(saved)
    assert torch.equal(torch.rand(3), first)
    prec.set_rng_state(saved["cpu"])                      # a checkpoint from before kept the CPU state alone
    assert torch.equal(torch.rand(3), first)


def test_fp16_trains_through_a_loss_scaler():
    assert resolve_precision("fp32", "cpu").grad_scaler().is_enabled() is False
    assert resolve_precision("bf16", "cpu").grad_scaler().is_enabled() is False
    scaler = resolve_precision("fp16", "cpu").grad_scaler()
    assert scaler.is_enabled()
    weight = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([weight], lr=1.0)
    loss = (weight * torch.tensor([0.5, 0.25])).sum()    # gradients the scaler multiplies by 2^16, then divides
    assert optimizer_step(opt, loss, scaler) == pytest.approx(0.75)
    assert torch.equal(weight.detach(), torch.tensor([0.5, 0.75]))
    assert scaler.get_scale() == 2.0 ** 16
    optimizer_step(opt, (weight * torch.tensor([float("inf"), 1.0])).sum(), scaler)    # overflow: step skipped
    assert torch.equal(weight.detach(), torch.tensor([0.5, 0.75])) and scaler.get_scale() == 2.0 ** 15


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch, capsys):
    from sonocad.runtime import dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(OptionError, match="1 GPU"):
        _launch(SimpleNamespace(devices=2, argv=["train", "data", "--devices", "2"]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SonocadError, match="no GPU of its own"):
        dist.init()
    monkeypatch.delenv("WORLD_SIZE")
    err = one_line_error(capsys, ["train", "data", "--out", "r", "--devices", "2"])
    assert "--devices" in err and "GPU" in err


def test_deterministic_cuda_settings(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)      # set by the call; gone after the test
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            deterministic_cuda()
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = flags[:4]
        torch.use_deterministic_algorithms(flags[4], warn_only=flags[5])
