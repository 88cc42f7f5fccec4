"""The CLIP text tower (OpenAI / OpenCLIP / Hugging Face) in Flax NNX.

Forward (shared/reference/clip_text.md §1): token + positional embedding (no LayerNorm before the
first block), causal pre-LN residual blocks (fused in-projection q|k|v, MLP with exact GELU or
QuickGELU), `ln_final`, pooling at the first argmax of the ids (the EOT token), text projection,
L2 normalisation (eps 1e-12, as AD-DINOv3's `encode_text`).

AD-DINOv3 runs the OpenAI weights with exact GELU (its model config lacks `quick_gelu`), so that
is the paper configuration; QuickGELU reproduces OpenAI / Hugging Face CLIP.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from addinov3_jax.models import layers, sharding
from addinov3_jax.models.sharding import ACT_HEADS, ACT_HIDDEN, ACT_MLP, ACT_TOKENS
from addinov3_jax.models.tokenizer import tokenize  # noqa: F401 - public surface: clip_text.tokenize

ACTIVATIONS = {"gelu": layers.gelu_exact, "quick_gelu": layers.quick_gelu}


@dataclasses.dataclass(frozen=True)
class Config:
    width: int
    depth: int
    num_heads: int
    embed_dim: int
    mlp_dim: int | None = None  # default 4 * width
    vocab_size: int = 49408
    context_length: int = 77
    activation: str = "gelu"  # "gelu" (exact erf, AD-DINOv3) or "quick_gelu" (OpenAI / HF)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        if self.mlp_dim is None:
            object.__setattr__(self, "mlp_dim", 4 * self.width)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


VARIANTS: dict[str, Config] = {
    # OpenAI ViT-L/14 and ViT-L/14@336px share this text tower (the AD-DINOv3 one).
    "vitl14": Config(width=768, depth=12, num_heads=12, embed_dim=768),
    "vitl14_336": Config(width=768, depth=12, num_heads=12, embed_dim=768),
    # OpenAI ViT-B/16 and ViT-B/32.
    "vitb16": Config(width=512, depth=12, num_heads=8, embed_dim=512),
    # Heads follow the OpenAI rule width // 64, so bare checkpoints need no head count.
    "tiny": Config(width=128, depth=2, num_heads=2, embed_dim=64),
}


def get_config(variant: str, activation: str | None = None) -> Config:
    if variant not in VARIANTS:
        raise ValueError(f"unknown CLIP text variant {variant!r}; known: {', '.join(VARIANTS)}")
    cfg = VARIANTS[variant]
    return dataclasses.replace(cfg, activation=activation) if activation else cfg


class Block(nnx.Module):
    """Pre-LN residual attention block; `lead=(depth,)` stacks all blocks."""

    def __init__(self, cfg: Config, lead: tuple[int, ...] = (), *, rngs: nnx.Rngs,
                 attention_impl: str | None = None):
        w = cfg.width
        self.ln_1 = layers.LayerNorm(w, lead, eps=cfg.layer_norm_eps, rngs=rngs)
        self.in_proj = layers.FusedQKV(w, w, lead, rngs=rngs)
        self.out_proj = layers.Linear(w, w, ("heads", "embed"), lead, rngs=rngs)
        self.ln_2 = layers.LayerNorm(w, lead, eps=cfg.layer_norm_eps, rngs=rngs)
        self.c_fc = layers.Linear(w, cfg.mlp_dim, ("embed", "mlp"), lead, rngs=rngs)
        self.c_proj = layers.Linear(cfg.mlp_dim, w, ("mlp", "embed"), lead, rngs=rngs)
        self.num_heads = cfg.num_heads
        self.activation = cfg.activation
        self.attention_impl = layers.check_attention_impl(attention_impl)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        b, t, d = x_btd.shape
        qkv = self.in_proj(self.ln_1(x_btd)).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = (sharding.constrain(qkv[:, :, i], ACT_HEADS) for i in range(3))
        o = layers.attention(q, k, v, causal=True, implementation=self.attention_impl)
        x_btd = sharding.constrain(
            x_btd + self.out_proj(sharding.constrain(o.reshape(b, t, d), ACT_HIDDEN)),
            ACT_TOKENS)
        h = sharding.constrain(ACTIVATIONS[self.activation](self.c_fc(self.ln_2(x_btd))), ACT_MLP)
        return sharding.constrain(x_btd + self.c_proj(h), ACT_TOKENS)


class TextTower(nnx.Module):
    """CLIP text transformer. `encode(ids)` -> L2-normalised embeddings (B, embed_dim).

    `compute_dtype` runs the blocks (bf16: LayerNorm statistics and softmax stay fp32; pooling,
    projection and normalisation are fp32); `param_dtype` stores the parameters; `attention_impl`
    is passed to `layers.attention`.
    """

    def __init__(self, config: Config, *, rngs: nnx.Rngs, scan_layers: bool = True,
                 compute_dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 attention_impl: str | None = None):
        cfg = config
        self.config = cfg
        self.scan_layers = scan_layers
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.token_embedding = layers.param(rngs, layers.trunc_normal(0.02),
                                            (cfg.vocab_size, cfg.width), ("vocab", "embed"))
        self.positional_embedding = layers.param(rngs, layers.trunc_normal(0.01),
                                                 (cfg.context_length, cfg.width), (None, "embed"))
        self.blocks = Block(cfg, (cfg.depth,), rngs=rngs, attention_impl=attention_impl)
        self.ln_final = layers.LayerNorm(cfg.width, (), eps=cfg.layer_norm_eps, rngs=rngs)
        self.text_projection = layers.param(rngs, layers.trunc_normal(cfg.width ** -0.5),
                                            (cfg.width, cfg.embed_dim), ("embed", None))
        # Identity of the weights (set by `load`), used to key the prompt-feature cache, and the
        # directory holding the tokenizer files that came with the weights (if any).
        self.checkpoint_id: str | None = None
        self.tokenizer_dir: str | None = None
        layers.cast_params(self, param_dtype)

    def __call__(self, ids_bt: jax.Array, *, return_hidden: bool = False) -> dict[str, jax.Array]:
        """Full forward. Returns `pooled` (after ln_final, at EOT), `projected` (unnormalised),
        `embeddings` (L2-normalised) and, with `return_hidden`, every block's output."""
        cfg = self.config
        t = ids_bt.shape[1]
        if t > cfg.context_length:
            raise ValueError(f"token ids have length {t} > context length {cfg.context_length}")
        x = (jnp.take(self.token_embedding[...], ids_bt, axis=0).astype(jnp.float32)
             + self.positional_embedding[:t].astype(jnp.float32)).astype(self.compute_dtype)
        taps = tuple(range(cfg.depth)) if return_hidden else ()
        x, hidden = layers.run_stacked(self.blocks, x, cfg.depth, taps, self.scan_layers)
        x = self.ln_final(x)
        eot = jnp.argmax(ids_bt, axis=-1)  # the first maximum: EOT (49407) is the largest id
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        projected = pooled @ self.text_projection[...].astype(jnp.float32)
        norm = jnp.maximum(jnp.linalg.norm(projected, axis=-1, keepdims=True), 1e-12)
        out = {"pooled": pooled, "projected": projected, "embeddings": projected / norm}
        if return_hidden:
            out["hidden"] = hidden
        return out

    def encode(self, ids_bt: jax.Array) -> jax.Array:
        """Projected, L2-normalised text embeddings (B, embed_dim)."""
        return self(ids_bt)["embeddings"]


def create(variant: str | Config, *, activation: str | None = None, rngs: nnx.Rngs,
           scan_layers: bool = True, compute_dtype: Any = jnp.float32,
           param_dtype: Any = jnp.float32, attention_impl: str | None = None) -> TextTower:
    """A randomly initialised text tower."""
    cfg = get_config(variant, activation) if isinstance(variant, str) else (
        dataclasses.replace(variant, activation=activation) if activation else variant)
    return TextTower(cfg, rngs=rngs, scan_layers=scan_layers, compute_dtype=compute_dtype,
                     param_dtype=param_dtype, attention_impl=attention_impl)


def load_tokenizer(path=None):
    """The tokenizer stored in a converted directory (or HF directory); the default otherwise."""
    from addinov3_jax.models import tokenizer

    if path is not None:
        try:
            return tokenizer.Tokenizer.from_directory(path)
        except (tokenizer.TokenizerError, NotADirectoryError):
            pass
    return tokenizer.default_tokenizer()
