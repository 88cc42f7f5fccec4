"""Small numerical building blocks shared by the DINOv3 and CLIP text towers.

Parameters are plain `nnx.Param`s created through `param`, which records the logical axis names
(`out_sharding` metadata, never a mesh axis) so that `sharding.py` can place them on any mesh;
activations are constrained by logical names with `sharding.constrain`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

trunc_normal = nnx.initializers.truncated_normal
# Largest stacked parameter drawn by an eager `vmap` in `per_layer` (larger ones: one slice at a time).
EAGER_VMAP_BYTES = 64 * 2**20
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype = jnp.float32,
) -> nnx.Param:
    """A parameter with logical axis names; `len(axes) == len(shape)` is enforced. A stacked
    parameter (leading `layers` axis) is drawn one layer at a time (`per_layer`)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    if axes and axes[0] == "layers":
        init = per_layer(init)
    return nnx.Param(
        init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False
    )


def per_layer(init: Initializer) -> Initializer:
    """`init` drawn for one slice of the leading axis at a time (one key per slice): under a
    trace (`nnx.jit`, `nnx.eval_shape`) a `lax.map`, so that a stacked tower's random
    initialisation needs one block's temporaries, not the whole stack's (vit7b16: `addinov3 plan`
    reports `backbone_init`). Eagerly, small stacks are drawn by a `vmap` over the same keys (the
    same values: random bits are a function of key and position): a `lax.map` run eagerly would
    compile a new program for every parameter of every model built."""
    def draw(key, shape, dtype=jnp.float32):
        keys = jax.random.split(key, shape[0])
        one = lambda k: init(k, tuple(shape[1:]), dtype)  # noqa: E731
        small = math.prod(shape) * jnp.dtype(dtype).itemsize <= EAGER_VMAP_BYTES
        if small and not isinstance(key, jax.core.Tracer):
            return jax.vmap(one)(keys)
        return jax.lax.map(one, keys)

    return draw


def cast_params(module: nnx.Module, dtype) -> None:
    """Stores every `nnx.Param` of `module` in `dtype` (a no-op for fp32)."""
    dtype = jnp.dtype(dtype)
    state = nnx.state(module, nnx.Param)
    if any(x.dtype != dtype for x in jax.tree.leaves(state)):
        nnx.update(module, jax.tree.map(lambda x: x.astype(dtype), state))


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


ATTENTION_IMPLEMENTATIONS = (None, "auto", "xla", "blockwise", "cudnn", "splash")
# The dtypes a tower computes in / stores its parameters in (config `model.compute_dtype`, ...).
DTYPES = ("float32", "bfloat16")


def check_attention_impl(implementation: str | None) -> str | None:
    """Validates an `attention_impl` value ("auto" is the same as None)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    return None if implementation == "auto" else implementation


# fp32 logits per step of "blockwise" attention: (batch, head) pairs are grouped so that one
# step's (pairs, T, T) block stays within this (measured on a 2-core AMD EPYC, benchmarks/RESULTS.md:
# 2 MiB steps beat both the whole (B, heads, T, T) matrix and smaller steps). One head's (T, T)
# block is split over queries only beyond BLOCKWISE_MAX_HEAD_BYTES (T > 2048): splitting ViT-L/16
# at 512 px (T = 1029, 4 MiB per head) into query blocks measured slower.
BLOCKWISE_STEP_BYTES = 2 << 20
BLOCKWISE_MAX_HEAD_BYTES = 16 << 20


def attention_backend(q: jax.Array, implementation: str | None) -> str:
    """The implementation `attention` runs for queries like `q` (B, T, heads, head_dim).

    None / "auto": cuDNN flash attention on GPU for bf16/fp16 with a head dim that cuDNN takes
    (a multiple of 8, at most 128). On a single-device CPU, "blockwise" when the fp32 logits of
    the whole (B, heads, T, T) matrix exceed `BLOCKWISE_STEP_BYTES` (it is then faster: 1.7x for
    ViT-L/16 at 512 px), else "xla" (the matrix fits in cache). XLA otherwise (on TPU the
    Pallas "splash" kernel is opt-in).
    """
    implementation = check_attention_impl(implementation)
    if implementation is not None:
        return implementation
    b, t, h, head_dim = q.shape
    backend = jax.default_backend()
    if (backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128):
        return "cudnn"
    mesh = jax.sharding.get_abstract_mesh()
    if (backend == "cpu" and (mesh.empty or mesh.size == 1)
            and b * h * t * t * 4 > BLOCKWISE_STEP_BYTES):
        return "blockwise"
    return "xla"


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention on (B, T, heads, head_dim) -> (B, T, heads, head_dim).

    Logits and softmax are computed in fp32 whatever the input dtype; the output has the dtype of
    `v`. `implementation`: None / "auto" (see `attention_backend`), "xla", "blockwise" (the same
    formula a block of (batch, head) pairs at a time, `_attention_blockwise`), "cudnn" (GPU, bf16
    / fp16 only) or "splash" (the Pallas TPU kernel). "xla" on a CPU host runs the same formula
    in a heads-major layout (`_attention_heads_major`).
    """
    backend = attention_backend(q, implementation)
    if backend == "splash":
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and mesh.size > 1:  # a Mosaic kernel is not partitioned automatically
            raise ValueError(f"attention_impl='splash' runs on one device; this mesh has "
                             f"{mesh.size}: use attention_impl='auto' (or 'xla') on a mesh")
        return _splash_attention(q, k, v, causal=causal)
    if backend == "blockwise":
        return _attention_blockwise(q, k, v, causal=causal)
    if backend == "xla" and jax.default_backend() == "cpu":
        return _attention_heads_major(q, k, v, causal=causal)
    if backend == "cudnn" and implementation is None:
        try:  # "auto": a shape cuDNN refuses (raised while tracing) falls back to XLA
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            backend = "xla"
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=backend)


def _heads_major_core(q_gqd, k_gkd, v_gkd, *, causal: bool, q_offset=0) -> jax.Array:
    """Softmax attention of g independent (queries, keys) pairs, fp32 logits and softmax; query
    i sits at position `q_offset + i` for the causal mask."""
    logits = jnp.einsum("gqd,gkd->gqk", q_gqd, k_gkd, preferred_element_type=jnp.float32)
    logits = logits * q_gqd.shape[-1] ** -0.5
    if causal:
        rows = q_offset + jnp.arange(q_gqd.shape[1])[:, None]
        logits = jnp.where(rows >= jnp.arange(k_gkd.shape[1])[None, :], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(v_gkd.dtype)
    return jnp.einsum("gqk,gkd->gqd", weights, v_gkd)


def _attention_heads_major(q, k, v, *, causal: bool) -> jax.Array:
    """XLA attention with heads moved ahead of the tokens first. On CPU the two batched matmuls
    then run on contiguous (T, head_dim) slices: 2x faster than the (B, T, heads, head_dim)
    contraction of `jax.nn.dot_product_attention` for ViT-L/16 at 512x512 (bench_cpu_block.py)."""
    b, t, h, d = q.shape
    q, k, v = (x.transpose(0, 2, 1, 3).reshape(b * h, t, d) for x in (q, k, v))
    out = _heads_major_core(q, k, v, causal=causal)
    return out.reshape(b, h, t, d).transpose(0, 2, 1, 3)


def _attention_blockwise(q, k, v, *, causal: bool, step_bytes: int = BLOCKWISE_STEP_BYTES,
                         max_head_bytes: int = BLOCKWISE_MAX_HEAD_BYTES) -> jax.Array:
    """The heads-major formula one block at a time (`lax.map`), so that no step holds more than
    `step_bytes` of fp32 logits (one head's at least): the (batch x heads) pairs in groups of
    g (the largest divisor of B * heads that fits) and, where one head's (T, T) logits exceed
    `max_head_bytes`, its queries in blocks of `max_head_bytes / (4 T)` rows (padded at the
    end; padded rows are dropped). Every key is seen in every step, so the softmax is exact."""
    b, t, h, d = q.shape
    pairs = b * h
    head_bytes = 4 * t * t
    g = max([n for n in range(1, pairs + 1) if pairs % n == 0 and n * head_bytes <= step_bytes],
            default=1)
    bq = t if head_bytes <= max_head_bytes else max(1, max_head_bytes // (4 * t))
    nq = -(-t // bq)
    q, k, v = (x.transpose(0, 2, 1, 3).reshape(pairs // g, g, t, d) for x in (q, k, v))
    if nq > 1:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, nq * bq - t), (0, 0)))
    q = q.reshape(pairs // g, g, nq, bq, d)

    def pair_group(args):
        q_gnqd, k_gkd, v_gkd = args

        def query_block(i):
            q_gqd = jax.lax.dynamic_index_in_dim(q_gnqd, i, axis=1, keepdims=False)
            return _heads_major_core(q_gqd, k_gkd, v_gkd, causal=causal, q_offset=i * bq)

        if nq == 1:
            return query_block(0)[:, None]
        return jnp.moveaxis(jax.lax.map(query_block, jnp.arange(nq)), 0, 1)

    out = jax.lax.map(pair_group, (q, k, v))  # (pairs / g, g, nq, bq, d)
    out = out.reshape(b, h, nq * bq, d)[:, :, :t]
    return out.transpose(0, 2, 1, 3)


SPLASH_BLOCK = 128


def _splash_attention(q, k, v, *, causal: bool, interpret: bool = False):
    """The Pallas TPU splash-attention kernel. Tokens are padded to a multiple of the kernel's
    128-token blocks; padded keys get a different segment id so real queries never see them."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )

    b, t, h, d = q.shape
    tp = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    mask = splash_mask.CausalMask((tp, tp)) if causal else splash_mask.FullMask((tp, tp))
    kernel = splash.make_splash_mha(
        splash_mask.MultiHeadMask([mask] * h), head_shards=1, q_seq_shards=1, interpret=interpret
    )
    ids = jnp.broadcast_to((jnp.arange(tp) >= t).astype(jnp.int32), (b, tp))
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731
    qs = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)  # the kernel does not scale
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(s1, s1)))(
        pad(qs), pad(k), pad(v), ids)
    return out.transpose(0, 2, 1, 3)[:, :t].astype(v.dtype)


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
