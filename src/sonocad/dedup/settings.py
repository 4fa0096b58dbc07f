"""DedupSettings: every setting that changes which images the duplicate search groups.

The settings are one frozen record so that a cache of duplicate groups can be keyed by all of them
(`DedupSettings.fingerprint`) and a new setting joins the key without anyone remembering to add it.

>>> s = DedupSettings.for_method("combined", threshold=0.85)
>>> s.match_threshold, s.phash_threshold == 55 / 64
(0.85, True)
>>> len(s.fingerprint())
64
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from dataclasses import dataclass

from ..errors import SonocadError

METHODS = ("phash", "embed", "match", "combined")
# Bump when the code changes what the same settings find, so that cached groups are recomputed.
FORMAT_VERSION = 2   # 2: match scores from integral images (same links on BUSI, scores within 2e-7)
# The detectors each method links on.
DETECTORS = {"phash": ("phash",), "embed": ("embed",), "match": ("match",), "combined": ("phash", "match")}
# Settings that only act after the per-image features are computed; all others shape the features.
_AFTER_FEATURES = ("method", "phash_threshold", "embed_threshold", "match_threshold",
                   "central", "scales", "neighbours", "exact_below", "ann_ef")


def _default_scales() -> tuple[float, ...]:
    # 0.95 ** k for k = 0..9 as numpy computes it (float64), so the values equal the earlier array's
    import numpy as np

    return tuple(float(s) for s in 0.95 ** np.arange(10))


@dataclass(frozen=True)
class DedupSettings:
    """How duplicates are found. Thresholds were chosen in docs/dedup.md from planted copies of BUSI
    images against pairs of images of different BUS-BRA patients."""

    method: str = "combined"          # phash, embed, match, or combined (pHash or match links a pair)
    phash_threshold: float = 55 / 64  # linking score of each detector
    embed_threshold: float = 0.98
    match_threshold: float = 0.80
    embed_model: str = "tf_efficientnet_lite0"   # timm backbone of the embeddings (ImageNet weights)
    embed_size: int = 224             # side of the letterboxed square it embeds
    thumb: int = 64                   # thumbnail side (longer side) for cross-correlation
    central: float = 0.8              # part of each side of an image used as the template
    blur: float = 1.0                 # Gaussian sigma (thumbnail px): speckle and resampling noise out
    highpass: float = 4.0             # minus a blur of this sigma: the shared bright-top/dark-bottom profile out
    scales: tuple[float, ...] = dataclasses.field(default_factory=_default_scales)   # template scales tried
    mid_block: int = 4                # backbone stage whose pooled output is the second candidate embedding
    view: float = 0.75                # central part embedded too, so heavy crops find their source
    neighbours: int = 10              # candidates per image and embedding for `match`
    exact_below: int = 10000          # fewer images: searches compare all pairs; more: HNSW index, hash buckets
    ann_ef: int = 32                  # candidate list of an HNSW search (faiss's efSearch)
    version: int = FORMAT_VERSION     # of the code's results; part of the fingerprint

    def __post_init__(self):
        def fail(name, what):
            raise SonocadError(f"{name} must be {what}, got {getattr(self, name)!r}")

        def number(name, ok, what):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not ok(v):
                fail(name, what)
            object.__setattr__(self, name, float(v))   # 1, 1.0 and numpy's 1.0: one fingerprint

        def integer(name, low):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                fail(name, f"a whole number of at least {low}")
            object.__setattr__(self, name, int(v))

        if self.method not in METHODS:
            raise SonocadError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("phash_threshold", "embed_threshold", "match_threshold"):
            number(name, lambda v: True, "a finite number")
        if not isinstance(self.embed_model, str) or not self.embed_model:
            fail("embed_model", "a timm model name")
        for name, low in (("embed_size", 32), ("thumb", 16), ("mid_block", 0), ("neighbours", 1), ("version", 0),
                          ("exact_below", 0), ("ann_ef", 1)):
            integer(name, low)
        for name in ("central", "view"):
            number(name, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
        number("blur", lambda v: v >= 0, "a Gaussian sigma of 0 or more")
        number("highpass", lambda v: v > 0, "a Gaussian sigma above 0")
        try:
            scales = tuple(float(s) for s in self.scales)
        except (TypeError, ValueError):
            fail("scales", "a non-empty sequence of numbers in (0, 1]")
        if not scales or not all(math.isfinite(s) and 0 < s <= 1 for s in scales):
            fail("scales", "a non-empty sequence of numbers in (0, 1]")
        object.__setattr__(self, "scales", scales)

    @classmethod
    def for_method(cls, method: str = "combined", threshold: float | None = None, **fields) -> DedupSettings:
        """Settings of `method`; `threshold` overrides its linking score (for "combined" the match one,
        pHash keeping its own), as `find_duplicates(method=..., threshold=...)` does."""
        s = cls(method=method, **fields)
        if threshold is None:
            return s
        return dataclasses.replace(s, **{f"{'match' if method == 'combined' else method}_threshold": threshold})

    @property
    def detectors(self) -> tuple[str, ...]:
        """The detectors whose scores link pairs under `method`."""
        return DETECTORS[self.method]

    @property
    def thresholds(self) -> dict[str, float]:
        """{detector: linking score} of all three detectors."""
        return {"phash": self.phash_threshold, "embed": self.embed_threshold, "match": self.match_threshold}

    def fingerprint(self) -> str:
        """Stable sha256 hex digest of every field: equal settings, equal digests; any change, another."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def same_features(self, other: DedupSettings) -> bool:
        """Whether per-image features computed under `other` are valid under these settings."""
        keep = {name: getattr(self, name) for name in _AFTER_FEATURES}
        return dataclasses.replace(other, **keep) == self


DEFAULT = DedupSettings()
