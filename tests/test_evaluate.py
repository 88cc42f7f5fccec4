"""Evaluation files and schema, one-class categories, original-resolution mode, `predict` on a
folder of mixed-size images, and the demo end to end (quick)."""

import csv
import json
import math
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from addinov3_jax.commands import predict
from addinov3_jax.io import model_dir
from addinov3_jax.runtime import evaluator as evaluate

KEYS = {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
        "pixel_aupro", "num_images"}


@pytest.fixture(scope="module")
def syn(eval_data):
    """conftest's `eval_data` (pill and weave)."""
    return eval_data


def test_eval_writes_documented_files(tiny, syn, tmp_path):
    opts = evaluate.EvalOptions(image_size=64, batch_size=4, heatmaps_per_category=2)
    results = evaluate.evaluate(tiny, [("synthetic", str(syn))], tmp_path, opts=opts,
                                classes=("pill", "weave"),
                                config={"note": "test"})
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"] == {"note": "test"}
    entry = saved["datasets"]["synthetic"]
    assert set(entry["categories"]) == {"pill", "weave"}
    for row in [*entry["categories"].values(), entry["mean"]]:
        assert set(row) == KEYS
        for k in KEYS - {"num_images"}:
            assert 0.0 <= row[k] <= 1.0
    assert entry["mean"]["num_images"] == 2 * (3 + 6)  # per class: 3 good, 3 defect types x 2
    mean = np.mean([c["pixel_auroc"] for c in entry["categories"].values()])
    assert entry["mean"]["pixel_auroc"] == pytest.approx(mean)
    assert results["datasets"]["synthetic"]["mean"] == entry["mean"]
    assert "| pill |" in (tmp_path / "results.md").read_text()
    assert len(list((tmp_path / "heatmaps" / "synthetic" / "pill").glob("*.png"))) == 2
    assert (tmp_path / "curves" / "synthetic" / "weave.png").is_file()


def test_one_class_categories_and_original_resolution(tiny, tmp_path):
    # A user folder: class "all_bad" has anomalies only (image metrics undefined), and the images
    # have their own, non-square size.
    for i in range(3):
        img = (np.random.default_rng(i).random((40, 56, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(_mk(tmp_path / "data/all_bad/anomalous" / f"{i}.png"))
        mask = np.zeros((40, 56), np.uint8)
        mask[10:20, 10 + i : 30] = 255
        Image.fromarray(mask).save(_mk(tmp_path / "data/all_bad/masks" / f"{i}_mask.png"))
    for resolution in ("network", "original"):
        opts = evaluate.EvalOptions(image_size=64, batch_size=2, heatmaps_per_category=0,
                                    curves=False, resolution=resolution)
        r = evaluate.evaluate(tiny, [("folder", str(tmp_path / "data"))], tmp_path / resolution,
                              opts=opts)
        entry = r["datasets"]["folder"]
        row = entry["categories"]["all_bad"]
        assert math.isnan(row["image_auroc"]) and math.isnan(entry["mean"]["image_auroc"])
        assert "only anomalous images" in entry["notes"]["all_bad"][0]
        assert 0 <= row["pixel_auroc"] <= 1
    text = (tmp_path / "original" / "results.json").read_text()
    assert "NaN" not in text and "null" in text  # strict JSON (DESIGN §4)
    assert "n/a" in (tmp_path / "original" / "results.md").read_text()


def test_original_resolution_curves_agree_with_results(tiny, syn, tmp_path):
    """The curves drawn at `resolution="original"` are the ones the results were read from (they
    were once computed on the network-resolution maps and disagreed with results.json)."""
    opts = evaluate.EvalOptions(image_size=32, batch_size=4, heatmaps_per_category=0,
                                resolution="original")  # the images are 64 x 64
    curves: dict = {}
    r = evaluate.evaluate(tiny, [("synthetic", str(syn), ("pill",))], tmp_path, opts=opts,
                          curves_out=curves)
    row = r["datasets"]["synthetic"]["categories"]["pill"]
    drawn = curves[("synthetic", "pill")]
    pixel, image = drawn["pixel"].metrics(opts.fpr_limit), drawn["image"].metrics()
    assert drawn["pixel"].num_pos + drawn["pixel"].num_neg == row["num_images"] * 64 * 64
    assert (pixel["auroc"], pixel["ap"], pixel["f1_max"], pixel["aupro"]) == (
        row["pixel_auroc"], row["pixel_ap"], row["pixel_f1_max"], row["pixel_aupro"])
    assert (image["auroc"], image["ap"]) == (row["image_auroc"], row["image_ap"])


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_predict_on_mixed_size_folder(tiny, tmp_path):
    sizes = [(40, 30), (100, 64), (33, 77)]
    for i, (w, h) in enumerate(sizes):
        img = (np.random.default_rng(i).random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(_mk(tmp_path / "in" / ("sub" if i else "") / f"img{i}.png"))
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "in" / "gray.png")
    model_dir.save(tiny, tmp_path / "model")
    from addinov3_jax.commands.cli import main

    assert main(["predict", "--checkpoint", str(tmp_path / "model"), "--class-name", "widget",
                 "--output", str(tmp_path / "out"), "--image-size", "64", "--batch-size", "2",
                 "--save-maps", str(tmp_path / "in")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert len(rows) == 4
    for row in rows:
        w, h = int(row["width"]), int(row["height"])
        assert np.load(tmp_path / "out" / "maps" / f"{row['name']}.npy").shape == (h, w)
        pw, ph = Image.open(tmp_path / "out" / "heatmaps" / f"{row['name']}.png").size
        assert pw > 2 * w and ph > h  # image | overlay, colour bar, caption
        assert 0 <= float(row["score"]) <= 1
    meta = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert meta["class_name"] == "widget" and len(meta["images"]) == 4
    # Same predictions as the in-memory model, image by image.
    model = predict.load_model(tmp_path / "model")
    again = predict.predict(model, [tmp_path / "in" / "img0.png"], "widget", tmp_path / "out2",
                            image_size=64, batch_size=2)
    first = next(r for r in rows if r["name"] == "img0")
    assert again.images[0]["score"] == pytest.approx(float(first["score"]), abs=1e-6)


def test_demo_end_to_end_quick_with_converted_towers(tiny_towers, tmp_path):
    """The whole demo (train, zero-shot trained / untrained, 1- and 4-shot over seeds, decisions,
    report) once, on towers given as converted directories (`--dinov3 DIR --clip-text DIR`): the
    default run differs only in building its random tiny towers (as `test_train.py`'s loss test
    trains on them)."""
    from addinov3_jax.commands import demo

    assert demo.run(workdir=str(tmp_path), quick=True, dinov3=str(tiny_towers / "backbone"),
                    clip_text=str(tiny_towers / "text_tower")) == 0
    spec = json.loads((tmp_path / "train" / "model" / "model.json").read_text())
    assert spec["backbone"] == str(tiny_towers / "backbone")  # referenced, not copied
    assert json.loads((tmp_path / "results.json").read_text())["config"]["model"][
        "class_name_source"] == "readable"
    for name in ("results.json", "results_untrained.json", "results.md", "demo_report.json"):
        assert (tmp_path / name).is_file(), name
    trained = json.loads((tmp_path / "results.json").read_text())
    untrained = json.loads((tmp_path / "results_untrained.json").read_text())
    held_out = set(trained["datasets"]["synthetic"]["categories"])
    assert held_out == {"weave", "carpet", "pill", "hexnut"} == set(
        untrained["datasets"]["synthetic"]["categories"])
    assert "trained / untrained" in (tmp_path / "results.md").read_text()
    assert list((tmp_path / "heatmaps" / "synthetic").rglob("*.png"))
    # Few-shot: 1 and 4 shots over seeds (0, 1, 2), same schema, side by side in results.md.
    report = json.loads((tmp_path / "demo_report.json").read_text())
    for k in (1, 4):
        fs = json.loads((tmp_path / f"results_{k}shot.json").read_text())
        assert fs["shots"] == k and fs["seeds"] == [0, 1, 2]
        entry = fs["datasets"]["synthetic"]
        assert set(entry["categories"]) == held_out and set(entry["per_seed"]) == {"0", "1", "2"}
        assert all(len(p) == k for per in entry["references"].values() for p in per.values())
        assert report["fewshot"][f"{k}_shot"]["mean"]["pixel_auroc"] == entry["mean"]["pixel_auroc"]
    md = (tmp_path / "results.md").read_text()
    assert "| pixel AUROC |" in md and "4-shot" in md and "zero-shot" in md
    # Decisions at 5% with the 4-shot model: >= 19 calibration images per class beyond the
    # references, >= 100 held-out test good images; report.html links only files that exist.
    cal = json.loads((tmp_path / "results_4shot.json").read_text())["datasets"]["synthetic"][
        "calibration"]
    assert cal["false_alarm_rate_target"] == 0.05 and cal["mean"]["num_good"] >= 100
    assert all(r["n"] >= 19 and "false_alarm_rate" in r for r in cal["categories"].values())
    assert report["decisions"]["num_good"] == cal["mean"]["num_good"]
    page = (tmp_path / "report.html").read_text()
    links = re.findall(r'src="([^"]+)"', page)
    assert links and all((tmp_path / unquote(x)).is_file() for x in links)
    assert 'class="trained-untrained"' in page and 'class="decisions"' in page
