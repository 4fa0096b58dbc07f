"""Do BUSI and BUS-BRA decode to the same bytes as before a change to image reading?

Decodes every `--every`-th image of both datasets as training does (gray, overlays cleaned, letterboxed to
224 px; and `resize stretch`), and its lesion masks, and prints one SHA-256 over all of them plus one per
dataset. Run it before and after a change (e.g. with `git stash`): equal digests mean byte-identical decodes.

    .venv/bin/python bench/decode_digest.py              # every image (about 1,500)
    .venv/bin/python bench/decode_digest.py --every 5
    .venv/bin/python bench/decode_digest.py --smoke     # a few phantoms (the test suite)
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from harness import BUSBRA, BUSI, Bench, phantoms  # noqa: E402  (bench/ on sys.path)

from sonocad.data import discover  # noqa: E402
from sonocad.data.images import load_gray, load_mask, load_square  # noqa: E402


def digest(samples, every: int) -> tuple[str, int]:
    h = hashlib.sha256()
    chosen = samples[::every]
    for s in chosen:
        gray = np.asarray(load_gray(s.path))
        h.update(gray.tobytes() + str(gray.shape).encode())
        h.update(load_square(s.path, 224, "pad", clean_overlays=True).tobytes())
        h.update(load_square(s.path, 224, "stretch", clean_overlays=True).tobytes())
        if s.masks:
            h.update(load_mask(s.masks, s.path, 224, "pad").tobytes())
    return h.hexdigest(), len(chosen)


def main(argv=None) -> int:
    bench = Bench.start("decode_digest", __doc__, argv, lambda p: p.add_argument(
        "--every", type=int, default=1, help="decode every N-th image (default: all)"))
    sets = {"phantoms": phantoms(bench.tmp() / "phantoms")} if bench.smoke else {"BUSI": BUSI, "BUS-BRA": BUSBRA}
    total, digests = hashlib.sha256(), {}
    for name, root in sets.items():
        if not root.is_dir():
            print(f"{name}: not found at {root} (../shared is absent)")
            continue
        d, n = digest(discover(root), bench.args.every)
        total.update(d.encode())
        digests[name] = d
        print(f"{name}: {n} images, sha256 {d}")
    return bench.finish({"sha256": total.hexdigest()}, details=digests)


if __name__ == "__main__":
    raise SystemExit(main())
