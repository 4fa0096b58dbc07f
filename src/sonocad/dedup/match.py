"""The `match` detector: candidate pairs from embedding neighbours, verified by normalised
cross-correlation (by FFT) of the central part of one thumbnail, at several scales, at every position
inside the other thumbnail."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .features import Features, central_part
from .settings import DEFAULT, DedupSettings


def _search_spectra(t: np.ndarray, side: int):
    """FFTs of a thumbnail and its square, zero-padded to side x side, and its size."""
    from scipy.fft import rfft2

    h, w = t.shape
    p = np.zeros((2, side, side), np.float32)
    p[0, :h, :w], p[1, :h, :w] = t, t * t
    return rfft2(p), (h, w)


def _templates(t: np.ndarray, settings: DedupSettings):
    """The central `settings.central` part of a thumbnail at each of `settings.scales`: conjugate FFTs
    of the zero-mean template and of its support, template norms and sizes."""
    from scipy.fft import rfft2

    core = central_part(t, settings.central, least=4)
    ch, cw = core.shape
    core = Image.fromarray(core)
    k, side = len(settings.scales), settings.thumb
    tpl, ones = np.zeros((k, side, side), np.float32), np.zeros((k, side, side), np.float32)
    norms, sizes = np.zeros(k, np.float32), np.zeros((k, 2), np.int64)
    for i, r in enumerate(settings.scales):
        th, tw = max(4, round(ch * r)), max(4, round(cw * r))
        a = np.asarray(core.resize((tw, th), Image.BOX if r < 1 else Image.BILINEAR), np.float32)
        a = a - a.mean()
        tpl[i, :th, :tw], ones[i, :th, :tw] = a, 1.0
        norms[i], sizes[i] = np.sqrt((a * a).sum()), (th, tw)
    return np.conj(rfft2(tpl)), np.conj(rfft2(ones)), norms, sizes


def _match(templates, targets, side: int) -> np.ndarray:
    """Best normalised cross-correlation of `templates` (one image) placed wholly inside each of
    `targets` (search spectra of side x side), over all positions and scales; -1 where no template fits."""
    from scipy.fft import irfft2

    ft, f1, norms, sizes = templates
    spec = np.stack([s for s, _ in targets])                       # (A, 2, T, T/2+1)
    hw = np.array([size for _, size in targets])                   # (A, 2)
    num = irfft2(spec[:, None, 0] * ft[None], s=(side, side), workers=-1)
    s1 = irfft2(spec[:, None, 0] * f1[None], s=(side, side), workers=-1)
    s2 = irfft2(spec[:, None, 1] * f1[None], s=(side, side), workers=-1)
    n = (sizes[:, 0] * sizes[:, 1]).astype(np.float32)[None, :, None, None]
    var = np.maximum(s2 - s1 * s1 / n, 1e-4 * n)   # flat (black) windows cannot score high
    ncc = num / (np.maximum(norms, 1e-3)[None, :, None, None] * np.sqrt(var))
    ncc[:, norms < 1e-2 * np.sqrt(sizes.prod(1))] = -1.0            # a blank template matches nothing
    ylim = (hw[:, None, 0] - sizes[None, :, 0])[:, :, None, None]   # last valid top-left corner
    xlim = (hw[:, None, 1] - sizes[None, :, 1])[:, :, None, None]
    r = np.arange(side)
    ok = (r[None, None, :, None] <= ylim) & (r[None, None, None, :] <= xlim)
    return np.where(ok, ncc, -1.0).reshape(len(targets), -1).max(1)


def candidate_pairs(feats: Features, settings: DedupSettings = DEFAULT, block: int = 512) -> np.ndarray:
    """(P, 2) pairs i < j where one is among the other's `settings.neighbours` nearest neighbours by any
    of: the embedding, the mid-level embedding, the central view of one against the whole of the other.
    Each source finds crops the others miss."""
    n = len(feats)
    if n < 2:
        return np.zeros((0, 2), np.int64)
    k = min(settings.neighbours, n - 1)
    e, m, v = feats.embedding, feats.mid, feats.view
    sources = [lambda a, b: e[a:b] @ e.T, lambda a, b: m[a:b] @ m.T,
               lambda a, b: np.maximum(e[a:b] @ v.T, v[a:b] @ e.T)]
    out = []
    for sim in sources:
        for i0 in range(0, n, block):
            s = sim(i0, i0 + block)
            s[np.arange(len(s)), np.arange(i0, i0 + len(s))] = -np.inf
            nn = np.argpartition(-s, k - 1, axis=1)[:, :k]
            out.append(np.stack([np.repeat(np.arange(i0, i0 + len(s)), k), nn.ravel()], 1))
    return np.unique(np.sort(np.concatenate(out), axis=1), axis=0)


def match_scores(feats: Features, pairs: np.ndarray, settings: DedupSettings = DEFAULT, progress: bool = False,
                 cache: dict | None = None) -> np.ndarray:
    """Cross-correlation score of each pair: the better of the two directions. `cache` ({(a, b): score}
    of one direction) is read and filled; keep one only for one set of features and settings."""
    cache = {} if cache is None else cache
    partners: dict[int, list[int]] = {}
    for i, j in pairs:
        for a, b in ((int(i), int(j)), (int(j), int(i))):
            if (a, b) not in cache:
                partners.setdefault(a, []).append(b)
    spectra: dict[int, tuple] = {}
    items = sorted(partners.items())
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc="match", leave=False)
    for a, bs in items:
        tpl = _templates(feats.thumbs[a], settings)
        for b in bs:
            if b not in spectra:
                spectra[b] = _search_spectra(feats.thumbs[b], settings.thumb)
        for c in range(0, len(bs), 32):   # bounded memory for images that are everyone's neighbour
            chunk = bs[c:c + 32]
            for b, s in zip(chunk, _match(tpl, [spectra[b] for b in chunk], settings.thumb)):
                cache[(a, b)] = float(s)
    return np.array([max(cache[(int(i), int(j))], cache[(int(j), int(i))]) for i, j in pairs], np.float32)
