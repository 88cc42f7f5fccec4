"""DINOv3 weight conversion: official `.pth` and Hugging Face layouts <-> our flat parameters.

Pure, table-driven functions (reference: shared/reference/dinov3.md §4):

* `hf_to_official(sd)`: HF `DINOv3ViTModel` keys -> official keys (split q/k/v fused, zero key bias).
* `official_to_params(sd, cfg)` / `params_to_official(params, cfg)`: official <-> ours. Linear
  weights are transposed, the patch conv goes OIHW -> HWIO, per-block tensors are stacked along a
  leading `layers` axis, and the key third of the qkv bias is zeroed (the official forward masks it).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from addinov3_jax.io import checkpoint_io
from addinov3_jax.io.checkpoint_io import CheckpointError
from addinov3_jax.models.dinov3 import VARIANTS, Config, bf16_periods, exact_periods
from weight_conversion import common

ARCHITECTURE = "dinov3"

Transform = Callable[[np.ndarray], np.ndarray]
_ID: Transform = lambda a: a  # noqa: E731
_T: Transform = lambda a: a.T  # noqa: E731
# Fused qkv: torch (3D, D) rows [q; k; v] <-> our kernel (D, 3, D) and bias (3, D).
_QKV_KERNEL: Transform = lambda a: a.T.reshape(a.shape[1], 3, -1)  # noqa: E731
_QKV_KERNEL_BACK: Transform = lambda a: a.reshape(a.shape[0], -1).T  # noqa: E731
_QKV_BIAS: Transform = lambda a: a.reshape(3, -1)  # noqa: E731
_QKV_BIAS_BACK: Transform = lambda a: a.reshape(-1)  # noqa: E731

# (official key, our key, official -> ours, ours -> official)
GLOBAL_RULES: list[tuple[str, str, Transform, Transform]] = [
    ("cls_token", "cls_token", _ID, _ID),
    ("storage_tokens", "storage_tokens", _ID, _ID),
    ("mask_token", "mask_token", _ID, _ID),
    ("patch_embed.proj.weight", "patch_kernel",
     lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
    ("patch_embed.proj.bias", "patch_bias", _ID, _ID),
    ("rope_embed.periods", "rope_periods", _ID, _ID),
    ("norm.weight", "norm.scale", _ID, _ID),
    ("norm.bias", "norm.bias", _ID, _ID),
]
LOCAL_CLS_NORM_RULES = [
    ("local_cls_norm.weight", "local_cls_norm.scale", _ID, _ID),
    ("local_cls_norm.bias", "local_cls_norm.bias", _ID, _ID),
]
# Per block: official `blocks.{i}.<suffix>` <-> ours `blocks.<key>[i]`.
BLOCK_RULES = [
    ("norm1.weight", "norm1.scale", _ID, _ID),
    ("norm1.bias", "norm1.bias", _ID, _ID),
    ("attn.qkv.weight", "attn.qkv.kernel", _QKV_KERNEL, _QKV_KERNEL_BACK),
    ("attn.proj.weight", "attn.proj.kernel", _T, _T),
    ("attn.proj.bias", "attn.proj.bias", _ID, _ID),
    ("ls1.gamma", "ls1", _ID, _ID),
    ("norm2.weight", "norm2.scale", _ID, _ID),
    ("norm2.bias", "norm2.bias", _ID, _ID),
    ("ls2.gamma", "ls2", _ID, _ID),
]
QKV_BIAS_RULES = [("attn.qkv.bias", "attn.qkv.bias", _QKV_BIAS, _QKV_BIAS_BACK)]
MLP_RULES = [
    ("mlp.fc1.weight", "mlp.fc1.kernel", _T, _T),
    ("mlp.fc1.bias", "mlp.fc1.bias", _ID, _ID),
    ("mlp.fc2.weight", "mlp.fc2.kernel", _T, _T),
    ("mlp.fc2.bias", "mlp.fc2.bias", _ID, _ID),
]
SWIGLU_RULES = [
    (f"mlp.{w}.{kind}", f"mlp.{w}.{'kernel' if kind == 'weight' else 'bias'}",
     _T if kind == "weight" else _ID, _T if kind == "weight" else _ID)
    for w in ("w1", "w2", "w3") for kind in ("weight", "bias")
]


def _rules(cfg: Config):
    glob = GLOBAL_RULES + (LOCAL_CLS_NORM_RULES if cfg.local_cls_norm else [])
    block = (BLOCK_RULES + (QKV_BIAS_RULES if cfg.qkv_bias else [])
             + (MLP_RULES if cfg.ffn == "mlp" else SWIGLU_RULES))
    return glob, block


def official_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every key and shape of an official state dict for `cfg` (buffers included)."""
    d, h, p, r = cfg.embed_dim, cfg.ffn_hidden, cfg.patch_size, cfg.num_registers
    shapes = {
        "cls_token": (1, 1, d), "storage_tokens": (1, r, d), "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,),
        "rope_embed.periods": (cfg.head_dim // 4,), "norm.weight": (d,), "norm.bias": (d,),
    }
    if cfg.local_cls_norm:
        shapes.update({"local_cls_norm.weight": (d,), "local_cls_norm.bias": (d,)})
    block = {
        "norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "ls1.gamma": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,), "ls2.gamma": (d,),
    }
    if cfg.qkv_bias:
        block.update({"attn.qkv.bias": (3 * d,), "attn.qkv.bias_mask": (3 * d,)})
    if cfg.ffn == "mlp":
        block.update({"mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,),
                      "mlp.fc2.weight": (d, h), "mlp.fc2.bias": (d,)})
    else:
        block.update({"mlp.w1.weight": (h, d), "mlp.w1.bias": (h,), "mlp.w2.weight": (h, d),
                      "mlp.w2.bias": (h,), "mlp.w3.weight": (d, h), "mlp.w3.bias": (d,)})
    for i in range(cfg.depth):
        shapes.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    return shapes


def official_to_params(sd: dict[str, np.ndarray], cfg: Config) -> dict[str, np.ndarray]:
    """Official state dict -> our flat parameters (validated against `cfg`)."""
    check_official(sd, cfg, source="state dict")
    glob, block = _rules(cfg)
    params = {ours: np.asarray(fwd(sd[off]), np.float32) for off, ours, fwd, _ in glob}
    for off, ours, fwd, _ in block:
        stacked = [fwd(sd[f"blocks.{i}.{off}"]) for i in range(cfg.depth)]
        params[f"blocks.{ours}"] = np.stack(stacked).astype(np.float32)
    if cfg.qkv_bias:
        masks = np.stack([_QKV_BIAS(sd[f"blocks.{i}.attn.qkv.bias_mask"]) for i in range(cfg.depth)])
        # Whatever the stored mask says, the official forward never applies a key bias (§2.4).
        masks[:, 1] = 0
        params["blocks.attn.qkv.bias"] = params["blocks.attn.qkv.bias"] * masks.astype(np.float32)
    return params


def params_to_official(params: dict[str, np.ndarray], cfg: Config) -> dict[str, np.ndarray]:
    """Our flat parameters -> an official state dict (with `bias_mask` buffers)."""
    glob, block = _rules(cfg)
    sd = {off: np.asarray(bwd(params[ours])) for off, ours, _, bwd in glob}
    for off, ours, _, bwd in block:
        for i in range(cfg.depth):
            sd[f"blocks.{i}.{off}"] = np.asarray(bwd(params[f"blocks.{ours}"][i]))
    if cfg.qkv_bias:
        d = cfg.embed_dim
        mask = np.concatenate([np.ones(d), np.zeros(d), np.ones(d)]).astype(np.float32)
        for i in range(cfg.depth):
            sd[f"blocks.{i}.attn.qkv.bias_mask"] = mask.copy()
    return sd


def check_official(sd: dict[str, np.ndarray], cfg: Config, *, source: str) -> None:
    actual = {k: tuple(v.shape) for k, v in sd.items()}
    problem = checkpoint_io.describe_mismatch(official_shapes(cfg), actual)
    if problem:
        raise CheckpointError(
            f"{source}: does not match a DINOv3 {describe(cfg)}:\n  {problem}\n"
            "Check the variant (omit it to auto-detect) and that the file is a DINOv3 backbone."
        )


def describe(cfg: Config) -> str:
    return (f"ViT (D={cfg.embed_dim}, depth={cfg.depth}, heads={cfg.num_heads}, ffn={cfg.ffn} "
            f"{cfg.ffn_hidden}, qkv_bias={cfg.qkv_bias}, local_cls_norm={cfg.local_cls_norm})")


# ---------------------------------------------------------------------------------------------
# Hugging Face layout

_HF_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "storage_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_HF_BLOCK = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.gate_proj.weight": "mlp.w1.weight", "mlp.gate_proj.bias": "mlp.w1.bias",
    "mlp.down_proj.weight": "mlp.fc2.weight", "mlp.down_proj.bias": "mlp.fc2.bias",
    "mlp.up_proj.weight": "mlp.fc1.weight", "mlp.up_proj.bias": "mlp.fc1.bias",
}
_HF_LAYER = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")


def is_hf(sd: dict[str, np.ndarray]) -> bool:
    return any(k.startswith("embeddings.") for k in sd)


def hf_to_official(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF `DINOv3ViTModel` state dict -> official keys (periods are not stored by HF)."""
    gated = any(".mlp.gate_proj." in k for k in sd)
    out: dict[str, np.ndarray] = {}
    qkv: dict[int, dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in sd.items():
        if key in _HF_GLOBAL:
            out[_HF_GLOBAL[key]] = value
        elif key == "embeddings.mask_token":
            out["mask_token"] = value.reshape(1, -1)
        elif m := _HF_LAYER.match(key):
            i, rest = int(m.group(1)), m.group(2)
            if rest.startswith("attention.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(i, {})[rest[len("attention."):]] = value
            elif rest in _HF_BLOCK:
                name = _HF_BLOCK[rest]
                if gated:  # gate/up/down -> w1/w2/w3
                    name = name.replace("mlp.fc1", "mlp.w2").replace("mlp.fc2", "mlp.w3")
                out[f"blocks.{i}.{name}"] = value
            else:
                unknown.append(key)
        elif "inv_freq" not in key:
            unknown.append(key)
    for i, parts in qkv.items():
        try:
            out[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
                [parts["q_proj.weight"], parts["k_proj.weight"], parts["v_proj.weight"]])
        except KeyError as e:
            raise CheckpointError(f"layer {i}: missing attention weight {e}") from e
        if "q_proj.bias" in parts or "v_proj.bias" in parts:
            d = parts["q_proj.weight"].shape[0]
            zeros = np.zeros(d, np.float32)
            out[f"blocks.{i}.attn.qkv.bias"] = np.concatenate(
                [parts.get("q_proj.bias", zeros), zeros, parts.get("v_proj.bias", zeros)])
            out[f"blocks.{i}.attn.qkv.bias_mask"] = np.concatenate(
                [np.ones(d), zeros, np.ones(d)]).astype(np.float32)
    for key in unknown:  # keep them so validation reports them as unexpected
        out[key] = sd[key]
    return out


# ---------------------------------------------------------------------------------------------
# Detection, conversion and reading


def infer_config(
    sd: dict[str, np.ndarray],
    *,
    num_heads: int | None = None,
    hf_config: dict[str, Any] | None = None,
    hint: str = "",
) -> tuple[str, Config]:
    """(variant name or "custom", Config) from the shapes of an official state dict."""
    try:
        d = sd["cls_token"].shape[-1]
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        swiglu = "blocks.0.mlp.w1.weight" in sd
        hidden = sd["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
        registers = sd["storage_tokens"].shape[1]
        patch = sd["patch_embed.proj.weight"].shape[-1]
    except KeyError as e:
        raise CheckpointError(
            f"not a DINOv3 ViT checkpoint: key {e} not found (found {len(sd)} keys, e.g. "
            f"{', '.join(list(sd)[:5])})"
        ) from e
    arch = dict(
        embed_dim=d, depth=depth, ffn="swiglu" if swiglu else "mlp", ffn_hidden=hidden,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, local_cls_norm="local_cls_norm.weight" in sd,
        num_registers=registers, patch_size=patch,
    )
    candidates = [
        (name, cfg) for name, cfg in VARIANTS.items()
        if all(getattr(cfg, k) == v for k, v in arch.items())
        and (num_heads is None or cfg.num_heads == num_heads)
    ]
    if "rope_embed.periods" in sd:
        head_dim = 4 * sd["rope_embed.periods"].shape[0]
        candidates = [(n, c) for n, c in candidates if c.head_dim == head_dim]
        num_heads = num_heads or d // head_dim
    if hf_config:
        num_heads = num_heads or hf_config.get("num_attention_heads")
        arch["layer_norm_eps"] = hf_config.get("layer_norm_eps", 1e-5)
        arch["rope_base"] = float(hf_config.get("rope_theta", 100.0))
        candidates = [(n, c) for n, c in candidates if c.num_heads == num_heads]
    if len(candidates) > 1:  # LVD vs SAT: same shapes; the official file name says which
        sat = "sat493m" in hint.lower()
        candidates = [(n, c) for n, c in candidates if n.endswith("_sat493m") == sat] or candidates
    if candidates:
        return candidates[0]
    if num_heads is None:
        raise CheckpointError(
            f"shapes {arch} match no released DINOv3 variant and the number of heads cannot be "
            "inferred; pass num_heads (CLI: --num-heads)"
        )
    return "custom", Config(num_heads=num_heads, **arch)


@dataclasses.dataclass
class Converted:
    variant: str
    config: Config
    params: dict[str, np.ndarray]
    metadata: dict[str, Any]


def convert_source(
    path: str | os.PathLike, *, variant: str | None = None, num_heads: int | None = None
) -> Converted:
    """Reads an official `.pth`, an HF directory (or `hf://ORG/REPO`) or a `.safetensors` file
    into our layout."""
    source = os.fspath(path)
    path = common.resolve_source(path)
    sd, hf_config, container = common.load_any(path)
    if is_hf(sd):
        source_format = "huggingface"
        sd = hf_to_official(sd)
    elif "cls_token" in sd:
        source_format = "official"
    else:
        raise CheckpointError(
            f"{path}: neither an official DINOv3 state dict (cls_token, blocks.N...) nor a Hugging "
            f"Face DINOv3ViTModel (embeddings., layer.N...); first keys: {', '.join(list(sd)[:5])}"
        )
    if "rope_embed.periods" in sd:
        periods_source = "checkpoint"
    else:
        periods_source = "exact"
    if variant is not None:
        from addinov3_jax.models.dinov3 import get_config

        name, cfg = variant, get_config(variant)
    else:
        name, cfg = infer_config(sd, num_heads=num_heads, hf_config=hf_config,
                                 hint=Path(source.removeprefix(common.HF_PREFIX)).name)
    if periods_source == "exact":
        sd["rope_embed.periods"] = exact_periods(cfg.head_dim, cfg.rope_base)
    sd = {k: v for k, v in sd.items() if k not in ("local_cls_norm.weight", "local_cls_norm.bias")
          or cfg.local_cls_norm}
    check_official(sd, cfg, source=str(path))
    params = official_to_params(sd, cfg)
    periods = params["rope_periods"]
    if periods_source == "checkpoint":
        if np.array_equal(periods, bf16_periods(cfg.head_dim, cfg.rope_base)):
            periods_source = "checkpoint (bf16-rounded, as released)"
        elif np.allclose(periods, exact_periods(cfg.head_dim, cfg.rope_base), rtol=1e-6):
            periods_source = "checkpoint (exact)"
    metadata = {
        "architecture": ARCHITECTURE,
        "variant": name,
        "config": cfg.to_dict(),
        "source_format": source_format,
        "source_container": container,
        "source_path": source,
        "source_sha256": common.source_digest(path),
        "param_count": int(sum(v.size for k, v in params.items() if k != "rope_periods")),
        "rope_periods_source": periods_source,
    }
    return Converted(name, cfg, params, metadata)


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    variant: str | None = None,
    num_heads: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`addinov3 convert dinov3`: writes a converted directory; returns its metadata."""
    checkpoint_io.check_output(output, overwrite=overwrite)
    conv = convert_source(source, variant=variant, num_heads=num_heads)
    checkpoint_io.write(output, conv.params, conv.metadata, overwrite=overwrite)
    return conv.metadata


def upgrade(params: dict[str, np.ndarray], cfg: Config) -> dict[str, np.ndarray]:
    """Parameters of format-1 directories (qkv kernel (L, D, 3D), bias (L, 3D)) in today's
    layout ((L, D, 3, D), (L, 3, D)); current ones pass through."""
    return checkpoint_io.upgrade_fused_qkv(params, "blocks.attn.qkv", cfg.depth, cfg.embed_dim)


def read_any(
    path: str | os.PathLike, *, num_heads: int | None = None
) -> tuple[Config, dict[str, np.ndarray], dict[str, Any]]:
    """(config, params, metadata) from a converted directory or any supported source."""
    if checkpoint_io.is_converted(path):
        params, meta = checkpoint_io.read(path, ARCHITECTURE)
        cfg = Config.from_dict(meta["config"])
        return cfg, upgrade(params, cfg), meta
    conv = convert_source(path, num_heads=num_heads)
    return conv.config, conv.params, conv.metadata


def open_any(
    path: str | os.PathLike, *, num_heads: int | None = None
) -> tuple[Config, checkpoint_io.Tensors, dict[str, Any]]:
    """Like `read_any`, but a converted directory's tensors stay on disk, read per shard."""
    if checkpoint_io.is_converted(path):
        tensors, meta = checkpoint_io.open_tensors(path, ARCHITECTURE)
        return Config.from_dict(meta["config"]), tensors, meta
    cfg, params, meta = read_any(path, num_heads=num_heads)
    return cfg, checkpoint_io.Tensors(params), meta


def official_to_hf(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official keys -> HF `DINOv3ViTModel` keys (the reverse of `hf_to_official`; drops the
    periods, `bias_mask`, the key bias and `local_cls_norm`, like the HF release converter)."""
    gated = any(".mlp.w1." in k for k in sd)
    glob = {v: k for k, v in _HF_GLOBAL.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    if gated:
        block.update({"mlp.w2.weight": "mlp.up_proj.weight", "mlp.w2.bias": "mlp.up_proj.bias",
                      "mlp.w3.weight": "mlp.down_proj.weight", "mlp.w3.bias": "mlp.down_proj.bias"})
    out = {}
    for key, value in sd.items():
        if key in glob:
            out[glob[key]] = value
        elif key == "mask_token":
            out["embeddings.mask_token"] = value.reshape(1, 1, -1)
        elif key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            if rest == "attn.qkv.weight":
                for name, part in zip("qkv", np.split(value, 3), strict=True):
                    out[f"layer.{i}.attention.{name}_proj.weight"] = part
            elif rest == "attn.qkv.bias":
                q, _, v = np.split(value, 3)
                out[f"layer.{i}.attention.q_proj.bias"] = q
                out[f"layer.{i}.attention.v_proj.bias"] = v
            elif rest in block:
                out[f"layer.{i}.{block[rest]}"] = value
    return out


def hf_config(cfg: Config) -> dict[str, Any]:
    """`DINOv3ViTConfig` keyword arguments for `cfg`."""
    return dict(
        hidden_size=cfg.embed_dim, intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, patch_size=cfg.patch_size,
        num_register_tokens=cfg.num_registers, use_gated_mlp=cfg.ffn == "swiglu",
        hidden_act="silu" if cfg.ffn == "swiglu" else "gelu", query_bias=cfg.qkv_bias,
        value_bias=cfg.qkv_bias, key_bias=False, layer_norm_eps=cfg.layer_norm_eps,
        rope_theta=cfg.rope_base,
    )
