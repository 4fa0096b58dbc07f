"""The training augmentation: scanner-like appearance changes (issue 18's candidate) on top of the standard ones."""
import pytest
import torch

from sonocad.config import TrainConfig
from sonocad.data.augment import augment_batch, scanner_appearance
from sonocad.errors import OptionError


def _phantom(n=8, size=64):
    x = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0)) * 0.3
    x[:, :, 20:40, 16:44] += 0.5
    return x


def test_scanner_appearance_stays_in_range_and_is_reproducible():
    x = _phantom()
    a = augment_batch(x.clone(), torch.Generator().manual_seed(3), appearance="scanner")
    b = augment_batch(x.clone(), torch.Generator().manual_seed(3), appearance="scanner")
    plain = augment_batch(x.clone(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert (a - plain).abs().mean() > 0.01     # it does change the images beyond the standard augmentation


def test_scanner_appearance_degrades_resolution_and_moves_no_mask():
    x = _phantom(16)
    masks = (x > 0.45).float()
    out = scanner_appearance(x.clone(), torch.Generator().manual_seed(1))
    # fine detail (differences between neighbouring pixels) drops in the images whose resolution was lowered
    detail = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean(dim=(1, 2, 3))     # noqa: E731
    assert (detail(out) < 0.7 * detail(x)).any()
    _, moved = augment_batch(x.clone(), torch.Generator().manual_seed(2), masks=masks, appearance="scanner")
    _, moved_std = augment_batch(x.clone(), torch.Generator().manual_seed(2), masks=masks)
    assert torch.equal(moved, moved_std)       # intensity changes leave the lesion masks where geometry put them


def test_appearance_is_a_checked_option():
    assert TrainConfig.from_recipe("default").appearance == "scanner"      # chosen in docs/generalization.md
    assert TrainConfig.from_recipe("default", appearance="standard").appearance == "standard"
    assert TrainConfig.from_recipe("notebook").appearance == "standard"
    with pytest.raises(OptionError, match="appearance"):
        TrainConfig.from_recipe("default", appearance="vivid")
    with pytest.raises(ValueError, match="appearance"):      # the library call checks it too, never ignores it
        augment_batch(_phantom(), torch.Generator().manual_seed(0), appearance="vivid")
