"""Run a StableHLO detector written by `addinov3 export --format stablehlo`, with jax, numpy and
safetensors only (no flax, no model code: this module imports nothing else from the package).

    from addinov3_jax import serving
    detect = serving.load("detector_dir")        # checks files, platform, shapes
    out = detect(images_u8)                      # (B, S, S, 3) uint8, already resized to S x S
    out["map"], out["score"], out.get("verdict")

`load` refuses, with one line (`ArtifactError`), a directory whose files are missing, corrupt
(checksums in `detector.json`) or unreadable, an artifact without this machine's platform, and
weights that do not fit the module; the returned callable refuses images of another size or
dtype. The weights are read once and placed on the default device; the module is compiled once
per batch size.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np

MANIFEST = "detector.json"


class ArtifactError(ValueError):
    """An exported detector that cannot be run as it is; the message says why."""


def backend_platform() -> str:
    """This process's JAX platform in `jax.export`'s words: cpu, cuda, rocm or tpu."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = getattr(jax.devices()[0].client, "platform_version", "").lower()
        return "rocm" if "rocm" in version else "cuda"
    return backend


class Detector:
    """A loaded StableHLO detector: `detector(images_u8)` -> {"map", "score"[, "verdict"]} (numpy)."""

    def __init__(self, directory: Path, manifest: dict, exported, weights: dict):
        self.directory, self.manifest = directory, manifest
        self.image_size = int(manifest["image_size"])
        self.class_name = manifest.get("class_name")
        self.output_names = tuple(o["name"] for o in manifest["outputs"])
        self._weights = jax.device_put(weights)
        self._call = jax.jit(exported.call)

    def __call__(self, images) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3) or images.dtype != np.uint8:
            raise ArtifactError(f"{self.directory}: expects uint8 images (B, {s}, {s}, 3) (resize to "
                                f"{s}x{s} first), got {images.dtype} {images.shape}")
        outputs = self._call(self._weights, images)
        return {n: np.asarray(o) for n, o in zip(self.output_names, outputs, strict=True)}


def load(directory: str | os.PathLike, *, verify: bool = True) -> Detector:
    """The detector in `directory` (`detector.json`, `detector.stablehlo`, `weights.safetensors`);
    `verify` checks the files' SHA-256 against `detector.json` first."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    manifest = _manifest(directory)
    files = manifest.get("files", {})
    for name in (manifest.get("artifact", "detector.stablehlo"), manifest["weights"]):
        if not (directory / name).is_file():
            raise ArtifactError(f"{directory / name}: missing; re-run addinov3 export")
        if verify and name in files and _sha256(directory / name) != files[name]:
            raise ArtifactError(f"{directory / name}: checksum mismatch (corrupt or modified); "
                                "re-run addinov3 export")
    artifact = directory / manifest.get("artifact", "detector.stablehlo")
    try:
        exported = jax.export.deserialize(bytearray(artifact.read_bytes()))
    except Exception as e:  # flatbuffer / MLIR errors of several types
        raise ArtifactError(f"{artifact}: not a readable jax.export artifact ({type(e).__name__}); "
                            "re-run addinov3 export") from e
    here = backend_platform()
    if here not in exported.platforms:
        raise ArtifactError(f"{artifact}: exported for {', '.join(exported.platforms)}, not for this "
                            f"{here} machine; re-export with --platforms including {here}")
    s = int(manifest["image_size"])
    *weight_avals, image_aval = exported.in_avals
    if len(image_aval.shape) != 4 or tuple(image_aval.shape[1:]) != (s, s, 3) or image_aval.dtype != np.uint8:
        raise ArtifactError(f"{artifact}: takes {image_aval.dtype} images {image_aval.shape}, but "
                            f"{MANIFEST} says uint8 (B, {s}, {s}, 3); the files do not belong together")
    try:
        weights = load_file(str(directory / manifest["weights"]))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{directory / manifest['weights']}: unreadable ({e})") from e
    names = sorted(weights)  # a dict argument is flattened in key order
    got = [(tuple(weights[n].shape), str(weights[n].dtype)) for n in names]
    want = [(tuple(a.shape), str(a.dtype)) for a in weight_avals]
    if got != want:
        pairs = zip(names, got, want, strict=False)
        first = next((f"{n}: {g} vs {w}" for n, g, w in pairs if g != w), "a different count")
        raise ArtifactError(f"{directory / manifest['weights']}: {len(got)} arrays that do not fit the "
                            f"module's {len(want)} weight arguments (first: {first}); the files do not "
                            "belong together")
    return Detector(directory, manifest, exported, weights)


def _manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable ({type(e).__name__}: {e}); is {directory} an "
                            "addinov3 export?") from e
    if manifest.get("format") != "stablehlo":
        raise ArtifactError(f"{directory}: a {manifest.get('format')!r} export, not stablehlo "
                            "(ONNX exports run in onnxruntime)")
    for key in ("image_size", "outputs", "weights"):
        if key not in manifest:
            raise ArtifactError(f"{path}: no {key!r} entry; re-run addinov3 export")
    return manifest


def _sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
