"""Logical-axis sharding: a rules table maps the logical names on parameters to mesh axes.

Layers name their parameter axes (`embed`, `mlp`, `qkv`, `heads`, `vocab`, `layers`, ...) and never
mention a mesh. A rules table (from the config) turns those names into `PartitionSpec`s for a mesh
with axes `data`, `fsdp` and `tensor`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

MESH_AXES = ("data", "fsdp", "tensor")

# Replicated parameters, batch split over data and fsdp (the default for the ViT-L backbone).
REPLICATED_RULES: Rules = (("batch", ("data", "fsdp")),)
# FSDP + tensor parallel for large backbones (vit7b16): weights sharded over `fsdp` along the
# model dimension and over `tensor` along the hidden / head dimension.
FSDP_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("qkv_out", "tensor"),
    ("vocab", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 takes the remaining devices. Axes are `AxisType.Auto`."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} does not use the "
                         f"{len(devices)} available devices")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec for logical `axes`; a mesh axis is used at most once per array."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used)
        used.update(names)
        out.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules):
    """A tree of `NamedSharding`s matching `state`, from each variable's logical axes."""

    def one(var):
        axes = var.get_metadata().get("out_sharding") or (None,) * np.ndim(var.get_value())
        return var.replace(NamedSharding(mesh, spec(axes, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, spec(("batch",) + (None,) * (ndim - 1), rules))
