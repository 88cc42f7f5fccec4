"""`predict`: skip-and-report for unreadable inputs, scores written per batch (nothing lost on a
crash), the on-disk text cache, the colour scale, and overlays that a person can read."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from addinov3_jax import plots
from addinov3_jax.commands import predict
from addinov3_jax.commands.cli import main
from addinov3_jax.data.records import DataError
from addinov3_jax.io import model_dir as model_io
from addinov3_jax.models import prompts


def images(folder, n=3, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (np.random.default_rng(i).random((size[1], size[0], 3)) * 255).astype(np.uint8)
        arr[5:15, 10:20] = 255  # a bright "defect"
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder


def run(model_dir, out, *inputs, extra=()):
    return main(["predict", "--checkpoint", str(model_dir), "--class-name", "widget", "--output",
                 str(out), "--image-size", "32", "--batch-size", "2", *extra, *map(str, inputs)])


def test_unreadable_inputs_are_skipped_and_reported(model_dir, tmp_path, capsys):
    folder = images(tmp_path / "in", n=3)
    (folder / "img1.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "notes.txt").write_text("not an image")
    assert run(model_dir, tmp_path / "out", folder, tmp_path / "notes.txt") == 0
    captured = capsys.readouterr()
    assert "skipped 2 unreadable" in captured.out
    assert "img1.png: unreadable or truncated image" in captured.err
    assert "notes.txt: not an image file (suffix '.txt'" in captured.err
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert [r["name"] for r in rows] == ["img0", "img2"]
    meta = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert meta["complete"] and {s["image"].rsplit("/", 1)[1] for s in meta["skipped"]} == {
        "img1.png", "notes.txt"}
    assert sorted(p.name for p in (tmp_path / "out" / "heatmaps").iterdir()) == ["img0.png", "img2.png"]
    assert not (tmp_path / "out" / predict.PENDING).exists()
    # Nothing readable at all: one line, exit 2, the reasons still in scores.json.
    assert run(model_dir, tmp_path / "out2", tmp_path / "notes.txt") == 2
    err = capsys.readouterr().err
    assert "predict: error: none of the 1 input(s) could be read" in err and err.count("\n") == 1
    assert json.loads((tmp_path / "out2" / "scores.json").read_text())["skipped"]


def test_crash_keeps_finished_batches(model_dir, tmp_path, monkeypatch):
    folder = images(tmp_path / "in", n=4)
    model = predict.load_model(model_dir)
    from addinov3_jax.runtime import inference

    calls = []
    real = inference.Predictor.__call__

    def flaky(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(self, *a, **kw)

    monkeypatch.setattr(inference.Predictor, "__call__", flaky)
    with pytest.raises(RuntimeError, match="device lost"):
        predict.predict(model, [folder], "widget", tmp_path / "out", image_size=32, batch_size=2,
                        save_maps=True)
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["name"] for r in rows] == ["img0", "img1"]  # the first batch, flushed
    meta = json.loads((out / "scores.json").read_text())
    assert meta["complete"] is False and len(meta["images"]) == 2
    assert {p.name for p in (out / "heatmaps").iterdir()} == {"img0.png", "img1.png"}
    assert {p.name for p in (out / "maps").iterdir()} == {"img0.npy", "img1.npy"}


def test_text_prototypes_are_cached_on_disk(model_dir, tmp_path, monkeypatch):
    folder = images(tmp_path / "in", n=1)
    assert run(model_dir, tmp_path / "out", folder) == 0
    cached = list((model_dir / "text_cache").glob("*.npy"))
    assert len(cached) >= 1

    def no_encoding(*a, **kw):
        raise AssertionError("the prompts were encoded again")

    monkeypatch.setattr(prompts, "_encode_classes", no_encoding)
    assert run(model_dir, tmp_path / "out2", folder) == 0
    assert model_io.text_cache_dir(model_dir, tmp_path / "o") == model_dir / "text_cache"


def test_text_cache_falls_back_to_the_output_dir(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(predict.os, "access", lambda *a: False)
    assert model_io.text_cache_dir(model_dir, tmp_path / "o") == tmp_path / "o" / "text_cache"


def _bar_column(png: Image.Image, body_width: int, height: int) -> np.ndarray:
    """The colour bar's middle column, top to bottom, inside its frame."""
    x0, y0, x1, y1 = plots.colorbar_box(body_width, height)
    return np.asarray(png.convert("RGB")).astype(int)[y0 + 2 : y1 - 1, (x0 + x1) // 2]


@pytest.mark.parametrize("scale", ["run", "fixed"])
def test_overlay_png_is_readable(model_dir, tmp_path, scale):
    folder = images(tmp_path / "in", n=2, size=(64, 48))
    assert run(model_dir, tmp_path / "out", folder, extra=("--scale", scale)) == 0
    meta = json.loads((tmp_path / "out" / "scores.json").read_text())
    lo, hi = meta["scale"]["min"], meta["scale"]["max"]
    maps = []
    for row in meta["images"]:
        png = Image.open(tmp_path / "out" / "heatmaps" / f"{row['name']}.png")
        w, h = row["width"], row["height"]
        assert png.size[0] > 2 * w + 20 and png.size[1] > h
        arr = np.asarray(png.convert("RGB")).astype(int)
        assert arr.std() > 10  # not a constant picture
        bar = _bar_column(png, 2 * w, h)
        top, bottom = bar[0], bar[-1]
        assert top[0] > top[2] and bottom[2] > bottom[0]  # red (high) on top, blue (low) below
        assert len({tuple(p) for p in bar}) > 10  # a gradient, not a flat strip
        maps.append(row)
    if scale == "run":
        assert lo < hi < 1  # the run's own range, not 0..1
        # With the run's scale the overlays are not uniformly blue.
        over = np.asarray(Image.open(tmp_path / "out" / "heatmaps" / "img0.png").convert("RGB"))
        half = over[:48, 64:128].astype(int)
        assert (half[..., 0] > half[..., 2] + 30).mean() > 0.01
    else:
        assert (lo, hi) == (0.0, 1.0)


def test_predict_rejects_bad_scale(model_dir, tmp_path):
    with pytest.raises(ValueError, match="scale must be one of"):
        predict.predict(predict.load_model(model_dir), [images(tmp_path / "in", 1)], "x",
                        tmp_path / "o", scale="log")
    with pytest.raises(DataError, match="no such file or folder"):
        predict.expand([tmp_path / "missing"])


def test_overlay_writes_the_score_and_the_scale():
    img = np.zeros((60, 80, 3), np.uint8)
    amap = np.linspace(0, 0.02, 60 * 80).reshape(60, 80)
    with_score = np.asarray(plots.overlay(img, amap, scale=(0, 0.02), score=0.5))
    no_score = np.asarray(plots.overlay(img, amap, scale=(0, 0.02)))
    assert with_score.shape == no_score.shape and (with_score != no_score).any()  # the caption


def test_output_names_never_collide():
    paths = [Path("d/bottle/train/good/000.png"), Path("d/bottle/test/good/000.png"),
             Path("x/a.png"), Path("x/a.jpg"), Path("y/b.png")]
    names = predict._unique_names(paths)
    assert names[paths[0]] == "train_good_000" and names[paths[1]] == "test_good_000"
    assert {names[paths[2]], names[paths[3]]} == {"a_png", "a_jpg"} and names[paths[4]] == "b"
    assert len(set(names.values())) == len(paths)
