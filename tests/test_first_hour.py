"""The first hour of a new user (issue #20): every input and fault a newcomer meets either works
or ends in one clear line, and nothing half-written is left behind."""

import csv
import errno
import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import runs
from PIL import Image

from addinov3_jax import config as config_lib
from addinov3_jax import plots
from addinov3_jax.commands import predict
from addinov3_jax.commands.cli import load_config, main
from addinov3_jax.data.records import decode_image, image_size
from addinov3_jax.io import workdir as workdir_io
from addinov3_jax.models import model as ad
from addinov3_jax.runtime import evaluator, trainer


def picture(path: Path, size=(40, 30), seed=0, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path, **save)
    return path


def run(model_dir, out, *inputs, extra=()):
    return main(["predict", "--checkpoint", str(model_dir), "--class-name", "widget", "--output",
                 str(out), "--image-size", "32", "--batch-size", "2", *extra, *map(str, inputs)])


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if p.name.startswith(".") and p.name != ".lock"
                  or ".tmp" in p.name or "partial" in p.name)


# 1 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["run", "fixed"])
def test_tiny_images_are_drawn_and_no_result_is_lost(model_dir, tmp_path, capsys, scale):
    picture(tmp_path / "in" / "strip.png", size=(80, 12))
    picture(tmp_path / "in" / "dot.png", size=(3, 2))
    picture(tmp_path / "in" / "normal.png")
    assert run(model_dir, tmp_path / "out", tmp_path / "in", extra=("--scale", scale)) == 0
    meta = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert meta["complete"] and len(meta["images"]) == 3 and not meta["not_drawn"]
    assert sorted(p.name for p in (tmp_path / "out" / "heatmaps").iterdir()) == [
        "dot.png", "normal.png", "strip.png"]
    assert leftovers(tmp_path / "out") == []
    capsys.readouterr()


@pytest.mark.parametrize("scale", ["run", "fixed"])
def test_a_drawing_failure_keeps_every_row(model_dir, tmp_path, monkeypatch, capsys, scale):
    picture(tmp_path / "in" / "a.png")
    picture(tmp_path / "in" / "b.png", seed=1)
    picture(tmp_path / "in" / "c.png", seed=2)

    def broken(*a, **kw):
        raise ValueError("cannot draw")

    monkeypatch.setattr(plots, "overlay", broken)
    assert run(model_dir, tmp_path / "out", tmp_path / "in", extra=("--scale", scale)) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    meta = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert len(rows) == 3 and len(meta["images"]) == 3 and meta["complete"]
    assert [n["error"] for n in meta["not_drawn"]] == ["cannot draw"] * 3
    assert "no heatmap for" in capsys.readouterr().err
    assert leftovers(tmp_path / "out") == []


# 2 -------------------------------------------------------------------------------------------

def test_output_names_are_injective(tmp_path):
    paths = [tmp_path / "x" / "a_b.png", tmp_path / "a" / "b.png", tmp_path / "c" / "b.png",
             tmp_path / "A" / "img.png", tmp_path / "a" / "img.png", tmp_path / "q" / "p.PNG",
             tmp_path / "q" / "p.png"]
    names = predict._unique_names(paths)
    assert len({n.lower() for n in names.values()}) == len(paths)  # also on case-blind disks
    assert names[tmp_path / "c" / "b.png"] == "c_b"  # readable where nothing collides


# 3 -------------------------------------------------------------------------------------------

def test_a_finished_workdir_refuses_another_run(train_data, tiny_towers, tmp_path):
    trainer.train(runs.tiny_config(train_data, tiny_towers, epochs=1), tmp_path)
    other = runs.tiny_config(train_data, tiny_towers, epochs=1)
    other.seed = 7
    with pytest.raises(ValueError, match="seed=0, this config has 7"):
        trainer.train(other, tmp_path)
    assert trainer.train(runs.tiny_config(train_data, tiny_towers, epochs=1), tmp_path)["finished"]


# 4 -------------------------------------------------------------------------------------------

def test_normal_only_class_has_undefined_pixel_metrics_and_strict_json(tiny, tmp_path):
    for i in range(2):
        picture(tmp_path / "data/good_only/normal" / f"{i}.png", seed=i)
        picture(tmp_path / "data/mixed/normal" / f"{i}.png", seed=10 + i)
        picture(tmp_path / "data/mixed/anomalous" / f"{i}.png", seed=20 + i)
        mask = np.zeros((30, 40), np.uint8)
        mask[5:15, 5:20] = 255
        (tmp_path / "data/mixed/masks").mkdir(exist_ok=True)
        Image.fromarray(mask).save(tmp_path / "data/mixed/masks" / f"{i}_mask.png")
    opts = evaluator.EvalOptions(image_size=32, batch_size=2, heatmaps_per_category=0, curves=False)
    r = evaluator.evaluate(tiny, [("folder", str(tmp_path / "data"))], tmp_path / "out", opts=opts,
                           results_name="results_test")
    entry = r["datasets"]["folder"]
    good = entry["categories"]["good_only"]
    for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"):
        assert math.isnan(good[k])
        assert entry["mean"][k] == entry["categories"]["mixed"][k]  # left out of the mean
    text = (tmp_path / "out" / "results_test.json").read_text()

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    saved = json.loads(text, parse_constant=refuse)  # strict JSON: NaN / Infinity refused
    assert saved["datasets"]["folder"]["categories"]["good_only"]["pixel_ap"] is None


# 5 -------------------------------------------------------------------------------------------

def test_predict_output_is_locked_and_a_killed_run_is_cleaned_up(model_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    picture(folder / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                           "command": "predict"}))
    assert run(model_dir, out, folder) == 2
    err = capsys.readouterr().err
    assert "another `addinov3 predict`" in err and err.count("\n") == 1
    # What a SIGKILLed run leaves: its (stale) lock, pending maps, a partial csv, a temp png.
    (out / ".lock").write_text(json.dumps({"pid": 2**22 + 4321, "host": socket.gethostname()}))
    (out / ".pending_maps.999").mkdir()
    (out / ".scores.csv.999.partial").write_text("image,name\n")
    (out / "heatmaps").mkdir()
    (out / "heatmaps" / ".a.png.999.tmp").write_bytes(b"\x89PNG half")
    assert run(model_dir, out, folder) == 0
    assert leftovers(out) == [] and not (out / ".lock").exists()
    # A rerun into the same output with other inputs: the folder matches its scores.json.
    picture(tmp_path / "in2" / "b.png")
    assert run(model_dir, out, tmp_path / "in2") == 0
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["b.png"]


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    (tmp_path / "scores.json").write_text("old")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(workdir_io.WriteFailed, match="scores.json: could not write .the disk is full"):
        workdir_io.atomic_write(tmp_path / "scores.json", fails)
    assert (tmp_path / "scores.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]


# 6 -------------------------------------------------------------------------------------------

def test_exif_orientation_is_applied_by_the_one_decoder(tmp_path):
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :10] = 255  # a white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    img = decode_image(path.read_bytes())
    assert img.size == (20, 60) and image_size(path.read_bytes()) == (20, 60)
    assert np.asarray(img)[:10].mean() > 200  # the band is on top, as a photo viewer shows it


# 7 -------------------------------------------------------------------------------------------

def test_webp_is_read_and_unknown_files_are_reported(model_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    picture(folder / "a.webp", format="WEBP", lossless=True)
    picture(folder / "sub" / "b.JPG", format="JPEG")
    (folder / "notes.txt").write_text("hello")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    picture(folder / ".hidden" / "c.png")  # hidden folders are not the user's images
    (folder / "empty.png").write_bytes(b"")
    assert run(model_dir, tmp_path / "out", folder) == 0
    meta = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert sorted(Path(r["image"]).name for r in meta["images"]) == ["a.webp", "b.JPG"]
    assert {Path(s["image"]).name: s["error"] for s in meta["skipped"]} == {
        "notes.txt": "not an image file (suffix '.txt'; expected one of .png, .jpg, .jpeg, .bmp, "
                     ".tif, .tiff, .webp)",
        "empty.png": "empty file (0 bytes)"}
    assert "BytesIO" not in capsys.readouterr().err


# 8 -------------------------------------------------------------------------------------------

def test_speed_is_measured_after_the_step_finished(monkeypatch):
    clock = {"now": 100.0}
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: clock["now"])

    class Pending:  # an asynchronously dispatched result: reading it takes the step's time
        def __float__(self):
            clock["now"] += 10.0
            return 0.5

    row = trainer.log_row({"loss": Pending()}, steps=5, since=100.0, batch_size=8)
    assert row["loss"] == 0.5 and row["steps_per_s"] == pytest.approx(0.5)
    assert row["images_per_s"] == pytest.approx(4.0)


# 9 -------------------------------------------------------------------------------------------

def test_a_full_disk_is_one_line_and_the_rerun_finishes(train_data, tiny_towers, tmp_path, monkeypatch,
                                                        capsys):
    import safetensors.numpy

    real = safetensors.numpy.save_file

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    work = tmp_path / "w"
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(  # the demo config on train_data, as a config file
        "from addinov3_jax import config\n\n\ndef get_config():\n"
        "    c = config.demo_config()\n"
        f"    c.data.root, c.data.classes, c.data.image_size = {str(train_data)!r}, "
        "('marble', 'washer'), 64\n"
        "    c.train.epochs, c.train.log_every, c.train.checkpoint_every = 1, 1, 100\n"
        f"    c.model.backbone = {str(tiny_towers / 'backbone')!r}\n"
        f"    c.model.text_tower = {str(tiny_towers / 'text_tower')!r}\n"
        "    return c\n")
    argv = ["train", "--config", str(cfg_file), "--workdir", str(work)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = [line for line in err.splitlines() if line.startswith("addinov3 ")]  # not the bars
    assert len(err) == 1 and "could not write (the disk is full)" in err[0]
    assert str(work / "model") in err[0] and "rerun the same command" in err[0]
    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    assert main(argv) == 0  # space freed: the rerun writes the model, no step left to train
    out = capsys.readouterr().out
    assert "nan" not in out and "no step left to train" in out
    assert (work / "model" / "model.json").is_file()


# 10 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,message", [
    ("--batch-size", "0", "expected a positive integer, got 0"),
    ("--batch-size", "-2", "expected a positive integer, got -2"),
    ("--image-size", "8", "expected a positive multiple of the patch size 16 (e.g. 16 or 32), got 8"),
    ("--image-size", "100", "expected a positive multiple of the patch size 16 (e.g. 96 or 112), got 100"),
])
def test_bad_numbers_are_argparse_errors(model_dir, tmp_path, capsys, flag, value, message):
    picture(tmp_path / "a.png")
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--checkpoint", str(model_dir), "--class-name", "x", "--output",
              str(tmp_path / "o"), flag, value, str(tmp_path / "a.png")])
    assert exit_.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="positive"):
        predict.check_arguments(scale="run", image_size=512, batch_size=0)


def test_config_mistakes_are_one_readable_line(monkeypatch):
    monkeypatch.chdir(runs.REPO)
    with pytest.raises(config_lib.ConfigError) as e:
        load_config("configs/demo.py", ["--config.train.batchsize=3"])
    assert "\\n" not in str(e.value) and "\\'" not in str(e.value)
    assert 'Did you mean "batch_size"' in str(e.value)
    with pytest.raises(config_lib.ConfigError) as e:
        load_config("configs/demo.py:quik", [])
    assert str(e.value) == "configs/demo.py: unknown argument 'quik'; allowed: '', 'quick'"


def test_reference_must_be_a_folder(model_dir, tmp_path, capsys):
    image = picture(tmp_path / "a.png")
    assert run(model_dir, tmp_path / "o", image, extra=("--reference", str(image))) == 2
    assert "--reference takes a folder of normal images of the class, not a file" in (
        capsys.readouterr().err)


# 11 ------------------------------------------------------------------------------------------

def test_large_photos_are_never_held_at_full_size(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(predict, "DISPLAY_MAX_SIDE", 64)
    path = picture(tmp_path / "in" / "big.jpg", size=(400, 300), format="JPEG")
    drawn, resized = [], []
    real_overlay, real_resize = plots.overlay, ad.resize_map

    def overlay(image, amap, *a, **kw):
        drawn.append((np.shape(image), np.shape(amap)))
        return real_overlay(image, amap, *a, **kw)

    def resize_map(amap, h, w):
        resized.append((h, w))
        return real_resize(amap, h, w)

    monkeypatch.setattr(plots, "overlay", overlay)
    monkeypatch.setattr(ad, "resize_map", resize_map)
    assert run(model_dir, tmp_path / "out", path, extra=("--save-maps",)) == 0
    assert drawn == [((48, 64, 3), (48, 64))] and resized == [(48, 64)]  # no 300 x 400 copy
    row = json.loads((tmp_path / "out" / "scores.json").read_text())["images"][0]
    assert (row["width"], row["height"]) == (400, 300)
    full = np.load(tmp_path / "out" / "maps" / "big.npy")  # still at the original size
    assert full.shape == (300, 400) and row["max_pixel"] == pytest.approx(float(full.max()), rel=1e-5)
    with Image.open(tmp_path / "out" / "heatmaps" / "big.png") as png:
        assert png.height < 300


def test_reduced_decoding_changes_nothing_below_the_cap(tmp_path):
    path = picture(tmp_path / "a.jpg", size=(120, 90), format="JPEG")
    data = path.read_bytes()
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(decode_image(data, max_side=120)))
    assert decode_image(data, max_side=40).size == (40, 30)


# 12 ------------------------------------------------------------------------------------------

def test_demo_config_from_anywhere_and_its_docs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/demo.py", [])  # not in the repository root
    assert tuple(cfg.data.classes) == config_lib.AUXILIARY
    doc = (runs.REPO / "configs" / "demo.py").read_text()
    assert f"{len(config_lib.AUXILIARY)} synthetic categories" in doc
    assert f"{len(config_lib.HELD_OUT)} held-out" in doc
    readme = (runs.REPO / "README.md").read_text()
    assert "train/model" in readme and "--class-name object" in readme


# Further first-hour cases --------------------------------------------------------------------

def test_output_inside_the_input_folder_is_not_read_back(model_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    picture(folder / "a.png")
    for _ in range(2):  # the rerun must not score its own heatmaps
        assert run(model_dir, folder / "out", folder) == 0
        meta = json.loads((folder / "out" / "scores.json").read_text())
        assert [Path(r["image"]).name for r in meta["images"]] == ["a.png"] and not meta["skipped"]
    capsys.readouterr()


def test_symlinked_folders_and_duplicates_count_once(model_dir, tmp_path, capsys):
    real = tmp_path / "real"
    picture(real / "a.png")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "linked").symlink_to(real, target_is_directory=True)
    (tmp_path / "in" / "loop").symlink_to(tmp_path / "in", target_is_directory=True)
    (tmp_path / "in" / "gone.png").symlink_to(tmp_path / "missing.png")
    paths, skipped = predict.expand([tmp_path / "in", real / "a.png"])
    assert [p.name for p in paths] == ["a.png"]
    assert [(Path(s["image"]).name, s["error"]) for s in skipped] == [("gone.png", "broken symbolic link")]


def test_blank_class_name_and_unwritable_output(model_dir, tmp_path, capsys):
    image = picture(tmp_path / "a.png")
    with pytest.raises(SystemExit):
        main(["predict", "--checkpoint", str(model_dir), "--class-name", " ", "--output",
              str(tmp_path / "o"), str(image)])
    assert "argument --class-name: expected a word" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert run(model_dir, tmp_path / "file" / "out", image) == 2  # below a file: never writable
    err = capsys.readouterr().err
    assert "not writable" in err and "choose another --output" in err and err.count("\n") == 1


@pytest.mark.parametrize("mode", ["L", "LA", "I;16", "P", "RGBA", "CMYK", "1"])
def test_every_pixel_format_decodes_to_rgb(tmp_path, mode):
    base = Image.fromarray((np.random.default_rng(0).random((12, 16, 3)) * 255).astype(np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.random.default_rng(0).random((12, 16)) * 65535).astype(np.uint16))
    else:
        img = base.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    out = decode_image(path.read_bytes())
    assert out.mode == "RGB" and out.size == (16, 12)
