"""Synthetic B-mode breast-ultrasound phantoms, used as demo data and for fast tests.

Each phantom is simulated in the echo-amplitude domain:

1. a tissue reflectivity map: bright skin line, hypoechoic subcutaneous fat with
   lobules and Cooper's ligaments, brighter fibroglandular tissue, striated
   retromammary muscle, all with wavy layer boundaries and slowly varying texture;
2. a lesion drawn on that map, with margin, orientation and echogenicity taken
   from the BI-RADS descriptors of its class;
3. per-column cumulative attenuation, which by itself produces posterior
   enhancement (low-attenuating lesion) or shadowing (high-attenuating lesion),
   plus refraction edge shadows beside smooth lesions;
4. imperfect time-gain compensation with a focal-zone brightening;
5. fully developed speckle: complex Gaussian scatterers weighted by the
   reflectivity and blurred by an anisotropic point-spread function (wider
   laterally than axially), so the envelope is Rayleigh distributed;
6. log compression with a random dynamic range and gain to 8 bits.

Class cues: benign lesions are oval, circumscribed, wider than tall, hypo- or
anechoic, with posterior enhancement; malignant lesions are irregular or
spiculated, taller than wide, hypoechoic, with posterior shadowing. Each of
the three cues (orientation, margin, posterior feature) is independently
atypical in about one lesion in seven (round shape, a rougher or smoother
margin, little posterior change), so single cues overlap between the classes
while almost every image still carries most of its class signal. Label "normal"
(BUSI's third class) gives tissue without a lesion and an empty mask.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import SonocadError
from ..io.rundir import refuse_result_folder

CLASSES = ("benign", "malignant", "normal")
MIN_SIZE = 32
MAX_SIZE = 4096
_ATYPICAL_P = 0.15


def _noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    sd = float(n.std())
    return n / sd if sd > 0 else n


def _step(z: np.ndarray, edge, width: float) -> np.ndarray:
    """Smooth 0->1 transition of z across edge."""
    return 1.0 / (1.0 + np.exp(-(z - edge) / width))


def _tissue(rng: np.random.Generator, size: int) -> np.ndarray:
    """Reflectivity map of normal breast tissue (glandular level ~1)."""
    y = (np.arange(size) / size)[:, None]
    x = (np.arange(size) / size)[None, :]
    skin = rng.uniform(0.02, 0.04)
    d1 = rng.uniform(0.12, 0.26) + 0.03 * _noise(rng, size, size / 6)[None, :]
    d2 = rng.uniform(0.68, 0.88) + 0.03 * _noise(rng, size, size / 5)[None, :]

    fat = rng.uniform(0.2, 0.4) * np.exp(0.3 * _noise(rng, (size, size), (size / 22, size / 12)))
    gland = rng.uniform(0.8, 1.1) * np.exp(0.3 * _noise(rng, (size, size), (size / 45, size / 12)))
    period = rng.uniform(0.025, 0.05)
    slope = rng.uniform(-0.15, 0.15)
    deep = rng.uniform(0.35, 0.6) * (1 + 0.4 * np.sin(2 * np.pi * (y + slope * x) / period))
    skin_level = rng.uniform(1.4, 2.2)

    below_skin = _step(y, skin, 0.004)
    in_gland = _step(y, d1, 0.012)
    in_deep = _step(y, d2, 0.015)
    echo = skin_level * (1 - below_skin) + below_skin * (
        (1 - in_gland) * fat + in_gland * ((1 - in_deep) * gland + in_deep * deep)
    )

    # Cooper's ligaments: thin bright oblique bands crossing the fat layer.
    for _ in range(rng.integers(1, 4)):
        x0, s = rng.uniform(0.1, 0.9), rng.uniform(-1.2, 1.2)
        dist = np.abs(x - (x0 + s * (y - skin)))
        band = np.exp(-((dist / 0.006) ** 2)) * below_skin * (1 - in_gland)
        echo = echo + rng.uniform(0.4, 0.9) * band
    return np.clip(echo, 0.03, None)


def _lesion_params(label: str, rng: np.random.Generator) -> dict:
    """Random lesion description in image-fraction units."""
    def atypical() -> bool:
        return bool(rng.random() < _ATYPICAL_P)

    if label == "benign":
        a = rng.uniform(0.09, 0.19)  # horizontal semi-axis
        b = a * (rng.uniform(0.8, 1.05) if atypical() else rng.uniform(0.45, 0.75))
        p = dict(
            tilt=rng.normal(0, math.radians(10)),
            rough=rng.uniform(0.05, 0.1) if atypical() else rng.uniform(0.0, 0.03),
            lobes=rng.integers(2, 4),  # macrolobulation at most
            n_spicules=0,
            edge_px=rng.uniform(0.6, 1.0),
            level=rng.uniform(0.03, 0.1) if rng.random() < 0.5 else rng.uniform(0.15, 0.4),
            hetero=rng.uniform(0.05, 0.2),
            posterior=rng.uniform(0.9, 1.2) if atypical() else rng.uniform(1.6, 2.6),
            capsule=rng.uniform(0.3, 0.8),
            halo=0.0,
            edge_shadow=rng.uniform(0.01, 0.04),
        )
    else:
        b = rng.uniform(0.09, 0.19)  # vertical semi-axis
        a = b / (rng.uniform(0.8, 1.05) if atypical() else rng.uniform(1.05, 1.6))
        smooth_margin = atypical()
        p = dict(
            tilt=rng.normal(0, math.radians(12)),
            rough=rng.uniform(0.04, 0.09) if smooth_margin else rng.uniform(0.12, 0.25),
            lobes=rng.integers(5, 10),
            n_spicules=0 if smooth_margin or rng.random() < 0.3 else int(rng.integers(4, 13)),
            edge_px=rng.uniform(1.2, 2.5),
            level=rng.uniform(0.12, 0.35),
            hetero=rng.uniform(0.2, 0.4),
            posterior=rng.uniform(0.8, 1.1) if atypical() else rng.uniform(0.2, 0.55),
            capsule=0.0,
            halo=rng.uniform(0.3, 0.7) if rng.random() < 0.5 else 0.0,
            edge_shadow=0.0,
        )
    # Keep the lesion (with margin excursions) below the fat layer's top and inside the image,
    # leaving room below it for the posterior feature.
    ext_y = 1.3 * max(abs(a * math.sin(p["tilt"])), b) + 0.01
    ext_x = 1.3 * max(a, abs(b * math.sin(p["tilt"]))) + 0.01
    p.update(
        a=a,
        b=b,
        cy=rng.uniform(0.2 + ext_y, max(0.2 + ext_y, 0.72 - ext_y)),
        cx=rng.uniform(0.04 + ext_x, max(0.04 + ext_x, 0.96 - ext_x)),
    )
    return p


def _draw_lesion(echo: np.ndarray, p: dict, rng: np.random.Generator):
    """Put the lesion into echo; return (echo, mask bool, attenuation map per pixel)."""
    size = echo.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    dx, dy = xx - p["cx"] * size, yy - p["cy"] * size
    ct, st = math.cos(p["tilt"]), math.sin(p["tilt"])
    u, v = dx * ct + dy * st, -dx * st + dy * ct
    A, B = p["a"] * size, p["b"] * size
    rr = np.hypot(u / A, v / B)
    theta = np.arctan2(v / B, u / A)

    # Boundary radius R(theta): low-order harmonics give lobulation, higher ones angular margins.
    ks = np.arange(2, 2 + p["lobes"] + (8 if p["rough"] > 0.1 else 0))
    amps = rng.standard_normal(ks.size) / ks**0.6
    amps *= p["rough"] / max(float(np.sqrt(np.sum(amps**2))), 1e-9)
    phases = rng.uniform(0, 2 * np.pi, ks.size)
    R = 1 + np.sum(amps[:, None, None] * np.cos(ks[:, None, None] * theta + phases[:, None, None]), axis=0)

    r_px = math.sqrt(A * B)
    signed = (R - rr) * r_px  # ~ pixels inside the boundary (negative outside)
    soft = np.clip(0.5 + signed / (2 * p["edge_px"]), 0.0, 1.0)
    mask = signed > 0

    lesion = p["level"] * np.exp(p["hetero"] * _noise(rng, echo.shape, max(size / 64, 0.8)))
    out = echo * (1 - soft) + lesion * soft

    if p["halo"] > 0:  # echogenic rim of infiltrated tissue around malignant lesions
        out *= 1 + p["halo"] * np.exp(-(((-signed - 0.12 * r_px) / (0.1 * r_px)) ** 2)) * (signed < 0)
    if p["capsule"] > 0:  # specular echoes where the smooth wall faces the beam (top and bottom)
        gy = np.abs(ndimage.sobel(ndimage.gaussian_filter(soft, 0.7), axis=0))
        out += p["capsule"] * gy / max(float(gy.max()), 1e-9)

    for _ in range(p["n_spicules"]):
        ts, length = rng.uniform(-np.pi, np.pi), rng.uniform(0.3, 0.9)
        dth = np.angle(np.exp(1j * (theta - ts)))
        along = (rr - R) / length  # 0 at the boundary, 1 at the spicule tip
        lateral = rr * r_px * np.abs(np.sin(dth))
        width = rng.uniform(0.7, 1.3) * max(size / 128, 0.5) * (1 - 0.7 * np.clip(along, 0, 1))
        spic = np.exp(-((lateral / width) ** 2)) * (np.cos(dth) > 0) * (along > -0.1) * (along < 1)
        out *= 1 - rng.uniform(0.5, 0.8) * spic

    # Attenuation so that, below the thickest part, the round-trip amplitude factor is p["posterior"].
    thick = float(soft.sum(axis=0).max())
    alpha = soft * (-math.log(p["posterior"]) / (2 * max(thick, 1.0)))
    if p["edge_shadow"] > 0:  # refraction at steep lateral walls
        gx = np.abs(ndimage.sobel(ndimage.gaussian_filter(soft, 0.7), axis=1))
        alpha += p["edge_shadow"] * gx / max(float(gx.max()), 1e-9)
    return out, mask, alpha


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise SonocadError(f"size must be an integer, got {size!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise SonocadError(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    return int(size)


def _check_label(label) -> str:
    if label not in CLASSES:
        raise SonocadError(f"unknown phantom class {label!r}; expected one of {', '.join(CLASSES)}")
    return label


def make_phantom(label: str, rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: (uint8 grayscale image HxW, uint8 mask HxW with 255 inside the lesion).

    label is 'benign' or 'malignant' ('normal' gives no lesion and an all-zero mask).
    """
    label, size = _check_label(label), _check_size(size)
    s = size / 128  # physical scale: pixel sizes below are tuned for 128 px
    echo = _tissue(rng, size)
    mask = np.zeros((size, size), bool)
    alpha = np.zeros((size, size))
    if label != "normal":
        echo, mask, alpha = _draw_lesion(echo, _lesion_params(label, rng), rng)

    # Posterior change: cumulative round-trip attenuation along each beam (column), slightly
    # blurred laterally by the beam width. Each pixel sees half of its own attenuation.
    cum = np.cumsum(alpha, axis=0) - alpha / 2
    atten = np.exp(-2 * ndimage.gaussian_filter(cum, (0.5 * s, 1.2 * s)))

    # Imperfect TGC: residual depth slope, a wobble, and a focal-zone bump.
    depth = np.arange(size) / size
    log_gain = (
        -rng.uniform(-0.3, 1.0) * depth
        + 0.15 * _noise(rng, size, size / 8)
        + rng.uniform(0.1, 0.4) * np.exp(-(((depth - rng.uniform(0.3, 0.7)) / 0.12) ** 2))
    )
    amp = echo * atten * np.exp(log_gain)[:, None]

    # Speckle: complex Gaussian scatterers weighted by amplitude, blurred by the PSF. The
    # PSF is longer laterally than axially, so speckle cells are elongated laterally.
    psf = (rng.uniform(0.5, 0.8) * s, rng.uniform(1.3, 2.0) * s)
    field = amp * (rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size)))
    iq = ndimage.gaussian_filter(field.real, psf) + 1j * ndimage.gaussian_filter(field.imag, psf)
    env = np.abs(iq)
    noise_floor = rng.uniform(0.01, 0.04) * float(np.median(env))
    env = np.abs(iq + noise_floor * (rng.standard_normal(env.shape) + 1j * rng.standard_normal(env.shape)))

    # Log compression with random dynamic range (contrast) and gain (brightness).
    db = 20 * np.log10(env + 1e-12)
    top = float(np.percentile(db, 99.5)) + rng.uniform(0.0, 8.0)
    dyn = rng.uniform(45.0, 60.0)
    img = np.clip((db - (top - dyn)) / dyn, 0.0, 1.0) ** rng.uniform(0.9, 1.2)
    return np.round(img * 255).astype(np.uint8), (mask.astype(np.uint8) * 255)


def write_phantom_set(
    out_dir, n: int = 200, seed: int = 0, size: int = 128, classes=("benign", "malignant"), add: bool = False
) -> dict:
    """Write n phantoms in the BUSI layout: out_dir/<class>/<class> (i).png plus '<class> (i)_mask.png'.

    n is split as evenly as possible across classes (earlier classes get the remainder).
    Returns {"out": str(out_dir), "n": n, "n_per_class": {...}, "written": files written}. Same seed ->
    byte-identical files. A folder that already holds files is refused unless `add`; then phantoms are written
    beside them, and a file of a phantom's name is kept when it holds that phantom's bytes and refused (before
    anything is written) when it holds anything else: no file is ever written over.
    """
    if isinstance(classes, str):
        classes = (classes,)
    classes = tuple(classes)
    if not classes:
        raise SonocadError("classes must name at least one class")
    for c in classes:
        _check_label(c)
    if len(set(classes)) != len(classes):
        raise SonocadError(f"classes contains duplicates: {', '.join(classes)}")
    size = _check_size(size)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise SonocadError(f"n must be an integer, got {n!r}")
    if n < 2 * len(classes):
        raise SonocadError(f"n must be at least {2 * len(classes)} (two per class), got {n}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SonocadError(f"seed must be a non-negative integer, got {seed!r}")

    n, seed = int(n), int(seed)
    out = Path(out_dir)
    base, extra = divmod(n, len(classes))
    per_class = {c: base + (i < extra) for i, c in enumerate(classes)}
    jobs = [(c, i) for c, count in per_class.items() for i in range(1, count + 1)]
    written = 0
    refuse_result_folder(out)
    try:
        if out.is_dir() and any(out.iterdir()) and not add:
            raise SonocadError(f"{out} already holds files; choose an empty or new folder, or add phantoms beside "
                               "them with --add (no file is written over)")
        if out.exists() and not out.is_dir():
            raise SonocadError(f"cannot write phantoms to {out}: it is a file, not a folder")
        kept = {job for job in jobs if _check_existing(out, seed, size, *job)}
        for c, i in jobs:
            if (c, i) in kept:
                continue
            (out / c).mkdir(parents=True, exist_ok=True)
            for path, data in zip(_names(out, c, i), _phantom_png(c, seed, size, i)):
                if path.exists():                  # checked above: this phantom's own bytes
                    continue
                with open(path, "xb") as f:        # exclusive: never over a file that appeared meanwhile
                    f.write(data)
                written += 1
    except OSError as e:
        raise SonocadError(f"cannot write phantoms to {out}: {e.strerror or e}") from None
    return {"out": str(out), "n": n, "n_per_class": per_class, "written": written}


def _names(out: Path, c: str, i: int) -> tuple[Path, Path]:
    return out / c / f"{c} ({i}).png", out / c / f"{c} ({i})_mask.png"


def _phantom_png(c: str, seed: int, size: int, i: int) -> tuple[bytes, bytes]:
    """Phantom i of class c as PNG bytes (image, mask). One generator per image: image i of a class does not
    depend on n or class order."""
    import io

    img, mask = make_phantom(c, np.random.default_rng([seed, CLASSES.index(c), i]), size)
    out = []
    for a in (img, mask):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(buf.getvalue())
    return out[0], out[1]


def _check_existing(out: Path, seed: int, size: int, c: str, i: int) -> bool:
    """Whether phantom i of class c is already in `out` (both files, byte for byte); refuses a file of its name
    that holds anything else."""
    names = _names(out, c, i)
    there = [p for p in names if p.exists() or p.is_symlink()]
    if not there:
        return False
    for path, data in zip(names, _phantom_png(c, seed, size, i)):
        if path in there and (not path.is_file() or path.read_bytes() != data):
            raise SonocadError(f"{path} exists and is not this phantom; nothing was written (choose another folder)")
    return len(there) == len(names)
