"""The run core's set-up: `setup(config)` returns the `Runtime` every command runs on, and the
frozen towers and the adapters, built abstractly first and materialized sharded.

`abstract_*` returns shapes only (`nnx.eval_shape`: no memory); `backbone`, `text_tower` and
`adapters` materialize straight into the shardings the config's rules give on a mesh: random
weights are initialised by `jax.jit(init, out_shardings=...)`, converted weights are read shard by
shard (`checkpoint_io.place`). No process ever holds an unsharded device copy of a tower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from addinov3_jax import config as config_lib
from addinov3_jax.data import readers, synthetic
from addinov3_jax.io import model_dir
from addinov3_jax.io import towers as io_towers
from addinov3_jax.models import clip_text, dinov3, sharding
from addinov3_jax.models import model as ad
from addinov3_jax.runtime import distributed, steps


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


DEMO_ROOT = config_lib.demo_config().data.root


def check_synthetic_root(root: str) -> None:
    """The synthetic data is generated only at the demo's default root; elsewhere a missing root
    is a typo, not a request to generate data there."""
    if Path(root).exists():
        return
    if Path(root) == Path(DEMO_ROOT):
        synthetic.ensure(root)
        return
    raise readers.DataError(f"{root}: no such dataset folder; generate the synthetic data with "
                            f"`addinov3 data synthetic --output {root}` or fix data.root")


# ---------------------------------------------------------------------------------------------
# The run core: one `setup(config)` for train, eval, plan and the demo.


@dataclasses.dataclass
class Runtime:
    """What a run of a config needs, set up once: the validated config, the mesh and rules,
    the backbone's architecture (metadata only), and the jitted steps built from them."""

    config: ml_collections.ConfigDict
    mesh: Any
    rules: Any
    backbone_config: dinov3.Config

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def head_config(self) -> ad.HeadConfig:
        m = self.config.model
        return ad.HeadConfig(feature_layers=tuple(m.feature_layers), text_layout=m.text_layout,
                             image_score=m.image_score, smoothing_sigma=m.smoothing_sigma)

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size // self.backbone_config.patch_size,) * 2

    def check_batch(self, global_batch: int, what: str) -> int:
        """Rows per process of `global_batch`, checked against processes and the batch split."""
        n, split = jax.process_count(), sharding.data_parallel_size(self.mesh, self.rules)
        if global_batch % n or global_batch % split:
            raise ValueError(f"{what} {global_batch} must be divisible by the {n} processes and "
                             f"the {split}-way batch split of the mesh")
        return global_batch // n

    def towers(self) -> tuple[dinov3.DinoV3, clip_text.TextTower]:
        """The frozen backbone and text tower, materialized in the rules' shardings."""
        m, seed = self.config.model, self.config.seed
        return backbone(m, self.mesh, self.rules, seed), text_tower(m, self.mesh, self.rules, seed)

    def adapters_fn(self, text_dim_: int):
        """The adapters' initializer of this run (its seed)."""
        return adapters_fn(self.backbone_config.embed_dim, text_dim_,
                           len(self.head_config.feature_layers), self.config.seed)

    def feature_step(self, graphdef):
        return steps.jit_feature_step(graphdef, self.head_config, self.mesh, self.rules)

    def train_step(self, tx, state_shardings):
        return steps.jit_train_step(tx, self.head_config, self.image_size,
                                    self.backbone_config.patch_size, state_shardings, self.mesh)

    def load_model(self, directory) -> ad.ADDinoV3:
        """A model directory loaded onto the mesh with the config's tower options and
        inference-time head choices (the text activation comes from `model.json`)."""
        m = self.config.model
        return model_dir.load(directory, mesh=self.mesh, rules=self.rules,
                              tower_options=tower_options(m), image_score=m.image_score,
                              smoothing_sigma=m.smoothing_sigma)

    def global_batch(self, local: dict, axes: dict[str, int]) -> dict:
        return distributed.global_batch(local, self.mesh, self.rules, axes)


def setup(config: ml_collections.ConfigDict) -> Runtime:
    """Validates `config` (once), joins the other processes with `config.multihost`, checks the
    tapped blocks against the backbone's depth (metadata only, before anything is written) and
    builds the mesh."""
    cfg = config_lib.validate(config)
    if cfg.multihost:
        distributed.init_multihost()
    bb_cfg = backbone_config(cfg.model)
    try:
        dinov3.select_blocks(tuple(cfg.model.feature_layers), bb_cfg.depth)
    except ValueError as e:
        raise config_lib.ConfigError(f"config field model.feature_layers: {e}") from None
    mesh = distributed.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    return Runtime(cfg, mesh, cfg.mesh.rules, bb_cfg)
