"""The on-disk image cache: built once, reused, rebuilt when an image changes, and trained from a batch at a time."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from sonocad.data import discover, load_many
from sonocad.data.cache import DiskImages, cached_images
from sonocad.data.synth import write_phantom_set
from sonocad.errors import SonocadError


@pytest.fixture
def small_set(tmp_path):
    write_phantom_set(tmp_path / "data", n=24, seed=5, size=72)
    return tmp_path / "data", [s.path for s in discover(tmp_path / "data")]


def test_cache_is_built_reused_and_rebuilt(small_set, tmp_path):
    root, paths = small_set
    images, good, problems = cached_images(paths, 48, folder=tmp_path / "c")
    data = next((tmp_path / "c").glob("*.u8"))
    built = data.stat().st_mtime_ns
    want, _, _ = load_many(paths, 48)
    assert isinstance(images, DiskImages) and images.shape == want.shape and good == list(range(len(paths)))
    assert np.array_equal(np.asarray(images), want)
    view = images[[5, 2, 9]][1:]                       # views of views read only what they index
    assert np.array_equal(np.asarray(view), want[[2, 9]]) and np.array_equal(images[7], want[7])
    cached_images(paths, 48, folder=tmp_path / "c")
    assert data.stat().st_mtime_ns == built            # reused: the same files and settings
    Image.fromarray(np.full((72, 72), 200, np.uint8)).save(paths[3])
    os.utime(paths[3], ns=(built + 10**9, built + 10**9))
    again, _, _ = cached_images(paths, 48, folder=tmp_path / "c")
    assert data.stat().st_mtime_ns != built            # one image changed: rebuilt
    assert np.asarray(again[3]).min() > 100 and np.array_equal(again[4], want[4])
    other, _, _ = cached_images(paths, 40, folder=tmp_path / "c")      # another geometry: a file of its own
    assert other.shape[-1] == 40 and len(list((tmp_path / "c").glob("*.u8"))) == 2


def test_bad_images_in_the_cache(small_set, tmp_path):
    root, paths = small_set
    bad = root / "benign" / "broken.png"
    bad.write_bytes(b"not a png")
    paths = paths + [str(bad)]
    with pytest.raises(SonocadError, match="broken.png"):
        cached_images(paths, 48, folder=tmp_path / "c")
    images, good, problems = cached_images(paths, 48, skip_bad=True, folder=tmp_path / "c")
    assert len(images) == len(paths) - 1 and len(problems) == 1 and len(paths) - 1 not in good
    with pytest.raises(SonocadError, match="broken.png"):      # a cache built with --skip-bad, read without it
        cached_images(paths, 48, folder=tmp_path / "c")


def test_training_from_the_disk_cache_reads_a_batch_at_a_time(tmp_path, monkeypatch):
    """Images on disk are never read all at once, and the run equals the in-memory one."""
    from sonocad.workflows.train import fit

    write_phantom_set(tmp_path / "data", n=40, seed=2, size=64)
    monkeypatch.setenv("SONOCAD_CACHE", str(tmp_path / "cache"))
    largest = []
    read = DiskImages._read

    def bounded(self, rows):
        assert len(rows) <= 64, f"{len(rows)} images read at once"
        largest.append(len(rows))
        return read(self, rows)

    monkeypatch.setattr(DiskImages, "_read", bounded)
    args = dict(img_size=48, head_epochs=2, finetune_epochs=2, batch_size=8, seed=0, dedup=False, progress=False,
                cache_features=False)
    disk = fit(tmp_path / "data", tmp_path / "disk", image_cache="disk", **args)
    memory = fit(tmp_path / "data", tmp_path / "memory", image_cache="memory", **args)
    assert largest and max(largest) <= 64
    assert disk["auc"] == memory["auc"]
    assert (tmp_path / "disk" / "predictions.csv").read_text() == (tmp_path / "memory" / "predictions.csv").read_text()
    assert json.loads((tmp_path / "disk" / "config.json").read_text())["config"]["image_cache"] == "disk"
