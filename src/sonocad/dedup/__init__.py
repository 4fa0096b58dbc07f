"""Find exact and near-duplicate images, so that a split can keep every copy of a scan on one side.

Every image is decoded to gray and its dark borders are trimmed. Three detectors score pairs:

* ``phash``: a 64-bit DCT perceptual hash; score = 1 - Hamming distance / 64, over all pairs (from
  `exact_below` images on, the pairs within the threshold are found through hash buckets).
  Catches exact, resized, re-compressed and overlay-edited copies; not crops or shifts.
* ``embed``: cosine similarity of ImageNet features of sonocad's default backbone
  (tf_efficientnet_lite0, ``model.forward_features``), over all pairs (from `exact_below` images on,
  through an HNSW index). Ultrasound images all look
  alike to an ImageNet network, so at a threshold that links no different patients it catches
  little more than pHash does; it is kept as an option.
* ``match``: candidate pairs (each image's 10 nearest neighbours by that embedding, by a
  mid-level one, and by the embedding of its central 75 % against the whole of the others; exact
  below `exact_below` images, from faiss HNSW indexes above) are
  verified by normalised cross-correlation of band-passed 64 px thumbnails, searching all
  translations and 10 scales (1.0 down to 0.63) of the central 80 % of one image inside the
  other, both ways; score = the best correlation. Catches crops, shifts and what pHash catches.
* ``combined`` (default): pHash or match links a pair.

Linked pairs are joined transitively into groups. The thresholds come from planted copies of real
BUSI images against pairs of images of different BUS-BRA patients (docs/dedup.md;
``python bench/dedup_calibrate.py BUSI BUSBRA`` repeats the measurement). Every setting that changes
the result is a field of `DedupSettings`; its `fingerprint()` keys caches of the groups.

Modules: `settings` (DedupSettings), `features` (trimming, hashes, thumbnails), `embed` (CNN
embeddings), `index` (neighbour and hash-bucket searches that scale), `match` (candidates and
cross-correlation), `group` (scoring, grouping, results), `plant` (synthetic copies for tests and
calibration).

>>> res = find_duplicates(paths, labels)                # doctest: +SKIP
>>> res.groups[:2], res.conflicts[:1]                   # doctest: +SKIP
([[12, 40], [101, 102, 377]], [[12, 40]])
>>> res.to_csv("groups.csv", paths, labels)             # doctest: +SKIP
>>> find_duplicates(paths, settings=DedupSettings(match_threshold=0.85))   # doctest: +SKIP
"""
from .embed import embed_images
from .features import Features, compute_features, phash, phash_similarity, thumbnail, trim_borders
from .group import DedupResult, find_duplicates, group_features, link, score_pairs, summarize
from .match import candidate_pairs, match_scores
from .plant import PLANT_KINDS, plant_copy
from .settings import DEFAULT, FORMAT_VERSION, METHODS, DedupSettings

__all__ = ["DEFAULT", "FORMAT_VERSION", "METHODS", "PLANT_KINDS", "DedupResult", "DedupSettings", "Features",
           "candidate_pairs", "compute_features", "embed_images", "find_duplicates", "group_features", "link",
           "match_scores", "phash", "phash_similarity", "plant_copy", "score_pairs", "summarize", "thumbnail",
           "trim_borders"]
