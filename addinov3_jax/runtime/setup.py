"""The frozen towers and the adapters, built abstractly first and materialized sharded.

`abstract_*` returns shapes only (`nnx.eval_shape`: no memory); `backbone`, `text_tower` and
`adapters` materialize straight into the shardings the config's rules give on a mesh: random
weights are initialised by `jax.jit(init, out_shardings=...)`, converted weights are read shard by
shard (`checkpoint_io.place`). No process ever holds an unsharded device copy of a tower.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from addinov3_jax.io import towers as io_towers
from addinov3_jax.models import clip_text, dinov3, sharding
from addinov3_jax.models import model as ad


def random_sharded(create: Callable[[], nnx.Module], mesh, rules) -> nnx.Module:
    """`create()` initialised on the mesh, each variable born in its rules' sharding."""
    abstract = nnx.eval_shape(create)
    graphdef, state = nnx.split(abstract)
    shardings = sharding.state_shardings(state, mesh, rules)
    state = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def tower_options(m) -> dict:
    """The tower options of `config.model` (dtypes, attention implementation, scan)."""
    return {"scan_layers": m.scan_layers, "compute_dtype": jnp.dtype(m.compute_dtype),
            "param_dtype": jnp.dtype(m.param_dtype), "attention_impl": m.attention_impl}


def backbone_init_fn(m, seed: int):
    """The random-init backbone of a variant name (`create()` builds it)."""
    return lambda: dinov3.create(m.backbone, rngs=nnx.Rngs(seed), **tower_options(m))


def _text_fn(m, seed: int):
    return lambda: clip_text.create(m.text_tower, activation=m.text_activation or None,
                                    rngs=nnx.Rngs(seed + 1), **tower_options(m))


def backbone_config(m) -> dinov3.Config:
    """The backbone architecture of `config.model` (a checkpoint's metadata only)."""
    return io_towers.dinov3_config(m.backbone)


def abstract_backbone(m) -> dinov3.DinoV3:
    cfg = backbone_config(m)
    return nnx.eval_shape(lambda: dinov3.DinoV3(cfg, rngs=nnx.Rngs(0), **tower_options(m)))


def backbone(m, mesh, rules, seed: int) -> dinov3.DinoV3:
    """The frozen DINOv3 of `config.model`, sharded by `rules` on `mesh`."""
    if m.backbone in dinov3.VARIANTS:
        return random_sharded(backbone_init_fn(m, seed), mesh, rules)
    return io_towers.load_dinov3(m.backbone, mesh=mesh, rules=rules, **tower_options(m))


def text_config(m) -> clip_text.Config:
    """The text tower architecture of `config.model` (a checkpoint's metadata only)."""
    return io_towers.clip_text_config(m.text_tower, m.text_activation or None)


def abstract_text_tower(m) -> clip_text.TextTower:
    cfg = text_config(m)
    return nnx.eval_shape(lambda: clip_text.TextTower(cfg, rngs=nnx.Rngs(0), **tower_options(m)))


def text_dim(m) -> int:
    return text_config(m).embed_dim


def text_tower(m, mesh, rules, seed: int) -> clip_text.TextTower:
    """The frozen CLIP text tower of `config.model`, sharded by `rules` on `mesh`."""
    if m.text_tower in clip_text.VARIANTS:
        return random_sharded(_text_fn(m, seed), mesh, rules)
    return io_towers.load_clip_text(m.text_tower, activation=m.text_activation or None, mesh=mesh,
                                    rules=rules, **tower_options(m))


def adapters_fn(visual_dim: int, text_dim_: int, num_layers: int, seed: int):
    """The adapters' initializer (the training run's starting point for a given seed)."""
    return lambda: ad.Adapters(visual_dim, text_dim_, num_layers, rngs=nnx.Rngs(seed + 2))
