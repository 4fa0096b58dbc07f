"""Lesion-aware training: the mask loss with missing masks, masks that follow the augmentation, the mask head's
output files and Dice, and their errors."""
import csv
import json

import numpy as np
import pytest
import torch
from conftest import one_line_error
from PIL import Image

from sonocad.cli.main import main
from sonocad.config import RunInfo, TrainConfig
from sonocad.data import discover
from sonocad.data.augment import augment_batch
from sonocad.data.images import from_square, load_mask, to_square
from sonocad.errors import SonocadError
from sonocad.models.classifier import create_model
from sonocad.models.maskhead import MaskDecoder, bilinear_by_matmul, dice_scores, mask_loss
from sonocad.training.prepare import decode_masks


def test_mask_loss_counts_only_images_with_known_masks():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1, 8, 8, generator=gen, requires_grad=True)
    masks = (torch.rand(4, 32, 32, generator=gen) > 0.5).float()
    known = torch.tensor([True, False, True, False])
    loss = mask_loss(logits, masks, known)
    loss.backward()
    # images without a mask get no gradient at all; the loss equals the loss of the known ones alone
    assert logits.grad[~known].abs().sum() == 0 and logits.grad[known].abs().sum() > 0
    assert torch.isclose(loss, mask_loss(logits[known], masks[known], torch.tensor([True, True])))
    none = mask_loss(logits, masks, torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
    # a confident right answer costs less than a confident wrong one
    target = torch.zeros(1, 32, 32)
    target[:, 8:24, 8:24] = 1
    right = torch.where(torch.nn.functional.avg_pool2d(target[None], 4) > 0.5, 8.0, -8.0)
    assert mask_loss(right, target, torch.tensor([True])) < 0.1 < mask_loss(-right, target, torch.tensor([True]))


@pytest.mark.parametrize("shape, size", [((7, 7), (224, 224)), ((14, 14), (28, 28)), ((10, 13), (4, 29)),
                                         ((5, 9), (5, 9))])
def test_bilinear_by_matmul_is_pytorchs_bilinear_resize(shape, size):
    # the CUDA path of maskhead.resize_bilinear (deterministic backward): the same resize as F.interpolate,
    # values and gradients, upsampling and downsampling
    x = torch.randn(3, 2, *shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weights = torch.randn(3, 2, *size, generator=torch.Generator().manual_seed(1))
    ours = bilinear_by_matmul(x, size)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    theirs = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    (grad_theirs,) = torch.autograd.grad((theirs * weights).sum(), x)
    assert torch.allclose(ours, theirs, atol=1e-5) and torch.allclose(grad_ours, grad_theirs, atol=1e-4)


def test_dice_scores():
    a = np.zeros((3, 4, 4), bool)
    b = a.copy()
    a[0, :2], b[0, :2] = True, True            # identical
    a[1, :2], b[1, 2:] = True, True            # disjoint
    assert dice_scores(a, b).tolist() == [1.0, 0.0, 1.0]     # both empty counts as agreement


def test_masks_follow_the_geometric_augmentation():
    x = torch.zeros(6, 1, 64, 64)
    x[:, :, 20:40, 10:30] = 1.0
    masks = (x > 0.5).float()
    plain = augment_batch(x.clone(), torch.Generator().manual_seed(5))
    warped, moved = augment_batch(x.clone(), torch.Generator().manual_seed(5), masks=masks)
    assert torch.equal(plain, warped)          # the same random draws with or without masks
    for img, m in zip(warped, moved):
        inside, outside = img[m > 0.5].mean(), img[m < 0.5].mean()
        assert inside > outside + 0.3          # the mask still covers the bright square after the warp
    assert not torch.equal(moved, masks)


def test_from_square_inverts_the_letterbox():
    mask = np.zeros((90, 160), bool)
    mask[30:60, 100:140] = True
    square = to_square(Image.fromarray(mask.astype(np.uint8) * 255), 64, "pad", Image.NEAREST) / 255.0
    back = from_square(square, (160, 90), "pad")
    assert back.shape == (90, 160)
    assert dice_scores(back[None], mask[None])[0] > 0.85


def test_decode_masks_missing_and_bad(phantoms, tmp_path):
    samples = discover(phantoms)[:4]
    samples[1] = type(samples[1])(samples[1].path, samples[1].label)        # no mask
    bad = tmp_path / "bad_mask.png"
    Image.new("L", (70, 90)).save(bad)
    samples[2] = type(samples[2])(samples[2].path, samples[2].label, masks=(str(bad),))
    with pytest.raises(SonocadError, match="mask is 70x90 px"):
        decode_masks(samples, 32, "pad")
    masks, known, problems = decode_masks(samples, 32, "pad", skip_bad=True)
    assert known.tolist() == [True, False, False, True] and len(problems) == 1
    assert masks[0].any() and not masks[1].any()
    assert np.array_equal(masks[3], load_mask(samples[3].masks, samples[3].path, 32))


def test_decoder_learns_lesion_masks(phantoms):
    """A few steps of the mask loss on a frozen ImageNet backbone bring the predicted masks onto the lesions."""
    from sonocad.models.infer import InputPipeline, resolve_precision

    torch.manual_seed(0)
    samples = [s for s in discover(phantoms) if s.label != "normal"][:24]
    images = np.stack([np.asarray(Image.open(s.path).convert("L").resize((64, 64))) for s in samples])
    masks = np.stack([load_mask(s.masks, s.path, 64) for s in samples])
    model = create_model("tf_efficientnet_lite0", 1, mask_head=True).eval()
    pipe = InputPipeline([0.5] * 3, [0.5] * 3, resolve_precision("fp32", "cpu"))     # the model is on the CPU
    x, m = pipe.with_masks(images, masks)
    known = torch.ones(len(images), dtype=torch.bool)

    def dice():
        with torch.no_grad():
            return dice_scores(model.mask_probability(x).numpy() >= 0.5, masks).mean()

    before = dice()
    opt = torch.optim.Adam(model.mask_head.parameters(), 3e-3)
    for _ in range(40):
        loss = mask_loss(model.forward_with_mask(x)[1], m, known)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert dice() > max(0.5, before + 0.3)


def test_mask_head_run_writes_masks_and_dice(tiny_run, phantoms, tmp_path, capsys):
    info = RunInfo.load(tiny_run / "config.json")
    assert info.mask_head and info.config.seg_weight == 1.0        # on by default: the phantoms have masks
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["segmentation"]["n"] == m["n"] and 0.0 <= m["segmentation"]["dice_mean"] <= 1.0
    assert "Lesion masks" in (tiny_run / "report.html").read_text()
    folder = phantoms / "malignant"
    assert main(["predict", str(tiny_run), str(folder), "--masks", str(tmp_path / "masks"),
                 "--csv", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == len([p for p in folder.glob("*.png") if "_mask" not in p.name])
    for r in rows[:3]:
        with Image.open(tmp_path / "masks" / r["mask"]) as pic, Image.open(r["path"]) as scan:
            assert pic.size == scan.size and set(np.unique(np.asarray(pic))) <= {0, 255}
    capsys.readouterr()
    err = one_line_error(capsys, ["predict", str(tiny_run), str(folder), "--masks", str(tmp_path / "masks"),
                                  "--heatmaps", str(tmp_path / "masks" / ".")])        # one folder for both
    assert "is the --heatmaps folder too" in err
    assert main(["evaluate", str(tiny_run), str(phantoms), "--out", str(tmp_path / "ev")]) == 0
    assert "lesion masks (48 images with masks): Dice" in capsys.readouterr().out
    pred = list(csv.DictReader(open(tmp_path / "ev" / "predictions.csv")))
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    dice = [float(p["lesion_dice"]) for p in pred if p["lesion_dice"]]
    assert len(dice) == ev["segmentation"]["n"] and np.isclose(np.mean(dice), ev["segmentation"]["dice_mean"], atol=1e-3)


def test_seg_weight_zero_trains_no_mask_head(phantoms, tmp_path, capsys):
    run = tmp_path / "plain"
    assert main(["train", str(phantoms), "--out", str(run), "--img-size", "64", "--head-epochs", "1",
                 "--finetune-epochs", "1", "--batch-size", "8", "--seg-weight", "0", "--quiet"]) == 0
    assert not RunInfo.load(run / "config.json").mask_head
    assert "segmentation" not in json.loads((run / "metrics.json").read_text())
    capsys.readouterr()
    err = one_line_error(capsys, ["predict", str(run), str(phantoms / "benign"), "--masks", str(tmp_path / "m")])
    assert "no lesion-mask head" in err


def test_seg_weight_options_and_old_runs():
    with pytest.raises(SonocadError, match="seg_weight"):
        TrainConfig.from_recipe(seg_weight=-1.0)
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "seg_weight"}
    info = RunInfo.loads(json.dumps({"config": old, "classes": ["a", "b"], "positive": "b", "img_size": 64,
                                     "mean": [0.5] * 3, "std": [0.5] * 3}).encode(), "x/config.json")
    assert info.config.seg_weight == 0.0 and info.mask_head is False     # runs from before the mask head
    decoder = MaskDecoder([8, 16, 32])
    out = decoder([torch.zeros(1, 8, 16, 16), torch.zeros(1, 16, 8, 8), torch.zeros(1, 32, 4, 4)])
    assert out.shape == (1, 1, 16, 16)
