"""The on-disk cache of the text prototypes: one `.npy` per (tower weights, activation, context,
compute dtype, word), written atomically, so a class is encoded by the frozen text tower once per
model, ever (`predict` and `eval` reuse what training computed)."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from addinov3_jax.models import prompts


def cache_key(model_id: str, activation: str, word: str, context: int, dtype: str = "float32") -> str:
    """The cache file name of one word's prototypes: weights, activation, context and the
    tower's compute dtype (bf16 prototypes are not reused by an fp32 run)."""
    suffix = "" if dtype == "float32" else f"|{dtype}"
    return hashlib.sha256(f"{model_id}|{activation}|{context}|{word}{suffix}".encode()).hexdigest()[:32]


def text_features(model, class_names: Sequence[str], *, cache_dir: str | os.PathLike | None = None,
                  full_context: bool = False, **kw) -> np.ndarray:
    """`prompts.text_features` of `class_names`, read from / written to `cache_dir` when given
    (and the tower has a `checkpoint_id`: converted weights; random towers are not cached)."""
    words = list(dict.fromkeys(class_names))
    context = model.config.context_length
    found: dict[str, np.ndarray] = {}
    cache = Path(cache_dir) if cache_dir and model.checkpoint_id else None
    dtype = str(jnp.dtype(getattr(model, "compute_dtype", "float32")))
    keys = {w: cache_key(model.checkpoint_id or "", model.config.activation, w,
                         context if full_context else 0, dtype) for w in words}
    if cache is not None:
        for w in words:
            f = cache / f"{keys[w]}.npy"
            if f.is_file():
                found[w] = np.load(f)
    todo = [w for w in words if w not in found]
    if jax.process_count() > 1:  # the encoding is a collective: every process or none runs it
        from jax.experimental import multihost_utils

        if int(np.max(multihost_utils.process_allgather(np.int32(len(todo))))) > 0:
            todo = words
    if todo:
        feats = prompts.text_features(model, todo, full_context=full_context, **kw)
        for w, f in zip(todo, feats, strict=True):
            found[w] = f
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
                # atomic, and unique per process and host: several may share the folder
                tmp = cache / f".{keys[w]}.{socket.gethostname()}.{os.getpid()}.npy"
                np.save(tmp, f)
                os.replace(tmp, cache / f"{keys[w]}.npy")
    return np.stack([found[w] for w in class_names])
