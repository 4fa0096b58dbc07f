"""BatchNorm folding for inference: same outputs, original untouched, unsafe orders refused."""
import pytest
import torch
from torch import nn

from sonocad.models.classifier import create_model, fold_batchnorm


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_fold_keeps_outputs_and_removes_batchnorm(name):
    model = _randomise_bn(create_model(name, 1, pretrained=False)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = fold_batchnorm(model)
    assert fast.bn_folded and fast is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # original untouched
    assert fold_batchnorm(fast) is fast


class BatchNormFirst(nn.Module):
    """A BatchNorm registered right after a conv that it does not follow at run time. With `conv_out`
    3 the fold goes through but computes something else; with 4 the widths differ and it cannot."""

    def __init__(self, conv_out: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, conv_out, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_fold_refuses_a_model_whose_call_order_differs():
    model = _randomise_bn(BatchNormFirst()).eval()
    fast = fold_batchnorm(model, size=16)
    assert any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


def test_fold_leaves_mismatched_pairs_alone():
    fast = fold_batchnorm(_randomise_bn(BatchNormFirst(conv_out=4)), size=8)
    assert isinstance(fast.bn, nn.BatchNorm2d) and fast.bn_folded


def test_tune_allocator_takes_effect_on_glibc():
    import platform

    from sonocad.runtime.allocator import tune_allocator

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt tuning is for glibc Linux only")
    assert tune_allocator() is True
    model = create_model("tf_efficientnet_lite0", 1, pretrained=False).eval()   # still computes after it
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 64, 64))).all()


class NeedsItsOwnSize(nn.Module):
    """No BatchNorm, and a forward that refuses the check's input size (as timm's ViTs do)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 16, stride=16)

    def forward(self, x):
        assert x.shape[-1] == 224, "input size must be 224"
        return self.proj(x).mean((2, 3))


def test_fold_leaves_models_without_batchnorm_as_they_are():
    model = NeedsItsOwnSize()
    assert fold_batchnorm(model) is model and model.bn_folded
