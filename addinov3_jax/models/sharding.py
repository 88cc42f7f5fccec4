"""Logical-axis sharding: a rules table (config data) maps logical axis names to mesh axes.

Layers name the axes of their parameters (`embed`, `mlp`, `heads`, `vocab`, `layers`, ...) and of
their activations (`act_batch`, `act_tokens`, `act_embed`, `act_heads`, `act_mlp`) and never
mention a mesh. The config's `mesh.rules` (a tuple of `(logical, mesh axes)` pairs, MaxText style)
turns those names into `PartitionSpec`s for a mesh with axes `data`, `fsdp` and `tensor`:
parameter shardings come from `nnx.logical_axis_rules` + `nnx.get_named_sharding`, activations are
constrained with `constrain` while a `use(mesh, rules)` context is active (a no-op otherwise).

The default rules map onto every mesh axis, so `mesh.fsdp` / `mesh.tensor` alone choose the
layout (an axis of size 1 is a no-op): weights split their model dimension over `fsdp` and their
hidden / head dimension over `tensor`; batches split over `data` x `fsdp`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

MESH_AXES = ("data", "fsdp", "tensor")

# Logical activation axes of the towers (batch, tokens, then embed / heads / hidden).
ACT_TOKENS = ("act_batch", "act_tokens", "act_embed")
ACT_HEADS = ("act_batch", "act_tokens", "act_heads", None)
ACT_HIDDEN = ("act_batch", "act_tokens", "act_heads")
ACT_MLP = ("act_batch", "act_tokens", "act_mlp")

# Every combination of logical axes the package resolves (parameter and activation shapes): the
# rules must not map two axes of one array onto the same mesh axis.
USED_AXES = (
    ("layers", "embed", "qkv", "heads"), ("layers", "qkv", "heads"), ("layers", "heads", "embed"),
    ("layers", "embed", "mlp"), ("layers", "mlp", "embed"), ("layers", "mlp"), ("layers", "embed"),
    ("layers", "embed", "adapter"), ("layers", "adapter_in", "adapter"), ("vocab", "embed"),
    (None, "embed"), ("embed", None), ("embed",), ACT_TOKENS, ACT_HEADS, ACT_HIDDEN, ACT_MLP,
    (None, "act_batch", "act_tokens", "act_embed"), ("batch",), (None, "batch"),
)

# Every logical name used in the package appears here: an unknown name is an error, not a
# silently replicated axis. Order does not matter (one entry per name).
DEFAULT_RULES: Rules = (
    # inputs and activations
    ("batch", ("data", "fsdp")),
    ("act_batch", ("data", "fsdp")),
    ("act_tokens", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    # parameters
    ("layers", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("qkv", None),
    ("vocab", "tensor"),
    ("adapter", "tensor"),
    ("adapter_in", "fsdp"),
)
# Every parameter replicated (pure data parallelism), batches still split over data x fsdp.
REPLICATED_RULES: Rules = tuple((k, v if k in ("batch", "act_batch") else None)
                                for k, v in DEFAULT_RULES)
PRESETS = {"default": DEFAULT_RULES, "replicated": REPLICATED_RULES}


def rules_preset(name: str) -> Rules:
    """A named rules table (a config helper: the config stores the table itself)."""
    if name not in PRESETS:
        raise ValueError(f"unknown sharding rules preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def validate_rules(rules) -> Rules:
    """The rules as a tuple of pairs, checked: known mesh axes, every needed name present."""
    try:
        pairs = tuple((str(k), _as_axes(v)) for k, v in rules)
    except (TypeError, ValueError) as e:
        raise ValueError(f"mesh.rules must be a sequence of (logical name, mesh axis or axes or "
                         f"None) pairs, got {rules!r}") from e
    names = [k for k, _ in pairs]
    dup = sorted({k for k in names if names.count(k) > 1})
    if dup:
        raise ValueError(f"mesh.rules: logical names listed twice: {dup}")
    for k, v in pairs:
        bad = [a for a in (v if isinstance(v, tuple) else (v,)) if a is not None and a not in MESH_AXES]
        if bad:
            raise ValueError(f"mesh.rules: {k!r} maps to unknown mesh axes {bad}; "
                             f"allowed: {', '.join(MESH_AXES)} or None")
    missing = [k for k, _ in DEFAULT_RULES if k not in names]
    if missing:
        raise ValueError(f"mesh.rules: no entry for the logical names {missing} "
                         "(map them to None to replicate)")
    for axes in USED_AXES:
        used = [a for entry in logical_spec(axes, pairs) if entry is not None
                for a in ((entry,) if isinstance(entry, str) else entry)]
        twice = sorted({a for a in used if used.count(a) > 1})
        if twice:
            raise ValueError(f"mesh.rules: an array with logical axes {axes} would use the mesh "
                             f"axes {twice} twice; map one of those names elsewhere")
    return pairs


def _as_axes(v):
    if v is None or isinstance(v, str):
        return v
    v = tuple(v)
    if not all(isinstance(a, str) for a in v):
        raise ValueError(v)
    return v if len(v) != 1 else v[0]


def logical_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec of logical `axes` under `rules` (flax's resolution)."""
    return PartitionSpec(*core_spmd.from_sharding_rules(tuple(axes), rules))


def state_shardings(tree, mesh: Mesh, rules: Rules):
    """`NamedSharding`s for an `nnx.State` (or module) from each variable's logical axes."""
    with nnx.logical_axis_rules(rules):
        return nnx.get_named_sharding(tree, mesh)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int, axis: int = 0) -> NamedSharding:
    """Sharding of an input array whose `axis` is the batch."""
    axes = [None] * ndim
    axes[axis] = "batch"
    return NamedSharding(mesh, logical_spec(axes, rules))


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch is split (the product of the mesh axes of `batch`)."""
    spec = logical_spec(("batch",), rules)[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return int(np.prod([mesh.shape[a] for a in names]))


def shard_bytes(shape: Sequence[int], dtype, sharding: NamedSharding) -> int:
    """Bytes of the largest shard of an array with this shape and sharding on one device."""
    shard = sharding.shard_shape(tuple(shape))
    return int(np.prod(shard, dtype=np.int64)) * np.dtype(dtype).itemsize


@contextlib.contextmanager
def use(mesh: Mesh, rules: Rules):
    """Activates `mesh` and `rules` for tracing: activation constraints apply under it."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside `use(mesh, rules)`."""
    rules = core_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, rules))
