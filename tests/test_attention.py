"""`layers.attention` (jax.nn.dot_product_attention, the CPU blockwise loop, the Pallas splash
kernel) against the einsum formula it replaced, alone and inside both towers; bf16 parameter
storage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from addinov3_jax.models import clip_text, dinov3, layers


def einsum_attention(q, k, v, *, causal=False, implementation=None):
    """The previous `layers.attention`: two einsums, fp32 logits and softmax."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if causal:
        t = q.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((t, t), dtype=bool)), logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def qkv(rng, b=3, t=17, h=4, d=16):
    return [jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", [None, "auto", "xla", "blockwise"])
@pytest.mark.parametrize("t", [1, 17, 77])
def test_equals_einsum_formula(rng, causal, impl, t):
    q, k, v = qkv(rng, t=t)
    got = jax.jit(lambda q, k, v: layers.attention(q, k, v, causal=causal, implementation=impl))(
        q, k, v)
    np.testing.assert_allclose(got, einsum_attention(q, k, v, causal=causal), atol=1e-6, rtol=0)


def test_backend_choice_and_bad_names(rng):
    q = qkv(rng)[0]
    assert layers.attention_backend(q, None) == "xla"  # CPU
    assert layers.attention_backend(q.astype(jnp.bfloat16), "auto") == "xla"
    assert layers.attention_backend(q, "cudnn") == "cudnn"
    assert layers.attention_backend(q, "blockwise") == "blockwise"
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        layers.attention(q, q, q, implementation="flash")
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        dinov3.create("tiny", rngs=nnx.Rngs(0), attention_impl="flash")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t", [1, 37, 40])
def test_blockwise_blocks_equal_plain_formula(rng, causal, t):
    """Small step budgets force both splits: (batch x heads) = 12 pairs in groups of 2, and the
    queries in blocks of 10 rows (37: the last block padded; 40: no padding)."""
    q, k, v = qkv(rng, b=3, t=t, h=4, d=16)
    fn = jax.jit(lambda q, k, v: layers._attention_blockwise(
        q, k, v, causal=causal, step_bytes=2 * 4 * t * t, max_head_bytes=4 * t * 10 - 1))
    with jax.default_matmul_precision("highest"):
        got = fn(q, k, v)
        want = einsum_attention(q, k, v, causal=causal)
    assert got.shape == q.shape and got.dtype == q.dtype
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_blockwise_bfloat16(rng):
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(rng, b=2, t=33, h=4, d=16))
    got = layers._attention_blockwise(q, k, v, causal=True, step_bytes=4 * 33 * 33,
                                      max_head_bytes=4 * 33 * 8)
    assert got.dtype == jnp.bfloat16
    want = einsum_attention(q, k, v, causal=True)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-2, rtol=0)


def test_auto_picks_blockwise_for_large_logits_on_cpu():
    """The shape rule: blockwise once the whole fp32 (B, heads, T, T) logits exceed
    BLOCKWISE_STEP_BYTES; "xla" below (one step would hold everything anyway)."""
    def spec(b, t, h=16, dtype=jnp.float32):
        return jax.ShapeDtypeStruct((b, t, h, 64), dtype)
    assert layers.attention_backend(spec(1, 1029), None) == "blockwise"  # ViT-L/16, 512 px
    assert layers.attention_backend(spec(8, 201), None) == "blockwise"  # 224 px, batch 8
    assert layers.attention_backend(spec(1, 1029, dtype=jnp.bfloat16), "auto") == "blockwise"
    assert layers.attention_backend(spec(1, 201), None) == "blockwise"  # 2.6 MB
    assert layers.attention_backend(spec(1, 128), None) == "xla"  # 1 MiB
    assert layers.attention_backend(spec(1, 17, h=4), None) == "xla"


@pytest.mark.parametrize("causal", [False, True])
def test_splash_kernel_interpreted(rng, causal):
    """The TPU kernel, run by the Pallas interpreter on CPU: padding to 128-token blocks is
    invisible (odd token count, batch > 1)."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    q, k, v = qkv(rng, b=2, t=37, h=2, d=64)
    got = layers._splash_attention(q, k, v, causal=causal, interpret=True)
    np.testing.assert_allclose(got, einsum_attention(q, k, v, causal=causal), atol=2e-6, rtol=0)


def test_dinov3_equals_einsum_attention(rng, monkeypatch):
    model = dinov3.create("tiny", rngs=nnx.Rngs(0), attention_impl="xla")
    x = rng.standard_normal((3, 48, 64, 3)).astype(np.float32)  # 12 patches + 5 = 17 tokens
    new = model.get_intermediate_layers(x, n=4, return_class_token=True)
    monkeypatch.setattr(layers, "attention", einsum_attention)
    old = model.get_intermediate_layers(x, n=4, return_class_token=True)
    for (p_new, c_new), (p_old, c_old) in zip(new, old, strict=True):
        np.testing.assert_allclose(p_new, p_old, atol=1e-6, rtol=0)
        np.testing.assert_allclose(c_new, c_old, atol=1e-6, rtol=0)


def test_clip_text_equals_einsum_attention(rng, monkeypatch):
    model = clip_text.create("tiny", rngs=nnx.Rngs(0), attention_impl="auto")
    ids = rng.integers(1, 49000, (3, 13)).astype(np.int32)
    ids[:, 9] = 49407
    new = model(ids, return_hidden=True)
    monkeypatch.setattr(layers, "attention", einsum_attention)
    old = model(ids, return_hidden=True)
    for a, b in zip(new["hidden"], old["hidden"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    np.testing.assert_allclose(new["embeddings"], old["embeddings"], atol=1e-6, rtol=0)


def test_bf16_parameter_storage(rng):
    bb = dinov3.create("tiny", rngs=nnx.Rngs(0), param_dtype="bfloat16", compute_dtype="bfloat16")
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(bb, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert bb.rope_periods[...].dtype == jnp.float32  # RoPE stays fp32
    out = bb(rng.standard_normal((2, 32, 32, 3)).astype(np.float32))
    assert out["x_norm_patchtokens"].dtype == jnp.bfloat16
    tt = clip_text.create("tiny", rngs=nnx.Rngs(0), param_dtype="bfloat16",
                          compute_dtype="bfloat16")
    ids = np.full((2, 8), 1, np.int32)
    ids[:, 5] = 49407
    emb = tt.encode(ids)
    assert emb.dtype == jnp.float32 and np.isfinite(np.asarray(emb)).all()


def test_parity_bfloat16_tables(capsys):
    from addinov3_jax.commands.cli import main

    assert main(["parity", "dinov3", "--random", "tiny", "--image-size", "48,64",
                 "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "ours bfloat16 vs ours fp32" in out and "rel L2" in out and "FAIL" not in out
