"""Processes, devices and meshes: `jax.distributed` set-up, the (data, fsdp, tensor) mesh, and
the host <-> global array helpers every loop uses (process-local rows in, whole arrays out).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from addinov3_jax.models import sharding
from addinov3_jax.models.sharding import MESH_AXES


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


def any_process(flag: bool) -> bool:
    """`flag` on any process (one small collective per call when there are several)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with `AxisType.Auto` axes; `-1` takes the remaining devices.

    With all three sizes given, the first `data * fsdp * tensor` devices are used (e.g. a
    one-device mesh on an eight-device host); on several processes the mesh must use them all.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive (one of them may be -1), got "
                         f"{dict(zip(MESH_AXES, sizes, strict=True))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))}: {len(devices)} "
                             f"devices are not divisible by {known}")
        sizes = [len(devices) // known if s == -1 else s for s in sizes]
    n = int(np.prod(sizes))
    if n > len(devices) or (n < len(devices) and jax.process_count() > 1):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {n} devices; "
                         f"{len(devices)} are available")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices[:n])


def default_mesh(batch_size: int | None = None):
    """A data-parallel mesh: every device, or on one process the most devices that split
    `batch_size` evenly."""
    if batch_size and jax.process_count() == 1:
        return make_mesh(math.gcd(batch_size, jax.device_count()), 1, 1)
    return make_mesh(-1, 1, 1)


def global_batch(local: dict[str, np.ndarray], mesh, rules, axes: dict[str, int]) -> dict[str, jax.Array]:
    """Process-local numpy rows -> global arrays split over the `batch` rule along `axes[key]`."""
    return {k: jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh, rules, np.ndim(local[k]), axis), np.asarray(local[k]))
        for k, axis in axes.items()}


def process_rows(mesh, rules, batch_size: int) -> np.ndarray:
    """The rows of a global batch that this process's devices hold under the `batch` rule, in
    the order `global_batch` expects them (ascending): with process-ordered devices, the block
    `[p * local, (p + 1) * local)`; all rows on one process, or where the batch is replicated."""
    s = sharding.batch_sharding(mesh, rules, 1, 0)
    rows = set()
    for idx in s.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*idx[0].indices(batch_size)))
    return np.array(sorted(rows), np.int64)


def gather(x: jax.Array) -> np.ndarray:
    """The whole global array as host numpy on every process (every process must call it)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
