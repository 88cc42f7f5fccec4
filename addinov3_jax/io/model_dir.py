"""Model directories: the one writer (`write_dir`, used by `save` and `convert model`) and
`load`, which reads a directory (or three converted parts) into an `ADDinoV3`, sharded when a
mesh is given.

A model directory holds `model.json` (part locations, head config, the text activation the
adapters were trained with), `adapters/` and, unless referenced by path, `backbone/` and
`text_tower/` as converted directories.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from addinov3_jax.io import checkpoint_io, towers
from addinov3_jax.models import clip_text, dinov3, tokenizer
from addinov3_jax.models.model import Adapters, ADDinoV3, HeadConfig
from weight_conversion import adapters as adapter_conv

MODEL_FILE = "model.json"

def save(model: ADDinoV3, directory: str | os.PathLike, *, backbone: str | None = None,
         text_tower: str | None = None, text_activation: str | None = None) -> Path:
    """Writes a model directory: `adapters/`, `model.json` and, unless paths to existing converted
    directories are given (then referenced by absolute path), `backbone/` and `text_tower/` (so
    the directory is self-contained). An existing model directory is replaced as a whole."""
    for name, ref, module in (("backbone", backbone, model.backbone),
                              ("text_tower", text_tower, model.text_tower)):
        if ref is None and module is None:
            raise ValueError(f"the model has no {name} and no path to one was given")
    return write_dir(directory, model.config,
                     adapters=(checkpoint_io.flat_params(model.adapters), {"source_format": "addinov3-jax"}),
                     backbone=backbone or model.backbone, text_tower=text_tower or model.text_tower,
                     link=True, overwrite=True, text_activation=text_activation or (
                         model.text_tower.config.activation if model.text_tower is not None else None))


def _tower_part(module) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, bytes]]:
    """(params, metadata, extra files) of a backbone / text tower module, to write as a converted
    directory."""
    arch, variants = (("dinov3", dinov3.VARIANTS) if isinstance(module, dinov3.DinoV3)
                      else ("clip_text", clip_text.VARIANTS))
    params = checkpoint_io.flat_params(module)
    variant = next((k for k, v in variants.items() if v == module.config), "custom")
    extra = {}
    if arch == "clip_text":
        try:
            extra = {tokenizer.VOCAB_FILE: tokenizer.find_vocab().read_bytes()}
        except tokenizer.TokenizerError:
            extra = {}
    return params, {
        "architecture": arch, "variant": variant, "config": module.config.to_dict(),
        "source_format": "addinov3-jax", "param_count": int(sum(
            v.size for k, v in params.items() if k != "rope_periods")),
    }, extra


def write_dir(directory: str | os.PathLike, head: HeadConfig | dict, *, adapters, backbone,
              text_tower, link: bool = True, overwrite: bool = False,
              text_activation: str | None = None) -> Path:
    """The one model-directory writer (`save` and `addinov3 convert model`), atomic.

    Writes `model.json` (part locations + head config) and the parts. Each part is one of:
    an NNX module (backbone / text tower, written as a converted directory), a tuple
    `(params, metadata[, extra files])` (written as a converted directory; for `adapters`,
    `(params, extra metadata)`), or the path of a converted directory: referenced by absolute path
    with `link=True`, copied in otherwise. `text_activation` (the text tower's MLP activation the
    adapters were trained with) is recorded and used by `load`, whatever the tower's metadata says.
    """
    head = head if isinstance(head, HeadConfig) else HeadConfig(**head)
    with checkpoint_io.atomic_directory(directory, overwrite=overwrite) as tmp:
        spec = {}
        for name, part in (("backbone", backbone), ("text_tower", text_tower), ("adapters", adapters)):
            if isinstance(part, (str, os.PathLike)):
                if link:
                    spec[name] = str(Path(part).absolute())
                    continue
                if not checkpoint_io.is_converted(part):
                    raise checkpoint_io.CheckpointError(f"{part}: not a converted directory "
                                                        f"({checkpoint_io.METADATA_FILE} missing)")
                shutil.copytree(part, tmp / name)
            elif name == "adapters":
                params, extra = part
                adapter_conv.write(tmp / name, params, head, source_format=extra.get(
                    "source_format", "addinov3-jax"), extra={k: v for k, v in extra.items()
                                                             if k != "source_format"})
            else:
                params, meta, files = _tower_part(part) if isinstance(part, nnx.Module) else (
                    (*part, {}) if len(part) == 2 else part)
                checkpoint_io.write(tmp / name, params, meta, extra_files=files)
            spec[name] = name
        spec["head"] = head.to_dict()
        if text_activation:
            spec["text_activation"] = text_activation
        (tmp / MODEL_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return Path(directory)


def load(path: str | os.PathLike | None = None, *, backbone=None, text_tower=None, adapters=None,
         config: HeadConfig | None = None, mesh=None, rules=None, tower_options: dict | None = None,
         text_activation: str | None = None, **overrides) -> ADDinoV3:
    """Loads a model directory (`model.json`) or a set of three converted directories.

    `overrides` replace head-config fields (e.g. `text_layout="interleave"`); with `mesh` and
    `rules` every variable is placed sharded (towers read shard by shard). `tower_options` go to
    both towers' `load` (compute_dtype, param_dtype, attention_impl, scan_layers); the text
    tower runs with `text_activation`, else the one `model.json` recorded at training, else its
    own metadata's.
    """
    tower_options = tower_options or {}
    if path is not None:
        path = Path(path)
        spec = json.loads((path / MODEL_FILE).read_text())
        text_activation = text_activation or spec.get("text_activation")
        resolve = lambda p: str(p if Path(p).is_absolute() else path / p)  # noqa: E731
        backbone = backbone or resolve(spec["backbone"])
        text_tower = text_tower or resolve(spec["text_tower"])
        adapters = adapters or resolve(spec["adapters"])
    if backbone is None or text_tower is None or adapters is None:
        raise ValueError("give a model directory or all of backbone, text_tower and adapters")
    params, meta = adapter_conv.read(adapters)
    head_cfg = config or HeadConfig(**{**meta.get("head", {}), **overrides})
    bb = backbone if isinstance(backbone, dinov3.DinoV3) else towers.load_dinov3(
        backbone, mesh=mesh, rules=rules, **tower_options)
    tt = text_tower if isinstance(text_tower, clip_text.TextTower) else towers.load_clip_text(
        text_tower, text_activation, mesh=mesh, rules=rules, **tower_options)
    shape = nnx.eval_shape(lambda: Adapters(bb.config.embed_dim, tt.config.embed_dim,
                                            len(head_cfg.feature_layers), rngs=nnx.Rngs(0)))
    trained = checkpoint_io.materialize(shape, checkpoint_io.Tensors(params), mesh=mesh, rules=rules,
                                       source=str(adapters))
    model = ADDinoV3(bb, tt, head_cfg, adapters=trained)
    return model


def resolve(checkpoint: str | os.PathLike) -> Path:
    """The model directory (`model.json`) of a model dir or of a training workdir (`model/`)."""
    path = Path(checkpoint)
    for candidate in (path, path / "model"):
        if (candidate / MODEL_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: neither a model directory ({MODEL_FILE}) nor a training "
                            "workdir with model/ inside")


def identity(directory: str | os.PathLike) -> dict[str, Any]:
    """What makes a model directory's scores what they are, without reading a parameter: the file
    checksums of its three parts (from their `addinov3.json`), the head config and the text
    activation. Two directories with equal identities compute the same maps."""
    directory = resolve(directory)
    spec = json.loads((directory / MODEL_FILE).read_text())
    out: dict[str, Any] = {}
    for part in ("backbone", "text_tower", "adapters"):
        where = Path(spec[part]) if Path(spec[part]).is_absolute() else directory / spec[part]
        try:
            meta = json.loads((where / checkpoint_io.METADATA_FILE).read_text())
        except (OSError, ValueError) as e:
            raise checkpoint_io.CheckpointError(f"{where}: unreadable metadata ({e})") from e
        out[part] = dict(sorted(meta.get("files", {}).items()))
    out["head"] = spec.get("head", {})
    out["text_activation"] = spec.get("text_activation")
    return out


def text_cache_dir(checkpoint: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Where the text prototypes are cached: `<model dir>/text_cache` when writable, else
    `<output>/text_cache`."""
    candidate = resolve(checkpoint) / "text_cache"
    try:
        candidate.mkdir(exist_ok=True)
        if os.access(candidate, os.W_OK):
            return candidate
    except OSError:
        pass
    return Path(output) / "text_cache"
