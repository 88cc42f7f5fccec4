"""The frozen towers from disk: a converted directory, an official `.pth`, a Hugging Face
directory or `.safetensors` (any source `weight_conversion` reads), materialized straight into
their shardings when a mesh is given (a converted directory is read shard by shard).

`dinov3_config` / `clip_text_config` describe a tower from a variant name or a checkpoint's
metadata alone (no weights read), for abstract shapes and memory plans.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from addinov3_jax.io import checkpoint_io
from addinov3_jax.models import clip_text, dinov3
from weight_conversion import clip_text as clip_conv
from weight_conversion import dinov3 as dinov3_conv


def load_dinov3(
    path: str,
    *,
    rope_periods: str = "checkpoint",
    scan_layers: bool = True,
    compute_dtype: Any = jnp.float32,
    num_heads: int | None = None,
    param_dtype: Any = jnp.float32,
    attention_impl: str | None = None,
    mesh=None,
    rules=None,
) -> dinov3.DinoV3:
    """Loads a converted directory, an official `.pth`, an HF directory or a `.safetensors` file.

    Args:
      rope_periods: "checkpoint" uses the periods stored in the checkpoint (bf16-rounded in the
        official `.pth` files: official parity), "exact" recomputes `100 ** (4k/d)` (HF parity).
      num_heads: only needed for a bare checkpoint whose shapes match no released variant.
      mesh, rules: place every parameter in its sharding; a converted directory is then read
        shard by shard, never whole onto one device. Default: the default device.
    """
    if rope_periods not in ("checkpoint", "exact"):
        raise ValueError(f"rope_periods must be 'checkpoint' or 'exact', got {rope_periods!r}")
    cfg, tensors, _ = dinov3_conv.open_any(path, num_heads=num_heads)
    if rope_periods == "exact":
        tensors.arrays["rope_periods"] = dinov3.exact_periods(cfg.head_dim, cfg.rope_base)
    model = nnx.eval_shape(
        lambda: dinov3.DinoV3(cfg, rngs=nnx.Rngs(0), scan_layers=scan_layers,
                              compute_dtype=compute_dtype, param_dtype=param_dtype,
                              attention_impl=attention_impl))
    return checkpoint_io.materialize(model, tensors, mesh=mesh, rules=rules, source=str(path))


def load_clip_text(path, activation: str | None = None, *, scan_layers: bool = True,
                   compute_dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   attention_impl: str | None = None, mesh=None, rules=None) -> clip_text.TextTower:
    """Loads a converted directory or any supported source (OpenAI / OpenCLIP / HF).

    `activation` overrides the one stored in the checkpoint metadata; `mesh` and `rules` place
    the parameters sharded (read shard by shard from a converted directory).
    """
    cfg, tensors, meta = clip_conv.open_any(path)
    if activation:
        cfg = dataclasses.replace(cfg, activation=activation)
    model = nnx.eval_shape(lambda: clip_text.TextTower(
        cfg, rngs=nnx.Rngs(0), scan_layers=scan_layers, compute_dtype=compute_dtype,
        param_dtype=param_dtype, attention_impl=attention_impl))
    model = checkpoint_io.materialize(model, tensors, mesh=mesh, rules=rules, source=str(path))
    model.checkpoint_id = meta.get("files", {}).get(checkpoint_io.PARAMS_FILE) or meta.get(
        "source_sha256")
    model.tokenizer_dir = str(path) if Path(path).is_dir() else None
    return model


def dinov3_config(source: str) -> dinov3.Config:
    """The backbone architecture of a variant name or a checkpoint (a converted directory's
    metadata only: no weights read, no checksums)."""
    if source in dinov3.VARIANTS:
        return dinov3.get_config(source)
    if checkpoint_io.is_converted(source):
        meta = checkpoint_io.read_metadata(source, dinov3_conv.ARCHITECTURE, verify=False)
        return dinov3.Config.from_dict(meta["config"])
    return dinov3_conv.open_any(source)[0]


def clip_text_config(source: str, activation: str | None = None) -> clip_text.Config:
    """The text tower architecture of a variant name or a checkpoint's metadata."""
    if source in clip_text.VARIANTS:
        return clip_text.get_config(source, activation)
    if checkpoint_io.is_converted(source):
        meta = checkpoint_io.read_metadata(source, clip_conv.ARCHITECTURE, verify=False)
        return clip_text.Config(**meta["config"])
    return clip_conv.open_any(source)[0]
