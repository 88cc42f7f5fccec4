"""The training feature cache: frozen DINOv3 features of every training image, computed once;
and the assembly of a training batch from this process's rows (cached or live).

The backbone is frozen and there is no augmentation, so every epoch sees the same features. The
cache is keyed by example index (the position in the training source) and holds them (with masks,
labels and class ids) in one of three places:

* "device": on the accelerators, replicated; a batch is a jitted gather (no host traffic);
* "memory": host RAM;
* "disk": memory-mapped `.npy` files under `WORKDIR/feature_cache/`.

A lookup returns global arrays laid out exactly like the live path's (`batch` axis split by the
rules), so the train step cannot tell cached from fresh features (bitwise with an fp32 cache).

Several processes: every process holds the whole cache. Over the epochs a process's rows of the
global batches reach almost every example (with P processes and E epochs a given example misses
one process's rows with probability (1 - 1/P)^E), so caching only "its" examples would save little,
and the "device" mode replicates the cache on every device anyway. `build` computes the features
in ordered global batches through the same jitted feature step as the live path (each process
decodes only its rows) and all-gathers them on the hosts; a "disk" cache then lives in one
directory per process (`feature_cache/process-P-of-N`), so hosts sharing a file system do not
write the same files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from addinov3_jax import config
from addinov3_jax.models import sharding
from addinov3_jax.runtime import distributed

# The places a cache can live (`train.feature_cache` adds "auto" and "off": config.py).
MODES = tuple(m for m in config.FEATURE_CACHE_MODES if m not in ("auto", "off"))
LABEL_KEYS = ("mask", "label", "class_id")





FEATURE_AXES = {"patches": 1, "cls": 1, "mask": 0, "label": 0, "class_id": 0}


def nbytes(n: int, n_layers: int, tokens: int, dim: int, dtype) -> int:
    return n * n_layers * (tokens + 1) * dim * np.dtype(jnp.dtype(dtype)).itemsize


class FeatureCache:
    """Features `patches` (N, L, T, D), `cls` (N, L, D) and `mask`, `label`, `class_id` per image."""

    def __init__(self, n: int, n_layers: int, tokens: int, dim: int, size: int, mode: str,
                 dtype: str, directory: Path | None = None):
        if mode not in MODES:
            raise ValueError(f"feature cache mode must be one of {MODES}, got {mode!r}")
        self.mode, self.dtype = mode, np.dtype(jnp.dtype(dtype))
        spec = {"patches": ((n, n_layers, tokens, dim), self.dtype),
                "cls": ((n, n_layers, dim), self.dtype), "mask": ((n, size, size), np.uint8),
                "label": ((n,), np.int32), "class_id": ((n,), np.int32)}
        if mode == "disk":
            directory.mkdir(parents=True, exist_ok=True)
            self.arrays = {k: np.lib.format.open_memmap(directory / f"{k}.npy", "w+", dt, shape)
                           for k, (shape, dt) in spec.items()}
        else:
            self.arrays = {k: np.zeros(shape, dt) for k, (shape, dt) in spec.items()}
        self.device = None

    def write(self, idx: np.ndarray, patches_lbnd, cls_lbd, local: dict) -> None:
        self.arrays["patches"][idx] = np.swapaxes(patches_lbnd, 0, 1).astype(self.dtype)
        self.arrays["cls"][idx] = np.swapaxes(cls_lbd, 0, 1).astype(self.dtype)
        for k in LABEL_KEYS:
            self.arrays[k][idx] = local[k]

    def finalize(self, mesh, rules) -> None:
        """Moves a "device" cache onto the devices (replicated) and compiles its gather."""
        self.mesh, self.rules = mesh, rules
        if self.mode == "device":  # every process holds the same arrays
            rep = NamedSharding(mesh, PartitionSpec())
            self.device = {k: jax.make_array_from_callback(v.shape, rep, lambda i, v=v: v[i])
                           for k, v in self.arrays.items()}
            out = {k: sharding.batch_sharding(mesh, rules, 4 if k == "patches" else
                                              (3 if k in ("cls", "mask") else 1), axis)
                   for k, axis in FEATURE_AXES.items()}
            self._gather = jax.jit(_gather, out_shardings=out)

    def lookup(self, idx: np.ndarray) -> dict[str, jax.Array]:
        """The batch of examples `idx` (this process's rows), as global arrays like the live path."""
        if self.device is not None:
            i = distributed.global_batch({"i": idx}, self.mesh, self.rules, {"i": 0})["i"]
            got = self._gather(self.device, i)
        else:
            local = {k: np.asarray(v[idx]) for k, v in self.arrays.items()}
            local["patches"], local["cls"] = local["patches"].swapaxes(0, 1), local["cls"].swapaxes(0, 1)
            got = distributed.global_batch(local, self.mesh, self.rules, FEATURE_AXES)
        got["patches"] = got["patches"].astype(jnp.float32)
        got["cls"] = got["cls"].astype(jnp.float32)
        got["mask"] = got["mask"].astype(jnp.float32)
        return got


def _gather(cache, idx):
    out = {k: cache[k][idx] for k in LABEL_KEYS}
    out["patches"] = cache["patches"][idx].swapaxes(0, 1)
    out["cls"] = cache["cls"][idx].swapaxes(0, 1)
    return out


def build(mode: str, batches: Iterable[dict], features: Callable, backbone_state, mesh, rules, *,
          num_examples: int, batch_size: int, n_layers: int, tokens: int, dim: int, size: int,
          dtype: str, directory: Path, progress=None) -> FeatureCache:
    """The cache of all `num_examples` examples from `batches` (`pipeline.ordered_batches` of
    `batch_size`, this process's rows), computed by `features(backbone_state, images)` and
    gathered on every host; global batch g holds examples `g*B ... g*B + B - 1`."""
    if jax.process_count() > 1:
        directory = directory / f"process-{jax.process_index()}-of-{jax.process_count()}"
    cache = FeatureCache(num_examples, n_layers, tokens, dim, size, mode, dtype, directory)
    for g, local in enumerate(batches):
        axes = {"image": 0, **{k: FEATURE_AXES[k] for k in LABEL_KEYS}}
        glob = distributed.global_batch(local, mesh, rules, axes)
        with sharding.use(mesh, rules):
            patches, cls = features(backbone_state, glob.pop("image"))
        idx = g * batch_size + np.arange(batch_size)
        valid = idx < num_examples
        cache.write(idx[valid], distributed.gather(patches)[:, valid], distributed.gather(cls)[:, valid],
                    {k: distributed.gather(v)[valid] for k, v in glob.items()})
        if progress is not None:
            progress.update(1)
    cache.finalize(mesh, rules)
    return cache


def train_batch(local: dict[str, np.ndarray], cache: FeatureCache | None, features: Callable,
                backbone_state, mesh, rules) -> dict[str, jax.Array]:
    """The global training batch from this process's rows `local`: features looked up in the
    cache by example `index`, or computed live from `image`; the same arrays either way."""
    if cache is not None:
        return cache.lookup(np.asarray(local["index"]))
    batch = distributed.global_batch(local, mesh, rules, {k: FEATURE_AXES[k] for k in LABEL_KEYS})
    images = distributed.global_batch(local, mesh, rules, {"image": 0})["image"]
    with sharding.use(mesh, rules):
        batch["patches"], batch["cls"] = features(backbone_state, images)
    return batch
