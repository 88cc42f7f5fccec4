"""Heatmap overlays and ROC / PR / PRO curve plots, drawn with PIL (no plotting dependency)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from addinov3_jax.data.records import decode_image

# A perceptually ordered blue -> cyan -> yellow -> red ramp (anchor colours, linearly blended).
_RAMP = np.array([[0, 0, 128], [0, 64, 255], [0, 200, 255], [120, 255, 120], [255, 220, 0],
                  [255, 64, 0], [128, 0, 0]], np.float32)


def colormap(x: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours."""
    x = np.clip(np.nan_to_num(x), 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    t = (x - lo)[..., None]
    return (_RAMP[lo] * (1 - t) + _RAMP[hi] * t).astype(np.uint8)


def overlay(image_rgb: np.ndarray, amap: np.ndarray, mask: np.ndarray | None = None,
            alpha: float = 0.5) -> Image.Image:
    """Image | heatmap overlay (| ground-truth contour) side by side."""
    heat = colormap(amap)
    blend = (image_rgb * (1 - alpha) + heat * alpha).astype(np.uint8)
    panels = [image_rgb.astype(np.uint8), blend]
    if mask is not None:
        edge = mask.astype(bool) & ~_erode(mask.astype(bool))
        contour = blend.copy()
        contour[edge] = (255, 255, 255)
        panels.append(contour)
    return Image.fromarray(np.concatenate(panels, axis=1))


def _erode(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[1:] &= m[:-1]
    out[:-1] &= m[1:]
    out[:, 1:] &= m[:, :-1]
    out[:, :-1] &= m[:, 1:]
    return out


def save_heatmaps(directory: Path, records, maps, masks, count: int, size: int) -> None:
    """Overlays for up to `count` images of a category, anomalous ones first."""
    directory.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(records)), key=lambda i: (-records[i].label, i))[:count]
    lo, hi = float(maps.min()), float(maps.max())
    for i in order:
        r = records[i]
        img = decode_image(Path(r.image_path).read_bytes()).resize((size, size), Image.BILINEAR)
        norm = (maps[i] - lo) / (hi - lo) if hi > lo else np.zeros_like(maps[i])
        name = f"{Path(r.image_path).parent.name}_{Path(r.image_path).stem}.png"
        overlay(np.asarray(img), norm, masks[i] if r.label else None).save(directory / name)


def _curve(y: np.ndarray, s: np.ndarray, weights: np.ndarray | None = None, points: int = 400):
    """(fpr, tpr, precision, recall) at distinct thresholds, thinned to about `points`."""
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    keep = np.append(np.flatnonzero(s[:-1] != s[1:]), len(s) - 1)
    keep = keep[np.linspace(0, len(keep) - 1, min(points, len(keep))).astype(int)]
    P, N = max(tp[-1], 1), max(fp[-1], 1)
    tp, fp = tp[keep], fp[keep]
    out = {"fpr": np.r_[0, fp / N], "tpr": np.r_[0, tp / P],
           "recall": tp / P, "precision": tp / np.maximum(tp + fp, 1)}
    if weights is not None:
        w = np.cumsum(weights[order])[keep]
        out["pro"] = np.r_[0, w / max(w[-1], 1e-12)]
    return out


def _panel(draw, box, title, xs, ys, xlim=(0, 1)):
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0 + 4, y0 - 14), title, fill=(0, 0, 0))
    for curve_x, curve_y, color in zip(xs, ys, ((200, 30, 30), (30, 30, 200)), strict=False):
        fx = (np.clip(curve_x, *xlim) - xlim[0]) / (xlim[1] - xlim[0])
        pts = [(x0 + fx_ * (x1 - x0), y1 - cy * (y1 - y0)) for fx_, cy in zip(fx, curve_y, strict=True)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)


def save_curves(path: Path, labels, scores, masks, maps, title: str = "", max_pixels: int = 2_000_000):
    """One PNG: image ROC, pixel ROC, pixel PR and PRO (FPR <= 0.3) curves of a category.

    Pixel curves use a fixed random subsample of at most `max_pixels` pixels (plots only; the
    reported metrics use every pixel).
    """
    from scipy import ndimage

    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.asarray(masks).reshape(len(masks), -1) > 0
    a = np.asarray(maps, np.float64).reshape(len(maps), -1)
    weights = np.zeros_like(a)
    for k in range(len(m)):
        lab, n = ndimage.label(m[k].reshape(masks[k].shape), structure=np.ones((3, 3)))
        if n:
            sizes = np.bincount(lab.reshape(-1))
            w = np.where(lab > 0, 1.0 / sizes[lab], 0.0).reshape(-1)
            weights[k] = w
    y, s, w = m.reshape(-1).astype(np.int64), a.reshape(-1), weights.reshape(-1)
    if y.size > max_pixels:
        pick = np.random.default_rng(0).choice(y.size, max_pixels, replace=False)
        y, s, w = y[pick], s[pick], w[pick]
    pix = _curve(y, s, w)
    neg = 1 - y
    fpr_ok = np.r_[0, np.cumsum(neg[np.argsort(-s, kind="stable")])[
        np.linspace(0, len(s) - 1, len(pix["pro"]) - 1).astype(int)] / max(neg.sum(), 1)]
    img = Image.new("RGB", (4 * 230 + 20, 270), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 4), title, fill=(0, 0, 0))
    labels = np.asarray(labels).astype(np.int64)
    if labels.min() != labels.max():
        ic = _curve(labels, np.asarray(scores, np.float64))
        _panel(d, (10, 40, 220, 250), "image ROC", [ic["fpr"]], [ic["tpr"]])
    _panel(d, (240, 40, 450, 250), "pixel ROC", [pix["fpr"]], [pix["tpr"]])
    _panel(d, (470, 40, 680, 250), "pixel PR (x=recall)", [pix["recall"]], [pix["precision"]])
    _panel(d, (700, 40, 910, 250), "PRO (x=FPR to 0.3)", [fpr_ok], [pix["pro"]], xlim=(0, 0.3))
    img.save(path)
