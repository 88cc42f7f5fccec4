"""Small numerical building blocks shared by the DINOv3 and CLIP text towers.

Parameters are plain `nnx.Param`s created through `param`, which records the logical axis names
(`out_sharding` metadata, never a mesh axis) so that `sharding.py` can place them on any mesh;
activations are constrained by logical names with `sharding.constrain`.
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


# ---------------------------------------------------------------------------------------------
# Modules whose parameters may carry leading `layers` axes (stacked transformer blocks).


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, lead: tuple[int, ...], *, eps: float, rngs: nnx.Rngs):
        lead_axes = ("layers",) * len(lead)
        self.scale = param(rngs, ones, (*lead, dim), (*lead_axes, "embed"))
        self.bias = param(rngs, zeros, (*lead, dim), (*lead_axes, "embed"))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Linear(nnx.Module):
    """`y = x @ kernel + bias`; kernel (in, out) like Flax, i.e. the torch weight transposed."""

    def __init__(
        self,
        din: int,
        dout: int,
        axes: tuple[str, str],
        lead: tuple[int, ...],
        *,
        bias: bool = True,
        rngs: nnx.Rngs,
    ):
        lead_axes = ("layers",) * len(lead)
        self.kernel = param(
            rngs, trunc_normal(0.02), (*lead, din, dout), (*lead_axes, *axes)
        )
        self.bias = (
            param(rngs, zeros, (*lead, dout), (*lead_axes, axes[1])) if bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(x, self.kernel[...], None if self.bias is None else self.bias[...])


class FusedQKV(nnx.Module):
    """Fused q/k/v projection, kernel (in, 3, heads * head_dim), bias (3, heads * head_dim).

    The q/k/v index is its own axis, so the `heads` axis (sharded over `tensor`) splits whole
    heads of each of q, k and v, never across the q/k/v boundary.
    """

    def __init__(self, din: int, dout: int, lead: tuple[int, ...], *, bias: bool = True,
                 rngs: nnx.Rngs):
        lead_axes = ("layers",) * len(lead)
        self.kernel = param(rngs, trunc_normal(0.02), (*lead, din, 3, dout),
                            (*lead_axes, "embed", "qkv", "heads"))
        self.bias = (param(rngs, zeros, (*lead, 3, dout), (*lead_axes, "qkv", "heads"))
                     if bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in) -> (..., 3, heads * head_dim)."""
        y = jnp.einsum("...i,ito->...to", x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


def run_stacked(
    blocks: nnx.Module, x: jax.Array, depth: int, taps: Sequence[int], scan: bool, *args
) -> tuple[jax.Array, list[jax.Array]]:
    """Applies `depth` stacked blocks (params with a leading `layers` axis) to `x`.

    Returns the final output and the outputs of the blocks listed in `taps` (ascending). With
    `scan`, each run of blocks between taps is one `jax.lax.scan`; otherwise the loop is unrolled.
    """
    graphdef, state = nnx.split(blocks)

    def one(x, layer_state):
        return nnx.merge(graphdef, layer_state)(x, *args)

    outputs, start = [], 0
    for stop in [*(t + 1 for t in taps), depth]:
        if stop <= start:
            continue
        segment = jax.tree.map(lambda a, s=start, e=stop: a[s:e], state)
        if scan:
            x, _ = jax.lax.scan(lambda c, s: (one(c, s), None), x, segment)
        else:
            for i in range(stop - start):
                x = one(x, jax.tree.map(lambda a, i=i: a[i], segment))
        start = stop
        if len(outputs) < len(taps):
            outputs.append(x)
    return x, outputs
