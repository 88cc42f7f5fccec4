"""Small numerical building blocks shared by the DINOv3 and CLIP text towers.

Parameters are plain `nnx.Param`s created through `param`, which records the logical axis names
(`out_sharding` metadata, never a mesh axis) so that `sharding.py` can place them on any mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

trunc_normal = nnx.initializers.truncated_normal
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype = jnp.float32,
) -> nnx.Param:
    """A parameter with logical axis names; `len(axes) == len(shape)` is enforced."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    return nnx.Param(
        init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False
    )


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis with two-pass (biased) variance, computed in fp32.

    Matches `torch.nn.LayerNorm`: `(x - mean) / sqrt(var + eps) * scale + bias`.
    """
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    y = centered * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """`x @ kernel + bias` in the dtype of `x` (kernels are cast to it)."""
    y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y


def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact erf GELU, `torch.nn.GELU()` default (JAX's default is the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    """QuickGELU of OpenAI CLIP: `x * sigmoid(1.702 x)`."""
    return x * jax.nn.sigmoid(1.702 * x)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False) -> jax.Array:
    """Scaled dot-product attention on (B, T, heads, head_dim); logits and softmax in fp32."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if causal:
        t = q.shape[1]
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))
        logits = jnp.where(mask, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
