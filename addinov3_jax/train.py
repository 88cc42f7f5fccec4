"""Training of the AD-DINOv3 adapters: sharded optax steps, feature cache, orbax checkpoints.

The backbone and the text tower are frozen and there is no augmentation, so a step is split in
two jitted functions: `features` (frozen DINOv3 taps, or a lookup in the feature cache) and `step`
(head, losses, AdamW update of the adapters). The same `step` consumes cached and freshly computed
features, so both give identical parameters (bitwise with an fp32 cache).

Only parameters under `adapters` train (`model.TRAINABLE`); they and the optimizer state are small
and replicated; the frozen backbone follows the config's sharding rules; batches are split over
the mesh's `data` and `fsdp` axes. Checkpoints (orbax) hold the adapters, the optimizer state, the
data-iterator state and JSON metadata; re-running the same command resumes from the latest one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from addinov3_jax import clip_text, dinov3, losses, sharding
from addinov3_jax import model as ad
from addinov3_jax.data import pipeline, readers

log = logging.getLogger("addinov3.train")

RULES = {"replicated": sharding.REPLICATED_RULES, "fsdp": sharding.FSDP_RULES}
BATCH = ("data", "fsdp")


# ---------------------------------------------------------------------------------------------
# Building blocks


def head_config(cfg: ml_collections.ConfigDict) -> ad.HeadConfig:
    m = cfg.model
    return ad.HeadConfig(feature_layers=tuple(m.feature_layers), text_layout=m.text_layout,
                         image_score=m.image_score, smoothing_sigma=m.smoothing_sigma)


def build_model(cfg: ml_collections.ConfigDict) -> ad.ADDinoV3:
    """Backbone and text tower from converted paths, or random init from variant names."""
    m = cfg.model
    dtype = jnp.dtype(m.compute_dtype)
    if m.backbone in dinov3.VARIANTS:
        backbone = dinov3.create(m.backbone, rngs=nnx.Rngs(cfg.seed), scan_layers=m.scan_layers,
                                 compute_dtype=dtype)
    else:
        backbone = dinov3.load(m.backbone, scan_layers=m.scan_layers, compute_dtype=dtype)
    if m.text_tower in clip_text.VARIANTS:
        text = clip_text.create(m.text_tower, activation=m.text_activation,
                                rngs=nnx.Rngs(cfg.seed + 1))
    else:
        text = clip_text.load(m.text_tower, activation=m.text_activation or None)
    return ad.ADDinoV3(backbone, text, head_config(cfg), rngs=nnx.Rngs(cfg.seed + 2))


def training_source(cfg: ml_collections.ConfigDict):
    """(source, object words, preprocess, report) of the auxiliary training data."""
    d = cfg.data
    if d.name == "synthetic":
        from addinov3_jax.data import synthetic

        synthetic.ensure(d.root)
    spec = readers.spec_for(d.name)
    if d.source == "tfds":
        from addinov3_jax.data import tfds_builders

        source, report = tfds_builders.data_source(d.name, d.tfds_data_dir, d.split), None
    else:
        records, report = readers.read(d.name, d.root, split=d.split,
                                       classes=tuple(d.classes) or None,
                                       on_bad_sample=d.on_bad_sample)
        source = pipeline.RecordSource(records)
    words = pipeline.class_words(source, cfg.model.class_name_source)
    pre = pipeline.Preprocess(size=(d.image_size, d.image_size),
                              mask_threshold=spec.mask_threshold if spec else 0.5,
                              classes=words, class_name_source=cfg.model.class_name_source)
    return source, words, pre, report


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int):
    """(AdamW, its schedule): linear warm-up from 0 over the first `warmup_fraction` of the steps,
    then constant (the official LambdaLR: lr * step / warmup)."""
    t = cfg.train
    warmup = int(t.warmup_fraction * total_steps)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, t.lr, max(warmup, 1)), optax.constant_schedule(t.lr)],
        [warmup]) if warmup > 0 else optax.constant_schedule(t.lr)
    return optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=1e-8, weight_decay=t.weight_decay), schedule


def global_batch(local: dict[str, np.ndarray], mesh, keys) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global arrays split over the batch axes."""
    out = {}
    for k in keys:
        arr = np.asarray(local[k])
        spec = PartitionSpec(BATCH, *([None] * (arr.ndim - 1)))
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), arr)
    return out


class FeatureCache:
    """Frozen features (and masks, labels, classes) of every training image, computed once.

    `mode`: "device" (replicated on every device, lookups stay on the device), "memory" (host
    RAM) or "disk" (memory-mapped .npy files under the workdir).
    """

    def __init__(self, n: int, n_layers: int, tokens: int, dim: int, size: int, mode: str,
                 dtype: str, directory: Path | None):
        self.mode, self.dtype = mode, np.dtype(jnp.dtype(dtype))
        spec = {"patches": ((n, n_layers, tokens, dim), self.dtype), "cls": ((n, n_layers, dim), self.dtype),
                "mask": ((n, size, size), np.uint8), "label": ((n,), np.int32),
                "class_id": ((n,), np.int32)}
        if mode == "disk":
            directory.mkdir(parents=True, exist_ok=True)
            self.arrays = {k: np.lib.format.open_memmap(directory / f"{k}.npy", "w+", dt, shape)
                           for k, (shape, dt) in spec.items()}
        else:
            self.arrays = {k: np.zeros(shape, dt) for k, (shape, dt) in spec.items()}
        self.device = None

    @staticmethod
    def nbytes(n, n_layers, tokens, dim, dtype) -> float:
        return n * n_layers * (tokens + 1) * dim * np.dtype(jnp.dtype(dtype)).itemsize

    def write(self, idx: np.ndarray, patches_lbnd, cls_lbd, local: dict) -> None:
        self.arrays["patches"][idx] = np.swapaxes(patches_lbnd, 0, 1).astype(self.dtype)
        self.arrays["cls"][idx] = np.swapaxes(cls_lbd, 0, 1).astype(self.dtype)
        for k in ("mask", "label", "class_id"):
            self.arrays[k][idx] = local[k]

    def finalize(self, mesh) -> None:
        if self.mode == "device":
            rep = NamedSharding(mesh, PartitionSpec())
            self.device = {k: jax.device_put(v, rep) for k, v in self.arrays.items()}
            out = {"patches": NamedSharding(mesh, PartitionSpec(None, BATCH)),
                   "cls": NamedSharding(mesh, PartitionSpec(None, BATCH))}
            out.update({k: NamedSharding(mesh, PartitionSpec(BATCH)) for k in ("mask", "label", "class_id")})
            self._gather = jax.jit(_gather, out_shardings=out)

    def lookup(self, idx: np.ndarray, mesh) -> dict[str, jax.Array]:
        """The batch at positions `idx` (process-local), as global arrays like the live path."""
        if self.device is not None:
            got = self._gather(self.device, global_batch({"i": idx}, mesh, ["i"])["i"])
        else:
            local = {k: np.asarray(v[idx]) for k, v in self.arrays.items()}
            got = global_batch(local, mesh, ["mask", "label", "class_id"])
            for k in ("patches", "cls"):
                got[k] = jax.make_array_from_process_local_data(
                    NamedSharding(mesh, PartitionSpec(None, BATCH)), local[k].swapaxes(0, 1))
        got["patches"] = got["patches"].astype(jnp.float32)
        got["cls"] = got["cls"].astype(jnp.float32)
        got["mask"] = got["mask"].astype(jnp.float32)
        return got


def _gather(cache, idx):
    out = {k: cache[k][idx] for k in ("mask", "label", "class_id")}
    out["patches"] = cache["patches"][idx].swapaxes(0, 1)
    out["cls"] = cache["cls"][idx].swapaxes(0, 1)
    return out


# ---------------------------------------------------------------------------------------------
# The trainer


@dataclasses.dataclass
class Trainer:
    config: ml_collections.ConfigDict
    workdir: Path

    def __post_init__(self):
        cfg = self.config
        self.workdir = Path(self.workdir)
        self.is_main = jax.process_index() == 0
        self.mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        self.rules = RULES[cfg.mesh.rules]
        self.model = build_model(cfg)
        self.head_cfg = self.model.config
        self.source, self.words, self.preprocess, self.report = training_source(cfg)
        n_proc = jax.process_count()
        if cfg.train.batch_size % n_proc:
            raise ValueError(f"batch size {cfg.train.batch_size} not divisible by {n_proc} processes")
        self.local_batch = cfg.train.batch_size // n_proc
        self.steps_per_epoch = pipeline.steps_per_epoch(len(self.source), self.local_batch, n_proc)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.source)} training images are fewer than one batch of "
                             f"{cfg.train.batch_size}")
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.tx, self.schedule = make_optimizer(cfg, self.total_steps)
        self.size = cfg.data.image_size
        p = self.model.backbone.config.patch_size
        self.grid = (self.size // p, self.size // p)
        # Text prototypes once per class, replicated.
        rep = NamedSharding(self.mesh, PartitionSpec())
        table = self.model.text_features(list(self.words), cache_dir=self.workdir / "text_cache")
        self.text_table = jax.device_put(jnp.asarray(table), rep)
        # Frozen backbone placed by the rules; adapters and optimizer state replicated.
        self.bb_graph, bb_state = nnx.split(self.model.backbone)
        self.bb_shardings = sharding.state_shardings(bb_state, self.mesh, self.rules)
        self.bb_state = jax.device_put(bb_state, self.bb_shardings)
        self.params = jax.device_put(ad.trainable_params(self.model), rep)
        self.opt_state = jax.device_put(self.tx.init(self.params), rep)
        self._build_steps()

    def _build_steps(self):
        rep = NamedSharding(self.mesh, PartitionSpec())
        feat = NamedSharding(self.mesh, PartitionSpec(None, BATCH))
        bb_graph, head_cfg, grid, size = self.bb_graph, self.head_cfg, self.grid, (self.size, self.size)

        def features(bb_state, images):
            return ad.extract_features(nnx.merge(bb_graph, bb_state), images, head_cfg)

        self.features = jax.jit(features, out_shardings=(feat, feat))

        def loss_fn(params, patches, cls, text, mask, label):
            out = ad.head(params, patches, cls, text, grid, size, head_cfg)
            terms = losses.total(out, mask, label)
            return terms["loss"], terms

        def step(params, opt_state, patches, cls, text_table, class_id, mask, label):
            text = text_table[class_id]
            (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, patches, cls, text, mask, label)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, terms

        self.step = jax.jit(step, donate_argnums=(0, 1), out_shardings=(rep, rep, rep))

    # -- data -----------------------------------------------------------------------------

    def _iterator(self, cached: bool):
        cfg = self.config
        src = list(range(len(self.source))) if cached else self.source
        pre = _index_only if cached else self.preprocess
        return iter(pipeline.train_dataset(
            src, pre, batch_size=self.local_batch, seed=cfg.seed, num_epochs=cfg.train.epochs,
            shard_index=jax.process_index(), shard_count=jax.process_count(),
            worker_count=0 if cached else cfg.data.worker_count))

    def build_cache(self) -> FeatureCache | None:
        t = self.config.train
        if t.feature_cache == "off":
            return None
        if jax.process_count() > 1:  # each host would cache a different part of the data
            if t.feature_cache == "auto":
                return None
            raise ValueError("the feature cache is single-host; use --config.train.feature_cache=off "
                             "(or auto) for multi-host training")
        cfg_b = self.model.backbone.config
        n_layers, tokens = len(self.head_cfg.feature_layers), self.grid[0] * self.grid[1]
        mode = t.feature_cache
        if mode == "auto":
            nbytes = FeatureCache.nbytes(len(self.source), n_layers, tokens, cfg_b.embed_dim,
                                         t.feature_cache_dtype)
            mode = "device" if nbytes <= t.feature_cache_max_gb * 2**30 else "disk"
        cache = FeatureCache(len(self.source), n_layers, tokens, cfg_b.embed_dim, self.size, mode,
                             t.feature_cache_dtype, self.workdir / "feature_cache")
        ds = pipeline.eval_dataset(self.source, self.preprocess, batch_size=self.local_batch,
                                   worker_count=self.config.data.worker_count)
        bar = _progress(self.is_main, total=-(-len(self.source) // self.config.train.batch_size),
                        desc=f"feature cache ({mode})")
        for local in ds:
            b = global_batch(local, self.mesh, ["image"])
            patches, cls = self.features(self.bb_state, b["image"])
            valid = local["valid"].astype(bool)
            idx = local["index"][valid]
            cache.write(idx, np.asarray(patches)[:, valid], np.asarray(cls)[:, valid],
                        {k: local[k][valid] for k in ("mask", "label", "class_id")})
            bar.update(1)
        bar.close()
        cache.finalize(self.mesh)
        return cache

    # -- checkpoints ----------------------------------------------------------------------

    def _manager(self):
        import orbax.checkpoint as ocp

        opts = ocp.CheckpointManagerOptions(max_to_keep=self.config.train.keep_checkpoints,
                                            create=True, enable_async_checkpointing=True)
        return ocp.CheckpointManager((self.workdir / "checkpoints").absolute(), options=opts,
                                     item_names=("params", "opt_state", "data", "meta"))

    def _save(self, mngr, step: int, it, force=False):
        import orbax.checkpoint as ocp

        meta = {"step": step, "total_steps": self.total_steps, "classes": list(self.words),
                "config": json.loads(self.config.to_json_best_effort())}
        mngr.save(step, force=force, args=ocp.args.Composite(
            params=ocp.args.StandardSave(self.params), opt_state=ocp.args.StandardSave(self.opt_state),
            data=ocp.args.JsonSave(it.get_state()), meta=ocp.args.JsonSave(meta)))

    def _restore(self, mngr, it) -> int:
        """Restores the newest readable checkpoint (older ones if it is corrupt); returns its step."""
        import orbax.checkpoint as ocp

        abstract = lambda tree: jax.tree.map(  # noqa: E731
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                got = mngr.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract(self.params)),
                    opt_state=ocp.args.StandardRestore(abstract(self.opt_state)),
                    data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
                it.set_state(got["data"])
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back
                log.warning("checkpoint %d in %s is unreadable (%s: %s); trying an older one",
                            step, self.workdir / "checkpoints", type(e).__name__, e)
                print(f"warning: checkpoint {step} is unreadable ({type(e).__name__}); "
                      "falling back to an older one", file=sys.stderr)
                continue
            self.params, self.opt_state = got["params"], got["opt_state"]
            return int(step)
        return 0

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.config
        self.workdir.mkdir(parents=True, exist_ok=True)
        cache = self.build_cache()
        it = self._iterator(cached=cache is not None)
        mngr = self._manager()
        start = self._restore(mngr, it)
        writer = _Writers(self.workdir, self.is_main)
        if start:
            print(f"resuming from step {start} of {self.total_steps}")
        bar = _progress(self.is_main, total=self.total_steps, initial=start, desc="train")
        t_last, n_last, last_terms = time.perf_counter(), start, None
        for step in range(start, self.total_steps):
            local = next(it)
            if cache is not None:
                b = cache.lookup(np.asarray(local["index"]), self.mesh)
                patches, cls, mask = b["patches"], b["cls"], b["mask"]
            else:
                b = global_batch(local, self.mesh, ["image", "mask", "class_id", "label"])
                patches, cls = self.features(self.bb_state, b["image"])
                mask = b["mask"]
            self.params, self.opt_state, terms = self.step(
                self.params, self.opt_state, patches, cls, self.text_table, b["class_id"], mask,
                b["label"])
            last_terms = terms
            done = step + 1
            if done % cfg.train.log_every == 0 or done == self.total_steps:
                dt = time.perf_counter() - t_last
                rate = (done - n_last) / max(dt, 1e-9)
                row = {k: float(v) for k, v in terms.items()}
                row.update(step=done, lr=float(self.schedule(done - 1)), steps_per_s=rate,
                           images_per_s=rate * cfg.train.batch_size)
                writer.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                t_last, n_last = time.perf_counter(), done
            if done % cfg.train.checkpoint_every == 0 and done != self.total_steps:
                self._save(mngr, done, it)
            bar.update(1)
        bar.close()
        if not mngr.latest_step() == self.total_steps:
            self._save(mngr, self.total_steps, it, force=True)
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
        ad.set_trainable_params(self.model, self.params)
        if self.is_main:
            self.save_model()
        return {"steps": self.total_steps, "resumed_from": start,
                "compilations": self.step._cache_size(),
                "final": {k: float(v) for k, v in (last_terms or {}).items()}}

    def save_model(self) -> Path:
        """Writes `workdir/model/` (adapters + towers or references) for `predict` / `eval`."""
        m = self.config.model
        ref = lambda p: None if p in dinov3.VARIANTS or p in clip_text.VARIANTS else str(  # noqa: E731
            Path(p).absolute())
        return ad.save(self.model, self.workdir / "model", backbone=ref(m.backbone),
                       text_tower=ref(m.text_tower))


def _index_only(i) -> dict:
    """Cached training reads only the example's position; the cache holds the rest."""
    return {"index": np.int32(i)}


def _progress(enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kw)


class _Writers:
    """JSON lines and TensorBoard event files, written by process 0 only."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            self.jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115
            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for k, v in row.items():
            if k != "step" and math.isfinite(v):
                self.tb.add_scalar(f"train/{k}", v, row["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def init_multihost() -> None:
    """`jax.distributed.initialize()`: from ADDINOV3_COORDINATOR / ADDINOV3_NUM_PROCESSES /
    ADDINOV3_PROCESS_ID when set (e.g. several processes on one machine), else auto-detected
    (TPU pods, SLURM, ...). CPU processes exchange data with gloo."""
    env = os.environ
    if env.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if "ADDINOV3_COORDINATOR" in env:
        jax.distributed.initialize(coordinator_address=env["ADDINOV3_COORDINATOR"],
                                   num_processes=int(env["ADDINOV3_NUM_PROCESSES"]),
                                   process_id=int(env["ADDINOV3_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains (or resumes) in `workdir`; returns a summary."""
    if config.multihost:
        init_multihost()
    return Trainer(config, Path(workdir)).run()
