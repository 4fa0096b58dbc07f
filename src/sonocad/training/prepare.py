"""Data preparation shared by `fit` and `cross_validate`: discover -> decode -> duplicate groups -> splits.

>>> from sonocad.config import TrainConfig
>>> from sonocad.training.prepare import prepare_data, hold_out_test, split_train_val
>>> cfg = TrainConfig.from_recipe(classes=["benign", "malignant"])
>>> prepared = prepare_data("Dataset_BUSI_with_GT", cfg)          # doctest: +SKIP
>>> rest, test = hold_out_test(prepared.full, cfg)                 # doctest: +SKIP
>>> train, val = split_train_val(rest, cfg)                        # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig
from ..data import discover, load_many, resolve_classes, stratified_group_split, undersample
from ..data.augment import augment_batch
from ..data.cache import AUTO_DISK_BYTES, cached_images, cached_masks
from ..data.images import load_mask
from ..data.split import group_ids
from ..errors import SonocadError
from ..io.files import atomic_write_text
from ..models.classifier import input_config
from .datarecord import size_and_time


@dataclass
class Split:
    """Part of the data, decoded: uint8 images (N, S, S), class indices, and their samples."""

    images: np.ndarray
    y: np.ndarray
    samples: list
    groups: np.ndarray | None = None   # what must stay together in any split (see with_duplicate_groups)
    masks: np.ndarray | None = None    # bool (N, S, S) lesion masks, decoded like the images (lesion-aware training)
    known: np.ndarray | None = None    # bool (N,): which images' masks are known (the others get no mask loss)

    def take(self, idx) -> "Split":
        def part(a):
            return None if a is None else a[idx]

        return Split(self.images[idx], self.y[idx], [self.samples[i] for i in idx], part(self.groups),
                     part(self.masks), part(self.known))

    def split_groups(self) -> list:
        return list(self.groups) if self.groups is not None else split_groups(self.samples)

    def counts(self, classes: list[str]) -> dict[str, int]:
        return {c: int((self.y == i).sum()) for i, c in enumerate(classes)}


@dataclass
class Task:
    """What a dataset asks for before any image is decoded: its samples, classes and the backbone's
    input geometry."""

    samples: list
    classes: list[str]
    positive: str | None
    img_size: int
    mean: list[float]
    std: list[float]


@dataclass
class Prepared:
    """A dataset ready to split: every image decoded once and grouped (duplicates, patients)."""

    task: Task
    full: Split
    bad: list[str] = field(default_factory=list)     # one-line problems of images left out (skip_bad)
    n_duplicate_sets: int | str = "dedup off"

    @property
    def classes(self) -> list[str]:
        return self.task.classes

    @property
    def sites(self) -> list[str]:
        return [s.site or "" for s in self.full.samples]


def find_task(data, cfg: TrainConfig) -> Task:
    """Discover `data` (a folder, a CSV manifest or a list of them: sites) and resolve its classes."""
    img_size, mean, std = input_config(cfg.model, cfg.img_size)
    samples = discover(data, cfg.classes, frames=cfg.frames)
    classes, positive = resolve_classes(samples, cfg.classes, cfg.positive)
    if cfg.dedup:
        from ..dedup import DedupSettings
        from ..dedup.index import require_index

        require_index(len(samples), DedupSettings(), "; --no-dedup trains without the search")
    return Task(samples, classes, positive, img_size, mean, std)


def on_disk(cfg: TrainConfig, n: int, size: int) -> bool:
    """Whether decoded images go to the on-disk cache: asked for, or (auto) more than 2 GiB of them."""
    return cfg.image_cache == "disk" or (cfg.image_cache == "auto" and n * size * size > AUTO_DISK_BYTES)


def trains_mask_head(cfg: TrainConfig, samples: list) -> bool:
    """Lesion-aware training: a mask decoder is trained when cfg.seg_weight > 0 and some samples have masks."""
    return cfg.seg_weight > 0 and any(s.masks for s in samples)


def decode_task(task: Task, cfg: TrainConfig, progress: bool = False) -> Prepared:
    """Decode every image once (a bad one stops here, before any training, unless cfg.skip_bad) and
    group duplicates with patients."""
    full, bad = decode_split(task.samples, task.classes, cfg, task.img_size, "training")
    full, n_dup = with_duplicate_groups(full, cfg, progress)
    return Prepared(task, full, bad, n_dup if cfg.dedup else "dedup off")


def prepare_data(data, cfg: TrainConfig, progress: bool = False) -> Prepared:
    """find_task, then decode_task: the dataset decoded, grouped and ready to split."""
    return decode_task(find_task(data, cfg), cfg, progress)


def decode_split(samples, classes: list[str], cfg: TrainConfig, img_size: int, what: str) -> tuple[Split, list[str]]:
    """Decode every image once (a bad one raises SonocadError, unless cfg.skip_bad): into memory, or into the
    on-disk cache (cfg.image_cache) for data larger than memory."""
    paths = [s.path for s in samples]
    disk = on_disk(cfg, len(paths), img_size)
    if disk:
        images, good, bad = cached_images(paths, img_size, cfg.resize, cfg.skip_bad, cfg.clean_overlays)
    else:
        images, good, bad = load_many(paths, img_size, cfg.resize, cfg.skip_bad, clean_overlays=cfg.clean_overlays)
    samples = [samples[i] for i in good]
    if not samples:
        raise SonocadError(f"no readable images left in the {what} data")
    y = np.asarray([classes.index(s.label) for s in samples])
    masks = known = None
    if trains_mask_head(cfg, samples):
        masks, known, bad_masks = (cached_masks(samples, img_size, cfg.resize, cfg.skip_bad) if disk else
                                   decode_masks(samples, img_size, cfg.resize, cfg.skip_bad))
        bad = bad + bad_masks
    if what == "training":
        for c, name in enumerate(classes):
            if (y == c).sum() < 3:
                raise SonocadError(f"class {name!r} has {(y == c).sum()} usable image(s); at least 3 are "
                                   "needed (train, validation, test)")
    return Split(images, y, samples, masks=masks, known=known), bad


def decode_masks(samples, size: int, resize: str, skip_bad: bool = False,
                 threads: int = 2) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(bool masks (N, S, S) placed like their images, which are known, one-line problems of the bad ones): the
    union of each sample's mask files. A bad mask raises SonocadError, unless `skip_bad` (its image then trains
    without a mask loss)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(s):
        if not s.masks:
            return None, None
        try:
            return load_mask(s.masks, s.path, size, resize), None
        except SonocadError as e:
            if not skip_bad:
                raise
            return None, f"{e} (its image trains without a mask)"

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(one, samples))
    masks = np.zeros((len(samples), size, size), bool)
    for i, (m, _) in enumerate(results):
        if m is not None:
            masks[i] = m
    known = np.asarray([m is not None for m, _ in results], bool)
    return masks, known, [err for _, err in results if err]


def split_groups(samples) -> list[str | None]:
    """What must stay together in a split: the sample's group (patient, lesion, duplicate set) within
    its site."""
    return [f"{s.site}/{s.group}" if s.group is not None else None for s in samples]


def with_duplicate_groups(split: Split, cfg: TrainConfig, progress: bool = False) -> tuple[Split, int]:
    """`split` with its groups set: each sample's own group (patient, lesion) merged with the duplicate
    sets that sonocad dedup finds (when cfg.dedup), so copies of one scan never cross a split.
    Returns the split and the number of duplicate sets found."""
    groups = split_groups(split.samples)
    n_dup = 0
    if cfg.dedup:
        dup_group, n_dup = cached_duplicates([s.path for s in split.samples], progress)
        groups = merge_groups(groups, dup_group)
    return replace(split, groups=group_ids(groups)), n_dup


def dedup_cache_key(paths: list[str], settings) -> str:
    """Cache key of a duplicate search: every setting of the search (`settings.fingerprint()`), the precision
    its embeddings run at, and every file's name, size and modification time."""
    from ..models.infer import resolve_precision

    stats = [(p, *size_and_time(p)) for p in paths]
    # the embeddings run in bf16 where the CPU has it: a cache shared between machines must not mix them
    key = [settings.fingerprint(), resolve_precision("auto").name, stats]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]


def cache_dir() -> Path:
    """Where sonocad keeps what it can compute again: $SONOCAD_CACHE, default ~/.cache/sonocad."""
    return Path(os.environ.get("SONOCAD_CACHE", Path.home() / ".cache" / "sonocad"))


def cached_duplicates(paths: list[str], progress: bool = False, settings=None) -> tuple[list[str], int]:
    """sonocad dedup's group of every path and the number of duplicate sets, cached on disk (cache_dir())
    under dedup_cache_key, so repeated runs on one dataset do not search it again."""
    from ..dedup import DedupSettings, find_duplicates

    settings = settings or DedupSettings()
    cache = cache_dir() / "dedup" / f"{dedup_cache_key(paths, settings)}.json"
    try:
        found = json.loads(cache.read_text())
        return found["group"], found["n_groups"]
    except (OSError, ValueError, KeyError):
        pass
    res = find_duplicates(paths, settings=settings, progress=progress)
    try:
        atomic_write_text(cache, json.dumps({"group": res.group, "n_groups": len(res.groups)}))
    except OSError:
        pass   # an unwritable cache only costs time
    return res.group, len(res.groups)


def merge_groups(*groupings: list) -> list[int]:
    """Connected components of samples linked by sharing a (non-None) group in any grouping."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(groupings[0])
    rows, cols = [], []
    for grouping in groupings:
        first: dict = {}
        for i, g in enumerate(grouping):
            if g is not None:
                rows.append(first.setdefault(g, i))
                cols.append(i)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1].tolist()


def hold_out_test(full: Split, cfg: TrainConfig) -> tuple[Split, Split]:
    """(rest, test): a stratified, grouped test part of cfg.test_size."""
    rest, held = stratified_group_split(full.y, full.split_groups(), cfg.test_size, cfg.seed, "test")
    return full.take(rest), full.take(held)


def split_train_val(full: Split, cfg: TrainConfig) -> tuple[Split, Split]:
    """Stratified, grouped validation part; undersampling (if asked) applies to the training part only."""
    tr, va = stratified_group_split(full.y, full.split_groups(), cfg.val_size, cfg.seed + 1, "validation")
    train, val = full.take(tr), full.take(va)
    if cfg.balance == "undersample":
        train = train.take(undersample(train.y, cfg.seed))
    return train, val


def grouping(prepared: Prepared) -> str:
    """What keeps related images on one side of every split: patient ids, duplicate groups, or nothing."""
    parts = []
    if any(s.group for s in prepared.full.samples):
        parts.append("group column / patient ids")
    n = prepared.n_duplicate_sets
    if isinstance(n, int):
        parts.append(f"duplicate groups found by sonocad dedup ({n} set{'s' if n != 1 else ''} of 2+ images)" if n
                     else "sonocad dedup (no duplicates found)")
    return "; ".join(parts) or "image (no groups known)"


def data_summary(data, test_source: str, prepared: Prepared, train: Split, val: Split, test: Split,
                 bad: list[str] | None = None, offline_augment: int = 0) -> dict:
    """What a run was trained and tested on: sources, counts per part and class, grouping, images left out."""
    classes = prepared.classes
    return {
        "source": [str(d) for d in data] if isinstance(data, (list, tuple)) else str(data),
        "test_source": test_source,
        **{f"n_{name}": part.counts(classes) for name, part in (("train", train), ("val", val), ("test", test))},
        **({"n_train_with_offline_copies": {c: n * (offline_augment + 1) for c, n in train.counts(classes).items()}}
           if offline_augment else {}),
        "grouped_by": grouping(prepared),
        "skipped_bad_images": prepared.bad + (bad or []),
        "duplicate_sets_found": prepared.n_duplicate_sets,
    }


def offline_augment(split: Split, copies: int, seed: int, appearance: str = "standard") -> Split:
    """The notebook's offline augmentation: `copies` fixed transformed versions of every image, added."""
    if copies <= 0:
        return split
    gen = torch.Generator().manual_seed(seed + 7919)
    base = torch.from_numpy(np.asarray(split.images)).unsqueeze(1).float() / 255     # copies live in memory
    masks = None if split.masks is None else torch.from_numpy(np.asarray(split.masks, bool)).unsqueeze(1).float()
    images, warped = [np.asarray(split.images)], [None if split.masks is None else np.asarray(split.masks, bool)]
    for _ in range(copies):
        out = augment_batch(base, gen, masks=masks, appearance=appearance)
        x, m = out if masks is not None else (out, None)
        images.append((x * 255).round().to(torch.uint8).squeeze(1).numpy())
        warped.append(None if m is None else m.squeeze(1).numpy() > 0.5)
    return Split(np.concatenate(images), np.tile(split.y, copies + 1), split.samples * (copies + 1),
                 masks=None if masks is None else np.concatenate(warped),
                 known=None if split.known is None else np.tile(split.known, copies + 1))
