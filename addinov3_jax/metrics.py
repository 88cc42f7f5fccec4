"""Image- and pixel-level metrics: AUROC, AP, F1-max and AUPRO (shared/reference/metrics.md).

Every metric comes from one descending sort of compact score keys and integer cumulative sums,
with one curve point per distinct score (ties collapsed). In JAX on an accelerator (64-bit enabled
locally for exact counts and float64 sums; on TPU, which lacks 64-bit, pass `backend="cpu"`) all
pixels are sorted as packed 64-bit (score, region id) keys and summed with masked scans. In NumPy
on a CPU host, whose SIMD sort is much faster than XLA's CPU sort, the normal pixels are sorted as
bare uint32 score keys and the anomalous ones as packed keys; the curve is then evaluated at the
anomalous pixels' distinct scores only, with exactly the same counts (`_metrics_numpy`).
`backend="jax"` / `"numpy"` forces one. Values equal scikit-learn's `roc_auc_score`,
`average_precision_score` and the maximum F1 of `precision_recall_curve`, and `aupro` is the MVTec
AD reference algorithm (8-connected ground-truth regions, integration to FPR 0.3 with
interpolation, divided by 0.3).

`aupro_200_thresholds` is the widely copied cflow-style variant (200 equally spaced thresholds,
FPR < 0.3, rescaled FPR axis), kept under a different name only to compare with published numbers.

`curves` / `pixel_curves` return the curve points these metrics integrate (`Curves`: ROC, PR
and PRO), for plots (`plots.save_curves`); they come from the same sort and the same formulas.

A metric that is undefined (one class only, no ground-truth region) is NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _flat(x) -> np.ndarray:
    return np.asarray(x).reshape(-1)


def _score_keys(xp, scores):
    """uint32 keys whose ascending order is the descending order of the float32 `scores`.

    -0.0 and +0.0 compare equal but have different bits: they are canonicalized to +0.0 first so
    that they form one threshold, as in scikit-learn."""
    scores = scores.astype(xp.float32)
    scores = xp.where(scores == 0, xp.zeros_like(scores), scores)
    bits = scores.view(xp.uint32)
    ordered = xp.where(bits >> 31 == 1, ~bits, bits | xp.uint32(0x80000000))  # ascending floats
    return ~ordered


def _pack(xp, keys, payload):
    """64-bit keys: the score key in the high half, the payload in the low half."""
    return (keys.astype(xp.uint64) << xp.uint64(32)) | payload.astype(xp.uint32).astype(xp.uint64)


def _sort_desc(xp, scores, payload):
    """One sort of packed 64-bit keys: the high half orders the float32 scores descending, the
    low half carries the payload. Returns the sorted keys."""
    return xp.sort(_pack(xp, _score_keys(xp, scores), payload))


def _split_keys_jax(keys):
    return (keys >> 32).astype(jnp.uint32), (keys & 0xFFFFFFFF).astype(jnp.int32)


def _split_keys_numpy(keys):
    """Zero-copy halves of little-endian 64-bit keys: (score keys, payloads)."""
    halves = keys.view(np.uint32).reshape(-1, 2)
    if np.little_endian:
        return halves[:, 1], halves[:, 0]
    return halves[:, 0], halves[:, 1]


def _from_sorted_jax(s, pay, inv_region_size, n_pos, n_neg, n_regions, fpr_limit):
    """[auroc, ap, f1_max, aupro] from sorted score keys `s` and payloads (0 = negative), with
    static shapes: masked scans over every position instead of compaction (the host path,
    `_metrics_numpy`, keeps the positives' thresholds only; a test checks they agree)."""
    xp, cummax = jnp, jax.lax.cummax
    pos = (pay > 0).astype(xp.int64)
    tp = xp.cumsum(pos)
    fp = xp.cumsum(1 - pos)
    last = xp.concatenate([s[1:] != s[:-1], xp.ones((1,), bool)])

    def prev_kept(v, mask):  # value at the previous kept index (v non-decreasing), else 0
        kept = xp.where(mask, v, xp.zeros_like(v))
        return xp.concatenate([xp.zeros((1,), v.dtype), cummax(kept)[:-1]])

    tp_prev, fp_prev = prev_kept(tp, last), prev_kept(fp, last)
    tpf, fpf = tp.astype(xp.float64), fp.astype(xp.float64)
    p, n = xp.float64(n_pos), xp.float64(n_neg)
    # AUROC: trapezoids between consecutive distinct thresholds, in integer arithmetic.
    area = xp.sum(xp.where(last, (fp - fp_prev) * (tp + tp_prev), 0)).astype(xp.float64)
    auroc = area / (2.0 * p * n)
    # AP: sum over thresholds of (recall step) * precision.
    precision = tpf / xp.maximum(tpf + fpf, 1.0)
    ap = xp.sum(xp.where(last, (tp - tp_prev).astype(xp.float64) * precision, 0.0)) / p
    # F1 = 2PR / (P + R) = 2 TP / (P + TP + FP).
    f1 = xp.max(xp.where(last, 2.0 * tpf / (p + tpf + fpf), 0.0))
    # AUPRO (reference algorithm): PRO increments 1/|r| per region pixel, FPR over OK pixels,
    # the curve closed with (1, 1), trapezoids up to fpr_limit plus the interpolated segment.
    pro = xp.minimum(xp.cumsum(inv_region_size[pay]) / n_regions, 1.0)
    x = xp.concatenate([xp.minimum(fpf / n, 1.0), xp.ones((1,))])
    y = xp.concatenate([pro, xp.ones((1,))])
    keep = xp.concatenate([last, xp.ones((1,), bool)])
    x_prev, y_prev = prev_kept(x, keep), prev_kept(y, keep)
    inside = keep & (x <= fpr_limit)
    seg = xp.sum(xp.where(inside, 0.5 * (y + y_prev) * (x - x_prev), 0.0))
    cross = keep & (x > fpr_limit) & (x_prev <= fpr_limit)  # exactly one such point
    y_star = y_prev + (y - y_prev) * (fpr_limit - x_prev) / xp.where(cross, x - x_prev, 1.0)
    corr = xp.sum(xp.where(cross, 0.5 * (y_star + y_prev) * (fpr_limit - x_prev), 0.0))
    return xp.stack([auroc, ap, f1, (seg + corr) / fpr_limit])


def _points_numpy(s, pay, inv_region_size, n_regions):
    """Curve points at every distinct threshold of sorted score keys `s` (descending) and
    payloads: (indices of the last position of each threshold, TP, FP, PRO)."""
    pos = pay > 0
    keep = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tp = np.cumsum(pos, dtype=np.int64)[keep]
    fp = (keep + 1) - tp
    pro = np.minimum(np.cumsum(inv_region_size[pay])[keep] / n_regions, 1.0)
    return keep, tp, fp, pro


def _pro_curve(fp, pro, n_neg, fpr_limit):
    """The reference PRO curve: (0, 0), one point per threshold, closed with (1, 1), cut at
    `fpr_limit` with a linearly interpolated end point. Returns (fpr, pro)."""
    x = np.r_[0.0, np.minimum(fp / np.float64(n_neg), 1.0), 1.0]
    y = np.r_[0.0, pro, 1.0]
    i = int(np.searchsorted(x, fpr_limit, side="right"))  # x[i - 1] <= limit < x[i]
    if i < len(x):
        y_star = y[i - 1] + (y[i] - y[i - 1]) * (fpr_limit - x[i - 1]) / (x[i] - x[i - 1])
        return np.r_[x[:i], fpr_limit], np.r_[y[:i], y_star]
    return x[:i], y[:i]


def _from_positive_points(tp, fp, fp_above, pro, n_pos, n_neg, fpr_limit):
    """[auroc, ap, f1_max, aupro] from the curve at the distinct scores of the positives only.

    At the i-th distinct positive score (descending): `tp`, `fp` = positives, negatives scored
    >= it, `fp_above` = negatives scored strictly above it, `pro` = the PRO there. Between two
    such thresholds only negatives enter: the curve there is a horizontal run (TP and PRO fixed)
    ending at `fp_above`, then one step to (`fp`, `tp`) that holds the tied negatives. This is the
    full curve (one point per distinct score) with the points inside each horizontal run left out,
    which changes none of the integrals (AUROC to the bit: integer counts) and no maximum.
    """
    if len(tp) == 0:  # no positive: every metric is undefined
        return np.full(4, np.nan)
    tp_prev, fp_prev = np.r_[0, tp[:-1]], np.r_[0, fp[:-1]]
    p, n = np.float64(n_pos), np.float64(n_neg)  # numpy scalars: 0/0 gives NaN, not an error
    # AUROC: trapezoids in integers; a horizontal run adds 2 TP per negative.
    area = int(np.sum((fp_above - fp_prev) * 2 * tp_prev + (fp - fp_above) * (tp + tp_prev)))
    area += (int(n_neg) - int(fp[-1])) * 2 * int(tp[-1])  # the negatives below every positive
    auroc = np.float64(area) / (2.0 * p * n)
    precision = tp / np.maximum(tp + fp, 1).astype(np.float64)
    ap = np.sum((tp - tp_prev) * precision) / p
    f1 = np.max(2.0 * tp / (p + tp + fp))
    if n_neg == 0:
        return np.array([auroc, ap, f1, np.nan], np.float64)
    # PRO curve: (0, 0), then per threshold the end of the run and the step, then (1, last PRO)
    # once every negative is in, closed with (1, 1) by `_pro_curve`.
    pro_prev = np.r_[0.0, pro[:-1]]
    xs = np.stack([fp_above, fp], axis=1).reshape(-1)
    ys = np.stack([pro_prev, pro], axis=1).reshape(-1)
    x, y = _pro_curve(np.r_[xs, n_neg], np.r_[ys, pro[-1]], n_neg, fpr_limit)
    pro_area = np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]))
    return np.array([auroc, ap, f1, pro_area / fpr_limit], np.float64)


def _positive_points(tp, fp, pro):
    """The thresholds of `_from_positive_points` picked out of the full curve (one point per
    distinct score): those where TP grows; `fp_above` is FP at the next higher score."""
    step = np.flatnonzero(np.diff(np.r_[0, tp]) > 0)
    return tp[step], fp[step], np.r_[0, fp][step], pro[step]


SWEEP_CHUNK = 1 << 22  # pixels per step of the host path's pass over the scores


def _metrics_numpy(scores, payload, inv_sizes, n_pos, n_regions, fpr_limit, chunk=SWEEP_CHUNK):
    """[auroc, ap, f1_max, aupro] on the host, with the memory of one uint32 key per negative
    pixel plus 60-80 bytes per positive pixel and ~60 per `chunk` pixels (see `pixel_metrics`).

    One pass over the scores in chunks splits them into the negatives' uint32 score keys and the
    positives' packed 64-bit (score key, region id) keys; both are sorted in place. The curve
    needs points only at the distinct positive scores (`_from_positive_points`): there TP and
    PRO come from a sweep over the sorted positives and FP from two binary searches in the
    sorted negatives. Exact: the same counts and the same PRO sums as one sort of every pixel."""
    n = scores.size
    neg = np.empty(n - n_pos, np.uint32)
    pos, filled = [], 0
    for i in range(0, n, chunk):
        s = np.asarray(scores[i : i + chunk], np.float32)
        if not np.all(np.isfinite(s)):
            raise ValueError("scores contain NaN or inf; metrics need finite scores")
        keys, pay = _score_keys(np, s), payload[i : i + chunk]
        hit = pay > 0
        pos.append(_pack(np, keys[hit], pay[hit]))
        k_neg = keys[~hit]
        neg[filled : filled + k_neg.size] = k_neg
        filled += k_neg.size
    pos = np.concatenate(pos) if pos else np.zeros(0, np.uint64)
    pos.sort()
    neg.sort()
    s_pos, pay_pos = _split_keys_numpy(pos)
    keep = np.flatnonzero(np.r_[s_pos[1:] != s_pos[:-1], True][: pos.size])
    tp = keep + 1
    pro = np.minimum(np.cumsum(inv_sizes[pay_pos])[keep] / n_regions, 1.0)
    thresholds = s_pos[keep]
    fp = np.searchsorted(neg, thresholds, side="right").astype(np.int64)
    fp_above = np.searchsorted(neg, thresholds, side="left").astype(np.int64)
    return _from_positive_points(tp, fp, fp_above, pro, n_pos, neg.size, fpr_limit)


@functools.partial(jax.jit, static_argnames=("fpr_limit",))
def _curve_metrics_jax(scores, payload, inv_region_size, n_pos, n_neg, n_regions, fpr_limit):
    s, pay = _split_keys_jax(_sort_desc(jnp, scores, payload))
    return _from_sorted_jax(s, pay, inv_region_size, n_pos, n_neg, n_regions, fpr_limit)


def _run(scores, payload, inv_sizes, n_pos, n_regions, fpr_limit, backend):
    """Dispatch: JAX on an accelerator (or `backend="jax"`), NumPy on a CPU host
    (`_metrics_numpy`), where its SIMD sort is several times faster than XLA's CPU sort. Both
    give the same counts and the same formulas; a test checks they agree."""
    n_regions = float(max(n_regions, 1))
    if backend is None:
        backend = "numpy" if jax.default_backend() == "cpu" else "jax"
    if backend == "numpy":
        with np.errstate(invalid="ignore", divide="ignore"):  # undefined cases become NaN
            return _metrics_numpy(scores, np.asarray(payload), np.asarray(inv_sizes, np.float64),
                                  n_pos, n_regions, float(fpr_limit))
    scores = np.asarray(scores, np.float32)
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf; metrics need finite scores")
    n_neg = scores.size - n_pos
    with jax.enable_x64(True):
        device = None if backend == "jax" else jax.devices(backend)[0]
        args = (jnp.asarray(scores), jnp.asarray(payload, jnp.int32),
                jnp.asarray(inv_sizes, jnp.float64), jnp.asarray(n_pos, jnp.int64),
                jnp.asarray(n_neg, jnp.int64), jnp.asarray(n_regions, jnp.float64))
        if device is not None:
            args = jax.device_put(args, device)
        return np.asarray(_curve_metrics_jax(*args, fpr_limit=float(fpr_limit)), np.float64)


def _binary(y_true, y_score):
    y = _flat(y_true)
    s = _flat(y_score)
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} values but y_score has {s.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must be binary (0/1 or bool); binarise masks first")
    return y.astype(np.int32), s


def classification_metrics(y_true, y_score, *, backend: str | None = None) -> dict[str, float]:
    """AUROC, AP and F1-max of binary labels vs scores (any shape, flattened), one sort."""
    y, s = _binary(y_true, y_score)
    p, n = int(y.sum()), int(y.size - y.sum())
    auroc, ap, f1, _ = _run(s, y, np.zeros(2), p, 1, 0.3, backend)
    return {"auroc": float(auroc) if p and n else float("nan"),
            "ap": float(ap) if p else 0.0,
            "f1_max": float(f1) if p else 0.0}


def auroc(y_true, y_score) -> float:
    """Area under the ROC curve (`sklearn.metrics.roc_auc_score`); NaN with one class only."""
    return classification_metrics(y_true, y_score)["auroc"]


def average_precision(y_true, y_score) -> float:
    """Step-wise average precision (`sklearn.metrics.average_precision_score`)."""
    return classification_metrics(y_true, y_score)["ap"]


def f1_max(y_true, y_score) -> float:
    """Maximum F1 over all distinct thresholds."""
    return classification_metrics(y_true, y_score)["f1_max"]


def _key_scores(s: np.ndarray) -> np.ndarray:
    """The float32 scores of sort keys (`_sort_desc`'s high halves)."""
    ordered = ~s.astype(np.uint32)
    bits = np.where(ordered >> 31 == 1, ordered & np.uint32(0x7FFFFFFF), ~ordered)
    return bits.astype(np.uint32).view(np.float32)


@dataclasses.dataclass(frozen=True)
class Curves:
    """The points the metrics integrate: one per distinct score, thresholds descending, at each
    the cumulative counts of `score >= threshold` (and, for pixels, the PRO value).

    `roc()`, `pr()` and `pro_curve()` give plot-ready (x, y) arrays; `metrics()` gives the
    values `classification_metrics` / `pixel_metrics` report for the same input.
    """

    thresholds: np.ndarray  # float32, descending
    tp: np.ndarray  # int64
    fp: np.ndarray  # int64
    pro: np.ndarray | None  # float64 mean per-region overlap; None for image-level curves
    num_pos: int
    num_neg: int

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, TPR), starting at (0, 0)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (np.r_[0.0, self.fp / np.float64(self.num_neg)],
                    np.r_[0.0, self.tp / np.float64(self.num_pos)])

    def pr(self) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision) at each threshold."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.tp / np.float64(self.num_pos), self.tp / np.maximum(self.tp + self.fp, 1.0)

    def pro_curve(self, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, PRO) of the reference AUPRO, cut at `fpr_limit` (its area / fpr_limit = AUPRO)."""
        if self.pro is None:
            raise ValueError("image-level curves have no PRO curve")
        with np.errstate(invalid="ignore", divide="ignore"):
            return _pro_curve(self.fp, self.pro, self.num_neg, float(fpr_limit))

    def metrics(self, fpr_limit: float = 0.3) -> dict[str, float]:
        pro = self.pro if self.pro is not None else np.zeros(len(self.tp))
        with np.errstate(invalid="ignore", divide="ignore"):
            a, ap, f1, pro_area = _from_positive_points(
                *_positive_points(self.tp, self.fp, pro), self.num_pos, self.num_neg,
                float(fpr_limit))
        p, n = self.num_pos, self.num_neg
        out = {"auroc": float(a) if p and n else float("nan"), "ap": float(ap) if p else 0.0,
               "f1_max": float(f1) if p else 0.0}
        if self.pro is not None:
            out["aupro"] = float(pro_area) if self.pro[-1] > 0 and n else float("nan")
        return out


def _curves(scores, payload, inv_sizes, n_regions, with_pro) -> Curves:
    scores = np.asarray(scores, np.float32)
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf; metrics need finite scores")
    s, pay = _split_keys_numpy(_sort_desc(np, scores, np.asarray(payload)))
    keep, tp, fp, pro = _points_numpy(s, pay, np.asarray(inv_sizes, np.float64), float(max(n_regions, 1)))
    p = int(tp[-1]) if len(tp) else 0
    return Curves(_key_scores(s[keep]), tp, fp, pro if with_pro else None, p, int(scores.size - p))


def curves(y_true, y_score) -> Curves:
    """ROC and PR curve points of binary labels vs scores (the ones `classification_metrics`
    integrates)."""
    y, s = _binary(y_true, y_score)
    return _curves(s, y, np.zeros(2), 1, with_pro=False)


def pixel_curves(masks, maps, *, ground_truth: GroundTruth | None = None) -> Curves:
    """ROC, PR and PRO curve points of (N, H, W) masks vs maps (those of `pixel_metrics`)."""
    gt = ground_truth or GroundTruth.from_masks(masks)
    s = _flat(maps)
    if s.size != gt.payload.size:
        raise ValueError(f"maps have {s.size} pixels but the masks have {gt.payload.size}")
    return _curves(s, gt.payload, gt.inv_sizes, gt.num_regions, with_pro=True)


@dataclasses.dataclass
class GroundTruth:
    """What AUPRO needs from the masks, computed once: per-pixel region ids (0 = OK pixel, else
    1 + global region index, 8-connectivity) and each region's inverse size."""

    payload: np.ndarray  # int32 (num_pixels,)
    inv_sizes: np.ndarray  # float64 (1 + num_regions,), entry 0 is 0
    shape: tuple[int, ...]

    @property
    def num_regions(self) -> int:
        return len(self.inv_sizes) - 1

    @classmethod
    def from_masks(cls, masks) -> GroundTruth:
        """From (N, H, W) masks (non-zero = anomalous)."""
        masks = np.asarray(masks)
        gt = cls.from_masks_list(masks[None] if masks.ndim == 2 else masks)
        gt.shape = masks.shape
        return gt

    @classmethod
    def from_masks_list(cls, masks) -> GroundTruth:
        """From a sequence of 2-D masks of any sizes (pixels are pooled in order)."""
        payloads, sizes, offset = [], [0.0], 0
        for m in masks:
            labels, count = ndimage.label(np.asarray(m) != 0, structure=EIGHT_CONNECTED)
            payloads.append(np.where(labels > 0, labels + offset, 0).astype(np.int32).reshape(-1))
            if count:
                sizes += list(np.bincount(labels.reshape(-1))[1:].astype(np.float64))
                offset += count
        inv = np.zeros(len(sizes), np.float64)
        inv[1:] = 1.0 / np.asarray(sizes[1:], np.float64)
        payload = np.concatenate(payloads) if payloads else np.zeros(0, np.int32)
        return cls(payload, inv, (payload.size,))


def pixel_metrics(masks, maps, *, fpr_limit: float = 0.3, ground_truth: GroundTruth | None = None,
                  backend: str | None = None) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and reference AUPRO from one sort of the pixels' score keys.

    masks, maps: (N, H, W) binary ground truth and anomaly maps. Pass `ground_truth` (from
    `GroundTruth.from_masks(masks)`) to reuse the connected components across evaluations.
    Memory on a CPU host, beyond the maps and the ground truth's int32 region ids: 4 bytes per
    normal pixel (its sort key), 60-80 bytes per anomalous pixel, and up to ~60 bytes for
    each of `SWEEP_CHUNK` pixels (~250 MB) while the keys are made: about 4 GB for the 567 M
    pixels of a full MVTec AD + VisA pass at 512x512 with 5 % anomalous pixels.
    """
    gt = ground_truth or GroundTruth.from_masks(masks)
    s = _flat(maps)
    if s.size != gt.payload.size:
        raise ValueError(f"maps have {s.size} pixels but the masks have {gt.payload.size}")
    p = int(np.count_nonzero(gt.payload))
    n = int(s.size - p)
    auroc_, ap, f1, aupro_ = _run(s, gt.payload, gt.inv_sizes, p, gt.num_regions, fpr_limit,
                                  backend)
    return {"auroc": float(auroc_) if p and n else float("nan"),
            "ap": float(ap) if p else 0.0,
            "f1_max": float(f1) if p else 0.0,
            "aupro": float(aupro_) if gt.num_regions and n else float("nan")}


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """AUPRO up to `fpr_limit` by the MVTec AD reference algorithm; NaN without regions."""
    return pixel_metrics(masks, maps, fpr_limit=fpr_limit)["aupro"]


def aupro_200_thresholds(masks, maps, fpr_limit: float = 0.3, steps: int = 200) -> float:
    """The cflow-style AUPRO copied by APRIL-GAN / AnomalyCLIP / MuSc (NOT the reference).

    200 thresholds equally spaced between the min and max score, `map > t`, keep FPR < 0.3, min-max
    rescale the kept FPRs to [0, 1] and integrate PRO with the trapezoid rule.
    """
    masks = np.asarray(masks) != 0
    maps = np.asarray(maps, np.float64)
    gt = GroundTruth.from_masks(masks)
    lo, hi = maps.min(), maps.max()
    if hi <= lo or gt.num_regions == 0:
        return float("nan")
    region = gt.payload
    flat = maps.reshape(-1)
    neg = region == 0
    sizes = np.bincount(region, minlength=gt.num_regions + 1)[1:]
    fprs, pros = [], []
    for th in np.arange(lo, hi, (hi - lo) / steps):
        hit = flat > th
        covered = np.bincount(region[hit], minlength=gt.num_regions + 1)[1:]
        pros.append(float(np.mean(covered / sizes)))
        fprs.append(float((hit & neg).sum() / neg.sum()))
    fprs, pros = np.asarray(fprs), np.asarray(pros)
    keep = fprs < fpr_limit
    if keep.sum() < 2:
        return float("nan")
    f, p = fprs[keep], pros[keep]
    f = (f - f.min()) / (f.max() - f.min())
    order = np.argsort(f, kind="stable")
    return float(np.trapezoid(p[order], f[order]))
