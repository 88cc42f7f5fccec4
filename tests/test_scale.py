"""Scale-out: evaluation on the mesh equals one device, two processes equal one, the memory plan
of vit7b16 (abstract shapes only), and the config validated at load with one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from addinov3_jax import config as config_lib
from addinov3_jax.io import model_dir as model_io
from addinov3_jax.io import towers
from addinov3_jax.models import clip_text, dinov3, sharding
from addinov3_jax.models import model as ad
from addinov3_jax.runtime import distributed
from addinov3_jax.runtime import evaluator as evaluate

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("pill", "weave")


@pytest.fixture(scope="module")
def syn(eval_data):
    """conftest's `eval_data` (pill and weave)."""
    return eval_data


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    backbone = dinov3.create("tiny", rngs=nnx.Rngs(0))
    # LayerScale 1 instead of the 1e-5 init: the random blocks then mix the tokens, so that image
    # scores differ between images (with 1e-5 they tie up to rounding and AUROC is noise).
    for ls in (backbone.blocks.ls1, backbone.blocks.ls2):
        ls.set_value(jnp.ones_like(ls[...]))
    text = clip_text.create("tiny", rngs=nnx.Rngs(1))
    model = ad.ADDinoV3(backbone, text, ad.HeadConfig(feature_layers=(0, 1, 2, 3)), rngs=nnx.Rngs(2))
    return model_io.save(model, tmp_path_factory.mktemp("scale_model") / "model")


def _metrics(results):
    return {(d, c, k): v for d, e in results["datasets"].items()
            for c, row in e["categories"].items() for k, v in row.items()}


def _assert_same(a, b, atol=1e-6):
    ma, mb = _metrics(a), _metrics(b)
    assert ma.keys() == mb.keys()
    for k in ma:
        np.testing.assert_allclose(ma[k], mb[k], atol=atol, rtol=0, err_msg=str(k))


def test_eval_on_eight_devices_equals_one(model_dir, syn, tmp_path):
    opts = evaluate.EvalOptions(image_size=64, batch_size=8, heatmaps_per_category=0, curves=False)
    runs = {}
    for name, mesh in (("one", distributed.make_mesh(1, 1, 1)), ("data8", distributed.make_mesh(8, 1, 1)),
                       ("fsdp4_tensor2", distributed.make_mesh(1, 4, 2))):
        model = model_io.load(model_dir, mesh=mesh, rules=sharding.DEFAULT_RULES)
        runs[name] = evaluate.evaluate(model, [("synthetic", str(syn), CLASSES)], tmp_path / name,
                                       opts=opts, mesh=mesh)
    _assert_same(runs["one"], runs["data8"])
    _assert_same(runs["one"], runs["fsdp4_tensor2"])


def _eval_cmd(workdir, syn, *extra):
    return [sys.executable, "-m", "addinov3_jax.commands.cli", "eval", "--config",
            str(REPO / "configs" / "demo.py"), "--workdir", str(workdir),
            "--config.data.image_size=64", "--config.eval.batch_size=8",
            "--config.eval.heatmaps_per_category=0", "--config.eval.curves=False",
            f"--config.eval.datasets.synthetic.root={syn}",
            f"--config.eval.datasets.synthetic.classes={CLASSES!r}", *extra]


def test_two_process_eval_equals_one_process(model_dir, syn, tmp_path, free_port):
    one, two = tmp_path / "one", tmp_path / "two"
    for w in (one, two):
        shutil.copytree(model_dir, w / "model")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(_eval_cmd(one, syn), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    port = free_port
    procs = []
    for pid in range(2):
        penv = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                    ADDINOV3_COORDINATOR=f"127.0.0.1:{port}", ADDINOV3_NUM_PROCESSES="2",
                    ADDINOV3_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(_eval_cmd(two, syn, "--config.multihost=True"), env=penv,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    _assert_same(json.loads((one / "results.json").read_text()),
                 json.loads((two / "results.json").read_text()))


def test_plan_vit7b_fsdp8_splits_the_parameters():
    res = subprocess.run(
        [sys.executable, "-m", "addinov3_jax.commands.cli", "plan", "--config",
         str(REPO / "configs" / "train_visa.py"), "--json", "--config.model.backbone=vit7b16",
         "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.train.batch_size=64",
         "--config.data.image_size=512"],
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    p = json.loads(res.stdout)
    assert p["devices"] == 8 and p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    total = p["frozen_param_bytes_total"]
    assert total > 25 * 2**30  # ~6.7 B fp32 parameters
    assert p["frozen_param_bytes_per_device"] <= total / 8 * 1.05
    assert p["train_state_bytes_per_device"] <= p["train_state_bytes_total"] / 8 * 1.05
    for step in ("feature_step", "train_step", "predict_step"):
        assert p[step]["temp_bytes_per_device"] > 0
    # The predict step of eval / predict also takes the parameters' shards only.
    assert p["predict_step"]["argument_bytes_per_device"] < total / 8 * 1.1
    # The feature step's parameter arguments are the shards, not the whole backbone.
    assert p["feature_step"]["argument_bytes_per_device"] < total / 8 * 1.1
    # Random init is born sharded: a device's output is its shard, and it is drawn one block at
    # a time, so its temporaries stay within one block's parameters (40 blocks), not the stack's.
    init = p["backbone_init"]
    assert init["output_bytes_per_device"] <= total / 8 * 1.05
    assert init["temp_bytes_per_device"] <= total / 40 * 1.25
    assert "temp_bytes_per_device" in p


def test_load_reads_converted_weights_shard_by_shard(model_dir, monkeypatch):
    """A converted directory is read slice by slice: no read ever returns a whole sharded tensor."""
    from addinov3_jax.io import checkpoint_io

    reads = []
    original = checkpoint_io.Tensors.read

    def spy(self, key, index, shape):
        out = original(self, key, index, shape)
        reads.append((key, out.size, int(np.prod(shape))))
        return out

    monkeypatch.setattr(checkpoint_io.Tensors, "read", spy)
    mesh = distributed.make_mesh(1, 8, 1)
    backbone = towers.load_dinov3(str(Path(model_dir) / "backbone"), mesh=mesh, rules=sharding.DEFAULT_RULES)
    kernel = {k: n for k, n, _ in reads}["blocks.mlp.fc1.kernel"]
    assert kernel * 8 == int(np.prod(backbone.blocks.mlp.fc1.kernel.shape))
    sliced = [k for k, n, full in reads if n < full]
    assert "blocks.attn.qkv.kernel" in sliced and "patch_kernel" in sliced


@pytest.mark.parametrize("args, fragments", [
    (["--config.train.epoch=3"], ["epoch"]),
    (["--config.train.epochs=two"], ["epochs", "two"]),
    (["--config.model.text_layout=diagonal"], ["model.text_layout", "stack", "interleave"]),
    (["--config.train.feature_cache=gpu"], ["train.feature_cache", "device", "disk"]),
    (["--config.mesh.fsdp=0"], ["mesh.fsdp"]),
    (["--config.data.image_size=100"], ["data.image_size", "multiple"]),
    (["--config.train.warmup_fraction=1.5"], ["train.warmup_fraction"]),
    (["--config.model.feature_layers=(0, 1, 9)"], ["model.feature_layers", "9"]),
], ids=["unknown-key", "wrong-type", "enum", "enum-cache", "mesh", "image-size", "warmup", "taps"])
def test_bad_config_is_one_clear_line(args, fragments, tmp_path, capsys):
    from addinov3_jax.commands import cli

    rc = cli.main(["train", "--config", str(REPO / "configs" / "demo.py"), "--workdir",
                   str(tmp_path / "w"), *args])
    err = capsys.readouterr().err
    assert rc != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("addinov3 train: error:"), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert not (tmp_path / "w").exists()


def test_unknown_config_arg_and_rules_are_refused():
    with pytest.raises(config_lib.ConfigError, match="unknown argument 'bogus'"):
        config_lib.demo_config("bogus")
    c = config_lib.demo_config()
    c.mesh.rules = (("batch", "nope"),)
    with pytest.raises(config_lib.ConfigError, match="unknown mesh axes"):
        config_lib.validate(c)
    c.mesh.rules = sharding.DEFAULT_RULES[:-1]
    with pytest.raises(config_lib.ConfigError, match="no entry for the logical names"):
        config_lib.validate(c)
    c.mesh.rules = tuple((k, "fsdp" if k == "adapter" else v) for k, v in sharding.DEFAULT_RULES)
    with pytest.raises(config_lib.ConfigError, match=r"would use the mesh axes \['fsdp'\] twice"):
        config_lib.validate(c)
    c.mesh.rules = sharding.rules_preset("replicated")
    assert config_lib.validate(c).mesh.rules == sharding.REPLICATED_RULES


def test_model_dir_records_the_trained_text_activation(tmp_path):
    """A tower whose metadata says QuickGELU, trained with exact GELU: eval and predict must run
    it with GELU again (model.json records it), unless told otherwise."""
    backbone = dinov3.create("tiny", rngs=nnx.Rngs(0))
    text = clip_text.create("tiny", activation="quick_gelu", rngs=nnx.Rngs(1))
    model_io.save(ad.ADDinoV3(text_tower=text, backbone=backbone, config=ad.HeadConfig(
        feature_layers=(0, 1, 2, 3)), rngs=nnx.Rngs(2)), tmp_path / "towers")
    model = ad.ADDinoV3(backbone, text, ad.HeadConfig(feature_layers=(0, 1, 2, 3)), rngs=nnx.Rngs(2))
    model_io.save(model, tmp_path / "model", text_tower=str(tmp_path / "towers" / "text_tower"),
            text_activation="gelu")
    assert json.loads((tmp_path / "model" / "model.json").read_text())["text_activation"] == "gelu"
    assert model_io.load(tmp_path / "model").text_tower.config.activation == "gelu"
    assert model_io.load(tmp_path / "model", text_activation="quick_gelu").text_tower.config.activation \
        == "quick_gelu"
    assert towers.load_clip_text(str(tmp_path / "towers" / "text_tower")).config.activation == "quick_gelu"


def test_predict_with_fsdp_loads_sharded_and_matches_data_parallel(model_dir, syn, tmp_path,
                                                                   monkeypatch):
    """`predict --fsdp 8`: the model is loaded straight onto the 8-device mesh with every large
    kernel split 8 ways (no device holds a whole copy), and the scores equal the data-parallel
    run's."""
    from addinov3_jax.commands import cli
    from addinov3_jax.commands import predict as predict_lib

    loaded = {}
    original = predict_lib.load_model

    def spy(checkpoint, mesh=None, **kw):
        loaded["model"] = original(checkpoint, mesh, **kw)
        return loaded["model"]

    monkeypatch.setattr(predict_lib, "load_model", spy)
    images = str(syn / "pill" / "test")
    scores = {}
    for name, extra in (("fsdp8", ["--fsdp", "8"]), ("data", [])):
        out = tmp_path / name
        assert cli.main(["predict", "--checkpoint", str(model_dir), "--class-name", "pill",
                         "--output", str(out), "--image-size", "64", "--batch-size", "8",
                         *extra, images]) == 0
        scores[name] = {r["name"]: r["score"] for r in
                        json.loads((out / "scores.json").read_text())["images"]}
        if name == "fsdp8":
            kernel = loaded["model"].backbone.blocks.mlp.fc1.kernel[...]
            shard = kernel.addressable_shards[0].data.shape
            assert kernel.sharding.mesh.shape["fsdp"] == 8
            assert shard[1] == kernel.shape[1] // 8  # the embed axis split over fsdp
    assert scores["fsdp8"].keys() == scores["data"].keys()
    for k in scores["data"]:
        np.testing.assert_allclose(scores["fsdp8"][k], scores["data"][k], atol=1e-6, rtol=0)
