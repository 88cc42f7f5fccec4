"""Sharding: parameter specs by logical axis (golden file), fsdp / tensor meshes train like data
parallelism, sharded state without whole copies, evaluation on any mesh equals one device,
`predict --fsdp` loads sharded, converted weights read shard by shard, vit7b16 lowers on fsdp."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import runs
from flax import nnx

from addinov3_jax.io import model_dir as model_io
from addinov3_jax.io import towers
from addinov3_jax.models import dinov3, sharding
from addinov3_jax.runtime import distributed, steps
from addinov3_jax.runtime import evaluator as evaluate
from addinov3_jax.runtime import trainer as train

EVAL_CLASSES = ("pill", "weave")  # conftest.EVAL_DATA


GOLDEN = Path(__file__).parent / "golden" / "shardings_tiny_fsdp.json"


def shardings_table():
    mesh = distributed.make_mesh(data=2, fsdp=4)
    model = nnx.eval_shape(lambda: dinov3.create("tiny", rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    specs = sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES)
    return {".".join(map(str, p)): str(v.get_value().spec) for p, v in nnx.to_flat_state(specs)}


def test_parameter_shardings_match_golden():
    table = shardings_table()
    if os.environ.get("ADDINOV3_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    assert table == json.loads(GOLDEN.read_text())


def _mesh_params(train_data, tiny_towers, workdir, data_axis, fsdp=1, tensor=1):
    cfg = runs.tiny_config(train_data, tiny_towers, epochs=2, checkpoint_every=2)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data_axis, fsdp, tensor
    train.train(cfg, workdir)
    return runs.final_params(workdir)


def test_fsdp_and_tensor_parallel_equal_data_parallel(train_data, tiny_towers, tmp_path):
    """Same data, same steps: sharding the weights (fsdp, tensor) changes no result beyond 1e-6."""
    ref = _mesh_params(train_data, tiny_towers, tmp_path / "data8", 8)
    for name, mesh in (("fsdp4_tensor2", (1, 4, 2)), ("fsdp8", (1, 8))):
        got = _mesh_params(train_data, tiny_towers, tmp_path / name, *mesh)
        for k, v in ref.items():
            np.testing.assert_allclose(got[k], v, atol=1e-6, rtol=0, err_msg=f"{name}: {k}")


def test_sharded_state_has_no_full_copies(train_data, tiny_towers, tmp_path):
    """With fsdp=8 every large backbone and adapter array lives in 8 shards and no device holds a
    whole copy of any of them (live-buffer accounting on the simulated devices); the random init
    drawn on the mesh is bitwise the eager one (`tiny_towers`, which the training tests read)."""
    import gc

    from addinov3_jax.runtime import setup

    cfg = runs.tiny_config(train_data)
    mesh = distributed.make_mesh(1, 8, 1)
    rules = sharding.DEFAULT_RULES
    gc.collect()
    before = {id(a) for a in jax.live_arrays()}
    backbone = setup.backbone(cfg.model, mesh, rules, 0)
    state, _ = steps.init_train_state(setup.adapters_fn(64, 32, 4, 0), optax_adamw(), mesh, rules)
    gc.collect()
    new = [a for a in jax.live_arrays() if id(a) not in before]
    sharded = {}
    for path, var in nnx.to_flat_state(nnx.state(backbone)):
        arr = var.get_value()
        if arr.ndim and "embed" in (var.get_metadata().get("out_sharding") or ()):
            sharded[path] = arr
    sharded["adapters.patch"] = state.params["patch"]
    whole = [a.shape for a in new if len(a.sharding.device_set) == 1 and a.size > 1024]
    assert not whole, whole  # no unsharded copy was made while building
    for path, arr in sharded.items():
        assert {s.data.size for s in arr.addressable_shards} == {arr.size // 8}, path
    eager = dict(nnx.to_flat_state(nnx.state(towers.load_dinov3(str(tiny_towers / "backbone")))))
    drawn = dict(nnx.to_flat_state(nnx.state(backbone)))
    assert drawn.keys() == eager.keys()
    for path, var in drawn.items():
        np.testing.assert_array_equal(var.get_value(), eager[path].get_value(), err_msg=str(path))


def optax_adamw():
    import optax

    return optax.adamw(1e-3)


def test_eval_on_eight_devices_equals_one(mixing_model_dir, eval_data, tmp_path):
    opts = evaluate.EvalOptions(image_size=64, batch_size=8, heatmaps_per_category=0, curves=False)
    results = {}
    for name, mesh in (("one", distributed.make_mesh(1, 1, 1)), ("data8", distributed.make_mesh(8, 1, 1)),
                       ("fsdp4_tensor2", distributed.make_mesh(1, 4, 2))):
        model = model_io.load(mixing_model_dir, mesh=mesh, rules=sharding.DEFAULT_RULES)
        results[name] = evaluate.evaluate(model, [("synthetic", str(eval_data), EVAL_CLASSES)],
                                          tmp_path / name, opts=opts, mesh=mesh)
    runs.assert_same_results(results["one"], results["data8"])
    runs.assert_same_results(results["one"], results["fsdp4_tensor2"])


def test_load_reads_converted_weights_shard_by_shard(mixing_model_dir, monkeypatch):
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
    backbone = towers.load_dinov3(str(Path(mixing_model_dir) / "backbone"), mesh=mesh,
                                  rules=sharding.DEFAULT_RULES)
    kernel = {k: n for k, n, _ in reads}["blocks.mlp.fc1.kernel"]
    assert kernel * 8 == int(np.prod(backbone.blocks.mlp.fc1.kernel.shape))
    sliced = [k for k, n, full in reads if n < full]
    assert "blocks.attn.qkv.kernel" in sliced and "patch_kernel" in sliced


def test_predict_with_fsdp_loads_sharded_and_matches_data_parallel(mixing_model_dir, eval_data, tmp_path,
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
    images = str(eval_data / "pill" / "test")
    scores = {}
    for name, extra in (("fsdp8", ["--fsdp", "8"]), ("data", [])):
        out = tmp_path / name
        assert cli.main(["predict", "--checkpoint", str(mixing_model_dir), "--class-name", "pill",
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


def test_vit7b_lowers_with_fsdp_mesh():
    """vit7b16's parameters split over fsdp (and tensor), and its forward lowers on that mesh
    from abstract shapes (no FLOPs, nothing allocated)."""
    from addinov3_jax.models import sharding
    from addinov3_jax.runtime import distributed

    mesh = distributed.make_mesh(data=1, fsdp=8)
    model = nnx.eval_shape(lambda: dinov3.create("vit7b16", rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    rules = sharding.DEFAULT_RULES
    shard = sharding.state_shardings(state, mesh, rules)
    kernel = shard["blocks"]["mlp"]["w1"]["kernel"].get_value()
    assert kernel.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), kernel.spec
    qkv = shard["blocks"]["attn"]["qkv"]["kernel"].get_value()
    assert qkv.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor"), qkv.spec
    x = jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32,
                             sharding=sharding.batch_sharding(mesh, rules, 4))
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)["x_norm_clstoken"],
                  in_shardings=(shard, x.sharding))
    with sharding.use(mesh, rules):
        text = fwd.lower(state, x).as_text()
    assert "sharding" in text
