"""Plots: curves drawn from the metrics' own points with real axes and the values in the legend,
two runs in one figure, the no-matplotlib fallback, and heatmaps one per defect type."""

import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from addinov3_jax import metrics, plots
from addinov3_jax.runtime import evaluator as evaluate


def curves_of(labels, scores, masks, maps):
    return evaluate.category_metrics(labels, scores, masks, maps, has_masks=True, fpr_limit=0.3,
                                     curves=True)[2]


def test_metrics_read_off_the_drawn_curves_equal_the_one_sort_metrics():
    """With curves drawn, a category's numbers come from the curve points; without, from one sort
    of the pixels (`pixel_metrics`, the accelerator path where there is one): they are equal."""
    for seed, shift in ((0, 0.5), (1, 0.0), (2, 0.2)):
        args = category(seed, shift)
        drawn = evaluate.category_metrics(*args, has_masks=True, fpr_limit=0.3, curves=True)[0]
        plain = evaluate.category_metrics(*args, has_masks=True, fpr_limit=0.3)[0]
        assert drawn == plain


def category(seed=0, shift=0.5):
    rng = np.random.default_rng(seed)
    masks = np.zeros((6, 24, 24), np.uint8)
    masks[:3, 6:14, 6:14] = 1
    maps = (rng.random(masks.shape) + shift * masks).astype(np.float32)
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = maps.reshape(6, -1).max(1)
    return labels, scores, masks, maps


def test_curve_png_has_axes_and_legend_values(tmp_path):
    pytest.importorskip("matplotlib")
    labels, scores, masks, maps = category()
    trained = curves_of(labels, scores, masks, maps)
    plots.save_curves(tmp_path / "c.png", trained, title="syn / pill", name="trained")
    png = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)
    assert png.shape[0] > 300 and png.shape[1] > 1000 and png.std() > 10  # not constant
    untrained = curves_of(*category(1, shift=0.0))
    fig = plots.curves_figure({"trained": trained, "untrained": untrained}, "syn / pill")
    axes = fig.get_axes()
    assert [a.get_title() for a in axes] == ["image ROC", "pixel ROC", "pixel precision-recall",
                                             "PRO (FPR <= 0.3)"]
    assert [a.get_xlabel() for a in axes] == ["false positive rate", "false positive rate", "recall",
                                              "false positive rate"]
    assert all(len(a.get_xticks()) > 2 for a in axes) and axes[3].get_xlim() == (0, 0.3)
    pix = metrics.pixel_metrics(masks, maps)
    img = metrics.classification_metrics(labels, scores)
    legends = [[t.get_text() for t in a.get_legend().get_texts()] for a in axes]
    assert f"trained (AUROC {img['auroc']:.3f})" in legends[0]
    assert f"trained (AUROC {pix['auroc']:.3f})" in legends[1]
    assert f"trained (AP {pix['ap']:.3f})" in legends[2]
    assert f"trained (AUPRO {pix['aupro']:.3f})" in legends[3]
    assert any(t.startswith("untrained (AUPRO ") for t in legends[3])


def test_without_matplotlib_numbers_still_come_and_one_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setattr(plots, "_WARNED_NO_MATPLOTLIB", False)
    labels, scores, masks, maps = category()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curves = curves_of(labels, scores, masks, maps)
        plots.save_curves(tmp_path / "a.png", curves)
        plots.save_curves(tmp_path / "b.png", curves)
    assert len([w for w in caught if "matplotlib is not installed" in str(w.message)]) == 1
    assert not list(tmp_path.iterdir())
    assert curves["pixel"].metrics() == metrics.pixel_metrics(masks, maps, backend="numpy")


def test_heatmaps_one_per_defect_type_with_scores(tmp_path):
    recs = []
    for i, (label, defect) in enumerate([(0, "good"), (0, "good"), (1, "crack"), (1, "crack"),
                                         (1, "hole"), (1, "stain")]):
        path = tmp_path / "img" / defect / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.default_rng(i).random((20, 20, 3)) * 255).astype(np.uint8)).save(path)
        recs.append(SimpleNamespace(label=label, defect=defect, image_path=str(path), class_name="widget"))
    assert [recs[i].defect for i in plots.pick_examples(recs, 4)] == ["crack", "hole", "stain", "good"]
    assert [recs[i].defect for i in plots.pick_examples(recs, 5)][-1] == "crack"
    maps = np.random.default_rng(0).random((6, 32, 32)).astype(np.float32) * 0.01
    masks = np.zeros((6, 32, 32), np.uint8)
    written = plots.save_heatmaps(tmp_path / "h", recs, maps, masks, 4, 32, scores=np.linspace(0, 1, 6))
    assert sorted(p.name for p in written) == ["crack_002.png", "good_000.png", "hole_004.png",
                                               "stain_005.png"]
    # The default scale is the category's range: the pictures use the whole colour ramp.
    arr = np.asarray(Image.open(written[0]).convert("RGB")).astype(int)[:32, 32:64]
    assert arr.std() > 10


def test_threshold_relative_overlay_colours_only_above_the_threshold():
    img = np.full((40, 40, 3), 128, np.uint8)
    amap = np.zeros((40, 40), np.float32)
    amap[10:20, 10:20] = 1.0
    pic = np.asarray(plots.overlay(img, amap, scale=(0.0, 1.0), threshold=0.5)).astype(int)
    body = pic[:40, 40:80]  # the overlay panel
    assert (body[:5, :5] == 128).all()  # below the threshold: the image, unchanged
    hot = body[12:18, 12:18]
    assert (hot[..., 0] > hot[..., 2] + 40).all()  # above it: warm colours
    # nothing above the threshold: still a readable (non-degenerate) colour bar
    flat = plots.overlay(img, np.zeros((40, 40)), scale=(0.0, 0.1), threshold=0.5)
    assert np.asarray(flat).std() > 5
