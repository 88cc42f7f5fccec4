"""Reading source checkpoints into `{key: float32 numpy array}` dicts.

This is the only place that imports torch (lazily, for `.pth` / `.pt` / `.bin` files); safetensors
files and Hugging Face directories are read without it. `hf://ORG/REPO[@REVISION]` sources are
fetched into the Hugging Face cache with `huggingface_hub.snapshot_download` (which honours
`HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN` and `HF_HUB_OFFLINE`) and read from there.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from addinov3_jax.io.checkpoint_io import CheckpointError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _to_numpy(value: Any) -> np.ndarray | None:
    """A tensor-like as a numpy array (floats upcast to float32); None for non-tensors."""
    if hasattr(value, "detach"):  # torch.Tensor
        t = value.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        return t.numpy()
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        arr = np.asarray(value)
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16":
            arr = arr.astype(np.float32)
        return arr
    return None


def _short_reason(e: BaseException) -> str:
    """The informative part of a torch.load error, without its multi-paragraph boilerplate."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n")[0].strip()
        return f"unpickling failed: {detail}" if detail else "unpickling failed"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def torch_load(path: str | os.PathLike) -> Any:
    """`torch.load(weights_only=True)`, falling back to a TorchScript archive (OpenAI CLIP), with
    one-line errors (needs the `convert` extra)."""
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path}: reading PyTorch files needs torch; install it with "
            "`pip install 'addinov3-jax[convert]'` (or convert a .safetensors file instead)"
        ) from e
    path = str(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - maybe a TorchScript archive (OpenAI CLIP)
        try:
            return torch.jit.load(path, map_location="cpu").state_dict()
        except Exception:  # noqa: BLE001
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({_short_reason(first)}); is it "
                "truncated or another kind of file? Compare its size / SHA-256 with the download page."
            ) from None


def load_torch(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch state dict or TorchScript archive as numpy arrays (needs the `convert` extra)."""
    return unwrap(torch_load(path), str(path))


def unwrap(obj: Any, path: str) -> dict[str, np.ndarray]:
    """Strips `{'state_dict': ...}` / `{'model': ...}` wrappers and `module.` prefixes."""
    for key in ("state_dict", "model", "teacher"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        arr = _to_numpy(v)
        if arr is None:
            continue
        if k.startswith("module."):
            k = k[len("module.") :]
        out[k] = arr
    if not out:
        raise CheckpointError(f"{path}: contains no tensors")
    return out


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `.safetensors` file as float32 numpy arrays (bf16 / fp16 upcast), without torch."""
    from safetensors import safe_open

    try:
        out = {}
        with safe_open(str(path), framework="flax") as f:
            for k in f.keys():
                out[k] = _to_numpy(f.get_tensor(k))
        return out
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from e


def load_hf_dir(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Weights and `config.json` of a Hugging Face model directory (single or sharded)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, np.ndarray] = {}
        for shard in shards:
            sd.update(load_safetensors(directory / shard))
        return sd, config
    if (directory / "model.safetensors").is_file():
        return load_safetensors(directory / "model.safetensors"), config
    for name in ("pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if (directory / name).is_file():
            return load_torch(directory / name), config
    if (directory / "open_clip_model.safetensors").is_file():
        return load_safetensors(directory / "open_clip_model.safetensors"), config
    raise CheckpointError(
        f"{directory}: no model.safetensors, sharded index or pytorch_model.bin found"
    )


HF_PREFIX = "hf://"
# What a conversion needs from a hub repository (not the duplicate TF / Flax / ONNX weights).
HF_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.txt.gz")
HF_TORCH_PATTERNS = ("pytorch_model*.bin", "open_clip_pytorch_model.bin")


def resolve_source(source: str | os.PathLike) -> Path:
    """A local path for `source`: `hf://ORG/REPO[@REVISION]` is fetched from the Hugging Face hub
    (or found in its cache; offline with HF_HUB_OFFLINE=1); anything else is returned as a Path."""
    text = os.fspath(source)
    if not text.startswith(HF_PREFIX):
        return Path(text)
    return _fetch(text)


@functools.lru_cache(maxsize=16)  # one fetch per repository and process
def _fetch(text: str) -> Path:
    repo, _, revision = text[len(HF_PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise CheckpointError(f"{text}: expected hf://ORG/REPO[@REVISION]")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(f"{text}: fetching from the hub needs huggingface_hub; install it "
                              "with `pip install 'addinov3-jax[hub]'`, or download the files and "
                              "pass their folder") from e
    try:
        local = Path(snapshot_download(repo, revision=revision or None, allow_patterns=list(HF_PATTERNS)))
        if not any(local.glob("*.safetensors")):  # an older repository with torch weights only
            local = Path(snapshot_download(repo, revision=revision or None,
                                           allow_patterns=[*HF_PATTERNS, *HF_TORCH_PATTERNS]))
    except Exception as e:  # noqa: BLE001 - offline, gated, unknown repo, network...
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = (" (HF_HUB_OFFLINE is set and it is not in the cache "
                f"{os.environ.get('HF_HOME', '~/.cache/huggingface')})" if offline else
                "; for gated repositories (DINOv3) accept the licence on the hub and set HF_TOKEN")
        raise CheckpointError(f"{text}: cannot fetch from the Hugging Face hub "
                              f"({type(e).__name__}: {first}){hint}") from None
    return local


def load_any(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """Reads a file or HF directory. Returns (state dict, HF config or {}, container kind)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        sd, config = load_hf_dir(path)
        return sd, config, "directory"
    if path.suffix == ".safetensors":
        return load_safetensors(path), {}, "safetensors"
    if path.suffix in TORCH_SUFFIXES:
        return load_torch(path), {}, "torch"
    raise CheckpointError(
        f"{path}: unknown checkpoint type; expected a converted directory, a Hugging Face "
        f"directory, a .safetensors file or one of {', '.join(TORCH_SUFFIXES)}"
    )


def source_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of the sorted weight files of a directory."""
    import hashlib

    from addinov3_jax.io.checkpoint_io import sha256_file

    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"):
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()
