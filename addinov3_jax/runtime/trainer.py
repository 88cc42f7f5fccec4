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

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from addinov3_jax.data import pipeline, readers
from addinov3_jax.io import model_dir, text_cache
from addinov3_jax.io import workdir as workdir_lib
from addinov3_jax.models import model as ad
from addinov3_jax.models import sharding
from addinov3_jax.runtime import checkpointing, distributed, feature_cache, setup, steps, test_hooks
from addinov3_jax.runtime.feature_cache import FeatureCache

RESUME_HINT = "rerun the same command to resume from the last checkpoint"


class TrainingInterrupted(RuntimeError):
    """Ctrl-C during training; the message says where and how to resume."""





# ---------------------------------------------------------------------------------------------
# Data


def training_source(cfg: ml_collections.ConfigDict, backbone_cfg):
    """(source, object words, preprocess, report) of the auxiliary training data."""
    d = cfg.data
    if d.name == "synthetic":
        setup.check_synthetic_root(d.root)
    spec = readers.spec_for(d.name)
    word_source, fixed_word = cfg.model.class_name_source, cfg.model.class_name
    if d.source == "tfds":
        from addinov3_jax.data import tfds_builders

        source, report = tfds_builders.data_source(d.name, d.tfds_data_dir, d.split), None
    else:
        records, report = readers.read(d.name, d.root, split=d.split,
                                       classes=tuple(d.classes) or None,
                                       on_bad_sample=d.on_bad_sample)
        source = pipeline.RecordSource(records)
    words = pipeline.class_words(source, word_source, fixed_word)
    pre = pipeline.Preprocess.for_backbone(backbone_cfg, d.image_size, words,
                                           class_name_source=word_source, fixed_word=fixed_word,
                                           mask_threshold=spec.mask_threshold if spec else 0.5)
    return source, words, pre, report


# ---------------------------------------------------------------------------------------------
# Work directory: writable, locked, never recomputed when finished


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
        path = workdir / "metrics.jsonl"
        if path.is_file():
            keep = [line for line in path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))
        self.jsonl = open(path, "a")  # noqa: SIM115
        self.tb = _summary_writer()(str(workdir / "tensorboard"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(workdir_lib.strict_json(row) + "\n")
        self.jsonl.flush()
        for k, v in row.items():
            if k != "step" and math.isfinite(v):
                self.tb.add_scalar(f"train/{k}", v, row["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _summary_writer():
    """tensorboardX's `SummaryWriter`, imported without PyTorch: tensorboardX imports torch when
    it is installed (only to accept torch tensors, which we never pass), and the package never
    imports torch at run time (an environment with the parity extras has it)."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX's fallback
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter


def log_row(terms: dict, steps: int, since: float, batch_size: int) -> dict[str, float]:
    """The loss terms as floats and the speed since `since` (a `time.perf_counter()` reading)
    over the last `steps` steps. The floats are read first: they wait for the step to finish,
    so the clock measures the computation, not its asynchronous dispatch."""
    row = {k: float(v) for k, v in terms.items()}
    rate = steps / max(time.perf_counter() - since, 1e-9)
    return {**row, "steps_per_s": rate, "images_per_s": rate * batch_size}


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl row; None for a blank or torn line (a kill mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None



def _build_cache(cfg, source, preprocess, backbone_state, features, mesh, rules, grid, dim,
                 rows, workdir, is_main) -> FeatureCache | None:
    """The feature cache of every training example (None when off), computed in global batches
    of `train.batch_size` of which this process decodes `rows`; identical on every process."""
    t = cfg.train
    if t.feature_cache == "off":
        return None
    n_layers, tokens = len(cfg.model.feature_layers), grid[0] * grid[1]
    mode = t.feature_cache
    if mode == "auto":
        size = feature_cache.nbytes(len(source), n_layers, tokens, dim, t.feature_cache_dtype)
        mode = "device" if size <= t.feature_cache_max_gb * 2**30 else "disk"
    batches = pipeline.ordered_batches(source, preprocess, batch_size=t.batch_size, rows=rows,
                                       worker_count=cfg.data.worker_count)
    bar = _progress(is_main, total=-(-len(source) // t.batch_size), desc=f"feature cache ({mode})")
    cache = feature_cache.build(
        mode, batches, features, backbone_state, mesh, rules, num_examples=len(source),
        batch_size=t.batch_size, n_layers=n_layers, tokens=tokens, dim=dim,
        size=cfg.data.image_size, dtype=t.feature_cache_dtype,
        directory=workdir / "feature_cache", progress=bar)
    bar.close()
    return cache


def train(config: ml_collections.ConfigDict | setup.Runtime,
          workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains (or resumes, or reports finished) in `workdir`; returns a summary. `config`: a
    config, or the `Runtime` of one (`setup.setup(config)`, when the caller set it up already)."""
    rt = config if isinstance(config, setup.Runtime) else setup.setup(config)
    workdir = Path(workdir)
    workdir_lib.ensure_writable(workdir)
    with workdir_lib.WorkdirLock(workdir, enabled=rt.is_main):
        return _run(rt, workdir)


def _run(rt: setup.Runtime, workdir: Path) -> dict[str, Any]:
    cfg, mesh, rules, bb_cfg, is_main = rt.config, rt.mesh, rt.rules, rt.backbone_config, rt.is_main
    source, words, preprocess, _ = training_source(cfg, bb_cfg)
    n_proc, t = jax.process_count(), cfg.train
    rt.check_batch(t.batch_size, "train.batch_size")
    steps_per_epoch = pipeline.steps_per_epoch(len(source), t.batch_size)
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
    tx, schedule = steps.make_optimizer(cfg, total)
    grid, head_cfg = rt.grid, rt.head_config

    # Frozen towers (sharded by the rules) and the text prototypes, computed once per class.
    backbone, text = rt.towers()
    with sharding.use(mesh, rules):
        table = text_cache.text_features(text, list(words), cache_dir=workdir / "text_cache")
    frozen = {"text": jax.device_put(jnp.asarray(table), NamedSharding(mesh, PartitionSpec()))}
    graphdef, backbone_state = nnx.split(backbone)

    state, state_shardings = steps.init_train_state(rt.adapters_fn(text.config.embed_dim), tx,
                                                    mesh, rules)
    features = rt.feature_step(graphdef)
    step_fn = rt.train_step(tx, state_shardings)

    # One global order of examples; this process reads the rows of each global batch that its
    # devices hold (the cache, when on, is keyed by example index and holds the rest).
    rows = distributed.process_rows(mesh, rules, t.batch_size)
    cache = _build_cache(cfg, source, preprocess, backbone_state, features, mesh, rules, grid,
                         bb_cfg.embed_dim, rows, workdir, is_main)
    it = iter(pipeline.train_dataset(
        range(len(source)) if cache else source, None if cache else preprocess,
        batch_size=t.batch_size, seed=cfg.seed, num_epochs=t.epochs, rows=rows,
        worker_count=0 if cache else cfg.data.worker_count))
    start, restored, data_state = checkpointing.restore_latest(mngr, checkpointing.abstract(state))
    if restored is not None:
        state = restored
        it.set_state(data_state)
        if is_main:
            print(f"resuming from step {start} of {total}")
    meta = {"total_steps": total, "classes": list(words), "config": json.loads(cfg.to_json_best_effort())}
    writer = _Writers(workdir, is_main, start)
    after_step = test_hooks.after_step()

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
            batch = feature_cache.train_batch(next(it), cache, features, backbone_state, mesh,
                                              rules)
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
                with workdir_lib.write_guard(mngr.directory, RESUME_HINT):
                    checkpointing.save(mngr, done, state, it.get_state(), {"step": done, **meta})
            bar.update(1)
            after_step(done, mngr)
            if distributed.any_process(ctrl_c["raised"]):
                break
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    bar.close()
    with workdir_lib.write_guard(mngr.directory, RESUME_HINT):
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
    with workdir_lib.write_guard(workdir / "model", RESUME_HINT):
        save_model(cfg, workdir / "model", backbone, text, state.params, head_cfg, is_main)
    return summary


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
    host = jax.tree.map(distributed.gather, parts)  # every process takes part in the gathers
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
