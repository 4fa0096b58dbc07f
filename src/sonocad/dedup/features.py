"""Per-image features of the duplicate search: border trimming, pixel digest, perceptual hash,
band-passed thumbnails, and (through `embed`) the CNN embeddings of the whole image and its centre."""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.images import load_gray, to_square
from ..errors import SonocadError
from .settings import DEFAULT, DedupSettings


def trim_borders(a: np.ndarray, level: int = 16, frac: float = 0.1) -> np.ndarray:
    """Crop off outer rows and columns with under `frac` of pixels above `level`: black frames,
    letterboxing, the empty side of a shifted copy. Border text covers too little of a row to count."""
    m = a > level
    rows = np.flatnonzero(m.mean(1) >= frac)
    cols = np.flatnonzero(m.mean(0) >= frac)
    if len(rows) < 16 or len(cols) < 16:
        return a
    return a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def phash(gray: np.ndarray) -> np.ndarray:
    """64-bit DCT perceptual hash (bools): the 8x8 lowest DCT frequencies of a 32x32 thumbnail,
    each compared with their median."""
    from scipy.fft import dctn

    small = np.asarray(Image.fromarray(gray).resize((32, 32), Image.LANCZOS), np.float32)
    low = dctn(small, type=2, norm="ortho")[:8, :8].ravel()
    return low > np.median(low)


def phash_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) matrix of 1 - Hamming distance / 64 between hash rows."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return 1.0 - (a @ (1 - b).T + (1 - a) @ b.T) / a.shape[1]


def thumbnail(gray: np.ndarray, settings: DedupSettings = DEFAULT) -> np.ndarray:
    """Band-passed float32 thumbnail, longer side `settings.thumb`: blurred by `settings.blur`, minus
    a blur by `settings.highpass`."""
    from scipy.ndimage import gaussian_filter

    im = Image.fromarray(gray)
    s = settings.thumb / max(im.size)
    size = (max(8, round(im.width * s)), max(8, round(im.height * s)))
    t = np.asarray(im.resize(size, Image.BOX if s < 1 else Image.BILINEAR), np.float32) / 255.0
    t = gaussian_filter(t, settings.blur)
    return t - gaussian_filter(t, settings.highpass, mode="nearest")


def central_part(a, frac: float, least: int = 1):
    """The central `frac` of each side of a 2-D array (at least `least` px a side)."""
    h, w = a.shape[:2]
    ch, cw = max(least, round(h * frac)), max(least, round(w * frac))
    return a[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]


@dataclass
class Features:
    """Per-image features: pixel digest, perceptual hash, thumbnail, L2-normalised embeddings."""

    digest: list[str]
    hashes: np.ndarray            # (N, 64) bool
    thumbs: list[np.ndarray]      # float32, longer side settings.thumb
    embedding: np.ndarray | None = None   # (N, 1280) model.forward_features
    mid: np.ndarray | None = None         # (N, C) pooled output of backbone stage settings.mid_block
    view: np.ndarray | None = None        # (N, 1280) embedding of the central settings.view part
    settings: DedupSettings | None = None  # what they were computed with (None: unknown)

    def __len__(self) -> int:
        return len(self.digest)


def _image_features(gray: np.ndarray, settings: DedupSettings):
    g = trim_borders(gray)
    digest = hashlib.sha1(np.ascontiguousarray(g).tobytes() + repr(g.shape).encode()).hexdigest()
    centre = central_part(g, settings.view)
    return (digest, phash(g), thumbnail(g, settings), to_square(Image.fromarray(g), settings.embed_size),
            to_square(Image.fromarray(centre), settings.embed_size))


def _as_gray(x) -> np.ndarray:
    if isinstance(x, str) or hasattr(x, "__fspath__"):
        x = load_gray(str(x), working_size=True)
    return np.asarray(x.convert("L") if isinstance(x, Image.Image) else x, np.uint8)


def compute_features(images, settings: DedupSettings = DEFAULT, *, embed: bool = True, progress: bool = False,
                     threads: int = 2, chunk: int = 2048, batch_size: int = 32) -> Features:
    """Features of `images`: paths (decoded with load_gray) or 8-bit grayscale arrays / PIL images.
    Without `embed`, no embeddings (enough for method "phash"). Images are decoded and embedded `chunk`
    at a time (whole images, then their central views, `batch_size` a batch), so that memory grows only
    by the features kept."""
    from itertools import islice

    for name, v in (("chunk", chunk), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SonocadError(f"{name} must be a whole number of at least 1, got {v!r}")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(images) if hasattr(images, "__len__") else None, desc="decode", leave=False)
    images, parts = iter(images), []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        while (batch := list(islice(images, chunk))) or not parts:
            out = list(pool.map(lambda x: _image_features(_as_gray(x), settings), batch))
            parts.append(Features([o[0] for o in out], np.array([o[1] for o in out], bool).reshape(-1, 64),
                                  [o[2] for o in out], settings=settings))
            if embed:   # whole images, then their central views, in one pass
                from .embed import embed_images

                size = settings.embed_size
                squares = np.array([o[3] for o in out] + [o[4] for o in out], np.uint8).reshape(-1, size, size)
                e, m = embed_images(squares, settings, batch_size=batch_size, progress=progress)
                parts[-1].embedding, parts[-1].mid, parts[-1].view = e[:len(out)], m[:len(out)], e[len(out):]
            if bar is not None:
                bar.update(len(out))
            if not batch:
                break
    if bar is not None:
        bar.close()
    feats = Features([d for p in parts for d in p.digest], np.concatenate([p.hashes for p in parts]),
                     [t for p in parts for t in p.thumbs], settings=settings)
    if embed:
        feats.embedding, feats.mid, feats.view = (np.concatenate([getattr(p, f) for p in parts])
                                                  for f in ("embedding", "mid", "view"))
    return feats
