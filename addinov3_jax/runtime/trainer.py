"""Training of the AD-DINOv3 adapters: one `TrainState` pytree, one pure `train_step`.

The backbone and the text tower are frozen and there is no augmentation, so a step is split in
two jitted functions: `feature_step` (frozen DINOv3 taps; or a lookup in the feature cache) and
`train_step` (head, losses, AdamW update of the adapters). The same `train_step` consumes cached
and fresh features, so both give identical parameters (bitwise with an fp32 cache).

Everything is built abstractly first (`nnx.eval_shape` / `jax.eval_shape`) and materialized in
the shardings that the config's rules give on the mesh (`towers.py`, `init_train_state`); batches
split over the `batch` rule's axes; `train_step` donates the state and pins its out shardings, so
a run compiles it once. `train(config, workdir)` wires data, steps, checkpoints and writers;
re-running the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from addinov3_jax import config as config_lib
from addinov3_jax.data import pipeline, readers
from addinov3_jax.io import model_dir
from addinov3_jax.io.workdir import WorkdirLock, ensure_writable, strict_json, write_guard
from addinov3_jax.models import losses, prompts, sharding
from addinov3_jax.models import model as ad
from addinov3_jax.runtime import checkpointing, setup
from addinov3_jax.runtime.feature_cache import FEATURE_AXES, FeatureCache, global_batch, nbytes

# Test hook, "K:SIGNAL" (e.g. "5:SIGKILL", "3:SIGINT"): this process sends itself SIGNAL right
# after step K, once the checkpoints started so far are complete, so that tests of a kill or a
# Ctrl-C and of the resume that follows are deterministic.
SIGNAL_AFTER_STEP_ENV = "ADDINOV3_TEST_SIGNAL_AFTER_STEP"
RESUME_HINT = "rerun the same command to resume from the last checkpoint"


class TrainingInterrupted(RuntimeError):
    """Ctrl-C during training; the message says where and how to resume."""


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


# ---------------------------------------------------------------------------------------------
# Data


DEMO_ROOT = config_lib.demo_config().data.root


def check_synthetic_root(root: str) -> None:
    """The synthetic data is generated only at the demo's default root; elsewhere a missing root
    is a typo, not a request to generate data there."""
    from addinov3_jax.data import synthetic

    if Path(root).exists():
        return
    if Path(root) == Path(DEMO_ROOT):
        synthetic.ensure(root)
        return
    raise readers.DataError(f"{root}: no such dataset folder; generate the synthetic data with "
                            f"`addinov3 data synthetic --output {root}` or fix data.root")


def training_source(cfg: ml_collections.ConfigDict, backbone_cfg):
    """(source, object words, preprocess, report) of the auxiliary training data."""
    d = cfg.data
    if d.name == "synthetic":
        check_synthetic_root(d.root)
    spec = readers.spec_for(d.name)
    word_source = config_lib.object_word_source(cfg)
    if d.source == "tfds":
        from addinov3_jax.data import tfds_builders

        source, report = tfds_builders.data_source(d.name, d.tfds_data_dir, d.split), None
    else:
        records, report = readers.read(d.name, d.root, split=d.split,
                                       classes=tuple(d.classes) or None,
                                       on_bad_sample=d.on_bad_sample)
        source = pipeline.RecordSource(records)
    words = pipeline.class_words(source, word_source)
    pre = pipeline.Preprocess(size=(d.image_size, d.image_size),
                              mask_threshold=spec.mask_threshold if spec else 0.5,
                              classes=words, class_name_source=word_source,
                              mean=tuple(backbone_cfg.pixel_mean), std=tuple(backbone_cfg.pixel_std))
    return source, words, pre, report


def _index_only(i) -> dict:
    """Cached training reads only the example's position; the cache holds the rest."""
    return {"index": np.int32(i)}


# ---------------------------------------------------------------------------------------------
# The run


def _progress(enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kw)


class _Writers:
    """JSON lines and TensorBoard event files, written by process 0 only. On resume from step
    s, rows past s (written after the checkpoint the run resumes from) are dropped first."""

    def __init__(self, workdir: Path, enabled: bool, resume_step: int):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        path = workdir / "metrics.jsonl"
        if path.is_file():
            keep = [line for line in path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))
        self.jsonl = open(path, "a")  # noqa: SIM115
        self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(strict_json(row) + "\n")
        self.jsonl.flush()
        for k, v in row.items():
            if k != "step" and math.isfinite(v):
                self.tb.add_scalar(f"train/{k}", v, row["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def log_row(terms: dict, steps: int, since: float, batch_size: int) -> dict[str, float]:
    """The loss terms as floats and the speed since `since` (a `time.perf_counter()` reading)
    over the last `steps` steps. The floats are read first: they wait for the step to finish,
    so the clock measures the computation, not its asynchronous dispatch."""
    row = {k: float(v) for k, v in terms.items()}
    rate = steps / max(time.perf_counter() - since, 1e-9)
    return {**row, "steps_per_s": rate, "images_per_s": rate * batch_size}


def _any_process(flag: bool) -> bool:
    """`flag` on any process (one small collective per call when there are several)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl row; None for a blank or torn line (a kill mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def init_multihost() -> None:
    """`jax.distributed.initialize()`: from ADDINOV3_COORDINATOR / ADDINOV3_NUM_PROCESSES /
    ADDINOV3_PROCESS_ID when set (e.g. several processes on one machine), else auto-detected
    (TPU pods, SLURM, ...). CPU processes exchange data with gloo."""
    env = os.environ
    if jax.distributed.is_initialized():
        return
    if env.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if "ADDINOV3_COORDINATOR" in env:
        jax.distributed.initialize(coordinator_address=env["ADDINOV3_COORDINATOR"],
                                   num_processes=int(env["ADDINOV3_NUM_PROCESSES"]),
                                   process_id=int(env["ADDINOV3_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def _build_cache(cfg, source, preprocess, backbone_state, features, mesh, rules, grid, dim,
                 local_batch, workdir, is_main) -> FeatureCache | None:
    t = cfg.train
    if t.feature_cache == "off":
        return None
    if jax.process_count() > 1:  # each host would cache a different part of the data
        if t.feature_cache == "auto":
            return None
        raise ValueError("the feature cache is single-host; use --config.train.feature_cache=off "
                         "(or auto) for multi-host training")
    n_layers, tokens = len(cfg.model.feature_layers), grid[0] * grid[1]
    mode = t.feature_cache
    if mode == "auto":
        size = nbytes(len(source), n_layers, tokens, dim, t.feature_cache_dtype)
        mode = "device" if size <= t.feature_cache_max_gb * 2**30 else "disk"
    cache = FeatureCache(len(source), n_layers, tokens, dim, cfg.data.image_size, mode,
                         t.feature_cache_dtype, workdir / "feature_cache")
    ds = pipeline.eval_dataset(source, preprocess, batch_size=local_batch,
                               worker_count=cfg.data.worker_count)
    bar = _progress(is_main, total=-(-len(source) // local_batch), desc=f"feature cache ({mode})")
    for local in ds:
        images = global_batch(local, mesh, rules, {"image": 0})["image"]
        with sharding.use(mesh, rules):
            patches, cls = features(backbone_state, images)
        valid = local["valid"].astype(bool)
        cache.write(local["index"][valid], np.asarray(patches)[:, valid], np.asarray(cls)[:, valid],
                    {k: local[k][valid] for k in ("mask", "label", "class_id")})
        bar.update(1)
    bar.close()
    cache.finalize(mesh, rules)
    return cache


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains (or resumes, or reports finished) in `workdir`; returns a summary."""
    cfg = config_lib.validate(config)
    if cfg.multihost:
        init_multihost()
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    bb_cfg = setup.backbone_config(cfg.model)  # metadata only
    try:  # the taps against the backbone's depth, before anything is written
        setup.dinov3.select_blocks(tuple(cfg.model.feature_layers), bb_cfg.depth)
    except ValueError as e:
        raise config_lib.ConfigError(f"config field model.feature_layers: {e}") from None
    ensure_writable(workdir)
    with WorkdirLock(workdir, enabled=is_main):
        return _run(cfg, bb_cfg, workdir, is_main)


def _run(cfg: ml_collections.ConfigDict, bb_cfg, workdir: Path, is_main: bool) -> dict[str, Any]:
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rules = cfg.mesh.rules
    source, words, preprocess, _ = training_source(cfg, bb_cfg)
    n_proc, t = jax.process_count(), cfg.train
    if t.batch_size % n_proc or t.batch_size % sharding.data_parallel_size(mesh, rules):
        raise ValueError(f"train.batch_size {t.batch_size} must be divisible by the {n_proc} "
                         f"processes and the {sharding.data_parallel_size(mesh, rules)}-way "
                         "batch split of the mesh")
    local_batch = t.batch_size // n_proc
    steps_per_epoch = pipeline.steps_per_epoch(len(source), local_batch, n_proc)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(source)} training images are fewer than one batch of {t.batch_size}")
    total = t.epochs * steps_per_epoch
    mngr = checkpointing.manager(workdir, t.keep_checkpoints)
    checkpointing.check_same_run(checkpointing.saved_config(mngr),  # before any heavy work
                                 json.loads(cfg.to_json_best_effort()), workdir)
    if checkpointing.latest_step(workdir) == total and (workdir / "model" / model_dir.MODEL_FILE).is_file():
        mngr.close()
        if is_main:
            print(f"{workdir}: already finished ({total} steps); the model is in {workdir / 'model'}")
        return {"steps": total, "resumed_from": total, "compilations": 0, "finished": True,
                "final": {}}
    stop = min(t.stop_after or total, total)
    tx, schedule = make_optimizer(cfg, total)
    size, p = cfg.data.image_size, bb_cfg.patch_size
    grid, head_cfg = (size // p, size // p), head_config(cfg)

    # Frozen towers (sharded by the rules) and the text prototypes, computed once per class.
    backbone = setup.backbone(cfg.model, mesh, rules, cfg.seed)
    text = setup.text_tower(cfg.model, mesh, rules, cfg.seed)
    with sharding.use(mesh, rules):
        table = prompts.text_features(text, list(words), cache_dir=workdir / "text_cache")
    frozen = {"text": jax.device_put(jnp.asarray(table), NamedSharding(mesh, PartitionSpec()))}
    graphdef, backbone_state = nnx.split(backbone)

    create_adapters = setup.adapters_fn(bb_cfg.embed_dim, text.config.embed_dim,
                                         len(head_cfg.feature_layers), cfg.seed)
    state, state_shardings = init_train_state(create_adapters, tx, mesh, rules)
    feat = sharding.batch_sharding(mesh, rules, 3, axis=1)
    features = jax.jit(functools.partial(feature_step, graphdef=graphdef, head_cfg=head_cfg),
                       out_shardings=(sharding.batch_sharding(mesh, rules, 4, axis=1), feat))
    step_fn = jax.jit(functools.partial(train_step, tx=tx, head_cfg=head_cfg, grid=grid,
                                        size=(size, size)),
                      donate_argnums=(0,),
                      out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())))

    cache = _build_cache(cfg, source, preprocess, backbone_state, features, mesh, rules, grid,
                         bb_cfg.embed_dim, local_batch, workdir, is_main)
    it = iter(pipeline.train_dataset(
        list(range(len(source))) if cache else source, _index_only if cache else preprocess,
        batch_size=local_batch, seed=cfg.seed, num_epochs=t.epochs,
        shard_index=jax.process_index(), shard_count=n_proc,
        worker_count=0 if cache else cfg.data.worker_count))
    start, restored, data_state = checkpointing.restore_latest(mngr, checkpointing.abstract(state))
    if restored is not None:
        state = restored
        it.set_state(data_state)
        if is_main:
            print(f"resuming from step {start} of {total}")
    meta = {"total_steps": total, "classes": list(words), "config": json.loads(cfg.to_json_best_effort())}
    writer = _Writers(workdir, is_main, start)
    hook_step, _, hook_signal = os.environ.get(SIGNAL_AFTER_STEP_ENV, "0:").partition(":")

    bar = _progress(is_main, total=total, initial=start, desc="train")
    t_last, n_last, last_terms, done = time.perf_counter(), start, None, start
    # Ctrl-C only raises a flag, read after each step: the checkpoint written then pairs the
    # assigned state with the data position of the same step (never a half-done step).
    ctrl_c = {"raised": False}
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda *_: ctrl_c.update(raised=True))
    try:
        for step in range(start, stop):
            local = next(it)
            if cache is not None:
                batch = cache.lookup(np.asarray(local["index"]))
            else:
                batch = global_batch(local, mesh, rules, {k: FEATURE_AXES[k] for k in
                                                          ("mask", "label", "class_id")})
                images = global_batch(local, mesh, rules, {"image": 0})["image"]
                with sharding.use(mesh, rules):
                    batch["patches"], batch["cls"] = features(backbone_state, images)
            with sharding.use(mesh, rules):
                state, terms = step_fn(state, frozen, batch)
            last_terms, done = terms, step + 1
            if done % t.log_every == 0 or done in (total, stop):
                row = log_row(terms, done - n_last, t_last, t.batch_size)
                row.update(step=done, lr=float(schedule(done - 1)))
                writer.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                t_last, n_last = time.perf_counter(), done
            if done % t.checkpoint_every == 0 and done != total:
                with write_guard(mngr.directory, RESUME_HINT):
                    checkpointing.save(mngr, done, state, it.get_state(), {"step": done, **meta})
            bar.update(1)
            if done == int(hook_step):
                mngr.wait_until_finished()
                os.kill(os.getpid(), getattr(signal, hook_signal))
            if _any_process(ctrl_c["raised"]):
                break
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    bar.close()
    with write_guard(mngr.directory, RESUME_HINT):
        if mngr.latest_step() != done:  # the final (or interrupted) step, checkpointed
            checkpointing.save(mngr, done, state, it.get_state(), {"step": done, **meta}, force=True)
        mngr.wait_until_finished()
    mngr.close()
    writer.close()
    if ctrl_c["raised"] or (n_proc > 1 and done < stop):
        raise TrainingInterrupted(f"interrupted at step {done} of {total}; rerun the same command "
                                  "to resume")
    summary = {"steps": done, "total_steps": total, "resumed_from": start,
               "compilations": step_fn._cache_size(),
               "final": {k: float(v) for k, v in (last_terms or {}).items()}}
    if done < total:
        if is_main:
            print(f"stopped after step {done} of {total} (train.stop_after); rerun without it to "
                  "continue")
        return summary
    with write_guard(workdir / "model", RESUME_HINT):
        save_model(cfg, workdir / "model", backbone, text, state.params, head_cfg, is_main)
    return summary


def _to_host(tree):
    """Arrays as host numpy (gathered across processes when they are not all addressable)."""
    from jax.experimental import multihost_utils

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(one, tree)


def save_model(cfg, directory: Path, backbone, text, params, head_cfg, is_main: bool) -> None:
    """Writes `directory` (adapters + towers, or references to converted towers) for `predict`
    and `eval`. Random towers are written too, so the directory is self-contained."""
    m = cfg.model
    ref = lambda p, variants: None if p in variants else str(Path(p).absolute())  # noqa: E731
    bb_ref, tt_ref = ref(m.backbone, setup.dinov3.VARIANTS), ref(m.text_tower, setup.clip_text.VARIANTS)
    parts = {"adapters": params}
    if bb_ref is None:
        parts["backbone"] = nnx.state(backbone)
    if tt_ref is None:
        parts["text"] = nnx.state(text)
    host = _to_host(parts)  # every process takes part in the gathers
    if not is_main:
        return
    if "backbone" in host:
        nnx.update(backbone, host["backbone"])
    if "text" in host:
        nnx.update(text, host["text"])
    model = ad.ADDinoV3(backbone, text, head_cfg, rngs=nnx.Rngs(0))
    ad.set_trainable_params(model, host["adapters"])
    model_dir.save(model, directory, backbone=bb_ref, text_tower=tt_ref,
            text_activation=text.config.activation)


def summary_line(summary: dict[str, Any], workdir) -> str:
    if summary.get("finished"):
        return f"nothing to do: {workdir} already holds the finished run"
    if summary["steps"] < summary.get("total_steps", summary["steps"]):
        return f"stopped after step {summary['steps']}; checkpoint in {workdir}/checkpoints"
    if summary["steps"] == summary.get("resumed_from") or "loss" not in summary.get("final", {}):
        return (f"no step left to train (resumed at step {summary['steps']}, the last); model "
                f"written to {workdir}/model")
    return (f"trained {summary['steps']} steps (resumed from {summary['resumed_from']}); final loss "
            f"{summary['final'].get('loss', float('nan')):.4f}; model written to {workdir}/model")


def main_entry(config, workdir) -> int:
    """`addinov3 train`: prints one line on Ctrl-C instead of a traceback."""
    try:
        summary = train(config, workdir)
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    print(summary_line(summary, workdir))
    return 0
