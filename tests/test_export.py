"""`addinov3 export`: ONNX (onnxruntime, OpenVINO when installed) and StableHLO (`serving.load`)
detectors equal `predict` on a tiny model, with and without a few-shot bank and a calibration, at
batch 1 and 3; `serving` runs without flax or the model code; broken or mismatched artifacts are
refused with one line; nothing is left behind when an export fails."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from addinov3_jax import serving
from addinov3_jax.commands import export
from addinov3_jax.commands.cli import main
from addinov3_jax.data import references
from addinov3_jax.data.pipeline import load_images, preprocess_image
from addinov3_jax.io import model_dir
from addinov3_jax.models import clip_text, dinov3, fewshot
from addinov3_jax.models import model as ad
from addinov3_jax.runtime import distributed, inference

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")

SIZE = 32
CLASS = "widget"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tiny = ad.ADDinoV3(dinov3.create("tiny", rngs=nnx.Rngs(0)), clip_text.create("tiny", rngs=nnx.Rngs(1)),
                       ad.HeadConfig(feature_layers=(0, 1, 2, 3)), rngs=nnx.Rngs(2))
    model_dir.save(tiny, root / "model")
    refs = root / "refs"
    refs.mkdir()
    for i in range(2):  # other sizes than SIZE: the bank goes through predict's resize
        arr = (np.random.default_rng(10 + i).random((40, 30, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(refs / f"good{i}.png")
    (root / "cal.json").write_text(json.dumps({"image_threshold": 0.5, "pixel_threshold": 0.6}))
    return root, {}


def exported(setup, fmt: str, fewshot_too: bool) -> Path:
    """The export of the tiny model (made once per format and variant; `setup[1]` caches it)."""
    root, cache = setup
    key = (fmt, fewshot_too)
    if key not in cache:
        out = root / f"{fmt}_{int(fewshot_too)}"
        extra = (["--reference", str(root / "refs"), "--calibration", str(root / "cal.json")]
                 if fewshot_too else [])
        assert main(["export", "--checkpoint", str(root / "model"), "--class-name", CLASS, "--format", fmt,
                     "--image-size", str(SIZE), "--output", str(out), "--platforms", "cpu", *extra]) == 0
        cache[key] = out
    return cache[key]


def images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)


def predict_reference(root: Path, x_u8: np.ndarray, fewshot_too: bool):
    """What `addinov3 predict` computes for S x S images (host preprocessing, Predictor)."""
    model = model_dir.load(root / "model")
    cfg = model.backbone.config
    fs = fewshot.FewShotConfig() if fewshot_too else None
    predictor = inference.Predictor(model, distributed.default_mesh(1), fewshot_config=fs)
    bank = None
    if fewshot_too:
        refs = references.reference_paths(root / "refs")
        bank = predictor.build_bank(load_images(refs, SIZE, cfg.pixel_mean, cfg.pixel_std))
    x = np.stack([preprocess_image(Image.fromarray(im), SIZE, cfg.pixel_mean, cfg.pixel_std) for im in x_u8])
    maps, scores = predictor(x, np.zeros(len(x), np.int32), predictor.text_table([CLASS]), bank=bank)
    return np.asarray(maps), np.asarray(scores)


def check(out: dict, want, fewshot_too: bool):
    maps, scores = want
    np.testing.assert_allclose(out["map"], maps, rtol=0, atol=export.RTOL)
    np.testing.assert_allclose(out["score"], scores, rtol=0, atol=export.RTOL)
    assert out["map"].dtype == np.float32 and out["score"].dtype == np.float32
    if fewshot_too:
        assert out["verdict"].dtype == np.bool_
        np.testing.assert_array_equal(out["verdict"], out["score"] > 0.5)
    else:
        assert "verdict" not in out


@pytest.mark.parametrize("fewshot_too", [False, True], ids=["zero-shot", "bank+calibration"])
@pytest.mark.parametrize("fmt", ["onnx", "stablehlo"])
def test_export_equals_predict(setup, fmt, fewshot_too):
    import onnxruntime as ort

    root = setup[0]
    out = exported(setup, fmt, fewshot_too)
    manifest = json.loads((out / export.MANIFEST).read_text())
    assert manifest["class_name"] == CLASS and manifest["image_size"] == SIZE
    assert [o["name"] for o in manifest["outputs"]] == ["map", "score"] + (["verdict"] if fewshot_too else [])
    assert manifest["verification"]["tolerance"]["rtol"] == export.RTOL
    assert manifest["model"]["backbone"]["files"]["params.safetensors"]
    assert (manifest["fewshot"] is not None) == fewshot_too
    assert (manifest["calibration"] is not None) == fewshot_too
    for batch in (1, 3):
        x = images(batch, seed=batch)
        if fmt == "onnx":
            session = ort.InferenceSession(str(out / export.ONNX_FILE), providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            got = dict(zip(names, session.run(None, {"images": x}), strict=True))
        else:
            got = serving.load(out)(x)
        key = ("predict", batch, fewshot_too)  # the same inputs for both formats: computed once
        if key not in setup[1]:
            setup[1][key] = predict_reference(root, x, fewshot_too)
        check(got, setup[1][key], fewshot_too)


def test_openvino_runs_the_onnx_file(setup):
    ov = pytest.importorskip("openvino")
    out = exported(setup, "onnx", True)
    # fp32 as exported (OpenVINO's CPU default on bf16-capable CPUs is bf16 inference).
    compiled = ov.Core().compile_model(str(out / export.ONNX_FILE), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    x = images(3, seed=7)
    result = compiled(x)
    got = {o.get_any_name(): result[o] for o in compiled.outputs}
    check(got, predict_reference(setup[0], x, True), True)


BLOCKER = """
import importlib.abc, json, sys
import numpy as np

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("flax", "torch", "onnx", "optax", "orbax") or name in (
                "addinov3_jax.models", "addinov3_jax.runtime", "addinov3_jax.commands"):
            raise ImportError(f"blocked: {name}")

sys.meta_path.insert(0, Block())
from addinov3_jax import serving
size = int(sys.argv[2])
x = np.random.default_rng(3).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
out = serving.load(sys.argv[1])(x)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "addinov3_jax") and m not in (
    "addinov3_jax", "addinov3_jax.serving"))
print(json.dumps({"map": out["map"].tolist(), "score": out["score"].tolist(), "heavy": heavy}))
"""


def test_serving_needs_no_flax_nor_model_code(setup):
    out = exported(setup, "stablehlo", True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", BLOCKER, str(out), str(SIZE)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    want = predict_reference(setup[0], images(3, seed=3), True)
    np.testing.assert_allclose(np.asarray(got["map"], np.float32), want[0], atol=export.RTOL)
    np.testing.assert_allclose(np.asarray(got["score"], np.float32), want[1], atol=export.RTOL)


def copy_export(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def one_line_error(fn, match: str):
    with pytest.raises(serving.ArtifactError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_broken_or_mismatched_artifacts_are_refused(setup, tmp_path, monkeypatch):
    good = exported(setup, "stablehlo", False)
    # A flipped byte: the checksum, and without the check the deserializer.
    bad = copy_export(good, tmp_path / "corrupt")
    data = bytearray((bad / export.STABLEHLO_FILE).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    (bad / export.STABLEHLO_FILE).write_bytes(bytes(data))
    one_line_error(lambda: serving.load(bad), "checksum mismatch")
    (bad / export.STABLEHLO_FILE).write_bytes(b"not an artifact")
    one_line_error(lambda: serving.load(bad, verify=False), "not a readable jax.export artifact")
    # detector.json of another size; weights of another export; images of another size.
    other = copy_export(good, tmp_path / "size")
    manifest = json.loads((other / export.MANIFEST).read_text())
    (other / export.MANIFEST).write_text(json.dumps({**manifest, "image_size": 64}))
    one_line_error(lambda: serving.load(other), "do not belong together")
    mixed = copy_export(good, tmp_path / "mixed")
    other_weights = exported(setup, "stablehlo", True) / export.WEIGHTS_FILE
    (mixed / export.WEIGHTS_FILE).write_bytes(other_weights.read_bytes())
    one_line_error(lambda: serving.load(mixed, verify=False), "do not fit")
    detect = serving.load(good)
    one_line_error(lambda: detect(np.zeros((1, 64, 64, 3), np.uint8)), "expects uint8 images")
    one_line_error(lambda: detect(np.zeros((1, SIZE, SIZE, 3), np.float32)), "expects uint8 images")
    # An ONNX export is not a StableHLO one; an artifact without this machine's platform.
    one_line_error(lambda: serving.load(exported(setup, "onnx", False)), "not stablehlo")
    monkeypatch.setattr(serving, "backend_platform", lambda: "tpu")
    one_line_error(lambda: serving.load(good), "not for this tpu machine")


def test_failed_export_leaves_nothing(setup, tmp_path, monkeypatch, capsys):
    root = setup[0]
    args = ["export", "--checkpoint", str(root / "model"), "--class-name", CLASS, "--format", "onnx",
            "--image-size", str(SIZE), "--output", str(tmp_path / "out")]
    monkeypatch.setattr(export, "RTOL", -1.0)  # no artifact can pass: the check refuses it
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "does not match predict" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory
    monkeypatch.undo()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(args) == 2  # refused before any work, the directory untouched
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("problem, text", [
    ({"image_threshold": 0.5}, "pixel_threshold"),
    ({"image_threshold": "high", "pixel_threshold": 0.1}, "numeric"),
])
def test_bad_calibration_is_one_line(setup, tmp_path, capsys, problem, text):
    root = setup[0]
    (tmp_path / "cal.json").write_text(json.dumps(problem))
    assert main(["export", "--checkpoint", str(root / "model"), "--class-name", CLASS, "--format", "onnx",
                 "--image-size", str(SIZE), "--output", str(tmp_path / "out"),
                 "--calibration", str(tmp_path / "cal.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert text in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_image_size_must_fit_the_patches(setup, tmp_path, capsys):
    root = setup[0]
    with pytest.raises(SystemExit) as exit_:  # refused by argparse, before anything is loaded
        main(["export", "--checkpoint", str(root / "model"), "--class-name", CLASS, "--format",
              "onnx", "--image-size", "40", "--output", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "multiple of the patch size 16" in capsys.readouterr().err
    with pytest.raises(export.ExportError, match="multiple of the backbone's patch size 16"):
        export.export(root / "model", CLASS, tmp_path / "out", image_size=40)
    assert not (tmp_path / "out").exists()


def test_help_lists_what_is_baked_in(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    for words in ("baked in", "text prototypes", "memory bank", "image_threshold", "XLA attention"):
        assert words in text
