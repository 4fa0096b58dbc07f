"""Turning cached uint8 images into model inputs, precision (bf16 on capable CPUs), batched inference."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from ..data.augment import augment_batch
from ..errors import SonocadError


@dataclass
class Precision:
    """Where and how the model runs: device, autocast dtype (None = fp32), memory layout."""

    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 training (small gradients underflow in fp16); a pass-through otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def rng_state(self) -> dict:
        """torch's global generators that training draws from (dropout): the CPU's, and on CUDA the GPU's."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state) -> None:
        """Restore `rng_state()` (or the CPU generator's state alone, as checkpoints before kept it)."""
        state = {"cpu": state} if isinstance(state, torch.Tensor) else state
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 autocast pays off."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, c, lambda: False)() for c in checks)


def resolve_precision(precision: str = "auto", device: str | None = None) -> Precision:
    """auto: bf16 autocast + channels_last on bf16-capable CPUs, fp32 on other CPUs; bf16 (or fp16
    where bf16 is unsupported) on CUDA."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        deterministic_cuda()
    if precision == "fp32":
        return Precision(dev, None, dev.type == "cuda")
    if dev.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if precision == "auto":
            return Precision(dev, torch.bfloat16 if bf16_ok else torch.float16, True)
        if precision == "bf16" and not bf16_ok:
            raise SonocadError("--precision bf16: this GPU does not support bf16; use auto or fp16")
        return Precision(dev, torch.bfloat16 if precision == "bf16" else torch.float16, True)
    if precision == "auto":
        return Precision(dev, torch.bfloat16, True) if cpu_has_fast_bf16() else Precision(dev, None, False)
    if precision == "fp16":
        return Precision(dev, torch.float16, True)
    return Precision(dev, torch.bfloat16, True)


def deterministic_cuda() -> None:
    """The same seed gives the same numbers on a GPU too, as it does on the CPU: deterministic cuDNN and cuBLAS
    kernels, and a warning naming any operation that has none (the mask decoder avoids the one it used,
    `maskhead.resize_bilinear`). Process-wide, like torch's own flags; cuBLAS's setting takes effect only if no
    matrix product ran on the GPU before."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if not torch.are_deterministic_algorithms_enabled():     # a caller's strict setting (errors) stays
        torch.use_deterministic_algorithms(True, warn_only=True)
    # fp32 means fp32: TF32 convolutions and products (on by default for cuDNN) would round to 10-bit mantissas
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class InputPipeline:
    """uint8 (N, S, S) gray images -> normalised float (N, 3, S, S) batches on the model's device."""

    def __init__(self, mean: list[float], std: list[float], precision: Precision, appearance: str = "standard"):
        self.appearance = appearance    # of the training augmentation (augment_batch)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.precision = precision

    def __call__(self, images: np.ndarray, gen: torch.Generator | None = None, strength: float = 1.0,
                 flip: bool = False, zoom: float = 1.0) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)
        if gen is not None:
            x = augment_batch(x, gen, strength, appearance=self.appearance)
        return self._finish(x, flip, zoom)

    def with_masks(self, images: np.ndarray, masks: np.ndarray, gen: torch.Generator | None = None,
                   strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(model input, float lesion masks (N, S, S) on the device) with the same augmentation (`gen`)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)
        m = torch.from_numpy(np.ascontiguousarray(masks)).unsqueeze(1).float()
        if gen is not None:
            x, m = augment_batch(x, gen, strength, masks=m, appearance=self.appearance)
        return self._finish(x), m[:, 0].to(self.precision.device, non_blocking=True)

    def _finish(self, x: torch.Tensor, flip: bool = False, zoom: float = 1.0) -> torch.Tensor:
        if zoom != 1.0:    # about the centre; what leaves the frame is lost, what enters is black
            x = TF.affine(x, angle=0.0, translate=[0, 0], scale=zoom, shear=[0.0, 0.0],
                          interpolation=TF.InterpolationMode.BILINEAR)
        if flip:
            x = x.flip(-1)
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        if self.precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision.device.type == "cuda":
            x = x.pin_memory()      # page-locked: the copy below runs beside the GPU's work
        return x.to(self.precision.device, non_blocking=True)


def tta_views(tta: bool, zooms=()) -> list[tuple[float, bool]]:
    """The (zoom, mirrored) views a prediction averages: the image alone without `tta`; with it, the image
    and each zoom of it, each as it is and mirrored."""
    return [(z, f) for z in (1.0, *zooms) for f in (False, True)] if tta else [(1.0, False)]


def all_views(pipeline: InputPipeline, images: np.ndarray, views: list[tuple[float, bool]]) -> torch.Tensor:
    """Every view of `images` as one batch, view by view (the rows of view k are k*N .. k*N + N - 1)."""
    return torch.cat([pipeline(images, zoom=zoom, flip=flip) for zoom, flip in views])


@torch.no_grad()
def run_batches(fn, images: np.ndarray, pipeline: InputPipeline, batch_size: int = 64,
                tta: bool = False, zooms=(), views: list[tuple[float, bool]] | None = None) -> np.ndarray:
    """Apply `fn` (a module or method) to all images in batches; with `tta`, average its outputs over
    `tta_views(tta, zooms)` (or over the (zoom, mirrored) `views` given)."""
    views = views or tta_views(tta, zooms)
    if 1 < len(views) and len(images) * len(views) <= batch_size:
        # a few images (one scan in serve): every view in one batch, one forward pass
        x = all_views(pipeline, images, views)      # outside autocast, as below
        with pipeline.precision.autocast():
            y = fn(x).float().cpu()
        return y.view(len(views), len(images), *y.shape[1:]).mean(0).numpy()
    outs = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        y = 0.0
        for zoom, flip in views:
            x = pipeline(chunk, zoom=zoom, flip=flip)   # outside autocast: a bf16 resampling grid is off by pixels
            with pipeline.precision.autocast():
                y = y + fn(x).float()
        outs.append((y / len(views)).cpu())
    if not outs:
        return np.zeros((0,), np.float32)
    return torch.cat(outs).numpy()
