"""Inference on the mesh: `Predictor` runs `model.predict_step` for `eval` and `predict`.

With a few-shot config, `Predictor.build_bank` runs the backbone over reference images on the
mesh (batch-split like the test batches) and returns a replicated `fewshot.MemoryBank`;
`predictor(..., bank=bank)` then fuses the few-shot maps and scores with the zero-shot ones, the
test images' bank queries coming from the same backbone pass as the head's features. Without a
bank the zero-shot step runs unchanged.

The model's towers are placed by the config's rules (sharded; see `towers.py` / `ad.load(...,
mesh=, rules=)`), the adapters alike, and every batch is split over the `batch` rule's axes. With
several processes each one feeds its own rows (`jax.make_array_from_process_local_data`) and
`gather` brings the global result to every host (for the metrics on process 0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from addinov3_jax.models import fewshot, sharding
from addinov3_jax.models import model as ad


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
      fewshot_config: settings of the few-shot branch (`build_bank`, `__call__(..., bank=)`);
        default `fewshot.FewShotConfig()`.
    """

    def __init__(self, model: ad.ADDinoV3, mesh=None, rules=sharding.DEFAULT_RULES,
                 fewshot_config: fewshot.FewShotConfig | None = None):
        self.mesh, self.rules = mesh or default_mesh(), rules
        self.model = place_model(model, self.mesh, rules)
        self.graphdef, self.backbone_state = nnx.split(model.backbone)
        self.adapters = ad.trainable_params(model)
        self.fewshot = fewshot_config or fewshot.FewShotConfig()
        out = (sharding.batch_sharding(self.mesh, rules, 3), sharding.batch_sharding(self.mesh, rules, 1))
        self._step = jax.jit(functools.partial(_step, graphdef=self.graphdef, cfg=model.config),
                             out_shardings=out)
        self._fewshot_step = jax.jit(functools.partial(
            _fewshot_step, graphdef=self.graphdef, cfg=model.config, fs=self.fewshot,
            bank_mesh=self.mesh if self.fewshot.shard_bank else None), out_shardings=out)
        self._taps = jax.jit(functools.partial(_taps, graphdef=self.graphdef,
                                               layers=model.config.feature_layers),
                             out_shardings=sharding.batch_sharding(self.mesh, rules, 4, axis=1))
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

    def __call__(self, images_bhwc, class_ids_b, table,
                 bank: fewshot.MemoryBank | None = None) -> tuple[jax.Array, jax.Array]:
        """Maps (B, H, W) and scores (B,) as global arrays, for process-local numpy rows; with a
        `bank` (from `build_bank`), fused with the few-shot branch (`fewshot.fuse`)."""
        images = self.to_global(np.asarray(images_bhwc, np.float32))
        ids = self.to_global(np.asarray(class_ids_b, np.int32))
        with sharding.use(self.mesh, self.rules):
            if bank is None:
                return self._step(self.backbone_state, self.adapters, images, ids, table)
            return self._fewshot_step(self.backbone_state, self.adapters, images, ids, table,
                                      bank.features_lmd)

    def build_bank(self, references_khwc, *, seed: int = 0, batch_size: int = 8) -> fewshot.MemoryBank:
        """The few-shot bank of k normalised reference images (k, H, W, 3) (the same array on
        every process), over the views of the few-shot config; the backbone runs on the mesh in
        global batches of `batch_size` rows (padded); the bank comes back replicated."""
        refs = np.asarray(references_khwc, np.float32)
        if refs.ndim != 4 or refs.shape[0] == 0:
            raise ValueError(f"reference images must be (k>0, H, W, 3), got {refs.shape}")
        rows = -(-batch_size // self.batch_split) * self.batch_split
        views = []
        for view in fewshot.augment_views(refs, self.fewshot.augment, self.fewshot.rotation_angles):
            view = np.asarray(view)
            parts = []
            for start in range(0, len(view), rows):
                chunk = view[start : start + rows]
                padded = np.concatenate([chunk, np.repeat(chunk[-1:], rows - len(chunk), 0)])
                sharded = jax.make_array_from_callback(
                    padded.shape, sharding.batch_sharding(self.mesh, self.rules, 4),
                    lambda idx, padded=padded: padded[idx])
                with sharding.use(self.mesh, self.rules):
                    taps = self._taps(self.backbone_state, sharded)
                parts.append(gather(taps)[:, : len(chunk)])
            views.append(jnp.asarray(np.concatenate(parts, axis=1)))
        bank = fewshot.bank_from_features(views, self.fewshot, shots=len(refs), seed=seed)
        if self.fewshot.shard_bank:  # rows split over every device of the mesh
            return fewshot.shard_bank(bank, self.mesh)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        feats = np.asarray(bank.features_lmd)
        return dataclasses.replace(bank, features_lmd=jax.make_array_from_callback(
            feats.shape, replicated, lambda idx: feats[idx]))


def _step(backbone_state, adapters, images, class_ids, table, *, graphdef, cfg):
    backbone = nnx.merge(graphdef, backbone_state)
    return ad.predict_step(backbone, adapters, images, table[class_ids], cfg)


def _fewshot_step(backbone_state, adapters, images, class_ids, table, bank_lmd, *, graphdef, cfg, fs,
                  bank_mesh):
    backbone = nnx.merge(graphdef, backbone_state)
    maps, scores, taps = ad.predict_step(backbone, adapters, images, table[class_ids], cfg,
                                         with_taps=True)
    p = backbone.config.patch_size
    grid = (images.shape[1] // p, images.shape[2] // p)
    fs_maps, fs_scores = fewshot.predict_features(bank_lmd, taps, grid, images.shape[1:3], fs,
                                                  mesh=bank_mesh)
    return fewshot.fuse(maps, scores, fs_maps, fs_scores, fs.fusion, fs.fusion_weight)


def _taps(backbone_state, images, *, graphdef, layers):
    return ad.l2_normalize(ad.extract_taps(nnx.merge(graphdef, backbone_state), images, layers)[0])


def gather(x: jax.Array) -> np.ndarray:
    """The whole global array as host numpy on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
