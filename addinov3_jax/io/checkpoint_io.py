"""Converted checkpoint directories: `params.safetensors` + a self-describing `addinov3.json`.

Directories are written atomically (`atomic_directory`: a temporary directory beside the target,
renamed into place once complete), and an existing non-empty directory is replaced only when
asked to (`overwrite=True`), never mixed with new files.

A converted directory holds the flat parameters of one model (keys are the NNX attribute paths,
e.g. `blocks.attn.qkv.kernel`) and JSON metadata: architecture, variant, full config, source
format, source SHA-256, parameter count and file checksums. It loads with `load(path)` alone and
needs neither torch nor the original file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

METADATA_FILE = "addinov3.json"
PARAMS_FILE = "params.safetensors"
# 2: fused qkv kernels stored (L, D, 3, D) with biases (L, 3, D); 1 stored (L, D, 3D), (L, 3D).
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as is; the message says why and what to do."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """All variables of `model` (params and buffers) as `{dotted.path: array}`."""
    return {
        ".".join(map(str, path)): np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(nnx.state(model))
    }


def describe_mismatch(
    expected: dict[str, tuple[int, ...]], actual: dict[str, tuple[int, ...]], limit: int = 5
) -> str:
    """Human-readable list of missing, unexpected and mis-shaped keys ('' when they agree)."""
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    misshaped = [
        f"{k}: expected {expected[k]}, got {actual[k]}"
        for k in expected
        if k in actual and tuple(expected[k]) != tuple(actual[k])
    ]
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = "; ".join(items[:limit])
            more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {name} key(s): {shown}{more}")
    return "\n  ".join(parts)


def upgrade_fused_qkv(params: dict[str, np.ndarray], prefix: str, depth: int,
                      dim: int) -> dict[str, np.ndarray]:
    """Format-1 fused projections `(L, D, 3D)` / `(L, 3D)` reshaped to `(L, D, 3, D)` / `(L, 3, D)`."""
    out = dict(params)
    for key, old_ndim, shape in ((f"{prefix}.kernel", 3, (depth, dim, 3, dim)),
                                 (f"{prefix}.bias", 2, (depth, 3, dim))):
        if key in out and np.ndim(out[key]) == old_ndim:
            out[key] = np.reshape(out[key], shape)
    return out


class Tensors:
    """Named tensors read on demand, a slice at a time: the one way weights reach devices.

    Backed by an in-memory dict (a conversion's output) and/or a `.safetensors` file, whose
    tensors are read per requested slice (`safe_open(...).get_slice`), so a process only ever
    holds its own shards plus one tensor in flight. Tensors stored in an older layout of the same
    size (format-1 fused qkv) are read whole and reshaped.
    """

    def __init__(self, arrays: dict[str, np.ndarray] | None = None,
                 file: str | os.PathLike | None = None):
        self.arrays = dict(arrays or {})
        self.file = None
        if file is not None:
            from safetensors import safe_open

            try:
                self.file = safe_open(str(file), framework="numpy")
            except Exception as e:  # safetensors raises several types for truncated files
                raise CheckpointError(f"{file}: unreadable ({e})") from e
            self.path = str(file)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        if self.file is not None:
            out = {k: tuple(self.file.get_slice(k).get_shape()) for k in self.file.keys()}  # noqa: SIM118
        out.update({k: tuple(np.shape(v)) for k, v in self.arrays.items()})
        return out

    def read(self, key: str, index: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
        """`tensor[index]`, the tensor viewed with the model's `shape`."""
        if key in self.arrays:
            return np.asarray(self.arrays[key]).reshape(shape)[index]
        sl = self.file.get_slice(key)
        if tuple(sl.get_shape()) != tuple(shape):  # an older layout: whole tensor, reshaped
            return np.asarray(self.file.get_tensor(key)).reshape(shape)[index]
        return np.asarray(sl[index])


def _legacy_equal(key: str, expected: tuple[int, ...], actual: tuple[int, ...]) -> bool:
    fused = key.endswith((".qkv.kernel", ".qkv.bias", ".in_proj.kernel", ".in_proj.bias"))
    return fused and int(np.prod(expected)) == int(np.prod(actual))


def place(abstract_state: nnx.State, tensors: Tensors, shardings, *, source: str) -> nnx.State:
    """Materializes `abstract_state` (shapes only) from `checkpoint_io`, each array directly in its
    target sharding (`jax.make_array_from_callback`: every device reads just its slice); no
    unsharded device copy ever exists. Key or shape mismatches are refused with a list."""
    flat = nnx.to_flat_state(abstract_state)
    expected = {".".join(map(str, p)): tuple(v.get_value().shape) for p, v in flat}
    actual = tensors.shapes()
    actual = {k: (expected[k] if k in expected and _legacy_equal(k, expected[k], s) else s)
              for k, s in actual.items()}
    problem = describe_mismatch(expected, actual)
    if problem:
        raise CheckpointError(f"{source}: parameters do not fit the model:\n  {problem}")
    flat_shardings = dict(nnx.to_flat_state(shardings))
    placed = []
    for path, var in flat:
        key, value = ".".join(map(str, path)), var.get_value()
        target = flat_shardings[path]
        target = target.get_value() if isinstance(target, nnx.Variable) else target

        def cb(index, key=key, value=value):
            return tensors.read(key, index, tuple(value.shape)).astype(value.dtype)

        placed.append((path, var.replace(jax.make_array_from_callback(value.shape, target, cb))))
    return nnx.from_flat_state(placed)


def assign(model: nnx.Module, params: dict[str, np.ndarray], *, source: str) -> None:
    """Writes `params` into `model` in place, refusing any key or shape mismatch."""
    flat = nnx.to_flat_state(nnx.state(model))
    expected = {".".join(map(str, p)): tuple(v.get_value().shape) for p, v in flat}
    actual = {k: tuple(np.shape(v)) for k, v in params.items()}
    problem = describe_mismatch(expected, actual)
    if problem:
        raise CheckpointError(f"{source}: parameters do not fit the model:\n  {problem}")
    for path, var in flat:
        value = params[".".join(map(str, path))]
        var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))


def check_output(directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuses an output path that is an existing file, or a non-empty directory unless
    `overwrite`. Returns it as a Path."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is a file; give a directory to write")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise CheckpointError(f"{directory}: exists and is not empty; choose another output or "
                              "pass --overwrite (overwrite=True) to replace it")
    return directory


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `directory`; when the block completes it takes
    the place of `directory` (the old one, if any and `overwrite`, is removed); when it fails it is
    deleted and `directory` is left untouched."""
    directory = check_output(directory, overwrite=overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        yield tmp
        if directory.is_dir():
            check_output(directory, overwrite=overwrite)  # still allowed (a concurrent writer?)
            old = directory.with_name(f"{tmp.name}.old")
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write(
    directory: str | os.PathLike,
    params: dict[str, np.ndarray],
    metadata: dict[str, Any],
    extra_files: dict[str, bytes] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Writes a converted directory atomically; `metadata` gets the format version and checksums
    added. An existing non-empty `directory` is replaced only with `overwrite`."""
    from safetensors.numpy import save_file

    with atomic_directory(directory, overwrite=overwrite) as tmp:
        arrays = {k: np.ascontiguousarray(v) for k, v in params.items()}
        save_file(arrays, str(tmp / PARAMS_FILE))
        files = {PARAMS_FILE: sha256_file(tmp / PARAMS_FILE)}
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
            files[name] = hashlib.sha256(data).hexdigest()
        meta = {"format_version": FORMAT_VERSION, **metadata, "files": files}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(directory)


def is_converted(path: str | os.PathLike) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def read_metadata(directory: str | os.PathLike, architecture: str, *,
                  verify: bool = True) -> dict[str, Any]:
    """The metadata of a converted directory, checking architecture, version and (with
    `verify`) the checksums of its files; reads no parameters into memory."""
    directory = Path(directory)
    meta_path = directory / METADATA_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable metadata ({e}); re-run `addinov3 convert`") from e
    if meta.get("architecture") != architecture:
        raise CheckpointError(
            f"{directory}: holds a {meta.get('architecture')!r} checkpoint, expected {architecture!r}"
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{directory}: written by a newer addinov3-jax; upgrade the package")
    if verify:
        for name, digest in meta.get("files", {}).items():
            if not (directory / name).is_file():
                raise CheckpointError(f"{directory / name}: missing; re-run `addinov3 convert`")
            if sha256_file(directory / name) != digest:
                raise CheckpointError(
                    f"{directory / name}: checksum mismatch (corrupt or modified); "
                    "re-run `addinov3 convert`"
                )
    return meta


def read(
    directory: str | os.PathLike, architecture: str, *, verify: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads a converted directory written by `write` whole (params in host memory)."""
    from safetensors.numpy import load_file

    meta = read_metadata(directory, architecture, verify=verify)
    path = Path(directory) / PARAMS_FILE
    try:
        params = load_file(str(path))
    except Exception as e:  # safetensors raises several types for truncated files
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    return params, meta


def open_tensors(directory: str | os.PathLike, architecture: str, *,
                 verify: bool = True) -> tuple[Tensors, dict[str, Any]]:
    """A converted directory's tensors, read lazily a slice at a time, and its metadata."""
    meta = read_metadata(directory, architecture, verify=verify)
    return Tensors(file=Path(directory) / PARAMS_FILE), meta


def materialize(abstract: nnx.Module, tensors: Tensors, *, mesh=None, rules=None,
                source: str) -> nnx.Module:
    """`abstract` (from `nnx.eval_shape`) with its variables read from `checkpoint_io`, placed by the
    logical-axis `rules` on `mesh` (or on the default device when no mesh is given)."""
    from addinov3_jax.models import sharding

    graphdef, state = nnx.split(abstract)
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda v: v.replace(dev), state,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
    else:
        shardings = sharding.state_shardings(state, mesh, rules)
    return nnx.merge(graphdef, place(state, tensors, shardings, source=source))
