"""Scoring pairs with the detectors of a method, joining linked pairs into duplicate groups, and the
DedupResult with its CSV and summary."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import numpy as np

from ..errors import SonocadError
from .features import Features, compute_features
from .index import phash_pairs, require_index, similar_pairs
from .match import candidate_pairs, match_scores
from .settings import DEFAULT, DedupSettings


@dataclass
class DedupResult:
    """Duplicate groups of a list of images (indices refer to the input order)."""

    group: list[str]                                   # one id per image: dup-NNNN or img-NNNN
    groups: list[list[int]] = field(default_factory=list)      # sets with 2+ members
    pairs: list[tuple[int, int, float, str]] = field(default_factory=list)  # (i, j, score, kind)
    conflicts: list[list[int]] = field(default_factory=list)   # groups whose labels differ

    def to_csv(self, path, paths: list[str], labels: list[str] | None = None) -> None:
        """Write `path,group,label` rows (atomically), one per image."""
        from ..io.files import atomic_write_text

        if len(paths) != len(self.group) or (labels is not None and len(labels) != len(self.group)):
            raise SonocadError(f"to_csv: the result has {len(self.group)} images, got {len(paths)} "
                               f"paths and {len(labels) if labels is not None else 'no'} labels")
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "group", "label"])
        for k, (p, g) in enumerate(zip(paths, self.group)):
            w.writerow([p, g, labels[k] if labels is not None else ""])
        atomic_write_text(path, buf.getvalue())


def find_duplicates(paths: list[str], labels: list[str] | None = None, *, method: str = "combined",
                    threshold: float | None = None, settings: DedupSettings | None = None,
                    progress: bool = False) -> DedupResult:
    """Group exact and near-duplicate images of `paths` (see the package docstring).

    `settings`, when given, decides everything and `method` and `threshold` are not used. Otherwise
    `method` is "phash", "embed", "match" or "combined" (pHash or match links a pair), and `threshold`
    overrides the linking score of that method (for "combined" the match one; pHash keeps its own),
    as `DedupSettings.for_method` builds them. Unreadable images raise SonocadError."""
    if settings is None:
        settings = DedupSettings.for_method(method, threshold)
    if labels is not None and len(labels) != len(paths):
        raise SonocadError(f"got {len(paths)} paths but {len(labels)} labels")
    require_index(len(paths), settings)
    feats = compute_features(paths, settings, embed=settings.method != "phash", progress=progress)
    return group_features(feats, labels, settings, progress=progress)


def score_pairs(feats: Features, settings: DedupSettings = DEFAULT, progress: bool = False,
                cache: dict | None = None) -> dict[tuple[int, int], dict[str, float]]:
    """{(i, j): {detector: score}} for every pair i < j that some detector of `settings.method` links."""
    use, th = settings.detectors, settings.thresholds
    found: dict[tuple[int, int], dict[str, float]] = {}
    for det in ("phash", "embed"):
        if det in use:
            search = phash_pairs if det == "phash" else similar_pairs
            pairs, scores = search(feats.hashes if det == "phash" else feats.embedding, th[det] - 1e-6, settings)
            for (i, j), s in zip(pairs.tolist(), scores.tolist()):
                found.setdefault((i, j), {})[det] = s
    if "match" in use:
        pairs = candidate_pairs(feats, settings)
        for (i, j), s in zip(pairs, match_scores(feats, pairs, settings, progress, cache)):
            if s >= th["match"] - 1e-6:
                found.setdefault((int(i), int(j)), {})["match"] = float(s)
    return found


def group_features(feats: Features, labels: list[str] | None = None, settings: DedupSettings = DEFAULT, *,
                   progress: bool = False, cache: dict | None = None) -> DedupResult:
    """find_duplicates on computed features. Pixel-identical linked pairs are of kind "exact"."""
    if feats.settings is not None and not settings.same_features(feats.settings):
        raise SonocadError("group_features: the features were computed with other settings "
                           f"({feats.settings}) than given ({settings})")
    pairs = []
    for (i, j), hits in sorted(score_pairs(feats, settings, progress, cache).items()):
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


def summarize(res: DedupResult, paths: list[str], labels: list[str] | None = None, examples: int = 8) -> dict:
    """Counts of a DedupResult: groups, sizes, images in groups, conflicts, pair kinds, examples; the
    `all_*` entries list every group, conflict and pair by `folder/name`."""
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
