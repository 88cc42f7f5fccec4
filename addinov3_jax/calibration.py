"""From scores to decisions: split-conformal thresholds from good images only, the normalized
score, defect masks and regions, and the rates a threshold achieves (pure numpy).

Split-conformal threshold (shared/reference/deployment.md): with n good images' scores and
`k = ceil((n + 1) * (1 - alpha))`, the k-th smallest score `t` satisfies
`P(new good score > t) <= alpha` for a new good image exchangeable with the calibration images
(marginally, over draws of the calibration set). When k > n no finite threshold has the
guarantee: `min_good_images(alpha) = ceil(1 / alpha) - 1` images are needed. The same
construction on each good image's maximum map value gives the pixel threshold: a good image's
defect mask (map > pixel threshold) is empty with probability >= 1 - alpha.

Normalized score (anomalib users expect the decision boundary at 0.5): one linear map, clipped,

    normalized = clip(0.5 * (s - m) / (t - m), 0, 1)

with `m` the smallest calibration score and `t` the image threshold: m -> 0, t -> 0.5,
2t - m -> 1; monotone, so `normalized > 0.5` exactly when `s > t`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

NORMALIZED_SCORE = "clip(0.5 * (score - good_min) / (image_threshold - good_min), 0, 1)"
# Few-shot settings that do not change a score (how the work is split).
_NOT_SCORE_SETTINGS = ("block_size", "shard_bank")


class CalibrationError(ValueError):
    """A calibration that cannot be made or used as given; the message says why."""


def conformal_rank(n: int, alpha: float) -> int:
    """k = ceil((n + 1)(1 - alpha)): the rank (1-based, ascending) of the threshold score."""
    if not 0 < alpha < 1:
        raise CalibrationError(f"the false-alarm rate must lie in (0, 1), got {alpha}")
    # The product rounded to 12 digits first: (20 * 0.95) is 18.999999999999996 in floats.
    return int(math.ceil(round((n + 1) * (1 - alpha), 12)))


def min_good_images(alpha: float) -> int:
    """The fewest good images with a finite conformal threshold at `alpha`: ceil(1/alpha) - 1."""
    conformal_rank(1, alpha)  # checks alpha
    return int(math.ceil(round(1 / alpha, 12))) - 1


def conformal_threshold(scores: Sequence[float], alpha: float) -> tuple[float, int]:
    """(t, k): the k-th smallest of the good images' `scores`. Raises `CalibrationError` when k > n."""
    s = np.sort(np.asarray(scores, np.float64).reshape(-1))
    n, k = len(s), conformal_rank(len(s), alpha)
    if k > n:
        raise CalibrationError(f"need at least {min_good_images(alpha)} good images for a false-alarm "
                               f"rate of {alpha:g}; got {n}")
    if not np.isfinite(s).all():
        raise CalibrationError("the good images' scores contain NaN or infinity")
    return float(s[k - 1]), k


def summary(scores: Sequence[float]) -> dict[str, float]:
    s = np.asarray(scores, np.float64)
    return {"min": float(s.min()), "median": float(np.median(s)), "max": float(s.max()),
            "mean": float(s.mean())}


def calibrate(image_scores: Sequence[float], max_pixels: Sequence[float], alpha: float) -> dict:
    """The calibration record of n good images: `n`, `alpha`, `k`, `image_threshold`,
    `pixel_threshold` (the same order statistic over each image's maximum map value) and the
    summaries of both."""
    t, k = conformal_threshold(image_scores, alpha)
    p, _ = conformal_threshold(max_pixels, alpha)
    return {"n": len(image_scores), "alpha": float(alpha), "k": k, "image_threshold": t,
            "pixel_threshold": p, "good_scores": summary(image_scores),
            "good_max_pixels": summary(max_pixels)}


def normalized_score(scores, threshold: float, good_min: float):
    """`clip(0.5 * (s - good_min) / (threshold - good_min), 0, 1)` (see the module docstring);
    when threshold == good_min: 0 at or below it, 1 above."""
    s = np.asarray(scores, np.float64)
    span = threshold - good_min
    if span <= 0:
        out = np.where(s > threshold, 1.0, 0.0)
    else:
        out = np.clip(0.5 * (s - good_min) / span, 0.0, 1.0)
    return float(out) if out.ndim == 0 else out


def verdict(score: float, threshold: float) -> str:
    return "defective" if score > threshold else "good"


def file_name(class_name: str) -> str:
    """`<class>.json` with anything but letters, digits, `.`, `-`, `_` replaced by `_`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", class_name.strip()).strip(".") + ".json"


def read(path: str | os.PathLike) -> dict:
    """A calibration file written by `addinov3 calibrate` (its path kept under `file`)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such calibration file; run `addinov3 calibrate` "
                               "first") from None
    except (OSError, ValueError) as e:
        raise CalibrationError(f"{path}: unreadable calibration ({e})") from None
    missing = [k for k in ("image_threshold", "good_scores", "model", "settings") if k not in record]
    if missing:
        raise CalibrationError(f"{path}: not a calibration file (missing {', '.join(missing)})")
    return {**record, "file": str(path)}


def _bank_key(reference: dict | None):
    if reference is None:
        return None
    settings = {k: v for k, v in reference.get("settings", {}).items() if k not in _NOT_SCORE_SETTINGS}
    return sorted(reference.get("sha256", [])), json.loads(json.dumps(settings))


def check_compatible(record: dict, *, identity: dict, settings: dict) -> None:
    """Refuses (one line naming the first mismatch) a calibration made with another model,
    image size, score mode, class name or few-shot bank than this run's `settings` (`class_name`,
    `image_size`, `image_score`, `reference`: None or a bank description with `sha256` and
    `settings`)."""
    where = record.get("file", "the calibration")
    theirs = record["model"].get("identity", {})
    for part in sorted(set(identity) | set(theirs)):
        if json.loads(json.dumps(identity.get(part))) != theirs.get(part):
            raise CalibrationError(f"{where} was made with another model ({part} differs: "
                                   f"{record['model'].get('dir')}); recalibrate with this checkpoint")
    cs = record["settings"]
    for key in ("class_name", "image_size", "image_score"):
        if cs.get(key) != settings.get(key):
            raise CalibrationError(f"{where} was made with {key} {cs.get(key)!r}, this run uses "
                                   f"{settings.get(key)!r}; use the same setting or recalibrate")
    mine, theirs_ref = settings.get("reference"), cs.get("reference")
    if (mine is None) != (theirs_ref is None):
        raise CalibrationError(
            f"{where} was made " + ("with a few-shot bank (--reference "
                                    f"{theirs_ref.get('folder')}, {theirs_ref.get('count')} images)"
                                    if theirs_ref else "without a few-shot bank")
            + ", this run " + ("has --reference" if mine else "has none")
            + "; use the same bank or recalibrate")
    if mine is not None:
        (a_files, a_set), (b_files, b_set) = _bank_key(mine), _bank_key(theirs_ref)
        if a_files != b_files:
            raise CalibrationError(f"{where} was made with a few-shot bank of {theirs_ref.get('count')} "
                                   f"other images ({', '.join(theirs_ref.get('images', [])[:3])}); "
                                   f"this run's --reference has {mine.get('count')} images that "
                                   "differ; use the same bank images or recalibrate")
        for key in sorted(set(a_set) | set(b_set)):
            if a_set.get(key) != b_set.get(key):
                raise CalibrationError(f"{where} was made with few-shot {key} {b_set.get(key)!r}, "
                                       f"this run uses {a_set.get(key)!r}; recalibrate")


# ---------------------------------------------------------------------------------------------
# Masks and regions


def defect_mask(map_hw: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """(H, W) bool: map > pixel threshold."""
    return np.asarray(map_hw) > pixel_threshold


def regions(mask_hw: np.ndarray, map_hw: np.ndarray) -> list[dict]:
    """The 8-connected components of `mask_hw`, largest first: `box` [x_min, y_min, x_max, y_max]
    (inclusive pixel coordinates), `area` (pixels) and `peak` (the largest map value inside)."""
    from scipy import ndimage

    mask = np.asarray(mask_hw, bool)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), int))
    if not count:
        return []
    values = np.asarray(map_hw, np.float64)
    idx = np.arange(1, count + 1)
    areas = ndimage.sum_labels(mask, labels, idx)
    peaks = ndimage.maximum(values, labels, idx)
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels)):
        ys, xs = sl
        out.append({"box": [int(xs.start), int(ys.start), int(xs.stop - 1), int(ys.stop - 1)],
                    "area": int(areas[i]), "peak": float(peaks[i])})
    return sorted(out, key=lambda r: (-r["area"], r["box"][1], r["box"][0]))


# ---------------------------------------------------------------------------------------------
# What a threshold achieves (evaluation, benchmarks)


def binomial_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact) interval of a binomial proportion; (nan, nan) without trials."""
    from scipy.stats import beta

    if trials == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    lo = 0.0 if successes == 0 else float(beta.ppf(a, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta.ppf(1 - a, successes + 1, trials - successes))
    return lo, hi


def rates(labels, scores, threshold: float) -> dict:
    """Decisions `score > threshold` against `labels` (1 = defective): the false-alarm rate on
    the good images (with its 95% Clopper-Pearson interval), the detection rate on the defective
    ones, and the confusion counts (NaN rates where a class is absent)."""
    y = np.asarray(labels).astype(bool)
    hit = np.asarray(scores, np.float64) > threshold
    tp, fn = int((hit & y).sum()), int((~hit & y).sum())
    fp, tn = int((hit & ~y).sum()), int((~hit & ~y).sum())
    good, bad = fp + tn, tp + fn
    return {"threshold": float(threshold),
            "false_alarm_rate": fp / good if good else math.nan,
            "false_alarm_ci95": list(binomial_interval(fp, good)),
            "detection_rate": tp / bad if bad else math.nan,
            "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn}}


def f1_optimal_threshold(labels, scores) -> float:
    """The threshold t (decisions score > t) with the largest F1 on labelled images: the largest
    score below each candidate cut; NaN when there are no defective images."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, np.float64)
    if not y.any():
        return math.nan
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # cut after the last of equal scores
    f1 = 2 * tp / (tp + fp + y.sum())
    f1 = np.where(last, f1, -1)
    i = int(np.argmax(f1))
    below = s_sorted[i + 1] if i + 1 < len(s_sorted) else -np.inf
    # A threshold between the cut's score and the next lower one: decisions score > t.
    return float(below if np.isfinite(below) else np.nextafter(s_sorted[i], -np.inf))
