"""AD-DINOv3 losses, as small pure functions (shared/DESIGN.md §2.6).

total = 0.25 * (focal(A) + dice(A[..., 1])) + 0.5 * (focal(M) + dice(M[..., 1])) + 0.25 * CE(g)

The focal loss takes probabilities (not logits), as the official `FocalLoss`: gamma 2, no alpha,
one-hot target clamped to [1e-5, 1 - 1e-5], `pt = sum(onehot * p) + 1e-5`, mean over all pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SMOOTH = 1e-5


def _mean(x: jax.Array) -> jax.Array:
    """Mean over all axes, one axis at a time: short fp32 sums keep 512x512 maps accurate."""
    while x.ndim:
        x = jnp.mean(x, axis=-1)
    return x


def _sum_hw(x_bhw: jax.Array) -> jax.Array:
    """Per-image sum over the pixels, rows first (B,)."""
    return jnp.sum(jnp.sum(x_bhw, axis=-1), axis=-1)


def focal(probs_bhwk: jax.Array, mask_bhw: jax.Array, gamma: float = 2.0) -> jax.Array:
    """Focal loss on class probabilities (B, H, W, K) against integer masks (B, H, W)."""
    k = probs_bhwk.shape[-1]
    onehot = jax.nn.one_hot(mask_bhw.astype(jnp.int32), k, dtype=probs_bhwk.dtype)
    onehot = jnp.clip(onehot, SMOOTH / (k - 1), 1.0 - SMOOTH)
    pt = jnp.sum(onehot * probs_bhwk, axis=-1) + SMOOTH
    return _mean(-((1.0 - pt) ** gamma) * jnp.log(pt))


def dice(prob_bhw: jax.Array, mask_bhw: jax.Array, smooth: float = 1.0) -> jax.Array:
    """Binary dice loss: `1 - mean_b (2 sum(p m) + 1) / (sum p + sum m + 1)`."""
    p, m = prob_bhw, mask_bhw.astype(prob_bhw.dtype)
    coeff = (2.0 * _sum_hw(p * m) + smooth) / (_sum_hw(p) + _sum_hw(m) + smooth)
    return 1.0 - jnp.mean(coeff)


def cross_entropy(logits_bk: jax.Array, labels_b: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels (`F.cross_entropy`)."""
    logp = jax.nn.log_softmax(logits_bk, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels_b.astype(jnp.int32)[:, None], axis=-1))


def total(outputs: dict[str, jax.Array], mask_bhw: jax.Array, label_b: jax.Array,
          weights: tuple[float, float, float] = (0.25, 0.5, 0.25)) -> dict[str, jax.Array]:
    """All loss terms for the model outputs `M`, `A`, `g`; `loss` is the weighted total."""
    a, m = outputs["A"], outputs["M"]
    awareness = focal(a, mask_bhw) + dice(a[..., 1], mask_bhw)
    seg = focal(m, mask_bhw) + dice(m[..., 1], mask_bhw)
    glob = cross_entropy(outputs["g"], label_b)
    loss = weights[0] * awareness + weights[1] * seg + weights[2] * glob
    return {"loss": loss, "awareness": awareness, "segmentation": seg, "global": glob}
