"""Backbones, head, loss, freezing, weight loading (the packaged ImageNet weights are real)."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sonocad.errors import SonocadError
from sonocad.models import classifier as models
from sonocad.models.classifier import create_model, set_trainable
from sonocad.training.optim import make_loss


def test_binary_head_one_logit_sigmoid_is_not_constant():
    torch.manual_seed(0)
    m = create_model("tf_efficientnet_lite0", 1, pretrained=False).eval()
    head = m.head
    assert isinstance(head[0], torch.nn.Linear) and head[0].out_features == 256
    assert isinstance(head[1], torch.nn.ReLU) and isinstance(head[2], torch.nn.Dropout)
    assert head[3].out_features == 1
    with torch.no_grad():
        logits = m(torch.randn(4, 3, 64, 64))
    p = m.probabilities(logits)
    assert p.shape == (4, 2)
    torch.testing.assert_close(p.sum(1), torch.ones(4))
    # the notebook's bug: softmax over one unit is always 1. Sigmoid must vary with the input.
    assert p[:, 1].std() > 0 and (p[:, 1] < 1).all()


def test_multiclass_head_softmax():
    m = create_model("tf_efficientnet_lite0", 3, pretrained=False).eval()
    with torch.no_grad():
        p = m.probabilities(m(torch.randn(2, 3, 64, 64)))
    assert p.shape == (2, 3)
    torch.testing.assert_close(p.sum(1), torch.ones(2))


def test_class_weighted_loss():
    y = np.array([0, 0, 0, 1])
    loss = make_loss(y, 2, "weighted")
    logits = torch.zeros(2, 1)
    # with logit 0 both classes cost log 2; the positive is weighted by n_neg / n_pos = 3
    assert float(loss(logits, torch.tensor([1, 1]))) == pytest.approx(3 * np.log(2), rel=1e-5)
    assert float(make_loss(y, 2, "none")(logits, torch.tensor([1, 1]))) == pytest.approx(np.log(2), rel=1e-5)
    ce = make_loss(np.array([0, 0, 1, 2]), 3, "weighted")
    assert ce.loss.weight.tolist() == pytest.approx([4 / 6, 4 / 3, 4 / 3])
    # bf16 logits (autocast on a bf16 CPU) with fp32 class weights: computed in fp32, no dtype error
    bf16 = ce(torch.zeros(2, 3, dtype=torch.bfloat16), torch.tensor([0, 2]))
    assert bf16.dtype == torch.float32 and float(bf16) == pytest.approx(np.log(3), rel=1e-5)


def test_unfreeze_top_blocks():
    m = create_model("tf_efficientnet_lite0", 1, pretrained=False)
    frozen = set_trainable(m, 0)
    assert frozen["trainable"] == sum(p.numel() for p in m.head.parameters())
    two = set_trainable(m, "2")
    assert m.backbone.blocks[6][0].conv_pw.weight.requires_grad
    assert m.backbone.blocks[5][0].conv_pw.weight.requires_grad
    assert not m.backbone.blocks[4][0].conv_pw.weight.requires_grad
    assert two["trainable"] > frozen["trainable"]
    assert set_trainable(m, "all")["frozen"] == 0


@pytest.mark.parametrize("name,size", [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite1", 240),
                                       ("tf_efficientnet_lite2", 260)])
def test_packaged_imagenet_weights_recognise_cat_and_espresso(name, size):
    import timm
    from skimage import data

    net = timm.create_model(name, pretrained=False)
    net.load_state_dict(models.packaged_state_dict(name))
    net.eval()
    for img, expected in ((data.chelsea(), 285), (data.coffee(), 967)):
        x = torch.from_numpy(np.array(Image.fromarray(img).resize((size, size)))).permute(2, 0, 1)
        x = (x.float() / 255 - 0.5) / 0.5
        with torch.no_grad():
            assert int(net(x[None]).argmax()) == expected


def test_default_model_loads_pretrained_backbone():
    a = create_model("tf_efficientnet_lite0", 1, pretrained=True)
    sd = models.packaged_state_dict("tf_efficientnet_lite0")
    torch.testing.assert_close(a.backbone.conv_stem.weight, sd["conv_stem.weight"])


def test_hub_weights_offline_fail_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(models, "_online", lambda *a, **k: False)
    with pytest.raises(SonocadError, match=r"weights=PATH, --weights.*pretrained=False, --no-pretrained"):
        create_model("resnet18", 1, pretrained=True)


def test_local_weights_file(tmp_path):
    src = create_model("resnet18", 1, pretrained=False)
    models.save_model(src, tmp_path / "w.safetensors")
    dst = create_model("resnet18", 1, pretrained=False, weights=str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(dst.backbone.conv1.weight, src.backbone.conv1.weight)
    torch.save(src.backbone.state_dict(), tmp_path / "w.pth")
    dst = create_model("resnet18", 1, pretrained=False, weights=str(tmp_path / "w.pth"))
    torch.testing.assert_close(dst.backbone.conv1.weight, src.backbone.conv1.weight)
    with pytest.raises(SonocadError, match="tensors match"):
        create_model("tf_efficientnet_lite0", 1, weights=str(tmp_path / "w.pth"))


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/sonocad-pwned", "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    import os

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Evil()}, f)
    if os.path.exists("/tmp/sonocad-pwned"):
        os.unlink("/tmp/sonocad-pwned")
    with pytest.raises(SonocadError, match="would run code"):
        create_model("resnet18", 1, pretrained=False, weights=str(path))
    assert not os.path.exists("/tmp/sonocad-pwned")


def test_unknown_model_name():
    with pytest.raises(SonocadError, match="unknown model"):
        create_model("no_such_net", 1)
