"""AD-DINOv3 adapter checkpoints: the official training script's `.pth` <-> our `adapters/` dir.

The official file holds three state dicts, `cls_token_adapter`, `patch_token_adapter` (4 adapters
each) and `prompt_adapter` (2), each adapter with `fc1.0.weight` (used) and `fc2.0.weight` (never
used by the forward). Ours keeps only the fc1 kernels, transposed and stacked:
`patch` / `cls` (L, D_visual, E) and `prompt` (2, E, E).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from addinov3_jax.io import checkpoint_io
from addinov3_jax.io.checkpoint_io import CheckpointError

ARCHITECTURE = "adapters"
# (official state dict, our parameter)
GROUPS = (("patch_token_adapter", "patch"), ("cls_token_adapter", "cls"), ("prompt_adapter", "prompt"))


def official_to_params(sd: dict[str, dict[str, np.ndarray]], *, source: str) -> dict[str, np.ndarray]:
    missing = [g for g, _ in GROUPS if g not in sd]
    if missing:
        raise CheckpointError(f"{source}: not an AD-DINOv3 adapter checkpoint; missing "
                              f"{', '.join(missing)} (found {', '.join(map(str, sd))})")
    params = {}
    for group, ours in GROUPS:
        weights = sd[group]
        idx = sorted(int(k.split(".")[0]) for k in weights if k.endswith(".fc1.0.weight"))
        if not idx or idx != list(range(len(idx))):
            raise CheckpointError(f"{source}: {group} has no consecutive `N.fc1.0.weight` keys "
                                  f"(found {', '.join(list(weights)[:6])})")
        kernels = [np.asarray(weights[f"{i}.fc1.0.weight"], np.float32).T for i in idx]
        if len({k.shape for k in kernels}) != 1:
            raise CheckpointError(f"{source}: {group} adapters have different shapes "
                                  f"{[k.shape for k in kernels]}")
        params[ours] = np.stack(kernels)
    if params["prompt"].shape[0] != 2:
        raise CheckpointError(f"{source}: expected 2 prompt adapters, found {params['prompt'].shape[0]}")
    if params["patch"].shape != params["cls"].shape:
        raise CheckpointError(f"{source}: patch {params['patch'].shape} and cls {params['cls'].shape} "
                              "adapters differ")
    return params


def params_to_official(params: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Ours -> the official layout; the unused fc2 weights are written as zeros."""
    out = {}
    for group, ours in GROUPS:
        out[group] = {}
        for i, kernel in enumerate(params[ours]):
            out[group][f"{i}.fc1.0.weight"] = np.ascontiguousarray(kernel.T)
            out[group][f"{i}.fc2.0.weight"] = np.zeros_like(kernel)
    return out


def load_official(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    from weight_conversion import common

    obj = common.torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of three state dicts")
    return {k: common.unwrap(v, f"{path}:{k}") for k, v in obj.items() if isinstance(v, dict)}


def write(directory, params: dict[str, np.ndarray], head, *, source_format: str,
          extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    head = head.to_dict() if hasattr(head, "to_dict") else dict(head)
    meta = {"architecture": ARCHITECTURE, "variant": "addinov3",
            "head": head, "source_format": source_format,
            "visual_dim": int(params["patch"].shape[1]), "text_dim": int(params["patch"].shape[2]),
            "param_count": int(sum(v.size for v in params.values())), **(extra or {})}
    return checkpoint_io.write(directory, params, meta, overwrite=overwrite)


def convert(source, output, *, feature_layers=(5, 11, 17, 23), overwrite: bool = False) -> dict[str, Any]:
    """`addinov3 convert adapters`: official `.pth` -> adapters directory.

    The head metadata records the official behaviour these weights were trained with:
    `text_layout="interleave"`; their object words came from image paths (`class_name_source`).
    """
    from addinov3_jax.models.model import HeadConfig
    from weight_conversion import common

    checkpoint_io.check_output(output, overwrite=overwrite)
    params = official_to_params(load_official(source), source=str(source))
    if len(feature_layers) != params["patch"].shape[0]:
        raise CheckpointError(f"{source}: {params['patch'].shape[0]} patch adapters but "
                              f"{len(feature_layers)} feature layers {tuple(feature_layers)}")
    head = HeadConfig(feature_layers=tuple(feature_layers), text_layout="interleave")
    write(output, params, head, source_format="official", extra={
        "source_path": str(source), "source_sha256": common.source_digest(source),
        "class_name_source": "path"}, overwrite=overwrite)
    return checkpoint_io.read(output, ARCHITECTURE)[1]


def read(path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """An adapters directory, or an official `.pth` read on the fly (interleave layout)."""
    if checkpoint_io.is_converted(path):
        return checkpoint_io.read(path, ARCHITECTURE)
    if Path(path).suffix in (".pth", ".pt"):
        params = official_to_params(load_official(path), source=str(path))
        n = params["patch"].shape[0]
        head = {"text_layout": "interleave", **({} if n == 4 else {"feature_layers": list(range(n))})}
        return params, {"head": head, "source_format": "official"}
    raise CheckpointError(f"{path}: neither an adapters directory nor an official .pth")
