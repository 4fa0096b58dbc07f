"""The `match` detector: candidate pairs from embedding neighbours, verified by normalised
cross-correlation (by FFT) of the central part of one thumbnail, at several scales, at every position
inside the other thumbnail."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .features import Features, central_part
from .index import AnnIndex, merge_nearest, neighbour_pairs
from .settings import DEFAULT, DedupSettings

SEARCH_CACHE = 4096   # thumbnails whose spectra and window sums are kept while `match_scores` runs
BATCH = 32            # directed pairs scored at a time


def _search_spectra(thumbs: list[np.ndarray], side: int) -> list[tuple]:
    """For each thumbnail: its FFT zero-padded to side x side, integral images (2, side + 1, side + 1) of
    it and its square (float64), so that a window's sums are four look-ups, and its size."""
    from scipy.fft import rfft2

    p = np.zeros((len(thumbs), 2, side + 1, side + 1), np.float64)
    for q, t in zip(p, thumbs):
        q[0, 1:t.shape[0] + 1, 1:t.shape[1] + 1] = t
        q[1, 1:t.shape[0] + 1, 1:t.shape[1] + 1] = np.square(t, dtype=np.float64)
    spectra = rfft2(p[:, 0, 1:, 1:].astype(np.float32), workers=-1)
    return list(zip(spectra, p.cumsum(2).cumsum(3), [t.shape for t in thumbs]))


def _templates(t: np.ndarray, settings: DedupSettings):
    """The central `settings.central` part of a thumbnail at each of `settings.scales`: conjugate FFTs
    of the zero-mean templates, their norms and sizes."""
    from scipy.fft import rfft2

    core = central_part(t, settings.central, least=4)
    ch, cw = core.shape
    core = Image.fromarray(core)
    k, side = len(settings.scales), settings.thumb
    tpl = np.zeros((k, side, side), np.float32)
    norms, sizes = np.zeros(k, np.float32), np.zeros((k, 2), np.int64)
    for i, r in enumerate(settings.scales):
        th, tw = max(4, round(ch * r)), max(4, round(cw * r))
        a = np.asarray(core.resize((tw, th), Image.BOX if r < 1 else Image.BILINEAR), np.float32)
        a = a - a.mean()
        tpl[i, :th, :tw] = a
        norms[i], sizes[i] = np.sqrt((a * a).sum()), (th, tw)
    return np.conj(rfft2(tpl)), norms, sizes


def _match(templates: list, targets: list, side: int) -> np.ndarray:
    """Best normalised cross-correlation, for each pair, of its `templates` (one image's, all of one
    set of sizes) placed wholly inside its target (`_search_spectra`), over all positions and scales;
    -1 where no template fits. The correlations come from one inverse FFT per scale, the windows'
    sums from integral images."""
    from scipy.fft import irfft2

    norms, sizes = np.stack([t[1] for t in templates]), templates[0][2]            # (P, K), (K, 2)
    hw = np.array([size for *_, size in targets])                                  # (P, 2)
    num = irfft2(np.stack([f for f, *_ in targets])[:, None] * np.stack([t[0] for t in templates]),
                 s=(side, side), workers=-1)                                       # (P, K, T, T)
    sums = np.stack([c for _, c, _ in targets])                                    # (P, 2, T + 1, T + 1)
    best = np.full(len(targets), -1.0, np.float32)
    for k, (th, tw) in enumerate(sizes.tolist()):
        ylim, xlim = hw[:, 0] - th, hw[:, 1] - tw            # last valid top-left corner in each target
        rows, cols = int(ylim.max()) + 1, int(xlim.max()) + 1
        if rows <= 0 or cols <= 0:
            continue
        box = (sums[:, :, th:th + rows, tw:tw + cols] - sums[:, :, :rows, tw:tw + cols]
               - sums[:, :, th:th + rows, :cols] + sums[:, :, :rows, :cols])   # window sums of t and t^2
        var = np.maximum(box[:, 1] - box[:, 0] ** 2 / (th * tw), 1e-4 * th * tw)   # flat windows score low
        ncc = num[:, k, :rows, :cols] / (np.maximum(norms[:, k], 1e-3)[:, None, None] * np.sqrt(var))
        if (ylim < rows - 1).any() or (xlim < cols - 1).any():   # targets of other sizes: their own corners
            ncc[(np.arange(rows)[None, :, None] > ylim[:, None, None])
                | (np.arange(cols)[None, None, :] > xlim[:, None, None])] = -1.0
        score = np.where(norms[:, k] >= 1e-2 * np.sqrt(th * tw), ncc.reshape(len(targets), -1).max(1), -1.0)
        best = np.maximum(best, score)   # a blank template matches nothing
    return best


def candidate_pairs(feats: Features, settings: DedupSettings = DEFAULT, block: int = 512) -> np.ndarray:
    """(P, 2) pairs i < j where one is among the other's `settings.neighbours` nearest neighbours by any
    of: the embedding, the mid-level embedding, the central view of one against the whole of the other.
    Each source finds crops the others miss. All pairs are compared below `settings.exact_below` images;
    above, HNSW indexes (`index.ann_index`) find the neighbours."""
    n = len(feats)
    if n < 2:
        return np.zeros((0, 2), np.int64)
    k = min(settings.neighbours, n - 1)
    e, m, v = feats.embedding, feats.mid, feats.view
    if n >= settings.exact_below:
        return _indexed_candidates(e, m, v, k, settings)
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


def _indexed_candidates(e: np.ndarray, m: np.ndarray, v: np.ndarray, k: int, settings: DedupSettings) -> np.ndarray:
    """candidate_pairs through HNSW indexes (`index.AnnIndex`) of the embeddings, the mid-level ones and the
    central views; the view source (best of whole-vs-view and view-vs-whole) merges the k best of each."""
    own = np.arange(len(e))
    whole = AnnIndex(e, settings)
    by_whole, view_in_whole = whole.search(e, k, own)[0], whole.search(v, k, own)
    del whole   # one index of long rows at a time
    by_view = merge_nearest([view_in_whole, AnnIndex(v, settings).search(e, k, own)], k)
    by_mid = AnnIndex(m, settings).search(m, k, own)[0]
    return np.unique(np.concatenate([neighbour_pairs(idx) for idx in (by_whole, by_mid, by_view)]), axis=0)


def _batches(todo: np.ndarray, template_of: np.ndarray, shape_key: np.ndarray, size: int):
    """Consecutive slices of `todo` (sorted by template image shape, then image) of at most `size` pairs
    whose template images have one shape (so their templates have one set of sizes)."""
    for b0 in range(0, len(todo), size):
        rows = todo[b0:b0 + size]
        yield from np.split(rows, np.flatnonzero(np.diff(shape_key[template_of[rows]])) + 1)


def match_scores(feats: Features, pairs: np.ndarray, settings: DedupSettings = DEFAULT, progress: bool = False,
                 cache: dict | None = None) -> np.ndarray:
    """Cross-correlation score of each pair: the better of the two directions. `cache` ({(a, b): score}
    of one direction) is read and filled; keep one only for one set of features and settings. Pairs are
    scored BATCH at a time, with templates made once per image and spectra kept for SEARCH_CACHE targets."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    directed = np.concatenate([pairs, pairs[:, ::-1]])
    scores = np.full(len(directed), np.nan, np.float32)
    if cache:
        scores[:] = [cache.get(ab, np.nan) for ab in map(tuple, directed.tolist())]
    shape_key = np.array([t.shape[0] * (settings.thumb + 1) + t.shape[1] for t in feats.thumbs], np.int64)
    todo = np.flatnonzero(np.isnan(scores))
    todo = todo[np.lexsort((directed[todo, 0], shape_key[directed[todo, 0]]))]
    batches = _batches(todo, directed[:, 0], shape_key, BATCH)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, total=-(-len(todo) // BATCH), desc="match", leave=False)
    templates: dict[int, tuple] = {}
    spectra: dict[int, tuple] = {}
    for rows in batches:
        a_s, b_s = directed[rows, 0].tolist(), directed[rows, 1].tolist()
        templates = {a: templates.get(a) or _templates(feats.thumbs[a], settings) for a in dict.fromkeys(a_s)}
        new = [b for b in dict.fromkeys(b_s) if b not in spectra]
        new = dict(zip(new, _search_spectra([feats.thumbs[b] for b in new], settings.thumb)))
        scores[rows] = _match([templates[a] for a in a_s], [spectra.get(b) or new[b] for b in b_s], settings.thumb)
        spectra.update(list(new.items())[:max(0, SEARCH_CACHE - len(spectra))])
    if cache is not None:
        cache.update(zip(map(tuple, directed[todo].tolist()), scores[todo].tolist()))
    return np.maximum(scores[:len(pairs)], scores[len(pairs):])
