"""Decisions: the split-conformal threshold (order statistic, coverage on exchangeable draws),
the normalized score, masks and regions, `addinov3 calibrate` and `predict --calibration`."""

import csv
import json
import re
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from addinov3_jax import calibration as calib
from addinov3_jax.commands.cli import main
from addinov3_jax.io import model_dir as model_io

# ------------------------------------------------------------------------------ the math


@pytest.mark.parametrize(("n", "k"), [(19, 19), (20, 20), (39, 38), (100, 96)])
def test_threshold_is_the_conformal_order_statistic(n, k):
    scores = np.random.default_rng(n).permutation(np.arange(1, n + 1)).astype(float) / 10
    t, rank = calib.conformal_threshold(scores, 0.05)
    assert rank == k == int(np.ceil((n + 1) * 0.95 - 1e-9))
    assert t == pytest.approx(k / 10)  # the k-th smallest


def test_too_few_good_images_are_refused():
    assert calib.min_good_images(0.05) == 19 and calib.min_good_images(0.1) == 9
    assert calib.min_good_images(0.01) == 99
    with pytest.raises(calib.CalibrationError,
                       match=r"need at least 19 good images for a false-alarm rate of 0.05; got 18"):
        calib.conformal_threshold(np.arange(18.0), 0.05)
    with pytest.raises(calib.CalibrationError, match="in \\(0, 1\\)"):
        calib.conformal_rank(10, 0.0)


@pytest.mark.parametrize(("n", "alpha"), [(19, 0.05), (50, 0.05), (9, 0.1), (30, 0.1)])
def test_false_alarm_rate_is_controlled_on_exchangeable_draws(n, alpha):
    rng = np.random.default_rng(1000 + n)
    draws, alarms = 1000, 0
    for _ in range(draws):
        good = rng.gamma(2.0, 1.0, size=n + 1)  # n calibration images and one new good image
        t, _ = calib.conformal_threshold(good[:n], alpha)
        alarms += good[n] > t
    se = np.sqrt(alpha * (1 - alpha) / draws)
    assert alarms / draws <= alpha + 3 * se
    assert alarms / draws >= alpha / 4  # and the threshold is not absurdly conservative


def test_normalized_score_maps_the_threshold_to_one_half():
    t, m = 0.3, 0.1
    s = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.9])
    np.testing.assert_allclose(calib.normalized_score(s, t, m), [0, 0, 0.25, 0.5, 0.75, 1, 1])
    assert calib.normalized_score(0.31, t, m) > 0.5 and calib.verdict(0.31, t) == "defective"
    assert calib.verdict(0.3, t) == "good"  # a score equal to the threshold is good
    assert calib.normalized_score(0.3, 0.3, 0.3) == 0 and calib.normalized_score(0.4, 0.3, 0.3) == 1


def test_masks_and_regions_match_a_hand_made_map():
    amap = np.zeros((6, 8))
    amap[1, 1], amap[2, 2] = 0.9, 0.7  # touch diagonally: one 8-connected region
    amap[4, 5:8] = [0.6, 0.8, 0.6]  # a second region
    amap[0, 7] = 0.5  # at the threshold: not in the mask
    mask = calib.defect_mask(amap, 0.5)
    assert mask.sum() == 5
    regions = calib.regions(mask, amap)
    assert regions == [{"box": [5, 4, 7, 4], "area": 3, "peak": 0.8},
                       {"box": [1, 1, 2, 2], "area": 2, "peak": 0.9}]
    assert calib.regions(np.zeros((3, 3), bool), np.zeros((3, 3))) == []


def test_rates_and_the_f1_optimal_threshold():
    labels = [0, 0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.8]
    r = calib.rates(labels, scores, 0.55)
    assert r["false_alarm_rate"] == 0.25 and r["detection_rate"] == pytest.approx(2 / 3)
    assert r["confusion"] == {"tp": 2, "fp": 1, "tn": 3, "fn": 1}
    lo, hi = r["false_alarm_ci95"]
    assert 0 < lo < 0.25 < hi < 1
    t = calib.f1_optimal_threshold(labels, scores)
    assert t == 0.3  # everything above 0.3 flagged: tp 3, fp 1 -> F1 6/7 (the best)


# ------------------------------------------------------------------------------ the commands



def goods(folder, n, seed=0, size=(40, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = (rng.random((size[1], size[0], 3)) * 60 + 100).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"g{i:02d}.png")
    return folder


def defects(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(99)
    for i in range(n):
        arr = (rng.random((32, 40, 3)) * 60 + 100).astype(np.uint8)
        arr[8:20, 10:24] = [255, 0, 0]
        Image.fromarray(arr).save(folder / f"d{i}.png")
    return folder


def calibrate(model_dir, good, *extra):
    return main(["calibrate", "--checkpoint", str(model_dir), "--class-name", "widget", "--good",
                 str(good), "--false-alarm-rate", "0.05", "--image-size", "32", "--batch-size", "4",
                 *map(str, extra)])


def predict(model_dir, out, *inputs, extra=()):
    return main(["predict", "--checkpoint", str(model_dir), "--class-name", "widget", "--output",
                 str(out), "--image-size", "32", "--batch-size", "2", *map(str, extra),
                 *map(str, inputs)])


def test_calibrate_then_predict_with_verdicts_masks_and_regions(model_dir, tmp_path, capsys):
    good = goods(tmp_path / "good", 20)
    assert calibrate(model_dir, good) == 0
    path = model_dir / "calibration" / "widget.json"
    record = json.loads(path.read_text())
    scores = np.sort(record["good"]["scores"])
    assert record["n"] == 20 and record["k"] == 20 and record["alpha"] == 0.05
    assert record["image_threshold"] == pytest.approx(scores[19])
    assert record["pixel_threshold"] == pytest.approx(np.sort(record["good"]["max_pixels"])[19])
    assert record["good_scores"]["min"] == pytest.approx(scores[0])
    assert record["settings"]["image_size"] == 32 and record["settings"]["reference"] is None
    assert record["model"]["identity"] == model_io.identity(model_dir)
    assert "image threshold" in capsys.readouterr().out

    inputs = defects(tmp_path / "in")
    goods(inputs, 2, seed=5)
    out = tmp_path / "out"
    assert predict(model_dir, out, inputs, extra=("--calibration", "auto")) == 0
    meta = json.loads((out / "scores.json").read_text())
    assert meta["calibration"]["image_threshold"] == record["image_threshold"]
    t, m = record["image_threshold"], record["good_scores"]["min"]
    for row in meta["images"]:
        assert row["verdict"] == ("defective" if row["score"] > t else "good")
        assert row["normalized_score"] == pytest.approx(calib.normalized_score(row["score"], t, m))
        mask = np.asarray(Image.open(out / "masks" / f"{row['name']}.png")) > 0
        assert mask.shape == (row["height"], row["width"])
        assert mask.sum() == sum(r["area"] for r in row["regions"])
        assert (mask.sum() > 0) == (row["max_pixel"] > record["pixel_threshold"])
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert {"verdict", "normalized_score", "defect_regions"} <= set(rows[0])
    page = (out / "report.html").read_text()
    links = re.findall(r'src="([^"]+)"', page)
    assert len(links) == 2 * len(rows) and all((out / unquote(x)).is_file() for x in links)
    assert "defective</span>" in page and "normalized score" in page


def test_fail_on_defect_exit_codes(model_dir, tmp_path, capsys):
    good = goods(tmp_path / "good", 19)
    record_path = tmp_path / "c.json"
    assert calibrate(model_dir, good, "--output", record_path) == 0
    record = json.loads(record_path.read_text())
    inputs = goods(tmp_path / "in", 2, seed=7)
    for threshold, code in ((1e9, 0), (-1e9, 3)):
        record["image_threshold"] = threshold
        record_path.write_text(json.dumps(record))
        assert predict(model_dir, tmp_path / f"out{code}", inputs,
                       extra=("--calibration", record_path, "--fail-on-defect")) == code
    assert "2 defective" in capsys.readouterr().out
    assert predict(model_dir, tmp_path / "o", inputs, extra=("--fail-on-defect",)) == 2  # no threshold


def test_mismatched_calibration_is_refused(model_dir, tmp_path, capsys):
    good = goods(tmp_path / "good", 19)
    record_path = tmp_path / "c.json"
    assert calibrate(model_dir, good, "--output", record_path) == 0
    capsys.readouterr()
    inputs = goods(tmp_path / "in", 1, seed=3)
    assert main(["predict", "--checkpoint", str(model_dir), "--class-name", "widget", "--output",
                 str(tmp_path / "o"), "--image-size", "48", "--calibration", str(record_path),
                 str(inputs)]) == 2
    err = capsys.readouterr().err
    assert "image_size 32, this run uses 48" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # refused before anything was written
    assert predict(model_dir, tmp_path / "o", inputs, extra=("--calibration", record_path,
                                                             "--reference", good)) == 2
    assert "without a few-shot bank, this run has --reference" in capsys.readouterr().err
    record = json.loads(record_path.read_text())
    record["model"]["identity"]["adapters"] = {"params.safetensors": "0" * 64}
    record_path.write_text(json.dumps(record))
    assert predict(model_dir, tmp_path / "o", inputs, extra=("--calibration", record_path)) == 2
    assert "made with another model (adapters differs" in capsys.readouterr().err


def test_too_few_good_images_and_the_bank_split(model_dir, tmp_path, capsys):
    good = goods(tmp_path / "good", 20)
    assert calibrate(model_dir, good, "--reference", good, "--shots", "2") == 2
    assert ("need at least 19 good images for a false-alarm rate of 0.05; got 18"
            in capsys.readouterr().err)
    goods(tmp_path / "good", 21)
    out = tmp_path / "c.json"
    assert calibrate(model_dir, good, "--reference", good, "--shots", "2", "--output", out) == 0
    record = json.loads(out.read_text())
    bank = [str(good / "g00.png"), str(good / "g01.png")]
    assert record["split"]["bank"] == bank and record["settings"]["reference"]["images"] == bank
    assert record["n"] == 19 and not set(bank) & set(record["good"]["images"])
    # predict with exactly the bank's images as --reference is accepted
    bank_dir = tmp_path / "bank"
    bank_dir.mkdir()
    for p in bank:
        (bank_dir / p.rsplit("/", 1)[1]).write_bytes(open(p, "rb").read())
    assert predict(model_dir, tmp_path / "o", bank_dir / "g00.png",
                   extra=("--calibration", out, "--reference", bank_dir)) == 0
