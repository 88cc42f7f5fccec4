"""A deterministic synthetic anomaly dataset in the MVTec AD layout (tests and the demo).

Categories are procedural textures and simply rendered objects; defects are painted with exact
masks: scratches, cracks, holes, stains, missing material, extra material and colour spots.

    from addinov3_jax.data import synthetic
    synthetic.generate("synthetic_ad")  # 10 categories x (10 normal + 3 defects x 8) test images
                                        # + 8 train/good images (few-shot references)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

TEXTURES = ("weave", "marble", "stripes", "grain", "mesh", "carpet")
OBJECTS = ("washer", "pill", "hexnut", "button")
CATEGORIES = TEXTURES + OBJECTS
DEFECTS = {
    "weave": ("scratch", "hole", "color_spot"),
    "marble": ("crack", "stain", "color_spot"),
    "stripes": ("scratch", "stain", "hole"),
    "washer": ("crack", "missing", "extra"),
    "pill": ("color_spot", "crack", "missing"),
    "hexnut": ("scratch", "extra", "hole"),
    "grain": ("crack", "hole", "stain"),
    "mesh": ("missing", "color_spot", "scratch"),
    "carpet": ("hole", "stain", "color_spot"),
    "button": ("crack", "color_spot", "missing"),
}
# Readable names used as class names (folder names keep underscores).
READABLE = {"weave": "woven fabric", "marble": "marble", "stripes": "striped fabric",
            "grain": "wood", "mesh": "wire mesh", "carpet": "carpet",
            "washer": "washer", "pill": "pill", "hexnut": "hex nut", "button": "button"}


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    small = rng.random((max(2, size // scale),) * 2)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, np.float32) / 255.0


def _texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "weave":
        period = size / 12
        base = 0.5 + 0.25 * np.sign(np.sin(2 * np.pi * x / period)) * np.sign(np.sin(2 * np.pi * y / period))
        color = np.array([0.55, 0.45, 0.35])
    elif kind == "marble":
        n = _smooth_noise(rng, size, 8)
        base = 0.5 + 0.3 * np.sin(6 * x / size * np.pi + 5 * n)
        color = np.array([0.8, 0.8, 0.78])
    elif kind == "stripes":
        base = 0.5 + 0.3 * np.sin(2 * np.pi * (x + 0.3 * y) / (size / 8))
        color = np.array([0.3, 0.5, 0.7])
    elif kind == "grain":  # wood-like rings around an off-image centre
        n = _smooth_noise(rng, size, 16)
        r = np.hypot(x - size * rng.uniform(-0.5, 1.5), y + size * 0.8)
        base = 0.55 + 0.2 * np.sin(r / (size / 40) + 4 * n)
        color = np.array([0.75, 0.5, 0.28])
    elif kind == "mesh":  # thin bright wires on a dark ground
        period = size / 10
        near = lambda v: np.abs(((v + 2) % period) - period / 2) < 1.2  # noqa: E731
        wires = near(x) | near(y)
        base = 0.25 + 0.6 * wires
        color = np.array([0.7, 0.72, 0.75])
    else:  # carpet: dense fibre noise
        base = 0.5 + 0.25 * (rng.random((size, size)) - 0.5) + 0.2 * _smooth_noise(rng, size, 3)
        color = np.array([0.45, 0.35, 0.55])
    base = base + 0.05 * _smooth_noise(rng, size, 4) + 0.02 * rng.standard_normal((size, size))
    return np.clip(base[..., None] * color[None, None] * 1.4, 0, 1)


def _object(kind: str, rng: np.random.Generator, size: int):
    """Object on a plain background; returns the image and the object's silhouette."""
    bg = np.clip(0.15 + 0.03 * _smooth_noise(rng, size, 6)[..., None] * np.ones(3), 0, 1)
    sil = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(sil)
    c = size / 2 + rng.uniform(-size * 0.04, size * 0.04, 2)
    r = size * rng.uniform(0.28, 0.32)
    if kind == "washer":
        d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=255)
        d.ellipse([c[0] - r / 2.5, c[1] - r / 2.5, c[0] + r / 2.5, c[1] + r / 2.5], fill=0)
        color = np.array([0.75, 0.75, 0.8])
    elif kind == "pill":
        d.rounded_rectangle([c[0] - r * 1.3, c[1] - r * 0.55, c[0] + r * 1.3, c[1] + r * 0.55],
                            radius=r * 0.55, fill=255)
        color = np.array([0.9, 0.85, 0.6])
    elif kind == "button":
        d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=255)
        for dx, dy in ((-1, -1), (1, -1), (-1, 1), (1, 1)):
            h = r * 0.12
            cx, cy = c[0] + dx * r * 0.3, c[1] + dy * r * 0.3
            d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=0)
        color = np.array([0.3, 0.45, 0.8])
    else:  # hexnut
        angles = np.arange(6) * np.pi / 3 + rng.uniform(0, np.pi / 3)
        d.polygon([(c[0] + r * np.cos(a), c[1] + r * np.sin(a)) for a in angles], fill=255)
        d.ellipse([c[0] - r / 2.2, c[1] - r / 2.2, c[0] + r / 2.2, c[1] + r / 2.2], fill=0)
        color = np.array([0.6, 0.6, 0.62])
    m = np.asarray(sil, np.float32)[..., None] / 255.0
    shade = 0.85 + 0.15 * _smooth_noise(rng, size, 5)[..., None]
    img = bg * (1 - m) + m * color * shade
    return np.clip(img + 0.01 * rng.standard_normal(img.shape), 0, 1), m[..., 0] > 0.5


def _defect(img: np.ndarray, sil: np.ndarray | None, kind: str, rng: np.random.Generator):
    """Paints a defect in place; returns its exact boolean mask."""
    size = img.shape[0]
    layer = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(layer)
    if sil is not None:  # place defects on the object
        ys, xs = np.nonzero(sil)
        k = rng.integers(len(ys))
        cx, cy = float(xs[k]), float(ys[k])
    else:
        cx, cy = rng.uniform(0.25, 0.75, 2) * size
    s = size / 128
    color = None
    if kind == "scratch":
        a = rng.uniform(0, np.pi)
        ln = rng.uniform(25, 45) * s
        d.line([cx - ln * np.cos(a), cy - ln * np.sin(a), cx + ln * np.cos(a), cy + ln * np.sin(a)],
               fill=255, width=max(2, int(2 * s)))
        color = np.array([0.95, 0.95, 0.95]) if img.mean() < 0.5 else np.array([0.05, 0.05, 0.05])
    elif kind == "crack":
        pts, p, a = [], np.array([cx, cy]), rng.uniform(0, 2 * np.pi)
        for _ in range(8):
            pts.append(tuple(p))
            a += rng.uniform(-0.7, 0.7)
            p = p + 5 * s * np.array([np.cos(a), np.sin(a)])
        d.line(pts, fill=255, width=max(2, int(2 * s)))
        color = np.array([0.05, 0.04, 0.03])
    elif kind == "hole":
        r = rng.uniform(5, 9) * s
        d.ellipse([cx - r, cy - r * 0.8, cx + r, cy + r * 0.8], fill=255)
        color = np.array([0.02, 0.02, 0.02])
    elif kind == "stain":
        r = rng.uniform(8, 14) * s
        d.ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=255)
        color = np.array([0.45, 0.3, 0.1])
    elif kind == "color_spot":
        r = rng.uniform(4, 7) * s
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        color = np.array([0.9, 0.1, 0.1]) if rng.random() < 0.5 else np.array([0.1, 0.8, 0.2])
    elif kind == "missing":
        r = rng.uniform(10, 16) * s
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        color = np.array([0.15, 0.15, 0.15])  # background shows through
    elif kind == "extra":
        r = rng.uniform(7, 11) * s
        d.ellipse([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=255)
        color = np.array([0.55, 0.5, 0.45])
    mask = np.asarray(layer) > 127
    if kind == "missing" and sil is not None:
        mask &= sil  # only object pixels can go missing
    if kind == "stain":  # semi-transparent, soft colour inside an exact region
        alpha = np.asarray(layer.filter(ImageFilter.GaussianBlur(2 * s)), np.float32)[..., None] / 255
        alpha = alpha * mask[..., None] * 0.8
        img[:] = img * (1 - alpha) + color * alpha
    else:
        img[mask] = color
    return mask


def _save(path: Path, arr: np.ndarray, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8) if mode == "RGB" else arr
    Image.fromarray(data, mode).save(path)


def ensure(root: str | os.PathLike, **kwargs) -> Path:
    """`generate` into `root` unless it already exists (configs point at it without a download)."""
    return Path(root) if Path(root).exists() else generate(root, **kwargs)


def generate(
    root: str | os.PathLike,
    *,
    categories=CATEGORIES,
    size: int = 128,
    normal: int | Mapping[str, int] = 10,
    per_defect: int = 8,
    train_normal: int | Mapping[str, int] = 8,
    seed: int = 0,
) -> Path:
    """Writes the dataset under `root` (MVTec layout) and returns it. Same arguments, same bytes.

    `normal` (test/good) and `train_normal` (train/good) take one count for every category or a
    mapping per category (missing categories: the defaults 10 and 8). The train/good images
    (few-shot references, calibration images) come from their own random stream, so their
    number never changes the test images.
    """
    root = Path(root)
    counts = {"normal": normal, "train_normal": train_normal}
    defaults = {"normal": 10, "train_normal": 8}

    def count(name: str, cat: str) -> int:
        value = counts[name]
        return value.get(cat, defaults[name]) if isinstance(value, Mapping) else value

    for ci, cat in enumerate(categories):
        rng = np.random.default_rng([seed, ci])
        train_rng = np.random.default_rng([seed, ci, 1])

        def render(rng=rng, cat=cat):
            if cat in TEXTURES:
                return _texture(cat, rng, size), None
            return _object(cat, rng, size)

        for i in range(count("train_normal", cat)):
            _save(root / cat / "train" / "good" / f"{i:03d}.png", render(train_rng)[0])
        for i in range(count("normal", cat)):
            _save(root / cat / "test" / "good" / f"{i:03d}.png", render()[0])
        for defect in DEFECTS[cat]:
            for i in range(per_defect):
                img, sil = render()
                mask = _defect(img, sil, defect, rng)
                _save(root / cat / "test" / defect / f"{i:03d}.png", img)
                _save(root / cat / "ground_truth" / defect / f"{i:03d}_mask.png",
                      mask.astype(np.uint8) * 255, "L")
    return root
