"""Find exact and near-duplicate images, so that a split can keep every copy of a scan on one side.

Every image is decoded to gray and its dark borders are trimmed. Three detectors score pairs:

* ``phash``: a 64-bit DCT perceptual hash; score = 1 - Hamming distance / 64, over all pairs.
  Catches exact, resized, re-compressed and overlay-edited copies; not crops or shifts.
* ``embed``: cosine similarity of ImageNet features of sonocad's default backbone
  (tf_efficientnet_lite0, ``model.forward_features``), over all pairs. Ultrasound images all look
  alike to an ImageNet network, so at a threshold that links no different patients it catches
  little more than pHash does; it is kept as an option.
* ``match``: candidate pairs (each image's 10 nearest neighbours by that embedding, by a
  mid-level one, and by the embedding of its central 75 % against the whole of the others) are
  verified by normalised cross-correlation of band-passed 64 px thumbnails, searching all
  translations and 10 scales (1.0 down to 0.63) of the central 80 % of one image inside the
  other, both ways; score = the best correlation. Catches crops, shifts and what pHash catches.
* ``combined`` (default): pHash or match links a pair.

Linked pairs are joined transitively into groups. The thresholds come from planted copies of real
BUSI images against pairs of images of different BUS-BRA patients (docs/dedup.md;
``python -m sonocad.data.dedup calibrate BUSI BUSBRA`` repeats the measurement).

>>> res = find_duplicates(paths, labels)                # doctest: +SKIP
>>> res.groups[:2], res.conflicts[:1]                   # doctest: +SKIP
([[12, 40], [101, 102, 377]], [[12, 40]])
>>> res.to_csv("groups.csv", paths, labels)             # doctest: +SKIP
"""
from __future__ import annotations

import csv
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import SonocadError
from .images import load_gray, to_square

METHODS = ("phash", "embed", "match", "combined")
EMBED_MODEL = "tf_efficientnet_lite0"
EMBED_SIZE = 224
THUMB = 64                       # thumbnail side (longer side) for cross-correlation
CENTRAL = 0.8                    # part of each side of an image used as the template
BLUR = 1.0                       # Gaussian sigma (thumbnail px): speckle and resampling noise out
HIGHPASS = 4.0                   # minus a sigma-4 blur: the shared bright-top/dark-bottom profile out
SCALES = 0.95 ** np.arange(10)   # template scales tried: 1.0 ... 0.63 (crops down to ~63 %)
MID_BLOCK = 4                    # backbone stage whose pooled output is the second candidate embedding
VIEW = 0.75                      # central part embedded too, so heavy crops find their source
NEIGHBOURS = 10                  # candidates per image and embedding for `match`
# Chosen in docs/dedup.md from planted copies of BUSI images vs pairs of different BUS-BRA patients.
THRESHOLDS = {"phash": 55 / 64, "embed": 0.98, "match": 0.80}
PLANT_KINDS = ("exact", "resize", "crop", "shift", "overlay", "jpeg", "combo")


@dataclass
class DedupResult:
    """Duplicate groups of a list of images (indices refer to the input order)."""

    group: list[str]                                   # one id per image: dup-NNNN or img-NNNN
    groups: list[list[int]] = field(default_factory=list)      # sets with 2+ members
    pairs: list[tuple[int, int, float, str]] = field(default_factory=list)  # (i, j, score, kind)
    conflicts: list[list[int]] = field(default_factory=list)   # groups whose labels differ

    def to_csv(self, path, paths: list[str], labels: list[str] | None = None) -> None:
        """Write `path,group,label` rows (atomically), one per image."""
        from ..io import atomic_write_text

        if len(paths) != len(self.group) or (labels is not None and len(labels) != len(self.group)):
            raise SonocadError(f"to_csv: the result has {len(self.group)} images, got {len(paths)} "
                               f"paths and {len(labels) if labels is not None else 'no'} labels")
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "group", "label"])
        for k, (p, g) in enumerate(zip(paths, self.group)):
            w.writerow([p, g, labels[k] if labels is not None else ""])
        atomic_write_text(path, buf.getvalue())


# --- per-image features ---------------------------------------------------------------------------

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


def _thumb(gray: np.ndarray, side: int = THUMB) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    im = Image.fromarray(gray)
    s = side / max(im.size)
    size = (max(8, round(im.width * s)), max(8, round(im.height * s)))
    t = np.asarray(im.resize(size, Image.BOX if s < 1 else Image.BILINEAR), np.float32) / 255.0
    t = gaussian_filter(t, BLUR)
    return t - gaussian_filter(t, HIGHPASS, mode="nearest")


@dataclass
class Features:
    """Per-image features: pixel digest, perceptual hash, thumbnail, L2-normalised embeddings."""

    digest: list[str]
    hashes: np.ndarray            # (N, 64) bool
    thumbs: list[np.ndarray]      # float32, longer side THUMB
    embedding: np.ndarray | None = None   # (N, 1280) model.forward_features
    mid: np.ndarray | None = None         # (N, 112) pooled output of backbone stage MID_BLOCK
    view: np.ndarray | None = None        # (N, 1280) embedding of the central VIEW part

    def __len__(self) -> int:
        return len(self.digest)


def _image_features(gray: np.ndarray):
    g = trim_borders(gray)
    digest = hashlib.sha1(np.ascontiguousarray(g).tobytes() + repr(g.shape).encode()).hexdigest()
    h, w = g.shape
    ch, cw = max(1, round(h * VIEW)), max(1, round(w * VIEW))
    centre = g[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
    return (digest, phash(g), _thumb(g), to_square(Image.fromarray(g), EMBED_SIZE),
            to_square(Image.fromarray(centre), EMBED_SIZE))


def compute_features(images, *, embed: bool = True, progress: bool = False, threads: int = 2) -> Features:
    """Features of `images`: paths (decoded with load_gray) or 8-bit grayscale arrays / PIL images."""
    def one(x):
        if isinstance(x, str) or hasattr(x, "__fspath__"):
            x = load_gray(str(x))
        return _image_features(np.asarray(x.convert("L") if isinstance(x, Image.Image) else x, np.uint8))

    images = list(images)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        it = pool.map(one, images)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, total=len(images), desc="decode", leave=False)
        out = list(it)
    feats = Features([o[0] for o in out], np.array([o[1] for o in out], bool).reshape(-1, 64),
                     [o[2] for o in out])
    if embed:   # whole images, then their central views, in one pass
        e, m = embed_images(np.array([o[3] for o in out] + [o[4] for o in out], np.uint8).reshape(
            -1, EMBED_SIZE, EMBED_SIZE), progress=progress)
        n = len(out)
        feats.embedding, feats.mid, feats.view = e[:n], m[:n], e[n:]
    return feats


_BACKBONE: dict = {}


def _backbone():
    """The default backbone with its ImageNet weights, built once per process."""
    if not _BACKBONE:
        import torch

        from ..infer import resolve_precision
        from ..models import create_model

        prec = resolve_precision("auto")   # bf16 autocast + channels_last on bf16-capable CPUs
        with torch.random.fork_rng(devices=[]):   # its unused head's random init must not move the caller's RNG
            model = create_model(EMBED_MODEL, 1).eval().to(prec.device)
        if prec.channels_last:
            model = model.to(memory_format=torch.channels_last)
        _BACKBONE.update(model=model, precision=prec)
    return _BACKBONE["model"], _BACKBONE["precision"]


def embed_images(squares: np.ndarray, batch_size: int = 32, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised embeddings of square uint8 gray images (mean = std = 0.5): the backbone's
    pooled features (N, 1280) and the average-pooled output of stage MID_BLOCK (N, C)."""
    import torch
    import torch.nn.functional as F

    model, prec = _backbone()
    out, mid = [], []
    hook = model.backbone.blocks[MID_BLOCK].register_forward_hook(
        lambda m, i, o: mid.append(o.float().mean((2, 3)).cpu()))
    starts = range(0, len(squares), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="embed", leave=False)
    try:
        with torch.no_grad():
            for i in starts:
                x = torch.from_numpy(np.ascontiguousarray(squares[i:i + batch_size])).float().div_(255.0)
                x = ((x - 0.5) / 0.5).unsqueeze(1).expand(-1, 3, -1, -1)
                if prec.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with prec.autocast():
                    out.append(model.forward_features(x.to(prec.device)).float().cpu())
    finally:
        hook.remove()
    if not out:
        return np.zeros((0, 1280), np.float32), np.zeros((0, 1), np.float32)
    return F.normalize(torch.cat(out), dim=-1).numpy(), F.normalize(torch.cat(mid), dim=-1).numpy()


# --- cross-correlation matching -------------------------------------------------------------------

def _search_spectra(t: np.ndarray):
    """FFTs of a thumbnail and its square, zero-padded to THUMB x THUMB, and its size."""
    from scipy.fft import rfft2

    h, w = t.shape
    p = np.zeros((2, THUMB, THUMB), np.float32)
    p[0, :h, :w], p[1, :h, :w] = t, t * t
    return rfft2(p), (h, w)


def _templates(t: np.ndarray):
    """The central CENTRAL part of a thumbnail at each of SCALES: conjugate FFTs of the zero-mean
    template and of its support, template norms and sizes."""
    from scipy.fft import rfft2

    h, w = t.shape
    ch, cw = max(4, round(h * CENTRAL)), max(4, round(w * CENTRAL))
    core = Image.fromarray(t[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw])
    k = len(SCALES)
    tpl, ones = np.zeros((k, THUMB, THUMB), np.float32), np.zeros((k, THUMB, THUMB), np.float32)
    norms, sizes = np.zeros(k, np.float32), np.zeros((k, 2), np.int64)
    for i, r in enumerate(SCALES):
        th, tw = max(4, round(ch * r)), max(4, round(cw * r))
        a = np.asarray(core.resize((tw, th), Image.BOX if r < 1 else Image.BILINEAR), np.float32)
        a = a - a.mean()
        tpl[i, :th, :tw], ones[i, :th, :tw] = a, 1.0
        norms[i], sizes[i] = np.sqrt((a * a).sum()), (th, tw)
    return np.conj(rfft2(tpl)), np.conj(rfft2(ones)), norms, sizes


def _match(templates, targets) -> np.ndarray:
    """Best normalised cross-correlation of `templates` (one image) placed wholly inside each of
    `targets` (search spectra), over all positions and scales; -1 where no template fits."""
    from scipy.fft import irfft2

    ft, f1, norms, sizes = templates
    spec = np.stack([s for s, _ in targets])                       # (A, 2, T, T/2+1)
    hw = np.array([size for _, size in targets])                   # (A, 2)
    num = irfft2(spec[:, None, 0] * ft[None], s=(THUMB, THUMB), workers=-1)
    s1 = irfft2(spec[:, None, 0] * f1[None], s=(THUMB, THUMB), workers=-1)
    s2 = irfft2(spec[:, None, 1] * f1[None], s=(THUMB, THUMB), workers=-1)
    n = (sizes[:, 0] * sizes[:, 1]).astype(np.float32)[None, :, None, None]
    var = np.maximum(s2 - s1 * s1 / n, 1e-4 * n)   # flat (black) windows cannot score high
    ncc = num / (np.maximum(norms, 1e-3)[None, :, None, None] * np.sqrt(var))
    ncc[:, norms < 1e-2 * np.sqrt(sizes.prod(1))] = -1.0            # a blank template matches nothing
    ylim = (hw[:, None, 0] - sizes[None, :, 0])[:, :, None, None]   # last valid top-left corner
    xlim = (hw[:, None, 1] - sizes[None, :, 1])[:, :, None, None]
    r = np.arange(THUMB)
    ok = (r[None, None, :, None] <= ylim) & (r[None, None, None, :] <= xlim)
    return np.where(ok, ncc, -1.0).reshape(len(targets), -1).max(1)


def candidate_pairs(feats: Features, k: int = NEIGHBOURS, block: int = 512) -> np.ndarray:
    """(P, 2) pairs i < j where one is among the other's `k` nearest neighbours by any of: the
    embedding, the mid-level embedding, the central view of one against the whole of the other.
    Each source finds crops the others miss."""
    n = len(feats)
    if n < 2:
        return np.zeros((0, 2), np.int64)
    k = min(k, n - 1)
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


def match_scores(feats: Features, pairs: np.ndarray, progress: bool = False, cache: dict | None = None) -> np.ndarray:
    """Cross-correlation score of each pair: the better of the two directions."""
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
        tpl = _templates(feats.thumbs[a])
        for b in bs:
            if b not in spectra:
                spectra[b] = _search_spectra(feats.thumbs[b])
        for c in range(0, len(bs), 32):   # bounded memory for images that are everyone's neighbour
            chunk = bs[c:c + 32]
            for b, s in zip(chunk, _match(tpl, [spectra[b] for b in chunk])):
                cache[(a, b)] = float(s)
    return np.array([max(cache[(int(i), int(j))], cache[(int(j), int(i))]) for i, j in pairs], np.float32)


# --- grouping -------------------------------------------------------------------------------------

def find_duplicates(paths: list[str], labels: list[str] | None = None, *, method: str = "combined",
                    threshold: float | None = None, progress: bool = False) -> DedupResult:
    """Group exact and near-duplicate images of `paths` (see the module docstring).

    `method`: "phash", "embed", "match" or "combined" (pHash or match links a pair). `threshold`
    overrides the linking score of that method; for "combined" it replaces the match threshold and
    pHash keeps THRESHOLDS["phash"]. Unreadable images raise SonocadError."""
    if method not in METHODS:
        raise SonocadError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if labels is not None and len(labels) != len(paths):
        raise SonocadError(f"got {len(paths)} paths but {len(labels)} labels")
    th = dict(THRESHOLDS)
    if threshold is not None:
        th["match" if method == "combined" else method] = float(threshold)
    feats = compute_features(paths, embed=method != "phash", progress=progress)
    return group_features(feats, labels, method=method, thresholds=th, progress=progress)


def score_pairs(feats: Features, method: str, thresholds: dict, progress: bool = False,
                cache: dict | None = None) -> dict[tuple[int, int], dict[str, float]]:
    """{(i, j): {detector: score}} for every pair some detector of `method` links."""
    n = len(feats)
    use = {"combined": ("phash", "match")}.get(method, (method,))
    found: dict[tuple[int, int], dict[str, float]] = {}
    for i0 in range(0, n, 512):
        upper = np.arange(i0, min(n, i0 + 512))[:, None] < np.arange(n)[None, :]
        for det in ("phash", "embed"):
            if det in use:
                s = (phash_similarity(feats.hashes[i0:i0 + 512], feats.hashes) if det == "phash"
                     else feats.embedding[i0:i0 + 512] @ feats.embedding.T)
                for a, b in zip(*np.nonzero((s >= thresholds[det] - 1e-6) & upper)):
                    found.setdefault((i0 + int(a), int(b)), {})[det] = float(s[a, b])
    if "match" in use:
        pairs = candidate_pairs(feats)
        for (i, j), s in zip(pairs, match_scores(feats, pairs, progress, cache)):
            if s >= thresholds["match"] - 1e-6:
                found.setdefault((int(i), int(j)), {})["match"] = float(s)
    return found


def group_features(feats: Features, labels: list[str] | None = None, *, method: str = "combined",
                   thresholds: dict | None = None, progress: bool = False, cache: dict | None = None) -> DedupResult:
    """find_duplicates on computed features; `thresholds` maps detector to linking score."""
    th = {**THRESHOLDS, **(thresholds or {})}
    pairs = []
    for (i, j), hits in sorted(score_pairs(feats, method, th, progress, cache).items()):
        if feats.digest[i] == feats.digest[j]:
            pairs.append((i, j, 1.0, "exact"))
        else:   # the score of the strongest kind of evidence: match, else embed, else phash
            best = next(d for d in ("match", "embed", "phash") if d in hits)
            pairs.append((i, j, hits[best], "+".join(d for d in ("phash", "embed", "match") if d in hits)))
    return link(len(feats), pairs, labels)


def link(n: int, pairs: list, labels: list[str] | None = None) -> DedupResult:
    """Join linked pairs transitively (connected components) into a DedupResult."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return DedupResult([], [], [], [])
    ij = np.array([(p[0], p[1]) for p in pairs], dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(ij)), (ij[:, 0], ij[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    members: dict[int, list[int]] = {}
    for k, c in enumerate(comp):
        members.setdefault(int(c), []).append(k)
    groups = sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])
    width = max(4, len(str(n)))
    group = [f"img-{k:0{width}d}" for k in range(n)]
    for g, m in enumerate(groups, start=1):
        for k in m:
            group[k] = f"dup-{g:0{width}d}"
    conflicts = [m for m in groups if labels is not None and len({labels[k] for k in m}) > 1]
    return DedupResult(group, groups, list(pairs), conflicts)


# --- planted copies and threshold calibration ----------------------------------------------------

_WORDS = ["LT BREAST", "RT BREAST", "LEFT BREAST", "RIGHT BREAST 10 O'CLOCK", "R 2:00 3CM FN",
          "D1 1.24 cm", "D2 0.87cm", "TRANS", "LONG", "RADIAL", "ANTI-RAD", "L 11H", "Dist 2.31 cm"]


def _draw_overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Text and caliper marks like those an ultrasound console burns into a saved frame."""
    img = img.copy()
    w, h = img.size
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        font = ImageFont.load_default(size=max(8, int(h * rng.uniform(0.03, 0.06))))
        d.text((int(rng.uniform(0.02, 0.6) * w), int(rng.uniform(0.02, 0.9) * h)),
               str(rng.choice(_WORDS)), fill=int(rng.integers(180, 256)), font=font)
    arm = max(3, int(min(w, h) * rng.uniform(0.015, 0.03)))
    width = 1 + int(min(w, h) > 400)
    marks = [(int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.8) * h))
             for _ in range(int(rng.integers(2, 5)))]
    for x, y in marks:
        d.line([(x - arm, y), (x + arm, y)], fill=255, width=width)
        d.line([(x, y - arm), (x, y + arm)], fill=255, width=width)
    (x0, y0), (x1, y1) = marks[:2]
    for t in np.linspace(0, 1, 24)[1:-1:2]:   # dotted measuring line between two calipers
        d.point((int(x0 + t * (x1 - x0)), int(y0 + t * (y1 - y0))), fill=230)
    return img


def plant_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A synthetic near-duplicate of `img` (made gray), one of PLANT_KINDS: "resize" scales by
    0.5-1.5x, "crop" keeps 70-95 % of each side, "shift" moves the frame by 5-15 % of each side
    (black fill, the far part lost), "overlay" draws text and calipers, "jpeg" re-compresses at
    quality 50-90, "combo" is resize + 80-95 % crop + overlay + jpeg."""
    if kind not in PLANT_KINDS:
        raise SonocadError(f"plant kind must be one of {', '.join(PLANT_KINDS)}, got {kind!r}")
    img = img.convert("L")
    if kind in ("resize", "combo"):
        s = rng.uniform(0.5, 1.5)
        img = img.resize((max(32, round(img.width * s)), max(32, round(img.height * s))), Image.BILINEAR)
    if kind in ("crop", "combo"):
        lo = 0.70 if kind == "crop" else 0.80
        cw, ch = round(img.width * rng.uniform(lo, 0.95)), round(img.height * rng.uniform(lo, 0.95))
        x0, y0 = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
        img = img.crop((x0, y0, x0 + cw, y0 + ch))
    if kind == "shift":
        dx = int(round(img.width * rng.uniform(0.05, 0.15) * rng.choice([-1, 1])))
        dy = int(round(img.height * rng.uniform(0.05, 0.15) * rng.choice([-1, 1])))
        canvas = Image.new("L", img.size, 0)
        canvas.paste(img, (dx, dy))
        img = canvas
    if kind in ("overlay", "combo"):
        img = _draw_overlay(img, rng)
    if kind in ("jpeg", "combo"):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(50, 91)))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("L")
    return img


# bus_0056-l and bus_0091-l are one frame with other calipers and text (checked by eye), so BUS-BRA
# cases 56 and 91 count as one patient: that pair is a duplicate, not a negative.
BUSBRA_SAME_PATIENT = {"busbra-91": "busbra-56"}


def calibrate(busi: str, busbra: str, seed: int = 0, progress: bool = True) -> dict:
    """Recall on planted copies against false links among different patients, per detector.

    Every BUSI image gets one planted copy (kinds in turn). Pair recall: the share of planted pairs
    scoring at least the threshold; group recall: the share of copies grouped with their original
    when BUSI and the copies are deduplicated together (for match this includes finding the pair
    as a candidate). Negatives: all pairs of BUS-BRA images of different patients (for match, the
    candidate pairs, the only ones it scores), and for pHash and embed every BUSI x BUS-BRA pair.
    Proposed thresholds: pHash and embed, the lowest grid value above every negative; match, halfway
    between the highest negative and the 1st percentile of planted pairs. Then BUSI alone is grouped."""
    import time
    from pathlib import Path

    from .discover import discover, read_busbra

    t0 = time.perf_counter()
    busi_s = discover(busi)
    busi_paths, busi_labels = [s.path for s in busi_s], [s.label for s in busi_s]
    f_busi = compute_features(busi_paths, progress=progress)
    t_busi = time.perf_counter() - t0
    bra_s = read_busbra(Path(busbra))
    f_bra = compute_features([s.path for s in bra_s], progress=progress)
    bra_names = [Path(s.path).name for s in bra_s]
    case = np.array([BUSBRA_SAME_PATIENT.get(s.group, s.group) for s in bra_s])

    nb = len(busi_s)
    kinds = np.array([PLANT_KINDS[i % len(PLANT_KINDS)] for i in range(nb)])
    copies = (plant_copy(load_gray(p), str(k), np.random.default_rng([seed, i]))
              for i, (p, k) in enumerate(zip(busi_paths, kinds)))
    f_cp = compute_features(copies, progress=progress)
    pool = Features(f_busi.digest + f_cp.digest, np.concatenate([f_busi.hashes, f_cp.hashes]),
                    f_busi.thumbs + f_cp.thumbs, np.concatenate([f_busi.embedding, f_cp.embedding]),
                    np.concatenate([f_busi.mid, f_cp.mid]), np.concatenate([f_busi.view, f_cp.view]))
    cache: dict = {}   # match scores of pool pairs; BUSI alone uses the same indices

    iu = np.triu_indices(len(bra_s), 1)
    different = case[iu[0]] != case[iu[1]]
    neg = {"phash": phash_similarity(f_bra.hashes, f_bra.hashes)[iu][different],
           "embed": (f_bra.embedding @ f_bra.embedding.T)[iu][different]}
    neg_pairs = {d: np.stack([iu[0][different], iu[1][different]], 1) for d in neg}
    cross = {"phash": phash_similarity(f_busi.hashes, f_bra.hashes).ravel(),
             "embed": (f_busi.embedding @ f_bra.embedding.T).ravel()}
    bra_pairs = candidate_pairs(f_bra)
    bra_match = match_scores(f_bra, bra_pairs, progress)
    keep = case[bra_pairs[:, 0]] != case[bra_pairs[:, 1]]
    neg["match"], neg_pairs["match"] = bra_match[keep], bra_pairs[keep]

    planted = np.stack([np.arange(nb), nb + np.arange(nb)], 1)
    pos = {"phash": 1 - (f_busi.hashes != f_cp.hashes).mean(1),
           "embed": np.einsum("nd,nd->n", f_busi.embedding, f_cp.embedding),
           "match": match_scores(pool, planted, cache=cache)}
    pool_pairs = candidate_pairs(pool)
    pool_match = match_scores(pool, pool_pairs, progress, cache)
    pool_ph, pool_em = phash_similarity(pool.hashes, pool.hashes), pool.embedding @ pool.embedding.T
    piu = np.triu_indices(len(pool), 1)
    candidate = set(map(tuple, pool_pairs.tolist()))

    def edges(det, t):
        if det == "match":
            return pool_pairs[pool_match >= t - 1e-6]
        s = (pool_ph if det == "phash" else pool_em)[piu]
        ok = s >= t - 1e-6
        return np.stack([piu[0][ok], piu[1][ok]], 1)

    def group_recall(edge_sets):
        comp = link(len(pool), [tuple(e) for es in edge_sets for e in es]).group
        ok = np.array([comp[i] == comp[nb + i] for i in range(nb)])
        return round(float(ok.mean()), 4), {k: round(float(ok[kinds == k].mean()), 3) for k in PLANT_KINDS}

    def point(det, q):
        return {"threshold": round(float(q), 4), "pair_recall": round(float((pos[det] >= q - 1e-6).mean()), 4),
                "group_recall": group_recall([edges(det, q)])[0],
                "false_links": int((neg[det] >= q - 1e-6).sum()),
                "cross_site_false_links": int((cross[det] >= q - 1e-6).sum()) if det in cross else None}

    covered = np.mean([tuple(p) in candidate for p in planted.tolist()])
    report = {"n_busi": nb, "n_busbra": len(bra_s),
              "planted_per_kind": {k: int((kinds == k).sum()) for k in PLANT_KINDS},
              "negative_pairs": {d: int(len(v)) for d, v in neg.items()},
              "planted_pairs_that_are_candidates": round(float(covered), 4),
              "busi_feature_seconds": round(t_busi, 1), "detectors": {}}
    proposed = {}
    for det, step in (("phash", 1 / 64), ("embed", 0.005), ("match", 0.01)):
        top = float(neg[det].max())
        low = float(np.quantile(pos[det], 0.01))
        if det == "match":
            t = round((top + low) / 2, 2)
            grid = sorted({*np.round(np.arange(0.6, 0.96, 0.05), 2), t})
        else:
            t = float(np.floor(top / step + 1e-9) * step + step)
            grid = [t + i * step for i in (-3, -2, -1, 0, 1, 2)]
        proposed[det] = t
        order = np.argsort(-neg[det])[:5]
        gr, by_kind = group_recall([edges(det, t)])
        report["detectors"][det] = {
            "max_negative": round(top, 4), "negative_quantile_0.999": round(float(np.quantile(neg[det], 0.999)), 4),
            "planted_quantile_0.01": round(low, 4), "proposed_threshold": round(t, 4),
            "pair_recall": round(float((pos[det] >= t - 1e-6).mean()), 4),
            "pair_recall_by_kind": {k: round(float((pos[det][kinds == k] >= t - 1e-6).mean()), 3)
                                    for k in PLANT_KINDS},
            "group_recall": gr, "group_recall_by_kind": by_kind,
            "top_negatives": [(bra_names[i], bra_names[j], round(float(neg[det][o]), 4))
                              for (i, j), o in zip(neg_pairs[det][order], order)],
            "curve": [point(det, q) for q in grid]}
    for name, dets in (("combined", ("phash", "match")), ("combined_with_embed", ("phash", "embed", "match"))):
        gr, by_kind = group_recall([edges(d, proposed[d]) for d in dets])
        report[name] = {"group_recall": gr, "group_recall_by_kind": by_kind}
    report["proposed"] = {d: round(t, 4) for d, t in proposed.items()}
    t1 = time.perf_counter()
    res = group_features(f_busi, busi_labels, thresholds=proposed, cache=cache)
    report["busi"] = summarize(res, busi_paths, busi_labels)
    emb_only = group_features(f_busi, busi_labels, method="embed", thresholds=proposed)
    linked = {(i, j) for i, j, *_ in res.pairs}
    report["busi_embed_pairs_not_linked_by_combined"] = [
        (busi_paths[i], busi_paths[j], round(sc, 4)) for i, j, sc, _ in emb_only.pairs if (i, j) not in linked]
    report["busi_group_seconds_after_features"] = round(time.perf_counter() - t1, 1)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def summarize(res: DedupResult, paths: list[str], labels: list[str] | None = None, examples: int = 8) -> dict:
    """Counts of a DedupResult: groups, sizes, images in groups, conflicts, pair kinds, examples."""
    from collections import Counter
    from pathlib import Path

    def name(k):
        p = Path(paths[k])
        return f"{p.parent.name}/{p.name}"

    return {"images": len(paths), "groups": len(res.groups),
            "images_in_groups": sum(len(g) for g in res.groups),
            "sizes": dict(sorted(Counter(len(g) for g in res.groups).items())),
            "conflicts": len(res.conflicts),
            "pair_kinds": dict(Counter(k for *_, k in res.pairs)),
            "examples": [[name(k) for k in g] for g in res.groups[:examples]],
            "conflict_examples": [[name(k) for k in g] for g in res.conflicts[:examples]],
            "all_groups": [[name(k) for k in g] for g in res.groups],
            "all_conflicts": [[f"{name(k)}:{labels[k]}" for k in g] for g in res.conflicts] if labels else [],
            "all_pairs": [(name(i), name(j), round(sc, 4), kind) for i, j, sc, kind in res.pairs]}


def main(argv: list[str] | None = None) -> int:
    """`python -m sonocad.data.dedup find DATA [--csv OUT]` or `... calibrate BUSI BUSBRA`."""
    import argparse
    import json
    import time

    from .discover import discover

    ap = argparse.ArgumentParser(prog="python -m sonocad.data.dedup")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("find", help="group the duplicates of a dataset, print a summary")
    f.add_argument("data")
    f.add_argument("--classes", nargs="+")
    f.add_argument("--method", default="combined", choices=METHODS)
    f.add_argument("--threshold", type=float)
    f.add_argument("--csv", help="write path,group,label here")
    f.add_argument("--json", help="write the full summary (all groups and pairs) here")
    c = sub.add_parser("calibrate", help="recall on planted copies vs false links; propose thresholds")
    c.add_argument("busi")
    c.add_argument("busbra")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "find":
            samples = discover(a.data, a.classes)
            paths, labels = [s.path for s in samples], [s.label for s in samples]
            t0 = time.perf_counter()
            res = find_duplicates(paths, labels, method=a.method, threshold=a.threshold, progress=True)
            out = summarize(res, paths, labels)
            out["seconds"] = round(time.perf_counter() - t0, 1)
            if a.csv:
                res.to_csv(a.csv, paths, labels)
        else:
            out = calibrate(a.busi, a.busbra, a.seed)
        if a.json:
            from ..io import atomic_write_text
            atomic_write_text(a.json, json.dumps(out, indent=1))
    except SonocadError as e:
        print(f"error: {e}")
        return 2
    def brief(d):
        return {k: brief(v) if isinstance(v, dict) else v for k, v in d.items() if not str(k).startswith("all_")}

    print(json.dumps(brief(out), indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
