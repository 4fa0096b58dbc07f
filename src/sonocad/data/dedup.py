"""Find exact and near-duplicate images, so that a split can keep every copy of a scan on one side.

Two detectors, run on each image with its dark borders trimmed:

* ``phash``: a 64-bit DCT perceptual hash; score = 1 - Hamming distance / 64. It catches exact,
  resized, re-compressed, overlay-edited and black-fill shifted copies, but not crops.
* ``embed``: cosine similarity of ImageNet features of sonocad's default backbone
  (tf_efficientnet_lite0, average of its last feature map). The whole of one image is also compared
  with sub-windows of the other's feature map (roughly 55-85 % crops), so heavy crops still match.
* ``combined`` (default): a pair is linked when either detector says duplicate.

Linked pairs are joined transitively into groups. The default thresholds come from planted copies of
real BUSI images against pairs of images of different BUS-BRA patients (docs/dedup.md;
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

METHODS = ("phash", "embed", "combined")
EMBED_MODEL = "tf_efficientnet_lite0"
EMBED_SIZE = 224
WINDOWS = (4, 5, 6)          # sub-window sides on the 7x7 feature map of a 224 px input
PHASH_THRESHOLD = 0.80       # chosen in docs/dedup.md
EMBED_THRESHOLD = 0.95       # chosen in docs/dedup.md
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
            raise SonocadError(f"to_csv: {len(self.group)} images in the result, "
                               f"got {len(paths)} paths and {len(labels) if labels else 0} labels")
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "group", "label"])
        for k, (p, g) in enumerate(zip(paths, self.group)):
            w.writerow([p, g, labels[k] if labels is not None else ""])
        atomic_write_text(path, buf.getvalue())


# --- image features -------------------------------------------------------------------------------

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
    """64-bit DCT perceptual hash (as bools): the 8x8 lowest DCT frequencies of a 32x32 thumbnail,
    each compared with their median."""
    from scipy.fft import dctn

    small = np.asarray(Image.fromarray(gray).resize((32, 32), Image.LANCZOS), np.float32)
    low = dctn(small, type=2, norm="ortho")[:8, :8].ravel()
    return low > np.median(low)


def phash_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) matrix of 1 - Hamming distance / 64 between hash rows."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return 1.0 - (a @ (1 - b).T + (1 - a) @ b.T) / a.shape[1]


@dataclass
class Features:
    """Per-image features: pixel digest, perceptual hash, whole and window embeddings (L2-normalised)."""

    digest: list[str]
    hashes: np.ndarray           # (N, 64) bool
    squares: np.ndarray          # (N, EMBED_SIZE, EMBED_SIZE) uint8, freed after embedding
    full: np.ndarray | None = None   # (N, D)
    windows: np.ndarray | None = None  # (N, K, D)


def _image_features(gray: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    g = trim_borders(gray)
    digest = hashlib.sha1(np.ascontiguousarray(g).tobytes() + repr(g.shape).encode()).hexdigest()
    return digest, phash(g), to_square(Image.fromarray(g), EMBED_SIZE)


def compute_features(images, *, embed: bool = True, progress: bool = False, threads: int = 2) -> Features:
    """Features of `images`: paths (decoded with load_gray) or 8-bit grayscale arrays / PIL images."""
    def one(x):
        if isinstance(x, (str, bytes)) or hasattr(x, "__fspath__"):
            x = load_gray(str(x))
        return _image_features(np.asarray(x.convert("L") if isinstance(x, Image.Image) else x, np.uint8))

    images = list(images)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        it = pool.map(one, images)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, total=len(images), desc="decode", leave=False)
        out = list(it)
    feats = Features([d for d, _, _ in out],
                     np.stack([h for _, h, _ in out]) if out else np.zeros((0, 64), bool),
                     np.stack([s for _, _, s in out]) if out else np.zeros((0, EMBED_SIZE, EMBED_SIZE), np.uint8))
    if embed:
        feats.full, feats.windows = embed_images(feats.squares, progress=progress)
    return feats


_EMBEDDER = {}


def _backbone():
    """The default backbone with its ImageNet weights, built once per process."""
    if "net" not in _EMBEDDER:
        import torch

        from ..infer import resolve_precision
        from ..models import create_model

        prec = resolve_precision("auto")
        net = create_model(EMBED_MODEL, 1).backbone.eval().to(prec.device)
        if prec.channels_last:
            net = net.to(memory_format=torch.channels_last)
        _EMBEDDER["net"], _EMBEDDER["precision"] = net, prec
    return _EMBEDDER["net"], _EMBEDDER["precision"]


def embed_images(squares: np.ndarray, batch_size: int = 32, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised embeddings of square uint8 images: the whole image (N, D) and each sub-window
    of the last feature map (N, K, D). The whole-image one equals the backbone's pooled output."""
    import torch
    import torch.nn.functional as F

    net, prec = _backbone()
    full, wins = [], []
    starts = range(0, len(squares), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="embed", leave=False)
    with torch.no_grad():
        for i in starts:
            x = torch.from_numpy(np.ascontiguousarray(squares[i:i + batch_size])).float().div_(255.0)
            x = ((x - 0.5) / 0.5).unsqueeze(1).expand(-1, 3, -1, -1)
            if prec.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with prec.autocast():
                fmap = net.forward_features(x.to(prec.device)).float()
            full.append(fmap.mean((2, 3)).cpu())
            w = [F.avg_pool2d(fmap, k, stride=1).flatten(2) for k in WINDOWS if k <= min(fmap.shape[2:])]
            wins.append(torch.cat(w, 2).transpose(1, 2).cpu() if w else fmap.mean((2, 3))[:, None].cpu())
    if not full:
        return np.zeros((0, 1280), np.float32), np.zeros((0, 1, 1280), np.float32)
    f = F.normalize(torch.cat(full), dim=-1).numpy()
    w = F.normalize(torch.cat(wins), dim=-1).numpy()
    return f, w


def embed_similarity(fa: np.ndarray, wa: np.ndarray | None, fb: np.ndarray, wb: np.ndarray | None) -> np.ndarray:
    """(len(fa), len(fb)) cosine similarities: whole vs whole, and (when windows are given) the best
    of whole-of-one vs any window of the other, both ways."""
    s = fa @ fb.T
    if wa is not None and wb is not None:
        na, nb, k = len(fa), len(fb), wb.shape[1]
        s = np.maximum(s, (fa @ wb.reshape(nb * k, -1).T).reshape(na, nb, k).max(-1))
        s = np.maximum(s, (fb @ wa.reshape(na * wa.shape[1], -1).T).reshape(nb, na, -1).max(-1).T)
    return s


# --- grouping -------------------------------------------------------------------------------------

def find_duplicates(paths: list[str], labels: list[str] | None = None, *, method: str = "combined",
                    threshold: float | None = None, progress: bool = False) -> DedupResult:
    """Group exact and near-duplicate images of `paths`.

    `method`: "phash", "embed" or "combined" (either one links a pair). `threshold` overrides the
    linking score of the method: pHash similarity for "phash", embedding cosine for "embed" and
    "combined" (where pHash keeps PHASH_THRESHOLD). Unreadable images raise SonocadError."""
    if method not in METHODS:
        raise SonocadError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if labels is not None and len(labels) != len(paths):
        raise SonocadError(f"got {len(paths)} paths but {len(labels)} labels")
    feats = compute_features(paths, embed=method != "phash", progress=progress)
    t_hash = threshold if (method == "phash" and threshold is not None) else PHASH_THRESHOLD
    t_emb = threshold if (method != "phash" and threshold is not None) else EMBED_THRESHOLD
    return group_features(feats, labels, method=method, phash_threshold=t_hash, embed_threshold=t_emb)


def group_features(feats: Features, labels: list[str] | None = None, *, method: str = "combined",
                   phash_threshold: float = PHASH_THRESHOLD, embed_threshold: float = EMBED_THRESHOLD,
                   block: int = 256) -> DedupResult:
    """find_duplicates on already computed features, with both thresholds explicit."""
    n = len(feats.digest)
    t_hash, t_emb = phash_threshold, embed_threshold
    found: dict[tuple[int, int], list] = {}
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        upper = np.arange(i0, i1)[:, None] < np.arange(n)[None, :]
        scores = []
        if method in ("phash", "combined"):
            scores.append(("phash", phash_similarity(feats.hashes[i0:i1], feats.hashes), t_hash))
        if method in ("embed", "combined"):
            scores.append(("embed", embed_similarity(feats.full[i0:i1], feats.windows[i0:i1],
                                                     feats.full, feats.windows), t_emb))
        for kind, s, t in scores:
            for a, b in zip(*np.nonzero((s >= t - 1e-6) & upper)):
                found.setdefault((i0 + int(a), int(b)), []).append((kind, float(s[a, b])))
    pairs = []
    for (i, j), hits in sorted(found.items()):
        kinds = [k for k, _ in hits]
        if feats.digest[i] == feats.digest[j]:
            pairs.append((i, j, 1.0, "exact"))
        else:   # the embedding score when it linked the pair, else the pHash one
            pairs.append((i, j, hits[-1][1], "+".join(kinds)))
    return _groups(n, pairs, labels)


def _groups(n: int, pairs: list, labels: list[str] | None) -> DedupResult:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return DedupResult([], [], [], [])
    ij = np.array([(i, j) for i, j, _, _ in pairs], dtype=np.int64).reshape(-1, 2)
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
    return DedupResult(group, groups, pairs, conflicts)


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
    marks = [(int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.8) * h))
             for _ in range(int(rng.integers(2, 5)))]
    for x, y in marks:
        d.line([(x - arm, y), (x + arm, y)], fill=255, width=1 + int(min(w, h) > 400))
        d.line([(x, y - arm), (x, y + arm)], fill=255, width=1 + int(min(w, h) > 400))
    (x0, y0), (x1, y1) = marks[:2]
    for t in np.linspace(0, 1, 24)[1:-1:2]:   # dotted measuring line between two calipers
        d.point((int(x0 + t * (x1 - x0)), int(y0 + t * (y1 - y0))), fill=230)
    return img


def plant_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A synthetic near-duplicate of grayscale `img`: one of PLANT_KINDS. "resize" scales by
    0.5-1.5x, "crop" keeps 70-95 % of each side, "shift" moves the frame 5-15 % per axis (black fill),
    "overlay" draws text and calipers, "jpeg" re-compresses at quality 50-90; "combo" is resize +
    80-95 % crop + overlay + jpeg."""
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


def _highest_clean(neg: np.ndarray, step: float) -> float:
    """Lowest threshold on a grid of `step` that no negative score reaches."""
    return float(np.floor(neg.max() / step + 1e-9) * step + step) if len(neg) else 0.0


def calibrate(busi: str, busbra: str, n_sources: int = 150, seed: int = 0, progress: bool = True) -> dict:
    """Measure recall on planted copies of `n_sources` random BUSI images (every PLANT_KIND) and
    the false-link rate among image pairs of different BUS-BRA patients, for pHash, whole-image
    embeddings and multi-window embeddings; propose thresholds with no false link among the negatives.
    Also scores BUSI x BUS-BRA pairs (certainly different) and groups BUSI with the proposed thresholds."""
    import time

    from .discover import discover, read_busbra
    from pathlib import Path

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    busi_s = discover(busi)
    bra_s = read_busbra(Path(busbra))
    f_busi = compute_features([s.path for s in busi_s], progress=progress)
    t_busi = time.perf_counter() - t0
    f_bra = compute_features([s.path for s in bra_s], progress=progress)

    src = rng.choice(len(busi_s), size=min(n_sources, len(busi_s)), replace=False)
    copies, origin, kinds = [], [], []
    for k, i in enumerate(src):
        img = load_gray(busi_s[i].path)
        for kind in PLANT_KINDS:
            copies.append(plant_copy(img, kind, np.random.default_rng([seed, k, PLANT_KINDS.index(kind)])))
            origin.append(int(i))
            kinds.append(kind)
    f_cp = compute_features(copies, progress=progress)
    origin, kinds = np.array(origin), np.array(kinds)

    def pos_scores(variant):
        if variant == "phash":
            return 1 - (f_busi.hashes[origin] != f_cp.hashes).mean(1)
        s = np.einsum("nd,nd->n", f_busi.full[origin], f_cp.full)
        if variant == "embed-multi":
            s = np.maximum(s, np.einsum("nd,nkd->nk", f_busi.full[origin], f_cp.windows).max(1))
            s = np.maximum(s, np.einsum("nd,nkd->nk", f_cp.full, f_busi.windows[origin]).max(1))
        return s

    def matrix(variant, fa, fb):
        if variant == "phash":
            return phash_similarity(fa.hashes, fb.hashes)
        if variant == "embed-whole":
            return fa.full @ fb.full.T
        return embed_similarity(fa.full, fa.windows, fb.full, fb.windows)

    case = np.array([s.group for s in bra_s])
    iu = np.triu_indices(len(bra_s), 1)
    different = case[iu[0]] != case[iu[1]]
    report = {"n_busi": len(busi_s), "n_busbra": len(bra_s), "n_planted": len(copies),
              "n_negative_pairs": int(different.sum()), "busi_feature_seconds": round(t_busi, 1),
              "variants": {}}
    for variant, step in (("phash", 1 / 64), ("embed-whole", 0.005), ("embed-multi", 0.005)):
        pos = pos_scores(variant)
        neg = matrix(variant, f_bra, f_bra)[iu][different]
        cross = matrix(variant, f_busi, f_bra).ravel()
        t = _highest_clean(neg, step)
        curve = []
        for q in sorted({t - 2 * step, t - step, t, t + step, t + 2 * step, *np.quantile(neg, [0.999, 0.9999])}):
            curve.append({"threshold": round(float(q), 4), "recall": round(float((pos >= q).mean()), 4),
                          "false_link_rate": float((neg >= q).mean()), "false_links": int((neg >= q).sum()),
                          "cross_site_false_links": int((cross >= q).sum())})
        report["variants"][variant] = {
            "proposed_threshold": round(t, 4), "max_negative": round(float(neg.max()), 4),
            "max_cross_site": round(float(cross.max()), 4),
            "recall": round(float((pos >= t).mean()), 4),
            "recall_by_kind": {k: round(float((pos[kinds == k] >= t).mean()), 3) for k in PLANT_KINDS},
            "positive_quantiles": {q: round(float(np.quantile(pos, q)), 4) for q in (0.01, 0.05, 0.1, 0.5)},
            "curve": curve}
        report["variants"][variant]["_pos"] = pos
    th, te = (report["variants"][v]["proposed_threshold"] for v in ("phash", "embed-multi"))
    ph = report["variants"]["phash"].pop("_pos") >= th
    em = report["variants"]["embed-multi"].pop("_pos") >= te
    report["variants"]["embed-whole"].pop("_pos")
    comb = ph | em
    report["combined"] = {"phash_threshold": th, "embed_threshold": te, "recall": round(float(comb.mean()), 4),
                          "recall_by_kind": {k: round(float(comb[kinds == k].mean()), 3) for k in PLANT_KINDS}}
    res = group_features(f_busi, [s.label for s in busi_s], phash_threshold=th, embed_threshold=te)
    report["busi"] = summarize(res, [s.path for s in busi_s], [s.label for s in busi_s])
    return report


def summarize(res: DedupResult, paths: list[str], labels: list[str] | None = None, examples: int = 8) -> dict:
    """Counts of a DedupResult: groups, sizes, images in groups, conflicts, pair kinds, a few examples."""
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
            "all_pairs": [(name(i), name(j), round(sc, 4), kind) for i, j, sc, kind in res.pairs]}


def main(argv: list[str] | None = None) -> int:
    """`python -m sonocad.data.dedup find DATA [--csv OUT]` or `... calibrate BUSI BUSBRA`."""
    import argparse
    import json
    import time

    from .discover import discover

    ap = argparse.ArgumentParser(prog="python -m sonocad.data.dedup")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("find", help="group duplicates of a dataset and print a summary")
    f.add_argument("data")
    f.add_argument("--classes", nargs="+")
    f.add_argument("--method", default="combined", choices=METHODS)
    f.add_argument("--threshold", type=float)
    f.add_argument("--csv")
    c = sub.add_parser("calibrate", help="measure recall / false links and propose thresholds")
    c.add_argument("busi")
    c.add_argument("busbra")
    c.add_argument("--sources", type=int, default=150)
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
            out = calibrate(a.busi, a.busbra, a.sources, a.seed)
            if a.json:
                from ..io import atomic_write_text
                atomic_write_text(a.json, json.dumps(out, indent=1))
    except SonocadError as e:
        print(f"error: {e}")
        return 2
    print(json.dumps({k: v for k, v in out.items() if not k.startswith("all_")}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
