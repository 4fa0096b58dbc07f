"""Synthetic near-duplicates of an image (`plant_copy`): the copies a dataset can hold (re-saved,
resized, cropped, shifted, overlaid with console text and calipers, re-compressed), for tests and for
calibrating the duplicate search's thresholds (bench/dedup_calibrate.py)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import SonocadError

PLANT_KINDS = ("exact", "resize", "crop", "shift", "overlay", "jpeg", "combo")
# what ultrasound consoles write on a frame
_WORDS = ["LT BREAST", "RT BREAST", "LEFT BREAST", "RIGHT BREAST 10 O'CLOCK", "R 2:00 3CM FN",
          "D1 1.24 cm", "D2 0.87cm", "TRANS", "LONG", "RADIAL", "ANTI-RAD", "L 11H", "Dist 2.31 cm"]


def _draw_overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Text and caliper marks like those an ultrasound console burns into a saved frame."""
    img = img.copy()
    w, h = img.size
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        font = ImageFont.load_default(size=max(8, int(h * rng.uniform(0.03, 0.06))))
        d.text((int(rng.uniform(0.02, 0.6) * w), int(rng.uniform(0.02, 0.9) * h)),
               str(rng.choice(_WORDS)), fill=int(rng.integers(180, 256)), font=font)
    arm = max(3, int(min(w, h) * rng.uniform(0.015, 0.03)))
    width = 1 + int(min(w, h) > 400)
    marks = [(int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.8) * h))
             for _ in range(int(rng.integers(2, 5)))]
    for x, y in marks:
        d.line([(x - arm, y), (x + arm, y)], fill=255, width=width)
        d.line([(x, y - arm), (x, y + arm)], fill=255, width=width)
    (x0, y0), (x1, y1) = marks[:2]
    for t in np.linspace(0, 1, 24)[1:-1:2]:   # dotted measuring line between two calipers
        d.point((int(x0 + t * (x1 - x0)), int(y0 + t * (y1 - y0))), fill=230)
    return img


def plant_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A synthetic near-duplicate of `img` (made gray), one of PLANT_KINDS: "resize" scales by
    0.5-1.5x, "crop" keeps 70-95 % of each side, "shift" moves the frame by 5-15 % of each side
    (black fill, the far part lost), "overlay" draws text and calipers, "jpeg" re-compresses at
    quality 50-90, "combo" is resize + 80-95 % crop + overlay + jpeg."""
    if kind not in PLANT_KINDS:
        raise SonocadError(f"plant kind must be one of {', '.join(PLANT_KINDS)}, got {kind!r}")
    img = img.convert("L")
    if kind in ("resize", "combo"):
        s = rng.uniform(0.5, 1.5)
        img = img.resize((max(32, round(img.width * s)), max(32, round(img.height * s))), Image.BILINEAR)
    if kind in ("crop", "combo"):
        lo = 0.70 if kind == "crop" else 0.80
        cw, ch = round(img.width * rng.uniform(lo, 0.95)), round(img.height * rng.uniform(lo, 0.95))
        x0, y0 = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
        img = img.crop((x0, y0, x0 + cw, y0 + ch))
    if kind == "shift":
        dx = int(round(img.width * rng.uniform(0.05, 0.15) * rng.choice([-1, 1])))
        dy = int(round(img.height * rng.uniform(0.05, 0.15) * rng.choice([-1, 1])))
        canvas = Image.new("L", img.size, 0)
        canvas.paste(img, (dx, dy))
        img = canvas
    if kind in ("overlay", "combo"):
        img = _draw_overlay(img, rng)
    if kind in ("jpeg", "combo"):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(50, 91)))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("L")
    return img
