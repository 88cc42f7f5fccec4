"""`addinov3 plan`: per-device memory of the compiled feature, train and predict steps, from shapes only.

Nothing is allocated and no weights or data are read: the towers, the `TrainState` and the
batches are abstract (`nnx.eval_shape` / `jax.ShapeDtypeStruct` with their shardings); the two
steps are lowered and compiled for the config's mesh and XLA's `memory_analysis()` reports the
argument, output and temporary bytes of one device's program. A variant name or a converted
directory's metadata is enough to describe a tower.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from addinov3_jax.models import fewshot, sharding
from addinov3_jax.runtime import setup, steps


def _bytes(abstract_state, shardings) -> tuple[int, int]:
    """(total bytes, bytes on the most loaded device) of a tree of abstract arrays."""
    leaves = jax.tree.leaves(abstract_state)
    shards = jax.tree.leaves(shardings)
    total = sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in leaves)
    per_device = sum(sharding.shard_bytes(a.shape, a.dtype, s) for a, s in zip(leaves, shards, strict=True))
    return total, per_device


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {"argument_bytes_per_device": int(m.argument_size_in_bytes),
            "output_bytes_per_device": int(m.output_size_in_bytes),
            "temp_bytes_per_device": int(m.temp_size_in_bytes),
            "alias_bytes_per_device": int(m.alias_size_in_bytes)}


def plan(config) -> dict[str, Any]:
    """The memory plan of `config` (see the module docstring) as a JSON-ready dict."""
    rt = setup.setup(config)
    cfg, mesh, rules = rt.config, rt.mesh, rt.rules
    m, b, size = cfg.model, cfg.train.batch_size, rt.image_size
    bb = setup.abstract_backbone(m)
    graphdef, bb_state = nnx.split(bb)
    bb_shardings = sharding.state_shardings(bb_state, mesh, rules)
    bb_total, bb_dev = _bytes(bb_state, bb_shardings)
    text_state = nnx.state(setup.abstract_text_tower(m))
    text_total, text_dev = _bytes(text_state, sharding.state_shardings(text_state, mesh, rules))
    text_dim = setup.text_dim(m)
    n_layers = len(rt.head_config.feature_layers)
    tokens, dim = rt.grid[0] * rt.grid[1], rt.backbone_config.embed_dim

    # The run's own steps (runtime/steps.py), lowered for abstract arguments.
    tx, _ = steps.make_optimizer(cfg, 1000)
    abstract_state, state_shardings = steps.abstract_train_state(rt.adapters_fn(text_dim), tx,
                                                                 mesh, rules)
    st_total, st_dev = _bytes(abstract_state, state_shardings)

    images = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32,
                                  sharding=sharding.batch_sharding(mesh, rules, 4))
    feat4 = sharding.batch_sharding(mesh, rules, 4, axis=1)
    feat3 = sharding.batch_sharding(mesh, rules, 3, axis=1)
    with sharding.use(mesh, rules):
        feature_c = rt.feature_step(graphdef).lower(_with_shardings(bb_state, bb_shardings),
                                                     images).compile()
    batch = {
        "patches": jax.ShapeDtypeStruct((n_layers, b, tokens, dim), jnp.float32, sharding=feat4),
        "cls": jax.ShapeDtypeStruct((n_layers, b, dim), jnp.float32, sharding=feat3),
        "mask": jax.ShapeDtypeStruct((b, size, size), jnp.float32,
                                     sharding=sharding.batch_sharding(mesh, rules, 3)),
        "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharding.batch_sharding(mesh, rules, 1)),
        "class_id": jax.ShapeDtypeStruct((b,), jnp.int32,
                                         sharding=sharding.batch_sharding(mesh, rules, 1)),
    }
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    frozen = {"text": jax.ShapeDtypeStruct((12, text_dim, 2), jnp.float32, sharding=rep)}
    with sharding.use(mesh, rules):
        step_c = rt.train_step(tx, state_shardings).lower(
            _with_shardings(abstract_state, state_shardings), frozen, batch).compile()
    # The predict step of eval / predict (`inference.Predictor`), at the eval batch size.
    eb = cfg.eval.batch_size
    predict_fn = steps.jit_predict_steps(graphdef, rt.head_config, fewshot.FewShotConfig(), mesh,
                                         rules)[0]
    with sharding.use(mesh, rules):
        predict_c = predict_fn.lower(
            _with_shardings(bb_state, bb_shardings),
            _with_shardings(abstract_state.params, state_shardings.params),
            jax.ShapeDtypeStruct((eb, size, size, 3), jnp.float32,
                                 sharding=sharding.batch_sharding(mesh, rules, 4)),
            jax.ShapeDtypeStruct((eb,), jnp.int32, sharding=sharding.batch_sharding(mesh, rules, 1)),
            frozen["text"]).compile()
    feature_mem, step_mem = _memory(feature_c), _memory(step_c)
    extra = {"predict_step": _memory(predict_c)}
    if m.backbone in setup.dinov3.VARIANTS:  # random init, materialized sharded (runtime/setup.py)
        create = setup.backbone_init_fn(m, cfg.seed)
        init_c = jax.jit(lambda: nnx.state(create()), out_shardings=bb_shardings).lower().compile()
        extra["backbone_init"] = _memory(init_c)
    return {
        "backbone": m.backbone, "image_size": size, "batch_size": b,
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "devices": int(mesh.size),
        "platform": jax.devices()[0].platform,
        # Frozen = the backbone and the text tower (both resident while training).
        "frozen_param_bytes_total": bb_total + text_total,
        "frozen_param_bytes_per_device": bb_dev + text_dev,
        "backbone_param_bytes_total": bb_total, "backbone_param_bytes_per_device": bb_dev,
        "text_tower_param_bytes_total": text_total, "text_tower_param_bytes_per_device": text_dev,
        "train_state_bytes_total": st_total, "train_state_bytes_per_device": st_dev,
        "temp_bytes_per_device": max(feature_mem["temp_bytes_per_device"],
                                     step_mem["temp_bytes_per_device"]),
        "feature_step": feature_mem, "train_step": step_mem, **extra,
    }


def _gib(n: int) -> str:
    """Bytes in GiB, or MiB / KiB below one GiB (printed tables only; JSON keeps bytes)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:8.3f} {unit}"
    return f"{n / 2**10:8.3f} KiB"


def table(p: dict[str, Any]) -> str:
    """A human-readable rendering of `plan(...)`."""
    mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [f"memory plan: {p['backbone']} at {p['image_size']}px, batch {p['batch_size']}, "
             f"mesh {mesh} ({p['devices']} {p['platform']} devices)", "",
             f"{'':34}{'total':>14}{'per device':>14}",
             f"{'frozen backbone parameters':34}{_gib(p['backbone_param_bytes_total']):>14}"
             f"{_gib(p['backbone_param_bytes_per_device']):>14}",
             f"{'frozen text tower parameters':34}{_gib(p['text_tower_param_bytes_total']):>14}"
             f"{_gib(p['text_tower_param_bytes_per_device']):>14}",
             f"{'train state (adapters + AdamW)':34}{_gib(p['train_state_bytes_total']):>14}"
             f"{_gib(p['train_state_bytes_per_device']):>14}", ""]
    for name in ("feature_step", "train_step", "predict_step", "backbone_init"):
        if name not in p:
            continue
        s = p[name]
        lines.append(f"{name:14} per device: arguments {_gib(s['argument_bytes_per_device'])}, "
                     f"outputs {_gib(s['output_bytes_per_device'])}, "
                     f"temporaries {_gib(s['temp_bytes_per_device'])}")
    return "\n".join(lines)
