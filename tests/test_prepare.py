"""Data preparation shared by train and cv: duplicate groups (cached), merged groups, input geometry,
and the phase-2 schedule."""
import json
import math
import os

import numpy as np
import pytest
import torch

from sonocad.dedup import DedupSettings
from sonocad.training import prepare


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SONOCAD_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_find(paths, settings=None, progress=False):
        from sonocad.dedup import link

        calls.append(settings)
        return link(len(paths), [(0, 1, 1.0, "exact")])

    monkeypatch.setattr("sonocad.dedup.find_duplicates", fake_find)
    return calls


def test_duplicate_search_is_cached_and_invalidated(phantoms, cache):
    paths = [str(p) for p in sorted((phantoms / "benign").glob("*).png"))[:4]]
    group, n = prepare.cached_duplicates(paths)
    assert n == 1 and group[0] == group[1] != group[2] and len(cache) == 1
    assert prepare.cached_duplicates(paths) == (group, n) and len(cache) == 1        # hit
    assert prepare.cached_duplicates(paths, settings=DedupSettings(neighbours=5))[1] == 1
    assert len(cache) == 2 and cache[-1].neighbours == 5                             # another setting: a new search
    os.utime(paths[2], ns=(1, 1))                                                    # a file changed
    prepare.cached_duplicates(paths)
    assert len(cache) == 3


def test_cache_key_covers_every_setting(phantoms):
    import dataclasses

    paths = [str(p) for p in sorted((phantoms / "benign").glob("*).png"))[:2]]
    base = prepare.dedup_cache_key(paths, DedupSettings())
    assert base == prepare.dedup_cache_key(paths, DedupSettings())
    for f in dataclasses.fields(DedupSettings):
        value = getattr(DedupSettings(), f.name)
        if isinstance(value, str):
            continue        # method and model names: the fingerprint test in test_dedup covers them
        changed = tuple(v * 0.99 for v in value) if isinstance(value, tuple) else value + 1
        try:
            other = dataclasses.replace(DedupSettings(), **{f.name: changed})
        except Exception:
            continue        # not a valid value of that setting
        assert prepare.dedup_cache_key(paths, other) != base, f.name


def test_merge_groups_joins_transitively():
    a = ["p1", "p1", None, "p2", None, "p3"]
    b = [None, "d1", "d1", "d2", "d2", None]
    merged = prepare.merge_groups(a, b)
    assert merged[0] == merged[1] == merged[2]               # p1 joins 0-1, d1 joins 1-2
    assert merged[3] == merged[4] != merged[0]               # p2 and d2
    assert len({merged[0], merged[3], merged[5]}) == 3


def test_input_config_builds_no_model():
    from sonocad.models.classifier import input_config

    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert input_config("tf_efficientnet_lite0") == (224, [0.5] * 3, [0.5] * 3)
    assert input_config("resnet18", 96)[0] == 96
    assert torch.equal(torch.get_rng_state(), state)        # no weights were drawn
    with pytest.raises(prepare.SonocadError, match="^model: unknown model"):
        input_config("no_such_net")


@pytest.mark.parametrize("per_epoch,epochs", [(10, 12), (3, 1), (1, 3), (17, 12), (9, 1)])
def test_warmup_cosine_schedule(per_epoch, epochs):
    """Linear warm-up, factor (k+1)/(w+1) at step k, then cosine to 0 at the last step."""
    from sonocad.training.optim import warmup_cosine

    total = epochs * per_epoch
    warmup = min(per_epoch, total // 10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = warmup_cosine(opt, warmup, total)
    for k in range(total):
        want = (k + 1) / (warmup + 1) if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        assert opt.param_groups[0]["lr"] == pytest.approx(2e-4 * want, rel=1e-9, abs=1e-15), k
        opt.step()
        sched.step()


def test_prepare_data_groups_duplicates_with_patients(tmp_path, cache):
    from PIL import Image

    from sonocad.config import TrainConfig

    rng = np.random.default_rng(0)
    rows = ["path,label,group"]
    for i in range(12):
        label = "benign" if i % 2 else "malignant"
        Image.fromarray(rng.integers(0, 255, (40, 40), np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{label},{'p' + str(i // 4) if i < 4 else ''}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    prepared = prepare.prepare_data(tmp_path / "m.csv", TrainConfig(img_size=32))
    g = prepared.full.groups
    assert g[0] == g[1] == g[2] == g[3]           # patient p0 (and the fake duplicate pair 0-1)
    assert len(set(g[4:].tolist())) == 8 and prepared.n_duplicate_sets == 1
    assert prepare.grouping(prepared) == ("group column / patient ids; duplicate groups found by sonocad dedup "
                                          "(1 set of 2+ images)")     # what the run's data summary says
    assert prepared.classes == ["benign", "malignant"] and prepared.full.images.shape == (12, 32, 32)
    assert json.dumps(prepared.bad) == "[]"
