"""`convert`: atomic writes that never mix with an existing directory, `convert model` (one model
directory writer, accepted by `predict`), and `hf://` sources read offline from a locally built
Hugging Face cache."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, DINOv3ViTConfig, DINOv3ViTModel

from addinov3_jax.commands import predict
from addinov3_jax.commands.cli import main
from addinov3_jax.io import checkpoint_io, model_dir
from addinov3_jax.io.checkpoint_io import CheckpointError
from addinov3_jax.models import clip_text, dinov3
from addinov3_jax.models import model as ad
from weight_conversion import clip_text as clip_conv
from weight_conversion import dinov3 as dinov3_conv
from weight_conversion import model_dir as model_conv


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny random Hugging Face DINOv3 and CLIP text models, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(**dinov3_conv.hf_config(dinov3.VARIANTS["tiny"]))).save_pretrained(
        root / "dinov3")
    cfg = clip_conv.hf_config(clip_text.VARIANTS["tiny"])
    CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).save_pretrained(root / "clip")
    return root


def official_adapters(path, visual=64, text=64, seed=0):
    rng = np.random.default_rng(seed)
    sd = {}
    for group, n, d_in in (("cls_token_adapter", 4, visual), ("patch_token_adapter", 4, visual),
                           ("prompt_adapter", 2, text)):
        sd[group] = {f"{i}.fc{k}.0.weight": torch.from_numpy(rng.standard_normal(
            (text, d_in) if k == 1 else (d_in, text)).astype(np.float32)) for i in range(n) for k in (1, 2)}
    torch.save(sd, path)
    return path


def test_convert_refuses_to_mix_and_overwrites_atomically(hf_dirs, tmp_path):
    out = tmp_path / "out"
    assert main(["convert", "dinov3", "--source", str(hf_dirs / "dinov3"), "--output", str(out)]) == 0
    first = (out / checkpoint_io.PARAMS_FILE).read_bytes()
    (out / "stale.txt").write_text("from an earlier run")
    assert main(["convert", "dinov3", "--source", str(hf_dirs / "dinov3"), "--output", str(out)]) == 2
    assert (out / "stale.txt").is_file()  # refused: nothing touched
    assert main(["convert", "dinov3", "--source", str(hf_dirs / "dinov3"), "--output", str(out),
                 "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()  # replaced as a whole, not mixed
    assert (out / checkpoint_io.PARAMS_FILE).read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left
    # A failing write leaves the previous directory intact.
    with pytest.raises(RuntimeError):
        with checkpoint_io.atomic_directory(out, overwrite=True) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash mid-write")
    assert (out / checkpoint_io.PARAMS_FILE).read_bytes() == first and not (out / "half").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # An empty existing directory is fine.
    (tmp_path / "empty").mkdir()
    dinov3_conv.convert(hf_dirs / "dinov3", tmp_path / "empty")
    assert checkpoint_io.is_converted(tmp_path / "empty")


def test_convert_model_assembles_a_directory_predict_accepts(hf_dirs, tmp_path):
    pth = official_adapters(tmp_path / "99.pth")
    assert main(["convert", "adapters", "--source", str(pth), "--output", str(tmp_path / "adapters"),
                 "--feature-layers", "0,1,2,3"]) == 0
    assert main(["convert", "clip-text", "--source", str(hf_dirs / "clip"), "--output",
                 str(tmp_path / "clip")]) == 0
    # Backbone from an HF folder (converted on the fly), text tower and adapters converted dirs.
    assert main(["convert", "model", "--dinov3", str(hf_dirs / "dinov3"), "--clip-text",
                 str(tmp_path / "clip"), "--adapters", str(tmp_path / "adapters"), "--output",
                 str(tmp_path / "model")]) == 0
    spec = json.loads((tmp_path / "model" / model_dir.MODEL_FILE).read_text())
    assert {spec[k] for k in ("backbone", "text_tower", "adapters")} == {"backbone", "text_tower",
                                                                        "adapters"}
    assert spec["head"]["text_layout"] == "interleave"
    model = predict.load_model(tmp_path / "model")
    assert model.backbone.config == dinov3.VARIANTS["tiny"]
    ref = model_dir.load(backbone=tmp_path / "model" / "backbone", text_tower=tmp_path / "clip",
                  adapters=tmp_path / "adapters")
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x, "wood")[0], ref.predict(x, "wood")[0], atol=1e-6)
    # Adapters whose feature layers do not exist in the backbone are refused before writing.
    with pytest.raises(CheckpointError, match=r"feature layers \(5, 11, 17, 23\) do not exist"):
        model_conv.convert_model(hf_dirs / "dinov3", tmp_path / "clip", pth, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_model_save_uses_the_same_writer(tmp_path):
    model = ad.ADDinoV3(dinov3.create("tiny", rngs=nnx.Rngs(0)), clip_text.create("tiny", rngs=nnx.Rngs(1)),
                        ad.HeadConfig(feature_layers=(0, 1, 2, 3)), rngs=nnx.Rngs(2))
    model_dir.save(model, tmp_path / "m")
    (tmp_path / "m" / "stale").write_text("x")
    model_dir.save(model, tmp_path / "m", backbone=str(tmp_path / "m2_bb"))  # re-save replaces the whole dir
    spec = json.loads((tmp_path / "m" / model_dir.MODEL_FILE).read_text())
    assert spec["backbone"] == str((tmp_path / "m2_bb").absolute())  # referenced, absolute
    assert not (tmp_path / "m" / "stale").exists() and not (tmp_path / "m" / "backbone").exists()


def _hf_cache(home: Path, repo: str, folder: Path) -> None:
    """The hub cache layout: hub/models--ORG--NAME/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)


_RUN_COMMANDS = """import contextlib, io, json, sys
from addinov3_jax.commands.cli import main
done = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        done.append([main(argv), err.getvalue()])
print(json.dumps(done))
"""


def _run_commands(env, commands):
    """`addinov3 COMMAND...` one after the other in one new process with `env`: (exit code,
    stderr) of each."""
    res = subprocess.run([sys.executable, "-c", _RUN_COMMANDS, json.dumps(commands)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


def test_hf_sources_offline_from_the_cache(hf_dirs, tmp_path):
    pytest.importorskip("huggingface_hub")
    home = tmp_path / "hf_home"
    _hf_cache(home, "facebook/dinov3-tiny-pretrain-lvd1689m", hf_dirs / "dinov3")
    _hf_cache(home, "openai/clip-tiny", hf_dirs / "clip")
    official_adapters(tmp_path / "99.pth")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    # huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when imported: the three commands run in
    # one fresh process with that environment (`_run_commands`).
    (bb_rc, bb_err), (model_rc, model_err), (miss_rc, miss_err) = _run_commands(env, [
        ["convert", "dinov3", "--source", "hf://facebook/dinov3-tiny-pretrain-lvd1689m",
         "--output", str(tmp_path / "bb")],
        ["convert", "model", "--dinov3", str(tmp_path / "bb"), "--clip-text", "hf://openai/clip-tiny",
         "--adapters", str(tmp_path / "99.pth"), "--output", str(tmp_path / "model")],
        ["convert", "clip-text", "--source", "hf://openai/not-cached", "--output", str(tmp_path / "x")],
    ])
    assert bb_rc == 0, bb_err
    meta = checkpoint_io.read_metadata(tmp_path / "bb", "dinov3")
    assert meta["source_path"] == "hf://facebook/dinov3-tiny-pretrain-lvd1689m"
    assert meta["variant"] == "tiny" and meta["source_format"] == "huggingface"
    # The official adapters tap blocks (5, 11, 17, 23): refused for the 4-block tiny backbone,
    # after both towers were read through the cache.
    assert model_rc == 2 and "do not exist in a 4-block backbone" in model_err, model_err
    assert miss_rc == 2 and "cannot fetch from the Hugging Face hub" in miss_err
    assert "HF_HUB_OFFLINE is set" in miss_err and miss_err.count("\n") == 1
