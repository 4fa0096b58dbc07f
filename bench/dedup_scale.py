"""Time and peak memory of the duplicate search at 10^3, 10^4 and 10^5 synthetic images, with the recall of
planted copies, for the indexed search (HNSW neighbours and hash buckets) and, where it is feasible, the
all-pairs one (the measurement behind docs/dedup.md, "Scaling").

A set of n images holds n - n // 10 phantoms (`sonocad.data.synth.make_phantom`, generated at --image-size
px and cached as .npy under --cache) and n // 10 planted copies of the first phantoms
(`sonocad.dedup.plant_copy`, kinds in turn). Each search runs in a child process of its own, so that its
peak RSS is its own: "indexed" (DedupSettings.exact_below = 0) and, up to --all-pairs-up-to images,
"all pairs" (exact_below above n: every search compares all pairs, as before the index existed). Recall:
the share of copies grouped with their original; false links: linked pairs of different phantoms.

    .venv/bin/python bench/dedup_scale.py --sizes 1000 10000 100000 --json scale.json
    .venv/bin/python bench/dedup_scale.py --smoke       # 40 phantoms of 32 px, both searches
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from harness import ROOT, Bench  # noqa: E402  (bench/ is on sys.path when a script runs)

COPY_EVERY = 10   # one image in ten is a planted copy
SMOKE = {"sizes": [40], "all_pairs_up_to": 40, "image_size": 32, "embed_size": 32, "thumb": 32, "scales": 2,
         "threads": 1, "batch": 40}


def phantoms(n: int, size: int, cache: Path) -> np.ndarray:
    """The first n phantoms (labels in turn, seed = index) of `size` px, from the cache, generating and
    adding the ones it lacks."""
    from sonocad.data.synth import make_phantom

    path = cache / f"phantoms_{size}px.npy"
    have = np.load(path, mmap_mode="r") if path.exists() else np.zeros((0, size, size), np.uint8)
    if len(have) < n:
        new = [make_phantom(("benign", "malignant", "normal")[i % 3], np.random.default_rng(i), size=size)[0]
               for i in range(len(have), n)]
        have = np.concatenate([have, np.array(new, np.uint8).reshape(-1, size, size)])
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cache / "partial.npy", have)
        os.replace(cache / "partial.npy", path)
    return have[:n]


def synthetic_set(n: int, size: int, cache: Path) -> tuple[list, np.ndarray, list[str]]:
    """n images (phantoms, then planted copies of the first of them), each one's phantom, each copy's kind."""
    from PIL import Image

    from sonocad.dedup import PLANT_KINDS, plant_copy

    c = n // COPY_EVERY
    orig = phantoms(n - c, size, cache)
    kinds = [PLANT_KINDS[i % len(PLANT_KINDS)] for i in range(c)]
    copies = [np.asarray(plant_copy(Image.fromarray(orig[i]), kinds[i], np.random.default_rng([0, i])))
              for i in range(c)]
    return list(orig) + copies, np.r_[np.arange(n - c), np.arange(c)], kinds


def timed(module, name: str, spent: dict):
    """Replace module.name by a wrapper that adds its wall time to spent[name]; returns what puts it back."""
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
    setattr(module, name, wrapper)
    return lambda: setattr(module, name, inner)


def peak_rss_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def compare_ann(x: np.ndarray, k: int, settings, queries: int = 1000) -> dict:
    """Build and search time of faiss's and hnswlib's HNSW (same links, build and search lists) on the
    rows `index.AnnIndex` graphs (projected as it does), and their recall of the exact k nearest of a
    sample of rows."""
    import faiss

    from sonocad.dedup.index import HNSW_BUILD_EF, HNSW_LINKS, main_directions

    project = main_directions(x)
    p = np.ascontiguousarray(x if project is None else x @ project)
    sample = np.linspace(0, len(p) - 1, min(queries, len(p))).astype(int)
    sims = p[sample] @ p.T
    sims[np.arange(len(sample)), sample] = -np.inf
    exact = np.argpartition(-sims, k, axis=1)[:, :k]
    want, out, libs = 2 * k + 1, {}, {"faiss": faiss}
    try:
        import hnswlib
        libs["hnswlib"] = hnswlib
    except ImportError:
        out["hnswlib"] = "not installed"
    for lib in libs:   # built in one thread (as sonocad does, for a reproducible graph), searched in all
        t = time.perf_counter()
        if lib == "faiss":
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            g = faiss.IndexHNSWFlat(p.shape[1], HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
            g.hnsw.efConstruction = HNSW_BUILD_EF
            g.add(p)
            faiss.omp_set_num_threads(threads)
            g.hnsw.efSearch = max(settings.ann_ef, want)
        else:
            g = hnswlib.Index(space="ip", dim=p.shape[1])
            g.init_index(len(p), ef_construction=HNSW_BUILD_EF, M=HNSW_LINKS)
            g.add_items(p, num_threads=1)
            g.set_ef(max(settings.ann_ef, want))
        build = time.perf_counter() - t
        t = time.perf_counter()
        found = g.search(p, want)[1] if lib == "faiss" else g.knn_query(p, want)[0]
        search = time.perf_counter() - t
        recall = np.mean([len(set(e) & set(f)) / k for e, f in zip(exact, found[sample])])
        out[lib] = {"build_s": round(build, 2), "search_s": round(search, 2), "recall": round(float(recall), 4)}
    return out


def child(job: dict) -> dict:
    """One search (the job's size, method and settings) in this process; its figures."""
    import torch

    torch.set_num_threads(job["threads"])
    import sonocad.dedup.embed
    import sonocad.dedup.group
    from sonocad.dedup import PLANT_KINDS, DedupSettings, compute_features, group_features

    settings = DedupSettings(**job["settings"])
    t = time.perf_counter()
    images, origin, kinds = synthetic_set(job["n"], job["image_size"], Path(job["cache"]))
    spent = {"plant": time.perf_counter() - t}
    rss_before = peak_rss_gib()
    restore = [timed(sonocad.dedup.embed, "embed_images", spent)]
    restore += [timed(sonocad.dedup.group, name, spent) for name in ("candidate_pairs", "match_scores", "phash_pairs")]
    try:
        t = time.perf_counter()
        feats = compute_features(images, settings, batch_size=job["batch"])
        spent["features"] = time.perf_counter() - t
        res = group_features(feats, None, settings)
        spent["search"] = time.perf_counter() - t - spent["features"]
    finally:
        for undo in restore:
            undo()
    spent["total"] = time.perf_counter() - t
    n, c = len(images), len(kinds)
    grouped = np.array([res.group[n - c + i] == res.group[i] for i in range(c)])
    linked = np.array([(i, j) for i, j, *_ in res.pairs], np.int64).reshape(-1, 2)
    np.save(job["pairs"], linked)
    direct = {(i, j) for i, j in linked.tolist()}
    false = [kind for i, j, _, kind in res.pairs if origin[i] != origin[j]]
    out = {"n": n, "method": job["method"], "seconds": {k: round(v, 1) for k, v in spent.items()},
           "peak_rss_gib": round(peak_rss_gib(), 2), "rss_before_search_gib": round(rss_before, 2),
           "recall": round(float(grouped.mean()), 4) if c else None,
           "pair_recall": round(float(np.mean([(i, n - c + i) in direct for i in range(c)])), 4) if c else None,
           "recall_by_kind": {k: round(float(grouped[[x == k for x in kinds]].mean()), 3) for k in PLANT_KINDS},
           "false_links": len(false), "false_links_by_kind": {k: false.count(k) for k in sorted(set(false))},
           "links": len(linked),
           "groups": len(res.groups), "largest_group": max(map(len, res.groups), default=0),
           "load_avg": round(os.getloadavg()[0], 1)}
    if job.get("compare_ann"):
        out["ann"] = compare_ann(feats.embedding, settings.neighbours, settings)
    return out


def run_child(job: dict) -> dict:
    if job["in_process"]:        # smoke runs: no process of its own (its peak RSS is then not its own)
        return child(job)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               **{v: str(job["threads"]) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the {job['method']} search of {job['n']} images failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(r: dict) -> str:
    s = r["seconds"]
    embed = s.get("embed_images", 0.0)
    return (f"{r['n']:>7} {r['method']:<9} {s['total']:>7.1f} {s['features'] - embed:>7.1f} {embed:>7.1f} "
            f"{s.get('candidate_pairs', 0):>7.1f} {s.get('phash_pairs', 0):>6.1f} {s.get('match_scores', 0):>7.1f} "
            f"{r['peak_rss_gib']:>6.2f} {r['recall']:>7.3f} {r['pair_recall']:>6.3f} {r['false_links']:>6} {r['links']:>7} "
            f"{r.get('same_links', ''):>6}")


def add_arguments(ap) -> None:
    import argparse

    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--all-pairs-up-to", type=int, default=10000, help="largest size also searched by all pairs")
    ap.add_argument("--image-size", type=int, default=64, help="phantom side (px)")
    ap.add_argument("--embed-size", type=int, default=40, help="DedupSettings.embed_size")
    ap.add_argument("--thumb", type=int, default=48, help="DedupSettings.thumb")
    ap.add_argument("--neighbours", type=int, default=3, help="DedupSettings.neighbours")
    ap.add_argument("--scales", type=int, default=4, help="template scales, 1.0 down to 0.66 (geometric)")
    ap.add_argument("--default-settings", action="store_true", help="DedupSettings() instead of the above")
    ap.add_argument("--batch", type=int, default=128, help="embedding batch size")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch, BLAS and OpenMP threads")
    ap.add_argument("--compare-ann", action="store_true", help="time faiss and hnswlib (if installed) too")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "sonocad" / "dedup_scale"))


def main(argv=None) -> int:
    if argv is None and "--child" in sys.argv:          # one search, in a process of its own
        print(json.dumps(child(json.loads(sys.argv[sys.argv.index("--child") + 1]))))
        return 0
    bench = Bench.start("dedup_scale", __doc__, argv, add_arguments)
    a = bench.args
    if bench.smoke:
        vars(a).update(SMOKE, cache=str(bench.tmp() / "cache"))
    settings = {} if a.default_settings else {
        "embed_size": a.embed_size, "thumb": a.thumb, "neighbours": a.neighbours,
        "scales": [round(float(s), 4) for s in 0.66 ** (np.arange(a.scales) / max(1, a.scales - 1))]}
    print(f"load average {os.getloadavg()[0]:.1f}; threads {a.threads}")
    print(f"settings: {settings or 'DedupSettings()'}; phantoms of {a.image_size} px; one image in "
          f"{COPY_EVERY} a planted copy")
    report = {"runs": [], "generate_s": {}}
    header = (f"{'images':>7} {'search':<9} {'total s':>7} {'decode':>7} {'embed':>7} {'cands':>7} {'phash':>6} "
              f"{'match':>7} {'RSS GiB':>6} {'recall':>7} {'pairs':>6} {'false':>6} {'links':>7} {'same':>6}")
    print(header)
    for n in a.sizes:
        t = time.perf_counter()
        phantoms(n - n // COPY_EVERY, a.image_size, Path(a.cache))
        report["generate_s"][n] = round(time.perf_counter() - t, 1)
        found = {}
        for method in ("indexed", "all pairs") if n <= a.all_pairs_up_to else ("indexed",):
            job = {"n": n, "method": method, "image_size": a.image_size, "cache": a.cache, "batch": a.batch,
                   "threads": a.threads, "pairs": str(Path(a.cache) / f"links_{n}_{method[0]}.npy"),
                   "settings": dict(settings, exact_below=0 if method == "indexed" else n + 1),
                   "compare_ann": a.compare_ann and method == "indexed", "in_process": bench.smoke}
            r = run_child(job)
            found[method] = {tuple(p) for p in np.load(job["pairs"]).tolist()}
            if method == "all pairs":
                r["same_links"] = len(found["indexed"] & found[method])
            report["runs"].append(r)
            print(row(r), flush=True)
            if "ann" in r:
                print(f"        HNSW libraries on the {n} embeddings: {r['ann']}")
    print("seconds: decode = decoding, hashes, thumbnails; embed = CNN embeddings (images and central views); "
          "cands = neighbour search; phash = pHash pairs; match = cross-correlation. recall: copies grouped "
          "with their original; pairs: copies linked to it directly; same: links also found by the indexed search")
    print(f"phantoms generated (s, cached for later runs): {report['generate_s']}")
    summary = {f"{r['n']}_{r['method'].replace(' ', '_')}_{k}": v for r in report["runs"]
               for k, v in (("seconds", r["seconds"]["total"]), ("recall", r["recall"]), ("false_links", r["false_links"]))}
    return bench.finish(summary, report)


if __name__ == "__main__":
    raise SystemExit(main())
