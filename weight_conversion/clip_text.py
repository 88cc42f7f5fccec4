"""CLIP text-tower conversion: OpenAI / OpenCLIP / Hugging Face layouts -> our flat parameters.

Table-driven (reference: shared/reference/clip_text.md §2). The OpenAI layout is the hub: HF keys
are first mapped to it (q/k/v fused into `in_proj`, `text_projection` transposed back), then the
rules below transpose Linear weights into Flax kernels and stack the blocks. Visual-tower keys are
ignored; fp16 tensors are upcast exactly to fp32.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from addinov3_jax.io import checkpoint_io
from addinov3_jax.io.checkpoint_io import CheckpointError
from addinov3_jax.models import tokenizer
from addinov3_jax.models.clip_text import VARIANTS, Config
from weight_conversion import common

ARCHITECTURE = "clip_text"

_ID = lambda a: a  # noqa: E731
_T = lambda a: a.T  # noqa: E731
# Fused in_proj: torch (3W, W) rows [q; k; v] <-> our kernel (W, 3, W) and bias (3, W).
_QKV_KERNEL = lambda a: a.T.reshape(a.shape[1], 3, -1)  # noqa: E731
_QKV_KERNEL_BACK = lambda a: a.reshape(a.shape[0], -1).T  # noqa: E731
_QKV_BIAS = lambda a: a.reshape(3, -1)  # noqa: E731
_QKV_BIAS_BACK = lambda a: a.reshape(-1)  # noqa: E731

# (OpenAI key, our key, OpenAI -> ours, ours -> OpenAI)
GLOBAL_RULES = [
    ("token_embedding.weight", "token_embedding", _ID, _ID),
    ("positional_embedding", "positional_embedding", _ID, _ID),
    ("ln_final.weight", "ln_final.scale", _ID, _ID),
    ("ln_final.bias", "ln_final.bias", _ID, _ID),
    ("text_projection", "text_projection", _ID, _ID),  # used as x @ P: no transpose
]
BLOCK_RULES = [  # OpenAI `transformer.resblocks.{i}.<key>` -> ours `blocks.<key>[i]`
    ("ln_1.weight", "ln_1.scale", _ID, _ID),
    ("ln_1.bias", "ln_1.bias", _ID, _ID),
    ("attn.in_proj_weight", "in_proj.kernel", _QKV_KERNEL, _QKV_KERNEL_BACK),
    ("attn.in_proj_bias", "in_proj.bias", _QKV_BIAS, _QKV_BIAS_BACK),
    ("attn.out_proj.weight", "out_proj.kernel", _T, _T),
    ("attn.out_proj.bias", "out_proj.bias", _ID, _ID),
    ("ln_2.weight", "ln_2.scale", _ID, _ID),
    ("ln_2.bias", "ln_2.bias", _ID, _ID),
    ("mlp.c_fc.weight", "c_fc.kernel", _T, _T),
    ("mlp.c_fc.bias", "c_fc.bias", _ID, _ID),
    ("mlp.c_proj.weight", "c_proj.kernel", _T, _T),
    ("mlp.c_proj.bias", "c_proj.bias", _ID, _ID),
]
_HF_BLOCK = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}
_IGNORED = re.compile(r"^(visual\.|vision_model\.|visual_projection|logit_scale|"
                      r"input_resolution|context_length|vocab_size|attn_mask|.*position_ids$)")


def openai_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    w, f = cfg.width, cfg.mlp_dim
    shapes = {"token_embedding.weight": (cfg.vocab_size, w),
              "positional_embedding": (cfg.context_length, w),
              "ln_final.weight": (w,), "ln_final.bias": (w,), "text_projection": (w, cfg.embed_dim)}
    block = {"ln_1.weight": (w,), "ln_1.bias": (w,), "attn.in_proj_weight": (3 * w, w),
             "attn.in_proj_bias": (3 * w,), "attn.out_proj.weight": (w, w),
             "attn.out_proj.bias": (w,), "ln_2.weight": (w,), "ln_2.bias": (w,),
             "mlp.c_fc.weight": (f, w), "mlp.c_fc.bias": (f,), "mlp.c_proj.weight": (w, f),
             "mlp.c_proj.bias": (w,)}
    for i in range(cfg.depth):
        shapes.update({f"transformer.resblocks.{i}.{k}": s for k, s in block.items()})
    return shapes


def text_keys_openai(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenAI / OpenCLIP (`CLIP` or `CustomTextCLIP` with `text.`) dict -> text keys only."""
    if any(k.startswith("text.") for k in sd):
        sd = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    return {k: v for k, v in sd.items() if not _IGNORED.match(k)}


def hf_to_openai(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF `CLIPModel` / `CLIPTextModelWithProjection` text keys -> OpenAI keys."""
    out: dict[str, np.ndarray] = {}
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if _IGNORED.match(key):
            continue
        k = key.removeprefix("text_model.")
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".")[-1]] = value
        elif k == "text_projection.weight":
            out["text_projection"] = value.T
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k):
            i, mod, kind = m.groups()
            prefix = f"transformer.resblocks.{i}."
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{prefix}attn.in_proj_{kind}", {})[mod[-6]] = value
            elif mod in _HF_BLOCK:
                out[f"{prefix}{_HF_BLOCK[mod]}.{kind}"] = value
            else:
                out[key] = value
        else:
            out[key] = value  # reported as unexpected by validation
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{key}: q/k/v projections incomplete (found {sorted(parts)})")
        out[key] = np.concatenate([parts["q"], parts["k"], parts["v"]])
    return out


def openai_to_params(sd: dict[str, np.ndarray], cfg: Config, *, source: str) -> dict[str, np.ndarray]:
    problem = checkpoint_io.describe_mismatch(openai_shapes(cfg), {k: v.shape for k, v in sd.items()})
    if problem:
        raise CheckpointError(f"{source}: does not match a CLIP text tower {cfg}:\n  {problem}")
    params = {ours: np.asarray(fn(sd[k]), np.float32) for k, ours, fn, _ in GLOBAL_RULES}
    for k, ours, fn, _ in BLOCK_RULES:
        params[f"blocks.{ours}"] = np.stack(
            [fn(sd[f"transformer.resblocks.{i}.{k}"]) for i in range(cfg.depth)]).astype(np.float32)
    return params


def params_to_openai(params: dict[str, np.ndarray], cfg: Config) -> dict[str, np.ndarray]:
    """Ours -> OpenAI layout (the inverse of `openai_to_params`)."""
    sd = {k: np.asarray(fn(params[ours])) for k, ours, _, fn in GLOBAL_RULES}
    for k, ours, _, fn in BLOCK_RULES:
        for i in range(cfg.depth):
            sd[f"transformer.resblocks.{i}.{k}"] = np.asarray(fn(params[f"blocks.{ours}"][i]))
    return sd


def openai_to_hf(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenAI keys -> HF `CLIPTextModelWithProjection` keys (for parity runs)."""
    rev = {v: k for k, v in _HF_BLOCK.items()}
    out = {"text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
           "text_model.final_layer_norm.weight": sd["ln_final.weight"],
           "text_model.final_layer_norm.bias": sd["ln_final.bias"],
           "text_projection.weight": sd["text_projection"].T}
    for key, value in sd.items():
        if m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key):
            i, mod, kind = m.groups()
            prefix = f"text_model.encoder.layers.{i}."
            out[f"{prefix}{rev[mod]}.{kind}"] = value
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
            i, kind = m.groups()
            for name, part in zip("qkv", np.split(value, 3), strict=True):
                out[f"text_model.encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = part
    return out


def hf_config(cfg: Config) -> dict[str, Any]:
    """`CLIPTextConfig` keyword arguments for `cfg`."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                max_position_embeddings=cfg.context_length, projection_dim=cfg.embed_dim,
                hidden_act=cfg.activation, layer_norm_eps=cfg.layer_norm_eps,
                bos_token_id=tokenizer.SOT_ID, eos_token_id=tokenizer.EOT_ID, pad_token_id=1)


def infer_config(sd: dict[str, np.ndarray], *, activation: str, num_heads: int | None = None,
                 hint: str = "") -> tuple[str, Config]:
    try:
        vocab, width = sd["token_embedding.weight"].shape
        arch = dict(
            width=width, vocab_size=vocab, context_length=sd["positional_embedding"].shape[0],
            depth=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
            embed_dim=sd["text_projection"].shape[1],
            mlp_dim=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        )
    except KeyError as e:
        raise CheckpointError(f"not a CLIP text tower: key {e} not found (first keys: "
                              f"{', '.join(list(sd)[:5])})") from e
    cfg = Config(num_heads=num_heads or max(1, width // 64), activation=activation, **arch)
    names = [n for n, c in VARIANTS.items()
             if dataclasses.replace(c, activation=activation) == cfg]
    if "vitl14_336" in names and "336" not in hint:
        names.remove("vitl14_336")
    return (names[0] if names else "custom"), cfg


def _tokenizer_files(path: Path, vocab: str | None) -> dict[str, bytes]:
    if path.is_dir() and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return {n: (path / n).read_bytes() for n in ("vocab.json", "merges.txt")}
    try:
        return {tokenizer.VOCAB_FILE: tokenizer.find_vocab(vocab).read_bytes()}
    except tokenizer.TokenizerError as e:
        print(f"warning: converted directory has no tokenizer files: {e}", file=sys.stderr)
        return {}


def convert_source(path, *, variant: str | None = None, activation: str | None = None,
                   num_heads: int | None = None):
    """Reads an OpenAI / OpenCLIP file, an HF directory (or `hf://ORG/REPO`) or a `.safetensors`
    file: (config, params, metadata)."""
    source = os.fspath(path)
    path = common.resolve_source(path)
    sd, hf_cfg, container = common.load_any(path)
    if any(k.removeprefix("text_model.").startswith("encoder.layers.") for k in sd):
        source_format = "huggingface"
        text_cfg = hf_cfg.get("text_config", hf_cfg)
        default_act = text_cfg.get("hidden_act", "quick_gelu")
        num_heads = num_heads or text_cfg.get("num_attention_heads")
        sd = hf_to_openai(sd)
    else:
        source_format = "openclip-custom" if any(k.startswith("text.") for k in sd) else "openai"
        default_act = "gelu"  # what AD-DINOv3 runs these weights with
        sd = text_keys_openai(sd)
    act = activation or default_act
    name, cfg = infer_config(sd, activation=act, num_heads=num_heads,
                             hint=Path(source.removeprefix(common.HF_PREFIX)).name)
    if variant is not None:
        from addinov3_jax.models.clip_text import get_config

        name, cfg = variant, get_config(variant, act)
    params = openai_to_params(sd, cfg, source=str(path))
    metadata = {
        "architecture": ARCHITECTURE, "variant": name, "config": cfg.to_dict(),
        "source_format": source_format, "source_container": container,
        "source_path": source, "source_sha256": common.source_digest(path),
        "param_count": int(sum(v.size for v in params.values())), "activation": act,
    }
    return cfg, params, metadata


def convert_with_tokenizer(source, *, variant: str | None = None, activation: str | None = None,
                           vocab: str | None = None, num_heads: int | None = None):
    """`convert_source` plus the tokenizer files to store beside the weights:
    (config, params, metadata, {file name: bytes})."""
    cfg, params, meta = convert_source(source, variant=variant, activation=activation,
                                       num_heads=num_heads)
    files = _tokenizer_files(common.resolve_source(source), vocab)  # memoized: no second fetch
    meta["tokenizer_files"] = sorted(files)
    return cfg, params, meta, files


def convert(source, output, *, variant: str | None = None, activation: str | None = None,
            vocab: str | None = None, num_heads: int | None = None,
            overwrite: bool = False) -> dict[str, Any]:
    """`addinov3 convert clip-text`: writes a converted directory (weights + tokenizer files)."""
    checkpoint_io.check_output(output, overwrite=overwrite)
    cfg, params, meta, files = convert_with_tokenizer(source, variant=variant, activation=activation,
                                                      vocab=vocab, num_heads=num_heads)
    checkpoint_io.write(output, params, meta, extra_files=files, overwrite=overwrite)
    return meta


def read_any(path: str | os.PathLike) -> tuple[Config, dict[str, np.ndarray], dict[str, Any]]:
    if checkpoint_io.is_converted(path):
        params, meta = checkpoint_io.read(path, ARCHITECTURE)
        cfg = Config(**meta["config"])
        return cfg, checkpoint_io.upgrade_fused_qkv(params, "blocks.in_proj", cfg.depth, cfg.width), meta
    return convert_source(path)


def open_any(path: str | os.PathLike) -> tuple[Config, checkpoint_io.Tensors, dict[str, Any]]:
    """Like `read_any`, but a converted directory's tensors stay on disk, read per shard."""
    if checkpoint_io.is_converted(path):
        tensors, meta = checkpoint_io.open_tensors(path, ARCHITECTURE)
        return Config(**meta["config"]), tensors, meta
    cfg, params, meta = convert_source(path)
    return cfg, checkpoint_io.Tensors(params), meta
