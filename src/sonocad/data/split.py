"""Stratified, grouped splits: a group (patient, lesion, duplicate set, site) never crosses a split."""
from __future__ import annotations

from collections import Counter

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ..errors import SonocadError


def group_ids(groups: list[str | None]) -> np.ndarray:
    """Integer group ids; samples without a group are each their own group."""
    ids, table = [], {}
    for i, g in enumerate(groups):
        key = ("g", g) if g is not None else ("i", i)
        ids.append(table.setdefault(key, len(table)))
    return np.asarray(ids)


def stratified_group_split(labels: list, groups: list[str | None], fraction: float, seed: int,
                           what: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, held_out) with about `fraction` held out, stratified by label and
    never separating a group."""
    labels = np.asarray(labels)
    counts = Counter(labels.tolist())
    # tiny datasets: fewer folds (a larger held-out fraction) so every class can appear on both sides
    n_splits = max(2, min(int(round(1.0 / fraction)), min(counts.values())))
    few = {c: n for c, n in counts.items() if n < 2}
    if few:
        raise SonocadError(f"cannot draw a {what} split: class(es) {', '.join(map(str, few))} have fewer "
                           "than 2 images")
    gid = group_ids(groups)
    if len(np.unique(gid)) < n_splits:
        raise SonocadError(f"cannot draw a {what} split: only {len(np.unique(gid))} independent groups")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest, held = next(splitter.split(np.zeros(len(labels)), labels, gid))
    missing = set(counts) - set(labels[held].tolist())
    if missing:
        raise SonocadError(f"cannot draw a {what} split holding every class (too few images of "
                           f"{', '.join(map(str, missing))})")
    return np.sort(rest), np.sort(held)


def undersample(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices keeping every minority-class sample and a random equal-sized subset of each other class."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    n = counts.min()
    keep = [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c in classes]
    return np.sort(np.concatenate(keep))
