"""`report.html` and decisions in eval: every linked file exists, the tables equal results.json,
the calibration uses train images only, and the page renders (headless Chromium, when present)."""

import json
import math
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from addinov3_jax import reporting
from addinov3_jax.data import synthetic
from addinov3_jax.runtime import evaluator as evaluate

KEYS = {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
        "pixel_aupro", "num_images"}


class Page(HTMLParser):
    """The links and the tables (class, data-dataset, rows of cell texts) of a page."""

    def __init__(self, text):
        super().__init__()
        self.links, self.tables, self._cell = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a:
                self.links.append(unquote(a[key]))
        if tag == "table":
            self.tables.append({"class": a.get("class"), "dataset": a.get("data-dataset"), "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append(self._cell)
            self._cell = None


def check_links(page_path: Path) -> Page:
    page = Page(page_path.read_text())
    assert page.links
    for link in page.links:
        assert "://" not in link and not link.startswith("//"), link  # nothing from the network
        assert (page_path.parent / link).is_file(), link
    return page


def screenshot_std(page_path: Path, tmp_path: Path) -> float:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}",
                    f"--screenshot={shot}", "--window-size=1200,2000", page_path.resolve().as_uri()],
                   check=True, capture_output=True, timeout=180, cwd=tmp_path)
    return float(np.asarray(Image.open(shot).convert("L"), np.float32).std())


@pytest.fixture(scope="module")
def syn(synthetic_data):
    return synthetic_data(("pill", "weave"), size=64, normal=6, per_defect=2, train_normal=12)


def test_eval_calibrates_on_train_images_and_writes_a_checked_report(tiny, syn, tmp_path):
    opts = evaluate.EvalOptions(image_size=64, batch_size=4, heatmaps_per_category=0,
                                false_alarm_rate=0.1, report_examples=2)
    seen = []
    real = evaluate.predict_records

    def spy(predictor, records, *a, **kw):
        seen.append({r.split for r in records})
        return real(predictor, records, *a, **kw)

    evaluate.predict_records = spy
    try:
        evaluate.evaluate(tiny, [("synthetic", str(syn))], tmp_path, opts=opts,
                          classes=("pill", "weave"))
    finally:
        evaluate.predict_records = real
    assert seen.count({"train"}) == 2 and seen.count({"test"}) == 2  # calibration: train only
    saved = json.loads((tmp_path / "results.json").read_text())
    entry = saved["datasets"]["synthetic"]
    for row in [*entry["categories"].values(), entry["mean"]]:
        assert set(row) == KEYS  # METRICS unchanged
    cal = entry["calibration"]
    assert cal["false_alarm_rate_target"] == 0.1
    for r in cal["categories"].values():
        assert r["n"] == 12 and r["k"] == 12  # ceil(13 * 0.9) = 12
        c = r["confusion"]
        assert c["fp"] + c["tn"] == r["num_good"] == 6 and c["tp"] + c["fn"] == r["num_defective"] == 6
        assert r["false_alarm_rate"] == c["fp"] / 6 and r["detection_rate"] == c["tp"] / 6
        assert 0 <= r["f1_false_alarm_rate"] <= 1 and r["f1_detection_rate"] > 0
    assert cal["mean"]["false_alarm_rate"] == pytest.approx(
        np.mean([r["false_alarm_rate"] for r in cal["categories"].values()]))
    assert "Decisions at a target false-alarm rate of 0.1" in (tmp_path / "results.md").read_text()

    page = check_links(tmp_path / "report.html")
    metrics = [t for t in page.tables if t["class"] == "metrics"]
    assert len(metrics) == 1 and metrics[0]["dataset"] == "synthetic"
    header, *rows = metrics[0]["rows"]
    assert header[0] == "category" and header[-1] == "images"
    assert [r[0] for r in rows] == ["pill", "weave", "mean"]
    for r in rows:
        src = entry["mean"] if r[0] == "mean" else entry["categories"][r[0]]
        for key, cell in zip(header[1:], r[1:], strict=True):
            value = src[key if key != "images" else "num_images"]
            assert cell == ("n/a" if value is None else reporting.fmt(value)), (r[0], key)
    decisions = [t for t in page.tables if t["class"] == "decisions"][0]
    header, *rows = decisions["rows"]
    for r in rows[:-1]:
        src = cal["categories"][r[0]]
        assert r[header.index("false-alarm rate")] == reporting.fmt(src["false_alarm_rate"])
        assert r[header.index("detection rate")] == reporting.fmt(src["detection_rate"])
        c = src["confusion"]
        assert r[-1] == f"{c['tp']} / {c['fp']} / {c['tn']} / {c['fn']}"
    pictures = [tmp_path / link for link in page.links if "report/" in link]
    assert len(pictures) == 2 * 2 * 2 * 2  # 2 classes x (misses, false alarms) x 2 x (overlay, mask)
    for p in pictures:
        with Image.open(p) as im:
            assert im.height >= 256
    assert screenshot_std(tmp_path / "report.html", tmp_path) > 10


def test_too_few_train_images_is_a_note_not_a_failure(tiny, tmp_path):
    root = synthetic.generate(tmp_path / "syn", categories=("pill",), size=64, normal=2,
                              per_defect=1, train_normal=5)
    opts = evaluate.EvalOptions(image_size=64, batch_size=4, heatmaps_per_category=0, curves=False,
                                false_alarm_rate=0.1, report_examples=1)
    results = evaluate.evaluate(tiny, [("synthetic", str(root))], tmp_path / "out", opts=opts)
    row = results["datasets"]["synthetic"]["calibration"]["categories"]["pill"]
    assert row == {"n": 5, "note": "need at least 9 good images for a false-alarm rate of 0.1; got 5"}
    assert "need at least 9 good images" in (tmp_path / "out" / "report.html").read_text()


def test_escaping_and_formatting():
    assert reporting.esc('<a href="x">&') == "&lt;a href=&quot;x&quot;&gt;&amp;"
    assert reporting.fmt(None) == "n/a" and reporting.fmt(math.nan) == "n/a"
    assert reporting.fmt(0.123456) == "0.1235" and reporting.fmt(7) == "7"
    page = reporting.page("<script>", [reporting.table(["a"], [["<b>"]])])
    assert "<script>" not in page.split("<style>")[0] + page.split("</style>")[1]
    assert reporting.href(Path("/x/a b/c#.png"), "/x") == "a%20b/c%23.png"
