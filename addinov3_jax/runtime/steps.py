"""Every jitted step of the package, each defined once: the pure step functions and their jit
wiring with pinned shardings. Train, eval, predict, plan, the benchmarks and the tests all run
these (through `runtime.setup.Runtime` and `runtime.inference.Predictor`).

* `feature_step`: frozen DINOv3 taps -> standardised patches (L, B, N, D) and CLS (L, B, D);
* `train_step`: head, losses and one AdamW update of the adapters (`TrainState` donated);
* `predict_step` / `fewshot_step`: pixel maps (B, H, W) and image scores (B,), the latter fused
  with a few-shot memory bank from the same backbone pass;
* `taps_step`: the unit-norm tapped patch tokens of reference images (a memory bank's rows).

The frozen backbone travels as `(graphdef, state)`: the state is an argument (sharded, never
donated), the graphdef static.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from addinov3_jax.models import fewshot, losses, sharding
from addinov3_jax.models import model as ad


@flax.struct.dataclass
class TrainState:
    """All the training state: the adapter kernels, the optimizer state and the step."""

    step: jax.Array
    params: dict[str, jax.Array]
    opt_state: Any


# ---------------------------------------------------------------------------------------------
# Pure building blocks


def head_config(cfg: ml_collections.ConfigDict) -> ad.HeadConfig:
    m = cfg.model
    return ad.HeadConfig(feature_layers=tuple(m.feature_layers), text_layout=m.text_layout,
                         image_score=m.image_score, smoothing_sigma=m.smoothing_sigma)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int):
    """(AdamW, its schedule): linear warm-up from 0 over the first `warmup_fraction` of the steps,
    then constant (the official LambdaLR: lr * step / warmup)."""
    t = cfg.train
    warmup = int(t.warmup_fraction * total_steps)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, t.lr, max(warmup, 1)), optax.constant_schedule(t.lr)],
        [warmup]) if warmup > 0 else optax.constant_schedule(t.lr)
    return optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=1e-8, weight_decay=t.weight_decay), schedule


def _train_state_init(create_adapters, tx):
    def init() -> TrainState:
        params = nnx.to_pure_dict(nnx.state(create_adapters()))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def abstract_train_state(create_adapters, tx, mesh, rules) -> tuple[TrainState, TrainState]:
    """(shapes, shardings) of the `TrainState`, without allocating anything: adapter kernels by
    their logical axes, the optimizer's moments like their parameters, counters replicated."""
    abstract = nnx.state(nnx.eval_shape(create_adapters))
    param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh, rules))
    rep = NamedSharding(mesh, PartitionSpec())
    abstract_state = jax.eval_shape(_train_state_init(create_adapters, tx))
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state,
                                          param_shardings, transform_non_params=lambda _: rep)
    return abstract_state, TrainState(step=rep, params=param_shardings, opt_state=opt_shardings)


def init_train_state(create_adapters, tx, mesh, rules) -> tuple[TrainState, TrainState]:
    """(state, its shardings): built abstractly, then materialized by
    `jax.jit(init, out_shardings=...)` directly in the rules' layout."""
    _, shardings = abstract_train_state(create_adapters, tx, mesh, rules)
    return jax.jit(_train_state_init(create_adapters, tx), out_shardings=shardings)(), shardings


def feature_step(backbone_state: nnx.State, images_bhwc: jax.Array, *, graphdef,
                 head_cfg: ad.HeadConfig) -> tuple[jax.Array, jax.Array]:
    """Frozen features of a batch: standardised patches (L, B, N, D) and CLS (L, B, D)."""
    return ad.extract_features(nnx.merge(graphdef, backbone_state), images_bhwc, head_cfg)


def train_step(state: TrainState, frozen: dict[str, jax.Array], batch: dict[str, jax.Array], *,
               tx, head_cfg: ad.HeadConfig, grid: tuple[int, int],
               size: tuple[int, int]) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step of the adapters on a batch of features.

    Args:
      state: the `TrainState`.
      frozen: `{"text": (C, E, 2)}` the class prototypes of the frozen text tower.
      batch: `patches` (L, B, N, D), `cls` (L, B, D), `mask` (B, H, W), `label`, `class_id` (B,).
    Returns the new state and the loss terms.
    """
    text = frozen["text"][batch["class_id"]]

    def loss_fn(params):
        out = ad.head(params, batch["patches"], batch["cls"], text, grid, size, head_cfg)
        terms = losses.total(out, batch["mask"], batch["label"])
        return terms["loss"], terms

    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      opt_state=opt_state), terms


def predict_step(backbone_state, adapters, images, class_ids, table, *, graphdef, cfg):
    """Maps (B, H, W) and scores (B,) of normalised images; `table[class_ids]` their prototypes."""
    backbone = nnx.merge(graphdef, backbone_state)
    return ad.predict_step(backbone, adapters, images, table[class_ids], cfg)


def fewshot_step(backbone_state, adapters, images, class_ids, table, bank_lmd, *, graphdef, cfg,
                 fs: fewshot.FewShotConfig, bank_mesh):
    """`predict_step` fused with the few-shot branch of `bank_lmd` (one backbone pass)."""
    backbone = nnx.merge(graphdef, backbone_state)
    maps, scores, taps = ad.predict_step(backbone, adapters, images, table[class_ids], cfg,
                                         with_taps=True)
    p = backbone.config.patch_size
    grid = (images.shape[1] // p, images.shape[2] // p)
    fs_maps, fs_scores = fewshot.predict_features(bank_lmd, taps, grid, images.shape[1:3], fs,
                                                  mesh=bank_mesh)
    return fewshot.fuse(maps, scores, fs_maps, fs_scores, fs.fusion, fs.fusion_weight)


def taps_step(backbone_state, images, *, graphdef, layers):
    """Unit-norm tapped patch tokens (L, B, N, D) of normalised images."""
    return ad.l2_normalize(ad.extract_taps(nnx.merge(graphdef, backbone_state), images, layers)[0])


# ---------------------------------------------------------------------------------------------
# Jit wiring: pinned out shardings, so a run compiles each step once.


def jit_feature_step(graphdef, head_cfg: ad.HeadConfig, mesh, rules):
    return jax.jit(functools.partial(feature_step, graphdef=graphdef, head_cfg=head_cfg),
                   out_shardings=(sharding.batch_sharding(mesh, rules, 4, axis=1),
                                  sharding.batch_sharding(mesh, rules, 3, axis=1)))


def jit_train_step(tx, head_cfg: ad.HeadConfig, image_size: int, patch_size: int,
                   state_shardings: TrainState, mesh):
    """`train_step` for square images of `image_size`, donating the state."""
    grid = (image_size // patch_size,) * 2
    return jax.jit(functools.partial(train_step, tx=tx, head_cfg=head_cfg, grid=grid,
                                     size=(image_size, image_size)),
                   donate_argnums=(0,),
                   out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())))


def jit_predict_steps(graphdef, cfg: ad.HeadConfig, fs: fewshot.FewShotConfig, mesh, rules):
    """(predict step, few-shot step, taps step), jitted for `mesh`."""
    out = (sharding.batch_sharding(mesh, rules, 3), sharding.batch_sharding(mesh, rules, 1))
    plain = jax.jit(functools.partial(predict_step, graphdef=graphdef, cfg=cfg), out_shardings=out)
    fused = jax.jit(functools.partial(fewshot_step, graphdef=graphdef, cfg=cfg, fs=fs,
                                      bank_mesh=mesh if fs.shard_bank else None),
                    out_shardings=out)
    taps = jax.jit(functools.partial(taps_step, graphdef=graphdef, layers=cfg.feature_layers),
                   out_shardings=sharding.batch_sharding(mesh, rules, 4, axis=1))
    return plain, fused, taps
