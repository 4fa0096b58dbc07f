"""Duplicate finding: planted copies join their originals, distinct images stay apart, conflicts, CSV,
settings (validation, fingerprint, honoured), the indexed searches (same finds as all pairs, bounded memory)."""
import csv
import dataclasses
import math
import shutil

import numpy as np
import pytest
from conftest import BUSI, need
from PIL import Image, ImageDraw

from sonocad.data.synth import make_phantom
from sonocad.dedup import (
    DedupResult,
    DedupSettings,
    Features,
    candidate_pairs,
    compute_features,
    find_duplicates,
    group_features,
    link,
    phash_similarity,
    plant_copy,
)
from sonocad.dedup.index import hamming_pairs, phash_pairs, similar_pairs
from sonocad.errors import SonocadError

LABELS = ["benign", "malignant", "benign", "malignant", "normal", "benign"]


def _overlay(img: Image.Image) -> Image.Image:
    img = img.copy()
    d = ImageDraw.Draw(img)
    d.text((4, 4), "LT BREAST 2:00", fill=255)
    d.text((60, 110), "D1 1.2cm", fill=230)
    for x, y in ((40, 50), (90, 70)):
        d.line([(x - 4, y), (x + 4, y)], fill=255)
        d.line([(x, y - 4), (x, y + 4)], fill=255)
    return img


def _copies(img: Image.Image) -> dict[str, Image.Image]:
    w, h = img.size
    shifted = Image.new("L", img.size, 0)
    shifted.paste(img, (13, -11))
    return {
        "resized": img.resize((int(w * 1.4), int(h * 1.4)), Image.BILINEAR),
        "shrunk": img.resize((int(w * 0.75), int(h * 0.75)), Image.BILINEAR),
        "cropped": img.crop((9, 14, 9 + int(w * 0.82), 14 + int(h * 0.85))),
        "shifted": shifted,
        "overlay": _overlay(img),
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Six distinct phantoms, five copies of each of the first three, as files."""
    out = tmp_path_factory.mktemp("dedup")
    paths, labels, origin = [], [], []
    for i, label in enumerate(LABELS):
        img = Image.fromarray(make_phantom(label, np.random.default_rng(i), size=128)[0])
        p = out / f"orig{i}.png"
        img.save(p)
        paths.append(str(p)), labels.append(label), origin.append(i)
        if i < 3:
            for name, cp in _copies(img).items():
                p = out / f"copy{i}_{name}.png"
                cp.save(p)
                paths.append(str(p)), labels.append(label), origin.append(i)
            p = out / f"copy{i}_jpeg.jpg"
            img.save(p, quality=60)
            paths.append(str(p)), labels.append(label), origin.append(i)
    return paths, labels, origin


def test_planted_copies_join_their_originals(planted):
    paths, labels, origin = planted
    res = find_duplicates(paths, labels)
    first = {o: paths.index(next(p for p, q in zip(paths, origin) if q == o)) for o in set(origin)}
    for k, o in enumerate(origin):
        assert res.group[k] == res.group[first[o]], f"{paths[k]} not grouped with its original"
    assert len({res.group[first[o]] for o in first}) == len(first), "distinct images were merged"
    assert len(res.groups) == 3 and all(len(g) == 7 for g in res.groups)
    assert all(res.group[first[o]].startswith("img-") for o in (3, 4, 5))
    assert not res.conflicts
    for i, j, score, kind in res.pairs:
        assert origin[i] == origin[j] and i < j and 0 < score <= 1 and kind


def test_phash_alone_catches_resized_and_overlaid_copies(planted):
    paths, labels, origin = planted
    res = find_duplicates(paths, labels, method="phash")
    for name in ("resized", "shrunk", "overlay", "jpeg"):
        k = next(i for i, p in enumerate(paths) if f"copy0_{name}" in p)
        assert res.group[k] == res.group[0], name
    assert len({res.group[paths.index(p)] for p in paths if "orig" in p}) == 6


def test_copy_with_another_label_is_a_conflict(planted):
    paths, labels, origin = planted
    labels = list(labels)
    k = next(i for i, p in enumerate(paths) if "copy1_cropped" in p)
    labels[k] = "benign" if labels[k] != "benign" else "malignant"
    res = find_duplicates(paths, labels)
    assert len(res.conflicts) == 1
    assert k in res.conflicts[0] and origin.index(1) in res.conflicts[0]
    assert {origin[i] for i in res.conflicts[0]} == {1}


def test_to_csv_writes_path_group_label(planted, tmp_path):
    paths, labels, _ = planted
    res = link(len(paths), [(0, 1, 0.99, "match")], labels)
    out = tmp_path / "sub" / "groups.csv"
    res.to_csv(out, paths, labels)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "group", "label"]
    assert [r["path"] for r in rows] == paths and [r["label"] for r in rows] == labels
    assert rows[0]["group"] == rows[1]["group"] == "dup-0001"
    assert len({r["group"] for r in rows}) == len(paths) - 1
    assert not [p for p in out.parent.iterdir() if p.name != "groups.csv"]   # no temp file left
    with pytest.raises(SonocadError):
        res.to_csv(out, paths[:-1], labels)


def test_link_is_transitive_and_ids_are_stable():
    res = link(6, [(0, 3, 0.9, "phash"), (3, 5, 0.9, "match"), (1, 2, 1.0, "exact")], list("aabbab"))
    assert res.groups == [[0, 3, 5], [1, 2]]
    assert res.group == ["dup-0001", "dup-0002", "dup-0002", "dup-0001", "img-0004", "dup-0001"]
    assert res.conflicts == [[0, 3, 5], [1, 2]]
    assert link(0, []) == DedupResult([], [], [], [])


def test_bad_arguments(planted):
    paths, labels, _ = planted
    with pytest.raises(SonocadError, match="^method must be one of phash, embed, match, combined, got 'ssim'$"):
        find_duplicates(paths, method="ssim")
    with pytest.raises(SonocadError, match="labels"):
        find_duplicates(paths, labels[:-1])
    with pytest.raises(SonocadError, match="kind"):
        plant_copy(Image.new("L", (64, 64)), "rotate", np.random.default_rng(0))
    assert find_duplicates([]).group == []


@pytest.mark.parametrize("field, value", [
    ("method", "ssim"), ("phash_threshold", math.nan), ("match_threshold", "high"), ("embed_model", ""),
    ("embed_size", 8), ("thumb", 64.0), ("central", 0.0), ("view", 1.5), ("blur", -1.0), ("highpass", 0.0),
    ("scales", ()), ("scales", (1.0, 1.2)), ("mid_block", -1), ("neighbours", 0), ("version", True),
    ("exact_below", -1), ("ann_ef", 0), ("exact_below", 1.5)])
def test_impossible_settings_name_the_setting(field, value):
    with pytest.raises(SonocadError, match=f"^{field} must be") as e:
        DedupSettings(**{field: value})
    assert "\n" not in str(e.value)


def test_for_method_is_the_find_duplicates_shorthand():
    assert DedupSettings.for_method() == DedupSettings()
    s = DedupSettings.for_method("combined", 0.85)
    assert (s.method, s.match_threshold, s.phash_threshold) == ("combined", 0.85, 55 / 64)
    s = DedupSettings.for_method("phash", 0.9)
    assert (s.method, s.phash_threshold, s.match_threshold) == ("phash", 0.9, 0.80)
    assert DedupSettings.for_method("embed").thresholds == {"phash": 55 / 64, "embed": 0.98, "match": 0.80}


def test_fingerprint_covers_every_setting():
    base = DedupSettings()
    assert DedupSettings().fingerprint() == base.fingerprint()
    assert DedupSettings(central=1, scales=np.array([1, 0.5])).fingerprint() == \
        DedupSettings(central=1.0, scales=(1.0, 0.5)).fingerprint()   # numbers of another type: same settings
    other = {"method": "phash", "embed_model": "resnet18", "scales": base.scales[:-1]}
    seen = {base.fingerprint()}
    for f in dataclasses.fields(DedupSettings):   # a new numeric field needs no change here
        v = getattr(base, f.name)
        new = other[f.name] if f.name in other else v + 1 if isinstance(v, int) else v * 0.9
        changed = dataclasses.replace(base, **{f.name: new})
        assert changed != base and changed.fingerprint() not in seen, f.name
        seen.add(changed.fingerprint())
    assert all(len(fp) == 64 and int(fp, 16) >= 0 for fp in seen)


def test_find_duplicates_honours_its_settings(planted, tmp_path):
    paths, labels, origin = planted
    exact = tmp_path / "orig0_exact.png"
    shutil.copy(paths[0], exact)
    paths = [*paths, str(exact)]
    res = find_duplicates(paths)
    assert len(res.groups) == 3 and res.group[-1] == res.group[0]
    assert (0, len(paths) - 1, 1.0, "exact") in res.pairs
    # no score exceeds 1, so nothing is linked, not even the pixel-identical copy: "exact" only names
    # a pair that a detector linked
    strict = DedupSettings(phash_threshold=1.01, match_threshold=1.01)
    res = find_duplicates(paths, labels=[*labels, labels[0]], settings=strict)
    assert res.groups == [] and res.pairs == [] and all(g.startswith("img-") for g in res.group)
    # settings given win over the method/threshold shorthand
    assert find_duplicates(paths, method="phash", threshold=0.0, settings=strict).groups == []
    assert len(find_duplicates(paths, method="phash", threshold=0.0).groups) == 1


def test_busi_known_duplicates():
    """Copies in BUSI (an exact re-save, a crop, a copy filed under both classes) and unrelated images."""
    root = need(BUSI)
    names = ["benign/benign (1).png", "benign/benign (318).png",          # the same frame saved twice
             "benign/benign (62).png", "benign/benign (140).png",         # one is a crop of the other
             "benign/benign (333).png", "malignant/malignant (77).png",   # filed under both classes
             "benign/benign (10).png", "benign/benign (200).png", "malignant/malignant (30).png",
             "malignant/malignant (150).png", "normal/normal (70).png", "normal/normal (100).png"]
    paths = [str(root / n) for n in names]
    labels = [n.split("/")[0] for n in names]
    res = find_duplicates(paths, labels)
    assert res.groups == [[0, 1], [2, 3], [4, 5]]
    assert res.conflicts == [[4, 5]]


@pytest.fixture(scope="module")
def planted_features(planted):
    return compute_features(planted[0])


def test_indexed_search_finds_what_all_pairs_finds(planted, planted_features):
    """Below exact_below every search compares all pairs; at 0 the HNSW index and the hash buckets
    must find the same candidates, links and groups (twice: the index is rebuilt the same)."""
    paths, labels, _ = planted
    exact, indexed = DedupSettings(), DedupSettings(exact_below=0)
    assert len(paths) < exact.exact_below
    cands = candidate_pairs(planted_features, exact)
    for _ in range(2):
        np.testing.assert_array_equal(candidate_pairs(planted_features, indexed), cands)
    assert group_features(planted_features, labels, indexed) == group_features(planted_features, labels, exact)
    for th in (55 / 64, 40 / 64):
        for a, b in zip(phash_pairs(planted_features.hashes, th, exact),
                        phash_pairs(planted_features.hashes, th, indexed)):
            np.testing.assert_array_equal(a, b)
    a, b = (similar_pairs(planted_features.embedding, 0.9, s) for s in (exact, indexed))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)


def test_hash_buckets_find_every_pair_within_the_radius():
    rng = np.random.default_rng(0)
    hashes = rng.random((1500, 64)) < 0.5
    near = hashes[rng.integers(0, 1500, 500)] ^ (rng.random((500, 64)) < rng.uniform(0, 0.2, (500, 1)))
    hashes = np.concatenate([hashes, near, hashes[:3]])   # near copies and exact ones
    sim = phash_similarity(hashes, hashes)
    for radius in (0, 4, 9, 14):
        pairs, dist = hamming_pairs(hashes, radius)
        i, j = np.nonzero(np.triu(1 - sim <= radius / 64 + 1e-6, 1))
        np.testing.assert_array_equal(pairs, np.stack([i, j], 1))
        np.testing.assert_array_equal(dist, np.round((1 - sim[i, j]) * 64))


def test_no_search_builds_an_n_by_n_array():
    """5,000 images, at least exact_below: an N x N float32 matrix is 100 MB; every search stays under a
    quarter of it."""
    import tracemalloc

    n, rng = 5000, np.random.default_rng(0)
    rows = [rng.standard_normal((n, d)).astype(np.float32) for d in (136, 24, 136)]
    e, m, v = (r / np.linalg.norm(r, axis=1, keepdims=True) for r in rows)
    feats = Features([""] * n, rng.random((n, 64)) < 0.5, [], e, m, v)
    settings = DedupSettings(exact_below=n)
    tracemalloc.start()
    try:
        assert len(candidate_pairs(feats, settings)) >= n * settings.neighbours
        phash_pairs(feats.hashes, 0.8, settings)
        similar_pairs(feats.embedding, 0.5, settings)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < n * n, f"peak {peak / 2 ** 20:.0f} MiB"


def test_bad_search_sizes_are_one_line_errors(planted):
    for kw in ({"chunk": 0}, {"batch_size": 0}):
        with pytest.raises(SonocadError, match="must be") as e:
            compute_features(planted[0][:2], **kw)
        assert "\n" not in str(e.value)
