"""Inference on the mesh: `Predictor` runs `model.predict_step` for `eval` and `predict`.

The model's towers are placed by the config's rules (sharded; see `towers.py` / `ad.load(...,
mesh=, rules=)`), the adapters alike, and every batch is split over the `batch` rule's axes. With
several processes each one feeds its own rows (`jax.make_array_from_process_local_data`) and
`gather` brings the global result to every host (for the metrics on process 0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from addinov3_jax import model as ad
from addinov3_jax import sharding


def default_mesh(batch_size: int | None = None):
    """A data-parallel mesh: every device, or on one process the most devices that split
    `batch_size` evenly."""
    if batch_size and jax.process_count() == 1:
        return sharding.make_mesh(math.gcd(batch_size, jax.device_count()), 1, 1)
    return sharding.make_mesh(-1, 1, 1)


def place_model(model: ad.ADDinoV3, mesh, rules) -> ad.ADDinoV3:
    """`model` with every variable moved into the rules' sharding on `mesh` (towers that were
    loaded with the same mesh and rules are already there: nothing moves)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))
    return model


class Predictor:
    """Pixel maps and image scores of batches of normalised images, on a mesh.

    Args:
      model: an `ADDinoV3`; its variables are moved onto `mesh` by the rules (`place_model`)
        unless they are there already.
      mesh, rules: the mesh (default: `default_mesh()`) and the logical-axis rules.
    """

    def __init__(self, model: ad.ADDinoV3, mesh=None, rules=sharding.DEFAULT_RULES):
        self.mesh, self.rules = mesh or default_mesh(), rules
        self.model = place_model(model, self.mesh, rules)
        self.graphdef, self.backbone_state = nnx.split(model.backbone)
        self.adapters = ad.trainable_params(model)
        out = (sharding.batch_sharding(self.mesh, rules, 3), sharding.batch_sharding(self.mesh, rules, 1))
        self._step = jax.jit(functools.partial(_step, graphdef=self.graphdef, cfg=model.config),
                             out_shardings=out)
        self.batch_split = sharding.data_parallel_size(self.mesh, rules)

    def text_table(self, words: Sequence[str], cache_dir=None) -> jax.Array:
        """(C, E, 2) prototypes of `words`, computed once (and cached on disk), replicated."""
        with sharding.use(self.mesh, self.rules):
            table = self.model.text_features(list(words), cache_dir=cache_dir)
        return jax.device_put(jnp.asarray(table), NamedSharding(self.mesh, PartitionSpec()))

    def local_rows(self, global_batch: int) -> int:
        """Rows each process feeds for a global batch (checked to split evenly)."""
        n = jax.process_count()
        if global_batch % n or global_batch % self.batch_split:
            raise ValueError(f"batch size {global_batch} must be divisible by the {n} processes "
                             f"and the {self.batch_split}-way batch split of the mesh")
        return global_batch // n

    def to_global(self, local: np.ndarray) -> jax.Array:
        """Process-local rows -> a global array split over the `batch` rule."""
        local = np.asarray(local)
        return jax.make_array_from_process_local_data(
            sharding.batch_sharding(self.mesh, self.rules, local.ndim), local)

    def __call__(self, images_bhwc, class_ids_b, table) -> tuple[jax.Array, jax.Array]:
        """Maps (B, H, W) and scores (B,) as global arrays, for process-local numpy rows."""
        images = self.to_global(np.asarray(images_bhwc, np.float32))
        ids = self.to_global(np.asarray(class_ids_b, np.int32))
        with sharding.use(self.mesh, self.rules):
            return self._step(self.backbone_state, self.adapters, images, ids, table)


def _step(backbone_state, adapters, images, class_ids, table, *, graphdef, cfg):
    backbone = nnx.merge(graphdef, backbone_state)
    return ad.predict_step(backbone, adapters, images, table[class_ids], cfg)


def gather(x: jax.Array) -> np.ndarray:
    """The whole global array as host numpy on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
