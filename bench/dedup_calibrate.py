"""Calibrate the duplicate search's thresholds: recall on planted copies against false links among
different patients, per detector (the measurement behind docs/dedup.md).

Every BUSI image gets one planted copy (`sonocad.dedup.plant_copy`, kinds in turn); the negatives are
pairs of BUS-BRA images of different patients. Prints a summary; --json writes the full report.

    .venv/bin/python bench/dedup_calibrate.py ../shared/data/busi/Dataset_BUSI_with_GT \\
        ../shared/data/busbra/BUSBRA --json calib.json
    .venv/bin/python bench/dedup_calibrate.py --smoke    # two stand-in sites of 32 phantoms, light settings
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from harness import Bench, fake_sites  # noqa: E402  (bench/ is on sys.path when a script runs)

from sonocad.data.discover import discover, read_busbra  # noqa: E402
from sonocad.data.images import load_gray  # noqa: E402
from sonocad.dedup import (  # noqa: E402
    DEFAULT,
    PLANT_KINDS,
    DedupSettings,
    Features,
    candidate_pairs,
    compute_features,
    group_features,
    link,
    match_scores,
    phash_similarity,
    plant_copy,
    summarize,
)
from sonocad.errors import SonocadError  # noqa: E402

# bus_0056-l and bus_0091-l are one frame with other calipers and text (checked by eye), so BUS-BRA
# cases 56 and 91 count as one patient: that pair is a duplicate, not a negative.
BUSBRA_SAME_PATIENT = {"busbra-91": "busbra-56"}


def calibrate(busi: str, busbra: str, seed: int = 0, progress: bool = True,
              settings: DedupSettings = DEFAULT) -> dict:
    """Recall on planted copies against false links among different patients, per detector.

    Every BUSI image gets one planted copy (kinds in turn). Pair recall: the share of planted pairs
    scoring at least the threshold; group recall: the share of copies grouped with their original
    when BUSI and the copies are deduplicated together (for match this includes finding the pair
    as a candidate). Negatives: all pairs of BUS-BRA images of different patients (for match, the
    candidate pairs, the only ones it scores), and for pHash and embed every BUSI x BUS-BRA pair.
    Proposed thresholds: pHash and embed, the lowest grid value above every negative; match, halfway
    between the highest negative and the 1st percentile of planted pairs. Then BUSI alone is grouped.
    `settings` gives everything but the thresholds (those are proposed here)."""
    t0 = time.perf_counter()
    busi_s = discover(busi)
    busi_paths, busi_labels = [s.path for s in busi_s], [s.label for s in busi_s]
    f_busi = compute_features(busi_paths, settings, progress=progress)
    t_busi = time.perf_counter() - t0
    bra_s = read_busbra(Path(busbra))
    f_bra = compute_features([s.path for s in bra_s], settings, progress=progress)
    bra_names = [Path(s.path).name for s in bra_s]
    case = np.array([BUSBRA_SAME_PATIENT.get(s.group, s.group) for s in bra_s])

    nb = len(busi_s)
    kinds = np.array([PLANT_KINDS[i % len(PLANT_KINDS)] for i in range(nb)])
    copies = (plant_copy(load_gray(p), str(k), np.random.default_rng([seed, i]))
              for i, (p, k) in enumerate(zip(busi_paths, kinds)))
    f_cp = compute_features(copies, settings, progress=progress)
    pool = Features(f_busi.digest + f_cp.digest, np.concatenate([f_busi.hashes, f_cp.hashes]),
                    f_busi.thumbs + f_cp.thumbs, np.concatenate([f_busi.embedding, f_cp.embedding]),
                    np.concatenate([f_busi.mid, f_cp.mid]), np.concatenate([f_busi.view, f_cp.view]), settings)
    cache: dict = {}   # match scores of pool pairs; BUSI alone uses the same indices

    iu = np.triu_indices(len(bra_s), 1)
    different = case[iu[0]] != case[iu[1]]
    neg = {"phash": phash_similarity(f_bra.hashes, f_bra.hashes)[iu][different],
           "embed": (f_bra.embedding @ f_bra.embedding.T)[iu][different]}
    neg_pairs = {d: np.stack([iu[0][different], iu[1][different]], 1) for d in neg}
    cross = {"phash": phash_similarity(f_busi.hashes, f_bra.hashes).ravel(),
             "embed": (f_busi.embedding @ f_bra.embedding.T).ravel()}
    bra_pairs = candidate_pairs(f_bra, settings)
    bra_match = match_scores(f_bra, bra_pairs, settings, progress)
    keep = case[bra_pairs[:, 0]] != case[bra_pairs[:, 1]]
    neg["match"], neg_pairs["match"] = bra_match[keep], bra_pairs[keep]

    planted = np.stack([np.arange(nb), nb + np.arange(nb)], 1)
    pos = {"phash": 1 - (f_busi.hashes != f_cp.hashes).mean(1),
           "embed": np.einsum("nd,nd->n", f_busi.embedding, f_cp.embedding),
           "match": match_scores(pool, planted, settings, cache=cache)}
    pool_pairs = candidate_pairs(pool, settings)
    pool_match = match_scores(pool, pool_pairs, settings, progress, cache)
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
    chosen = replace(settings, method="combined", **{f"{d}_threshold": t for d, t in proposed.items()})
    res = group_features(f_busi, busi_labels, chosen, cache=cache)
    report["busi"] = summarize(res, busi_paths, busi_labels)
    emb_only = group_features(f_busi, busi_labels, replace(chosen, method="embed"))
    linked = {(i, j) for i, j, *_ in res.pairs}
    report["busi_embed_pairs_not_linked_by_combined"] = [
        (busi_paths[i], busi_paths[j], round(sc, 4)) for i, j, sc, _ in emb_only.pairs if (i, j) not in linked]
    report["busi_group_seconds_after_features"] = round(time.perf_counter() - t1, 1)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def add_arguments(ap) -> None:
    ap.add_argument("busi", nargs="?", help="BUSI folder (class folders)")
    ap.add_argument("busbra", nargs="?", help="BUS-BRA folder (bus_data.csv and Images/)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the planted copies")


def main(argv: list[str] | None = None) -> int:
    """`python bench/dedup_calibrate.py BUSI BUSBRA [--seed 0] [--json OUT]`."""
    bench = Bench.start("dedup_calibrate", __doc__, argv, add_arguments)
    a, settings = bench.args, DEFAULT
    if bench.smoke:
        root = fake_sites(bench.tmp())
        a.busi, a.busbra = str(root / "busi" / "Dataset_BUSI_with_GT"), str(root / "busbra" / "BUSBRA")
        settings = replace(DEFAULT, embed_size=32, thumb=32, scales=(1.0, 0.8), neighbours=3)
    elif not (a.busi and a.busbra):
        raise SystemExit("bench/dedup_calibrate.py: give the BUSI and BUS-BRA folders (or --smoke)")
    try:
        out = calibrate(a.busi, a.busbra, a.seed, progress=not bench.smoke, settings=settings)
    except SonocadError as e:
        print(f"error: {e}")
        return 2

    def brief(d):
        return {k: brief(v) if isinstance(v, dict) else v for k, v in d.items() if not str(k).startswith("all_")}

    print(json.dumps(brief(out), indent=1, default=str))
    return bench.finish({"proposed_" + d: t for d, t in out["proposed"].items()}, out)


if __name__ == "__main__":
    raise SystemExit(main())
