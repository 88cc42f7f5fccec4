"""`addinov3 convert model`: a model directory from a backbone, a text tower and adapters.

Each part may be a converted directory (copied in), an original file or Hugging Face folder, or
`hf://ORG/REPO` (converted on the fly). The parts are checked against each other (adapter
widths vs the towers' widths, feature layers vs the backbone depth) before anything is written.
The result has the layout `model.save` writes (`model.json`, `backbone/`, `text_tower/`,
`adapters/`), is self-contained, is written atomically by the same writer (`model.write_dir`)
and is what `predict` and `eval` load.
"""

from __future__ import annotations

import os
from typing import Any

from addinov3_jax.io import checkpoint_io, model_dir
from addinov3_jax.io.checkpoint_io import CheckpointError
from weight_conversion import adapters as adapter_conv
from weight_conversion import clip_text as clip_conv
from weight_conversion import dinov3 as dinov3_conv


def _dinov3_part(source):
    if checkpoint_io.is_converted(source):
        return os.fspath(source), checkpoint_io.read_metadata(source, dinov3_conv.ARCHITECTURE, verify=False)
    converted = dinov3_conv.convert_source(source)
    return (converted.params, converted.metadata), converted.metadata


def _clip_part(source, activation):
    if checkpoint_io.is_converted(source):
        return os.fspath(source), checkpoint_io.read_metadata(source, clip_conv.ARCHITECTURE, verify=False)
    _, params, meta, files = clip_conv.convert_with_tokenizer(source, activation=activation)
    return (params, meta, files), meta


def _adapters_part(source):
    if checkpoint_io.is_converted(source):
        meta = checkpoint_io.read_metadata(source, adapter_conv.ARCHITECTURE, verify=False)
        return os.fspath(source), meta, (meta["visual_dim"], meta["text_dim"])
    params, meta = adapter_conv.read(source)
    extra = {"source_format": meta.get("source_format", "official"), "source_path": os.fspath(source)}
    if extra["source_format"] == "official":
        extra["class_name_source"] = "path"
    return (params, extra), meta, tuple(params["patch"].shape[1:])


def convert_model(dinov3, clip_text, adapters, output, *, activation: str | None = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """Assembles `output`; returns `model.json`'s content plus each tower's variant."""
    from addinov3_jax.models import model as ad

    checkpoint_io.check_output(output, overwrite=overwrite)
    backbone, bb_meta = _dinov3_part(dinov3)
    text, tt_meta = _clip_part(clip_text, activation)
    adapter_part, ad_meta, (visual, text_dim) = _adapters_part(adapters)
    head = ad.HeadConfig(**ad_meta.get("head", {}))
    depth, width = bb_meta["config"]["depth"], bb_meta["config"]["embed_dim"]
    problems = []
    if visual != width:
        problems.append(f"the adapters take {visual}-d visual tokens but the backbone is {width}-d")
    if text_dim != tt_meta["config"]["embed_dim"]:
        problems.append(f"the adapters produce {text_dim}-d features but the text tower embeds "
                        f"{tt_meta['config']['embed_dim']}-d")
    if max(head.feature_layers) >= depth:
        problems.append(f"the adapters' feature layers {tuple(head.feature_layers)} do not exist in "
                        f"a {depth}-block backbone (convert them with --feature-layers)")
    if problems:
        raise CheckpointError(f"{adapters}: does not fit the towers: " + "; ".join(problems))
    model_dir.write_dir(output, head, adapters=adapter_part, backbone=backbone, text_tower=text,
                 link=False, overwrite=overwrite)
    return {"backbone_variant": bb_meta["variant"], "text_tower_variant": tt_meta["variant"],
            "head": head.to_dict()}
