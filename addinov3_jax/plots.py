"""The pictures a person looks at: heatmap overlays (PIL) and ROC / PR / PRO curves (matplotlib).

Overlays: `image | overlay (| ground-truth contour)`, a colour bar with tick labels on the right
and a caption line with the image score below. The colour scale is explicit (`scale=(lo, hi)`),
printed on the bar, and chosen by the caller: `predict` uses the whole run's min / max by default
(or fixed 0-1), evaluation the category's min / max. Raw anomaly maps often peak near 1e-2, so a
fixed 0-1 scale paints them uniformly blue.

Curves: the points come from `metrics.curves` / `metrics.pixel_curves` (the same points the
reported metrics integrate); this module only draws them, with the metric in the legend, and can
draw several runs (e.g. trained vs untrained) in one figure. matplotlib is the optional `plots`
extra; without it curve plots are skipped with one warning and every number is still written.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from addinov3_jax import metrics
from addinov3_jax.data.records import decode_image

# A perceptually ordered blue -> cyan -> yellow -> red ramp (anchor colours, linearly blended).
_RAMP = np.array([[0, 0, 128], [0, 64, 255], [0, 200, 255], [120, 255, 120], [255, 220, 0],
                  [255, 64, 0], [128, 0, 0]], np.float32)
# Above a pixel threshold (calibrated predictions): yellow -> orange -> dark red.
_WARM = np.array([[255, 235, 60], [255, 140, 0], [230, 40, 0], [128, 0, 0]], np.float32)
COLORBAR_TICKS = 5
# Pictures lower than this are enlarged (nearest neighbour, whole factors) or padded, so the
# colour bar, its labels and the caption always fit; the enlargement keeps the width below
# MAX_ENLARGED_WIDTH.
MIN_HEIGHT = 24
MAX_ENLARGED_WIDTH = 4096


def colormap(x: np.ndarray, ramp: np.ndarray = _RAMP) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours (blue -> red, or `_WARM`)."""
    x = np.clip(np.nan_to_num(np.asarray(x, np.float32)), 0, 1) * np.float32(len(ramp) - 1)
    lo = np.floor(x).astype(np.uint8)
    hi = np.minimum(lo + 1, len(ramp) - 1)
    t = (x - lo)[..., None]
    return (ramp[lo] * (1 - t) + ramp[hi] * t).astype(np.uint8)


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, OSError):  # old Pillow / no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tick(v: float) -> str:
    return f"{v:.3g}"


def _font_px(height: int) -> int:
    return max(10, height // 28)


def colorbar_width(height: int) -> int:
    """Width in pixels of the colour bar block (bar + tick labels) that `overlay` appends."""
    return max(12, height // 16) + 6 * _font_px(height) + 12


def colorbar_box(body_width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the colour bar itself in an `overlay` picture whose panels
    are `body_width` x `height` pixels (top = the scale's maximum)."""
    margin = _font_px(height) // 2 + 4
    left = body_width + 6
    return left, margin, left + max(12, height // 16) - 1, height - margin - 1


def overlay(image_rgb: np.ndarray, amap: np.ndarray, mask: np.ndarray | None = None,
            alpha: float = 0.5, *, scale: tuple[float, float] = (0.0, 1.0),
            score: float | None = None, caption: str = "",
            threshold: float | None = None) -> Image.Image:
    """`image | heatmap overlay (| ground-truth contour)`, a colour bar for `scale`, a caption.

    `amap` holds raw map values; colours run from `scale[0]` (dark blue) to `scale[1]` (dark red),
    values outside are clipped. With a pixel `threshold` (a calibration's) the scale is relative
    to it: below it the image shows through unchanged, above it warm colours run from yellow (at
    the threshold) to dark red (at `scale[1]`, or just above the threshold when nothing exceeds
    it). The caption line shows `caption`, the image `score` and the scale.
    """
    lo, hi = float(scale[0]), float(scale[1])
    palette = _RAMP
    amap = np.asarray(amap, np.float32)
    if threshold is not None:
        # Nothing above the threshold in the scale: a short range above it (the bar stays readable).
        lo, palette = float(threshold), _WARM
        hi = max(hi, lo + max(1e-6, 0.05 * abs(lo)))
    norm = ((amap - np.float32(lo)) / np.float32(hi - lo) if hi > lo
            else np.zeros(np.shape(amap), np.float32))
    image_rgb = np.asarray(image_rgb, np.uint8)
    weight = np.full(amap.shape + (1,), alpha, np.float32)
    if threshold is not None:
        weight = weight * (amap > threshold)[..., None]
    blend = (image_rgb * (1 - weight) + colormap(norm, palette) * weight).astype(np.uint8)
    panels = [image_rgb, blend]
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        contour = blend.copy()
        contour[m & ~_erode(m)] = (255, 255, 255)
        panels.append(contour)
    body = _enlarge_small(np.concatenate(panels, axis=1))
    w = body.shape[1]
    h = max(body.shape[0], MIN_HEIGHT)  # a very wide, very low picture: padded below
    fpx = _font_px(h)
    font = _font(fpx)
    caption_h = int(fpx * 1.8)
    out = Image.new("RGB", (w + colorbar_width(h), h + caption_h), "white")
    out.paste(Image.fromarray(body), (0, 0))
    # Colour bar: top = hi, bottom = lo, with tick marks and labels in map units.
    x0, y0, x1, y1 = colorbar_box(w, h)
    bar_w = x1 - x0 + 1
    ramp = np.linspace(1, 0, y1 - y0 + 1)[:, None].repeat(bar_w, 1)
    out.paste(Image.fromarray(colormap(ramp, palette)), (x0, y0))
    draw = ImageDraw.Draw(out)
    draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
    for k in range(COLORBAR_TICKS):
        frac = k / (COLORBAR_TICKS - 1)
        y = int(round(y0 + (1 - frac) * (ramp.shape[0] - 1)))
        draw.line((x0 + bar_w, y, x0 + bar_w + 4, y), fill=(0, 0, 0))
        draw.text((x0 + bar_w + 6, y), _tick(lo + frac * (hi - lo)), fill=(0, 0, 0), font=font,
                  anchor="lm")
    parts = [caption] if caption else []
    if score is not None:
        parts.append(f"score {score:.4g}")
    parts.append(f"colours: map {_tick(lo)} .. {_tick(hi)}" if threshold is None else
                 f"colours above the pixel threshold {_tick(lo)} (.. {_tick(hi)})")
    draw.text((4, h + caption_h // 2), "   ".join(parts), fill=(0, 0, 0), font=font, anchor="lm")
    return out


def _enlarge_small(body: np.ndarray) -> np.ndarray:
    """`body` repeated k x k (nearest neighbour) when it is lower than `MIN_HEIGHT`."""
    h, w = body.shape[:2]
    k = max(1, min(-(-MIN_HEIGHT // max(h, 1)), MAX_ENLARGED_WIDTH // max(w, 1)))
    return body if k == 1 else body.repeat(k, axis=0).repeat(k, axis=1)


def _erode(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[1:] &= m[:-1]
    out[:-1] &= m[1:]
    out[:, 1:] &= m[:, :-1]
    out[:, :-1] &= m[:, 1:]
    return out


def pick_examples(records: Sequence, count: int) -> list[int]:
    """`count` indices to draw: one image per defect type first (anomalous types in name order,
    then normal), then more images, anomalous first."""
    first: dict[tuple[bool, str], int] = {}
    for i, r in enumerate(records):
        first.setdefault((r.label == 0, r.defect), i)
    chosen = [first[k] for k in sorted(first)]
    rest = [i for i in sorted(range(len(records)), key=lambda i: (-records[i].label, i))
            if i not in set(chosen)]
    return (chosen + rest)[: max(0, count)]


def save_heatmaps(directory: Path, records, maps, masks, count: int, size: int, *,
                  scores: Sequence[float] | None = None,
                  scale: tuple[float, float] | None = None) -> list[Path]:
    """Overlays of a category: one per defect type where possible (see `pick_examples`), each
    with its image score when `scores` is given. Colour scale: `scale`, default the category's
    min / max map value (printed on each picture's colour bar)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    maps = np.asarray(maps)
    scale = scale or (float(maps.min()), float(maps.max()))
    written = []
    for i in pick_examples(records, count):
        r = records[i]
        img = decode_image(Path(r.image_path).read_bytes(), r.image_path)
        img = img.resize((size, size), Image.BILINEAR)
        defect = r.defect or Path(r.image_path).parent.name
        path = directory / f"{defect}_{Path(r.image_path).stem}.png"
        overlay(np.asarray(img), maps[i], masks[i] if r.label else None, scale=scale,
                score=None if scores is None else float(scores[i]),
                caption=f"{r.class_name} / {(defect or 'anomalous') if r.label else 'normal'}",
                ).save(path)
        written.append(path)
    return written


REPORT_MIN_SIDE = 256  # report panels: smaller images are upscaled (bilinear) to this


def _resize_map(amap: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.asarray(amap, np.float32), "F").resize(
        (size, size), Image.BILINEAR), np.float32)


def save_report_panels(directory: Path, records, maps, masks, scores, count: int, size: int, *,
                       threshold: float | None = None,
                       pixel_threshold: float | None = None) -> dict[str, list[dict]]:
    """The report's examples of one category: the `count` defective images with the lowest
    scores (`misses`) and the good images with the highest (`false_alarms`), each drawn as
    `image | overlay | ground-truth outline` at least `REPORT_MIN_SIDE` pixels high (colours:
    the category's map range, or above `pixel_threshold` only) and, with a pixel threshold, its
    defect mask (`mask_file`). Returns {"misses": [...], "false_alarms": [...]} of dicts with
    `file`, `image`, `label`, `defect`, `score` (and `verdict` with an image `threshold`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.png"):
        old.unlink()
    maps, scores = np.asarray(maps), np.asarray(scores, np.float64)
    labels = np.array([r.label for r in records])
    scale = (float(maps.min()), float(maps.max()))
    side = max(REPORT_MIN_SIDE, size)
    bad = [i for i in np.argsort(scores, kind="stable") if labels[i]][:count]
    good = [i for i in np.argsort(-scores, kind="stable") if not labels[i]][:count]
    out: dict[str, list[dict]] = {"misses": [], "false_alarms": []}
    for kind, chosen in (("misses", bad), ("false_alarms", good)):
        for j, i in enumerate(chosen):
            r = records[i]
            img = decode_image(Path(r.image_path).read_bytes(), r.image_path).resize(
                (side, side), Image.BILINEAR)
            amap = _resize_map(maps[i], side)
            gt = (np.asarray(Image.fromarray(np.asarray(masks[i], np.uint8) * 255).resize(
                (side, side), Image.NEAREST)) > 0) if r.label else None
            defect = (r.defect or "anomalous") if r.label else "good"
            stem = f"{kind}_{j}_{defect}_{Path(r.image_path).stem}"
            item = {"file": str(directory / f"{stem}.png"), "image": r.image_path,
                    "label": int(r.label), "defect": defect, "score": float(scores[i])}
            if threshold is not None:
                item["verdict"] = "defective" if scores[i] > threshold else "good"
            overlay(np.asarray(img), amap, gt, scale=scale, score=float(scores[i]),
                    caption=f"{r.class_name} / {defect}", threshold=pixel_threshold).save(item["file"])
            if pixel_threshold is not None:
                item["mask_file"] = str(directory / f"{stem}_mask.png")
                Image.fromarray((amap > pixel_threshold).astype(np.uint8) * 255, "L").save(
                    item["mask_file"])
            out[kind].append(item)
    return out


# ------------------------------------------------------------------------------ curves

_WARNED_NO_MATPLOTLIB = False


def _figure(**kw):
    """A matplotlib Figure (no pyplot, no GUI backend), or None without matplotlib (warned once)."""
    global _WARNED_NO_MATPLOTLIB
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if not _WARNED_NO_MATPLOTLIB:
            warnings.warn("matplotlib is not installed: curve plots are skipped (every metric is "
                          "still written); install it with pip install 'addinov3-jax[plots]'",
                          stacklevel=3)
            _WARNED_NO_MATPLOTLIB = True
        return None
    return Figure(**kw)


def _thin(*arrays, points: int = 2000):
    n = len(arrays[0])
    if n <= points:
        return arrays
    idx = np.unique(np.linspace(0, n - 1, points).round().astype(int))
    return tuple(a[idx] for a in arrays)


def curves_figure(runs: Mapping[str, Mapping[str, metrics.Curves | None]], title: str = "",
                  *, fpr_limit: float = 0.3):
    """A matplotlib Figure with four panels (image ROC, pixel ROC, pixel PR, PRO up to
    `fpr_limit`), one line per run, the metric value in each legend entry; None without
    matplotlib. `runs`: {name: {"image": Curves | None, "pixel": Curves | None}} (the curves of
    `evaluator.category_metrics`)."""
    fig = _figure(figsize=(17, 4.6), dpi=100, layout="constrained")
    if fig is None:
        return None
    axes = fig.subplots(1, 4)
    specs = (("image", "image ROC", "false positive rate", "true positive rate", "AUROC"),
             ("pixel", "pixel ROC", "false positive rate", "true positive rate", "AUROC"),
             ("pixel", "pixel precision-recall", "recall", "precision", "AP"),
             ("pixel", f"PRO (FPR <= {fpr_limit:g})", "false positive rate", "per-region overlap",
              "AUPRO"))
    for k, (ax, (level, name, xlabel, ylabel, metric)) in enumerate(zip(axes, specs, strict=True)):
        drawn = False
        for run, curves in runs.items():
            c = curves.get(level)
            if c is None:
                continue
            values = c.metrics(fpr_limit)
            if k in (0, 1):
                x, y = c.roc()
                value = values["auroc"]
            elif k == 2:
                x, y = c.pr()
                value = values["ap"]
            else:
                x, y = c.pro_curve(fpr_limit)
                value = values["aupro"]
            x, y = _thin(x, y)
            step = "post" if k == 2 else None
            label = f"{run} ({metric} {value:.3f})" if len(runs) > 1 or run else f"{metric} {value:.3f}"
            if step:
                ax.step(x, y, where=step, label=label, linewidth=1.6)
            else:
                ax.plot(x, y, label=label, linewidth=1.6)
            drawn = True
        if k in (0, 1):
            ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="chance")
        ax.set_xlim(0, fpr_limit if k == 3 else 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(loc="lower right" if k != 2 else "upper right", fontsize=9)
        else:
            ax.text(0.5, 0.5, "undefined\n(one class only)", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    if title:
        fig.suptitle(title)
    return fig


def draw_curves(path, runs: Mapping[str, Mapping[str, metrics.Curves | None]], title: str = "",
                *, fpr_limit: float = 0.3) -> bool:
    """`curves_figure` saved as a PNG; False (and nothing written) without matplotlib."""
    fig = curves_figure(runs, title, fpr_limit=fpr_limit)
    if fig is None:
        return False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return True


def save_curves(path, curves: Mapping[str, metrics.Curves | None], title: str = "", *,
                name: str = "", compare: Mapping[str, Mapping[str, metrics.Curves | None]] | None = None,
                fpr_limit: float = 0.3) -> None:
    """One category's curves (`{"image": ..., "pixel": ...}`, the ones its metrics were read
    from: image ROC, pixel ROC, PR, PRO) drawn into `path`; `compare` adds other runs' curves
    (e.g. `{"untrained": ...}`) to the same panels, `name` labels this run."""
    runs = {name or ("this run" if compare else ""): curves, **(compare or {})}
    draw_curves(path, runs, title, fpr_limit=fpr_limit)
