"""Metrics: equal to scikit-learn (with ties) and to a plain step-by-step statement of the MVTec
reference AUPRO; the reference test vectors; edge cases; the 200-threshold variant."""

import bisect

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from addinov3_jax import metrics


def sk_f1_max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    f1 = 2 * p * r / (p + r)
    return np.nanmax(f1[np.isfinite(f1)])


@pytest.mark.parametrize("seed", range(4))
def test_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 5000
    y = (rng.random(n) < 0.3).astype(int)
    s = np.round(rng.random(n) + 0.4 * y, 2)  # coarse quantisation: many ties across classes
    got = metrics.classification_metrics(y, s)
    assert abs(got["auroc"] - roc_auc_score(y, s)) < 1e-9
    assert abs(got["ap"] - average_precision_score(y, s)) < 1e-9
    assert abs(got["f1_max"] - sk_f1_max(y, s)) < 1e-9
    assert metrics.auroc(y.reshape(50, 100), s.reshape(50, 100)) == got["auroc"]


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_signed_zeros_are_one_threshold(backend):
    """-0.0 and +0.0 are equal scores: one threshold, as in scikit-learn."""
    rng = np.random.default_rng(0)
    n = 3000
    y = (rng.random(n) < 0.3).astype(int)
    s = np.round(rng.normal(size=n) * 0.3 + 0.2 * y, 1).astype(np.float32)
    s[s == 0] = 0.0  # rounding made some -0.0: start from +0.0 only, then sign 42 of them
    zeros = np.flatnonzero(s == 0)
    s[zeros[:42]] = -0.0
    assert np.signbit(s[zeros]).sum() == 42
    got = metrics.classification_metrics(y, s, backend=backend)
    assert abs(got["auroc"] - roc_auc_score(y, s)) < 1e-9
    assert abs(got["ap"] - average_precision_score(y, s)) < 1e-9
    assert abs(got["f1_max"] - sk_f1_max(y, s)) < 1e-9
    masks = y.reshape(3, 25, 40)
    plus = np.where(s == 0, np.float32(0), s)
    pos_zero = metrics.pixel_metrics(masks, plus.reshape(masks.shape), backend=backend)
    assert metrics.pixel_metrics(masks, s.reshape(masks.shape), backend=backend) == pos_zero


def test_curves_are_the_points_the_metrics_integrate():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(5)
    masks = np.zeros((3, 20, 20), bool)
    masks[0, 2:8, 2:8] = masks[1, 10:14, 3:19] = True
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 2).astype(np.float32)
    c = metrics.pixel_curves(masks, maps)
    assert c.metrics() == metrics.pixel_metrics(masks, maps, backend="numpy")
    assert np.all(np.diff(c.thresholds) < 0) and set(c.thresholds) == set(maps.reshape(-1))
    fpr, tpr = c.roc()
    sk_fpr, sk_tpr, _ = roc_curve(masks.reshape(-1), maps.reshape(-1), drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    x, y = c.pro_curve(0.3)
    assert x[0] == 0 and x[-1] == pytest.approx(0.3) and np.all(np.diff(x) >= 0)
    assert np.trapezoid(y, x) / 0.3 == pytest.approx(metrics.aupro(masks, maps), abs=1e-12)
    labels = np.array([0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.8, 0.3, 0.3, -0.0])
    ci = metrics.curves(labels, scores)
    assert ci.pro is None and ci.metrics() == metrics.classification_metrics(labels, scores)
    recall, precision = ci.pr()
    assert recall[-1] == 1.0 and precision[0] == 1.0


def test_reference_vectors():
    y = [0, 0, 1, 1, 0, 1, 0, 0]
    s = [0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.2, 0.05]
    assert metrics.auroc(y, s) == pytest.approx(0.8, abs=1e-12)
    assert metrics.average_precision(y, s) == pytest.approx(0.7, abs=1e-12)
    assert metrics.f1_max(y, s) == pytest.approx(0.75, abs=1e-12)
    masks = np.zeros((2, 4, 4))
    masks[0, :2, :2] = 1
    masks[0, 3, 3] = 1
    maps = np.array([
        [[0.9, 0.8, 0.1, 0.1], [0.7, 0.2, 0.1, 0.1], [0.1, 0.1, 0.3, 0.1], [0.1, 0.1, 0.1, 0.6]],
        [[0.1, 0.5, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.4, 0.1], [0.1, 0.1, 0.1, 0.1]]])
    assert metrics.aupro(masks, maps) == pytest.approx(0.9537037037, abs=1e-9)


def plain_reference_aupro(masks, maps, limit=0.3):
    """The MVTec reference algorithm, step by step, in NumPy (float64)."""
    fp_w, pro_w = [], []
    n_regions = 0
    for m in masks:
        labels, count = ndimage.label(m, structure=np.ones((3, 3)))
        w = np.zeros(m.shape)
        for r in range(1, count + 1):
            w[labels == r] = 1.0 / (labels == r).sum()
        n_regions += count
        fp_w.append((labels == 0).astype(float).reshape(-1))
        pro_w.append(w.reshape(-1))
    fp_w, pro_w = np.concatenate(fp_w), np.concatenate(pro_w)
    s = np.asarray(maps, np.float64).reshape(-1)
    order = np.argsort(-s, kind="stable")
    s, fp_w, pro_w = s[order], fp_w[order], pro_w[order]
    fpr = np.cumsum(fp_w) / fp_w.sum()
    pro = np.cumsum(pro_w) / n_regions
    keep = np.append(np.flatnonzero(s[:-1] != s[1:]), len(s) - 1)
    x = np.concatenate([[0], np.minimum(fpr[keep], 1), [1]])
    y = np.concatenate([[0], np.minimum(pro[keep], 1), [1]])
    i = bisect.bisect_right(list(x), limit)
    area = np.sum(0.5 * (y[1:i] + y[: i - 1]) * (x[1:i] - x[: i - 1]))
    if x[i - 1] != limit:
        y_star = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
        area += 0.5 * (y_star + y[i - 1]) * (limit - x[i - 1])
    return area / limit


@pytest.mark.parametrize("quantise", [False, True])
def test_aupro_equals_plain_reference(quantise):
    rng = np.random.default_rng(7)
    masks = np.zeros((6, 48, 40), bool)
    for k in range(4):  # several components per image, some touching diagonally
        for _ in range(3):
            y, x = rng.integers(0, 40, 2)
            masks[k, y : y + rng.integers(2, 8), x : x + rng.integers(2, 8)] = True
        masks[k, 45, 0] = masks[k, 46, 1] = True  # one 8-connected diagonal region
    maps = rng.random(masks.shape) + 0.6 * ndimage.gaussian_filter(masks.astype(float), 2)
    if quantise:
        maps = np.round(maps * 4) / 4  # heavy ties
    got = metrics.pixel_metrics(masks, maps)
    assert abs(got["aupro"] - plain_reference_aupro(masks, maps)) < 1e-9
    y, s = masks.reshape(-1), maps.reshape(-1)
    assert abs(got["auroc"] - roc_auc_score(y, s)) < 1e-9
    assert abs(got["ap"] - average_precision_score(y, s)) < 1e-9
    assert abs(got["f1_max"] - sk_f1_max(y, s)) < 1e-9
    # Precomputed ground truth gives the same values; AUPRO is rank-invariant.
    gt = metrics.GroundTruth.from_masks(masks)
    assert metrics.pixel_metrics(masks, maps, ground_truth=gt) == got
    assert abs(metrics.aupro(masks, np.exp(3 * maps)) - got["aupro"]) < 1e-9


def test_edge_cases():
    s = np.random.default_rng(0).random(20)
    one_class = metrics.classification_metrics(np.ones(20), s)
    assert np.isnan(one_class["auroc"]) and one_class["ap"] == 1.0 and one_class["f1_max"] == 1.0
    negatives = metrics.classification_metrics(np.zeros(20), s)
    assert np.isnan(negatives["auroc"]) and negatives["ap"] == 0.0 and negatives["f1_max"] == 0.0
    y = np.r_[np.ones(5), np.zeros(15)]
    const = metrics.classification_metrics(y, np.full(20, 0.3))
    assert const["auroc"] == 0.5 and const["ap"] == 0.25 and const["f1_max"] == pytest.approx(2 * 0.25 / 1.25)
    masks = np.zeros((2, 8, 8))
    masks[0, 2:4, 2:4] = 1
    assert metrics.aupro(masks, np.full((2, 8, 8), 0.7)) == pytest.approx(0.15, abs=1e-12)
    assert np.isnan(metrics.aupro(np.zeros((2, 8, 8)), np.random.default_rng(0).random((2, 8, 8))))
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="binary"):
        metrics.auroc([0, 0.5], [0.1, 0.2])


def test_200_threshold_variant_is_different_and_labelled():
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 32, 32), bool)
    masks[:2, 8:16, 8:16] = True
    maps = rng.random(masks.shape) + masks * 0.5
    ref, cflow = metrics.aupro(masks, maps), metrics.aupro_200_thresholds(masks, maps)
    assert 0 < cflow <= 1 and 0 < ref <= 1
    # Not rank-invariant: a monotone transform changes the cflow value but not the reference.
    warped = (1 / (1 + np.exp(-8 * (maps - 0.5)))) ** 8
    assert abs(metrics.aupro(masks, warped) - ref) < 1e-9
    assert abs(metrics.aupro_200_thresholds(masks, warped) - cflow) > 1e-4
    assert np.isnan(metrics.aupro_200_thresholds(masks, np.zeros(masks.shape)))


def test_jax_and_numpy_backends_agree():
    rng = np.random.default_rng(11)
    masks = np.zeros((3, 40, 30), bool)
    masks[0, 5:15, 5:12] = masks[1, 20:30, 3:9] = True
    maps = np.round(rng.random(masks.shape) + masks * 0.3, 3).astype(np.float32)
    maps[2, :5] = -maps[2, :5]  # negative scores keep their order in the packed sort keys
    a = metrics.pixel_metrics(masks, maps, backend="numpy")
    b = metrics.pixel_metrics(masks, maps, backend="jax")
    for k in a:
        assert abs(a[k] - b[k]) < 1e-12, k
    y, s = masks.reshape(-1), maps.reshape(-1)
    assert abs(a["auroc"] - roc_auc_score(y, s)) < 1e-9
    c_jax = metrics.classification_metrics(y, s, backend="jax")
    c_np = metrics.classification_metrics(y, s, backend="numpy")
    assert all(abs(c_jax[k] - c_np[k]) < 1e-12 for k in c_np)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 22])
def test_host_path_chunks_equal_one_sort_of_every_pixel(chunk):
    """The host path (negatives as bare uint32 keys, curve at the positives' scores only, keys
    made `chunk` pixels at a time) gives the values of the all-pixel sort (JAX path) and the
    plain reference, with ties across chunk boundaries, signed zeros and negative scores."""
    rng = np.random.default_rng(13)
    masks = np.zeros((3, 12, 10), bool)
    masks[0, 2:6, 1:4] = masks[1, 7:11, 5:9] = masks[2, 0, 0] = True
    maps = (np.round(rng.normal(size=masks.shape) + masks, 1) * 0.5).astype(np.float32)
    maps[maps == 0] = -0.0
    gt = metrics.GroundTruth.from_masks(masks)
    p = int(np.count_nonzero(gt.payload))
    with np.errstate(invalid="ignore", divide="ignore"):
        got = metrics._metrics_numpy(maps.reshape(-1), gt.payload, gt.inv_sizes, p,
                                     float(gt.num_regions), 0.3, chunk=chunk)
    want = metrics.pixel_metrics(masks, maps, backend="jax")
    np.testing.assert_allclose(got, [want[k] for k in ("auroc", "ap", "f1_max", "aupro")],
                               atol=1e-12, rtol=0)
    assert abs(got[3] - plain_reference_aupro(masks, maps)) < 1e-9
    assert abs(got[0] - roc_auc_score(masks.reshape(-1), maps.reshape(-1))) < 1e-12


def test_pixel_metrics_one_class():
    rng = np.random.default_rng(2)
    maps = rng.random((2, 6, 6)).astype(np.float32)
    normal = metrics.pixel_metrics(np.zeros((2, 6, 6)), maps)
    assert np.isnan(normal["auroc"]) and np.isnan(normal["aupro"]) and normal["ap"] == 0.0
    anomalous = metrics.pixel_metrics(np.ones((2, 6, 6)), maps)
    assert np.isnan(anomalous["auroc"]) and np.isnan(anomalous["aupro"])
    assert anomalous["ap"] == 1.0 and anomalous["f1_max"] == 1.0
