"""DINOv3 Vision Transformers (Meta, 2025) in Flax NNX.

Numerics follow the official `facebookresearch/dinov3` forward (see shared/reference/dinov3.md):
16x16 patch embedding without position embedding, tokens `[CLS, 4 registers, patches]`, axial
rotate-half RoPE on patch tokens only, fused qkv with the key bias masked out, LayerScale, exact-GELU
MLP or SwiGLU, LayerNorm eps 1e-5 with two-pass variance, and a final norm.

The transformer blocks are stored stacked (a leading `layers` axis on every block parameter), so
`scan_layers` only changes how the forward runs: `jax.lax.scan` over layer slices (fast compiles)
or an unrolled Python loop.

Typical use::

    model = dinov3.load("converted/dinov3_vitl16")          # or a .pth / HF dir / .safetensors
    out = model(images_bhwc)                                # dict with the official names
    layers = model.get_intermediate_layers(images_bhwc, n=(5, 11, 17, 23), return_class_token=True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from addinov3_jax.models import layers, sharding
from addinov3_jax.models.sharding import ACT_HEADS, ACT_HIDDEN, ACT_MLP, ACT_TOKENS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAT_MEAN = (0.430, 0.411, 0.296)
SAT_STD = (0.213, 0.156, 0.143)


@dataclasses.dataclass(frozen=True)
class Config:
    """Architecture of one DINOv3 ViT. `ffn_hidden` is the resolved hidden width."""

    embed_dim: int
    depth: int
    num_heads: int
    ffn_hidden: int
    ffn: str = "mlp"  # "mlp" (exact GELU) or "swiglu"
    qkv_bias: bool = True
    local_cls_norm: bool = False  # present in some checkpoints, unused at inference
    patch_size: int = 16
    num_registers: int = 4
    rope_base: float = 100.0
    layer_norm_eps: float = 1e-5
    # Training-mode RoPE coordinate augmentation (only used when a `rope_rng` is passed).
    rope_shift: float | None = None
    rope_jitter: float | None = None
    rope_rescale: float | None = 2.0
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")
        if self.embed_dim % (4 * self.num_heads):
            raise ValueError(
                f"embed_dim {self.embed_dim} must be divisible by 4 * num_heads ({self.num_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        d = dict(d)
        for key in ("pixel_mean", "pixel_std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def swiglu_hidden(embed_dim: int, ffn_ratio: float, align: int) -> int:
    """SwiGLU hidden width: `int(D * ratio)`, times 2/3, rounded up to a multiple of `align`."""
    d0 = int(int(embed_dim * ffn_ratio) * 2 / 3)
    return align * math.ceil(d0 / align)


def _sat(cfg: Config) -> Config:
    return dataclasses.replace(cfg, local_cls_norm=True, pixel_mean=SAT_MEAN, pixel_std=SAT_STD)


_L = Config(embed_dim=1024, depth=24, num_heads=16, ffn_hidden=4096)
_7B = Config(
    embed_dim=4096, depth=40, num_heads=32, ffn="swiglu", qkv_bias=False, local_cls_norm=True,
    ffn_hidden=swiglu_hidden(4096, 3, 64),
)

VARIANTS: dict[str, Config] = {
    "vits16": Config(embed_dim=384, depth=12, num_heads=6, ffn_hidden=1536),
    "vits16plus": Config(
        embed_dim=384, depth=12, num_heads=6, ffn="swiglu", ffn_hidden=swiglu_hidden(384, 6, 8)
    ),
    "vitb16": Config(embed_dim=768, depth=12, num_heads=12, ffn_hidden=3072),
    "vitl16": _L,
    "vitl16_sat493m": _sat(_L),
    "vitl16plus": Config(
        embed_dim=1024, depth=24, num_heads=16, ffn="swiglu", ffn_hidden=swiglu_hidden(1024, 6, 8)
    ),
    "vith16plus": Config(
        embed_dim=1280, depth=32, num_heads=20, ffn="swiglu", ffn_hidden=swiglu_hidden(1280, 6, 8)
    ),
    "vit7b16": _7B,
    "vit7b16_sat493m": dataclasses.replace(_7B, pixel_mean=SAT_MEAN, pixel_std=SAT_STD),
    # Tests and the demo: 4 blocks so that the AD-DINOv3 taps fit as (0, 1, 2, 3).
    "tiny": Config(embed_dim=64, depth=4, num_heads=4, ffn_hidden=128),
}

# Official checkpoint file names (keep them: the hash selects SAT behaviour in the official hub).
CHECKPOINT_FILES = {
    "vits16": "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
    "vits16plus": "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
    "vitb16": "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
    "vitl16": "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
    "vitl16_sat493m": "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth",
    "vitl16plus": "dinov3_vitl16plus_pretrain_lvd1689m-46503df0.pth",
    "vith16plus": "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth",
    "vit7b16": "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth",
    "vit7b16_sat493m": "dinov3_vit7b16_pretrain_sat493m-a6675841.pth",
}


def get_config(variant: str) -> Config:
    if variant not in VARIANTS:
        raise ValueError(f"unknown DINOv3 variant {variant!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def exact_periods(head_dim: int, base: float = 100.0) -> np.ndarray:
    """RoPE periods `base ** (4k / d)`, k = 0 .. d/4 - 1, in float32 (HF / timm values)."""
    k = np.arange(head_dim // 4, dtype=np.float32)
    return (np.float32(base) ** (4.0 * k / np.float32(head_dim))).astype(np.float32)


def bf16_periods(head_dim: int, base: float = 100.0) -> np.ndarray:
    """The bf16-rounded periods stored in the released `.pth` files, as float32."""
    return np.asarray(jnp.asarray(exact_periods(head_dim, base)).astype(jnp.bfloat16), np.float32)


class RopePeriods(nnx.Variable):
    """Non-trainable RoPE periods (kept from the checkpoint for official parity)."""


# ---------------------------------------------------------------------------------------------
# RoPE


def rope_coords(h: int, w: int) -> jax.Array:
    """Patch-centre coordinates in [-1, 1] with per-axis ("separate") normalisation, (h*w, 2)."""
    cy = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    cx = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    yy, xx = jnp.meshgrid(cy, cx, indexing="ij")
    return 2.0 * jnp.stack([yy.reshape(-1), xx.reshape(-1)], axis=-1) - 1.0


def augment_coords(coords: jax.Array, cfg: Config, rng: jax.Array) -> jax.Array:
    """Training-mode shift / jitter / rescale of RoPE coordinates, in the official order."""
    k_shift, k_jitter, k_rescale = jax.random.split(rng, 3)
    if cfg.rope_shift is not None:
        s = cfg.rope_shift
        coords = coords + jax.random.uniform(k_shift, (2,), minval=-s, maxval=s)
    if cfg.rope_jitter is not None:
        lj = math.log(cfg.rope_jitter)
        coords = coords * jnp.exp(jax.random.uniform(k_jitter, (2,), minval=-lj, maxval=lj))
    if cfg.rope_rescale is not None:
        lr = math.log(cfg.rope_rescale)
        coords = coords * jnp.exp(jax.random.uniform(k_rescale, (1,), minval=-lr, maxval=lr))
    return coords


def rope_tables(coords_n2: jax.Array, periods: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sin and cos tables (N_p, head_dim) with the `[y, x, y, x]` angle layout, in float32."""
    angles = 2.0 * jnp.pi * coords_n2[:, :, None] / periods.astype(jnp.float32)[None, None, :]
    angles = angles.reshape(coords_n2.shape[0], -1)  # [theta_y..., theta_x...]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x_bnhd: jax.Array, sin_nd: jax.Array, cos_nd: jax.Array) -> jax.Array:
    """Rotate-half RoPE on the last `N_p` tokens (prefix tokens pass through), in float32."""
    n_prefix = x_bnhd.shape[1] - sin_nd.shape[0]
    prefix, patches = x_bnhd[:, :n_prefix], x_bnhd[:, n_prefix:]
    p = patches.astype(jnp.float32)
    half = p.shape[-1] // 2
    rotated = jnp.concatenate([-p[..., half:], p[..., :half]], axis=-1)
    p = p * cos_nd[None, :, None, :] + rotated * sin_nd[None, :, None, :]
    return jnp.concatenate([prefix, p.astype(x_bnhd.dtype)], axis=1)


# ---------------------------------------------------------------------------------------------
# Modules. Block parameters carry a leading `layers` axis of size `num_layers`.


class Attention(nnx.Module):
    def __init__(self, cfg: Config, lead: tuple[int, ...], *, rngs: nnx.Rngs,
                 attention_impl: str | None = None):
        d = cfg.embed_dim
        # Fused qkv, kernel (D, 3, D): the key third of the bias is never applied (masked).
        self.qkv = layers.FusedQKV(d, d, lead, bias=cfg.qkv_bias, rngs=rngs)
        self.proj = layers.Linear(d, d, ("heads", "embed"), lead, rngs=rngs)
        self.num_heads = cfg.num_heads
        self.attention_impl = layers.check_attention_impl(attention_impl)

    def __call__(self, x_bnd: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        b, n, d = x_bnd.shape
        qkv = jnp.einsum("bni,ito->bnto", x_bnd, self.qkv.kernel[...].astype(x_bnd.dtype))
        if self.qkv.bias is not None:
            key_mask = jnp.asarray([1.0, 0.0, 1.0])[:, None]
            qkv = qkv + (self.qkv.bias[...] * key_mask.astype(self.qkv.bias.dtype)).astype(qkv.dtype)
        qkv = qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = (sharding.constrain(qkv[:, :, i], ACT_HEADS) for i in range(3))
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        o = layers.attention(q, k, v, implementation=self.attention_impl).reshape(b, n, d)
        return self.proj(sharding.constrain(o, ACT_HIDDEN))


class Mlp(nnx.Module):
    def __init__(self, cfg: Config, lead: tuple[int, ...], *, rngs: nnx.Rngs):
        d, h = cfg.embed_dim, cfg.ffn_hidden
        self.fc1 = layers.Linear(d, h, ("embed", "mlp"), lead, rngs=rngs)
        self.fc2 = layers.Linear(h, d, ("mlp", "embed"), lead, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(sharding.constrain(layers.gelu_exact(self.fc1(x)), ACT_MLP))


class SwiGLU(nnx.Module):
    def __init__(self, cfg: Config, lead: tuple[int, ...], *, rngs: nnx.Rngs):
        d, h = cfg.embed_dim, cfg.ffn_hidden
        self.w1 = layers.Linear(d, h, ("embed", "mlp"), lead, rngs=rngs)
        self.w2 = layers.Linear(d, h, ("embed", "mlp"), lead, rngs=rngs)
        self.w3 = layers.Linear(h, d, ("mlp", "embed"), lead, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w3(sharding.constrain(jax.nn.silu(self.w1(x)) * self.w2(x), ACT_MLP))


class Block(nnx.Module):
    """Pre-norm block: `x + ls1 * attn(norm1 x)`, then `x + ls2 * ffn(norm2 x)`.

    Constructed with `lead=(depth,)` it holds all blocks stacked; call it on one layer's slice.
    """

    def __init__(self, cfg: Config, lead: tuple[int, ...] = (), *, rngs: nnx.Rngs,
                 attention_impl: str | None = None):
        d = cfg.embed_dim
        lead_axes = ("layers",) * len(lead)
        self.norm1 = layers.LayerNorm(d, lead, eps=cfg.layer_norm_eps, rngs=rngs)
        self.attn = Attention(cfg, lead, rngs=rngs, attention_impl=attention_impl)
        self.ls1 = layers.param(rngs, nnx.initializers.constant(1e-5), (*lead, d),
                                (*lead_axes, "embed"))
        self.norm2 = layers.LayerNorm(d, lead, eps=cfg.layer_norm_eps, rngs=rngs)
        self.mlp = Mlp(cfg, lead, rngs=rngs) if cfg.ffn == "mlp" else SwiGLU(cfg, lead, rngs=rngs)
        self.ls2 = layers.param(rngs, nnx.initializers.constant(1e-5), (*lead, d),
                                (*lead_axes, "embed"))

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        x = sharding.constrain(x + self.ls1[...].astype(x.dtype) * self.attn(self.norm1(x), sin, cos),
                               ACT_TOKENS)
        return sharding.constrain(x + self.ls2[...].astype(x.dtype) * self.mlp(self.norm2(x)),
                                  ACT_TOKENS)


class DinoV3(nnx.Module):
    """A DINOv3 ViT. Call it on NHWC float images (already normalised)."""

    def __init__(
        self,
        config: Config,
        *,
        rngs: nnx.Rngs,
        scan_layers: bool = True,
        compute_dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        attention_impl: str | None = None,
    ):
        """`compute_dtype` runs the matmuls (bf16: LayerNorm statistics, softmax and RoPE stay
        fp32); `param_dtype` stores the parameters; `attention_impl` is passed to
        `layers.attention` (one of `layers.ATTENTION_IMPLEMENTATIONS`; "auto" picks by platform)."""
        cfg = config
        d, p = cfg.embed_dim, cfg.patch_size
        self.config = cfg
        self.scan_layers = scan_layers
        self.compute_dtype = jnp.dtype(compute_dtype)
        # Patch embedding: HWIO conv kernel, applied as a matmul on flattened (ky, kx, c) patches.
        self.patch_kernel = layers.param(
            rngs, layers.trunc_normal(0.02), (p, p, 3, d), (None, None, None, "embed")
        )
        self.patch_bias = layers.param(rngs, layers.zeros, (d,), ("embed",))
        self.cls_token = layers.param(rngs, layers.trunc_normal(0.02), (1, 1, d),
                                      (None, None, "embed"))
        self.storage_tokens = layers.param(
            rngs, layers.trunc_normal(0.02), (1, cfg.num_registers, d), (None, None, "embed")
        )
        self.mask_token = layers.param(rngs, layers.zeros, (1, d), (None, "embed"))
        self.blocks = Block(cfg, (cfg.depth,), rngs=rngs, attention_impl=attention_impl)
        self.norm = layers.LayerNorm(d, (), eps=cfg.layer_norm_eps, rngs=rngs)
        if cfg.local_cls_norm:
            self.local_cls_norm = layers.LayerNorm(d, (), eps=cfg.layer_norm_eps, rngs=rngs)
        self.rope_periods = RopePeriods(jnp.asarray(exact_periods(cfg.head_dim, cfg.rope_base)))
        layers.cast_params(self, param_dtype)

    # -- internals -------------------------------------------------------------------------

    def _embed(self, images_bhwc: jax.Array, masks_bn: jax.Array | None) -> jax.Array:
        p, d = self.config.patch_size, self.config.embed_dim
        b, hi, wi, c = images_bhwc.shape
        if c != 3:
            raise ValueError(f"DINOv3 expects NHWC images with 3 channels, got shape {images_bhwc.shape}")
        h, w = hi // p, wi // p
        if h == 0 or w == 0:
            raise ValueError(f"image {hi}x{wi} is smaller than one {p}x{p} patch")
        x = images_bhwc[:, : h * p, : w * p].astype(self.compute_dtype)  # floor like the conv
        x = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * c)
        x = layers.dense(x, self.patch_kernel[...].reshape(p * p * c, d), self.patch_bias[...])
        if masks_bn is not None:
            x = jnp.where(masks_bn[..., None], self.mask_token[...].astype(x.dtype)[None], x)
        prefix = jnp.concatenate([self.cls_token[...], self.storage_tokens[...]], axis=1)
        prefix = jnp.broadcast_to(prefix.astype(x.dtype), (b, *prefix.shape[1:]))
        return sharding.constrain(jnp.concatenate([prefix, x], axis=1), ACT_TOKENS)

    def _features(self, images, taps, masks=None, rope_rng=None):
        cfg = self.config
        h, w = images.shape[1] // cfg.patch_size, images.shape[2] // cfg.patch_size
        coords = rope_coords(h, w)
        if rope_rng is not None:
            coords = augment_coords(coords, cfg, rope_rng)
        sin, cos = rope_tables(coords, self.rope_periods[...])
        x = self._embed(images, masks)
        return layers.run_stacked(self.blocks, x, cfg.depth, taps, self.scan_layers, sin, cos)

    # -- public API ------------------------------------------------------------------------

    def __call__(
        self,
        images_bhwc: jax.Array,
        *,
        masks: jax.Array | None = None,
        rope_rng: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """`forward_features`: normalised CLS / registers / patches and the pre-norm tokens.

        Args:
          images_bhwc: (B, H, W, 3) normalised images; trailing pixels beyond a multiple of the
            patch size are dropped.
          masks: optional (B, N_p) bool; masked patches are replaced by the mask token.
          rope_rng: enables the training-mode RoPE coordinate augmentation (off when None).
        """
        x, _ = self._features(images_bhwc, (), masks, rope_rng)
        xn = self.norm(x)
        r = self.config.num_registers
        return {
            "x_norm_clstoken": xn[:, 0],
            "x_storage_tokens": xn[:, 1 : 1 + r],
            "x_norm_patchtokens": xn[:, 1 + r :],
            "x_prenorm": x,
        }

    def get_intermediate_layers(
        self,
        images_bhwc: jax.Array,
        n: int | Sequence[int] = 1,
        *,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of selected blocks, like the official method.

        `n` an int selects the last n blocks, a sequence selects those 0-based block indices;
        outputs come in ascending block order. Each entry is `patches` (B, N_p, D) or, with
        `reshape=True`, (B, H/16, W/16, D) (NHWC, unlike the official NCHW), followed by the class
        token (B, D) and/or the register tokens (B, 4, D) when requested.
        """
        taps = select_blocks(n, self.config.depth)
        _, outs = self._features(images_bhwc, taps)
        r, p = self.config.num_registers, self.config.patch_size
        h, w = images_bhwc.shape[1] // p, images_bhwc.shape[2] // p
        results = []
        for out in outs:
            if norm:
                out = self.norm(out)
            patches = out[:, 1 + r :]
            if reshape:
                patches = patches.reshape(patches.shape[0], h, w, -1)
            item = (patches,)
            if return_class_token:
                item += (out[:, 0],)
            if return_extra_tokens:
                item += (out[:, 1 : 1 + r],)
            results.append(item if len(item) > 1 else patches)
        return tuple(results)


def select_blocks(n: int | Sequence[int], depth: int) -> tuple[int, ...]:
    """Block indices for `get_intermediate_layers(n=...)`, ascending, validated."""
    if isinstance(n, int | np.integer):
        if not 1 <= n <= depth:
            raise ValueError(f"n={n} must be between 1 and the depth {depth}")
        return tuple(range(depth - int(n), depth))
    idx = [int(i) for i in n]
    if not idx:
        raise ValueError("n must select at least one block")
    if len(set(idx)) != len(idx):
        raise ValueError(f"duplicate block indices in n={list(n)}")
    bad = [i for i in idx if not 0 <= i < depth]
    if bad:
        raise ValueError(f"block indices {bad} out of range for a depth-{depth} model (0..{depth - 1})")
    return tuple(sorted(idx))


def create(
    variant: str | Config,
    *,
    rngs: nnx.Rngs,
    scan_layers: bool = True,
    compute_dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_impl: str | None = None,
) -> DinoV3:
    """A randomly initialised model (tests, benchmarks, `--random` parity)."""
    cfg = get_config(variant) if isinstance(variant, str) else variant
    return DinoV3(cfg, rngs=rngs, scan_layers=scan_layers, compute_dtype=compute_dtype,
                  param_dtype=param_dtype, attention_impl=attention_impl)


def count_params(model: nnx.Module) -> int:
    """Number of parameters (trainable `nnx.Param`s, not the RoPE periods)."""
    state = nnx.state(model, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
