"""AD-DINOv3: frozen DINOv3 features + frozen CLIP text prototypes + trained adapters and AACM.

Per tapped block i (shared/DESIGN.md §2):
  p = normalize(leaky_relu(standardize(patches_i) @ W_patch_i))      (B, N, E)
  c = normalize(leaky_relu(cls_i @ W_cls_i))                          (B, E)
  t = [leaky_relu(T_n @ W_prompt_0), leaky_relu(T_a @ W_prompt_1)]    (B, E, 2), layout switch
  M_i = softmax(up(100 p @ t))          cross-modal map   (B, H, W, 2)
  A_i = [1 - s, s], s = sigmoid(up(10 p @ c))   AACM map  (B, H, W, 2)
  g_i = 100 c @ t                       global logits     (B, 2)
and M, A, g are the means over the taps; `up` is bilinear upsampling with align_corners=True.
Only the adapters train: every other parameter sits under `backbone` or `text_tower`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from addinov3_jax.models import clip_text, dinov3, layers, prompts, sharding

TEXT_LAYOUTS = ("stack", "interleave")
IMAGE_SCORES = ("global", "max", "mean_of_both")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Configuration of the AD-DINOv3 head (defaults = the paper, with the intended behaviour).

    text_layout: "stack" uses [t_n, t_a] as the two text columns; "interleave" reproduces the
      official `cat([t_n, t_a]).view(E, 2)` (needed for adapters trained by the official code).
    image_score: "global" = softmax(g)[1], "max" = max of the pixel map, "mean_of_both".
    smoothing_sigma: Gaussian smoothing of the pixel map at inference (0 = off, as official).
    """

    feature_layers: tuple[int, ...] = (5, 11, 17, 23)
    text_layout: str = "stack"
    image_score: str = "global"
    smoothing_sigma: float = 0.0
    patch_logit_scale: float = 100.0
    aacm_logit_scale: float = 10.0
    leaky_slope: float = 0.01
    standardize_eps: float = 1e-6

    def __post_init__(self):
        if self.text_layout not in TEXT_LAYOUTS:
            raise ValueError(f"text_layout must be one of {TEXT_LAYOUTS}, got {self.text_layout!r}")
        if self.image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {self.image_score!r}")
        object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Pure functions of the head


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear interpolation weights with align_corners=True.

    Source positions and weights are computed in float32 like PyTorch's CPU upsampling kernel
    (`scale = (in - 1) / (out - 1)`, `src = scale * i`, `w1 = src - floor(src)`, `w0 = 1 - w1`).
    """
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0)
    src = scale * np.arange(n_out, dtype=np.float32)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    w1 = (src - lo.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1) - w1).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), lo), w0)
    np.add.at(m, (np.arange(n_out), hi), w1)
    return m


def resize_map_rows(map_hw: np.ndarray, height: int, width: int, rows: int = 512):
    """(start row, block) pieces of one map resized to (height, width) on the host, bilinear with
    align_corners=True, `rows` output rows at a time (no full-size copy for huge images)."""
    rh = resize_matrix(map_hw.shape[0], height).astype(np.float32)
    cols = np.asarray(map_hw, np.float32) @ resize_matrix(map_hw.shape[1], width).astype(np.float32).T
    for start in range(0, height, rows):
        yield start, rh[start : start + rows] @ cols


def resize_map(map_hw: np.ndarray, height: int, width: int) -> np.ndarray:
    """One map resized to (height, width) on the host: the one map resize of eval at original
    resolution and of predict (`resize_map_rows` in one piece)."""
    return np.concatenate([b for _, b in resize_map_rows(map_hw, height, width, max(height, 1))])


def upsample_bilinear(x_bhwc: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize with align_corners=True, as `F.interpolate(..., align_corners=True)`."""
    rh = jnp.asarray(resize_matrix(x_bhwc.shape[1], size[0]))
    rw = jnp.asarray(resize_matrix(x_bhwc.shape[2], size[1]))
    return jnp.einsum("Hh,bhwc,Ww->bHWc", rh, x_bhwc, rw, precision=jax.lax.Precision.HIGHEST)


def gaussian_blur(maps_bhw: jax.Array, sigma: float, truncate: float = 4.0) -> jax.Array:
    """Separable Gaussian filter like `scipy.ndimage.gaussian_filter(mode="reflect")`."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k = jnp.asarray(k / k.sum(), jnp.float32)
    padded = jnp.pad(maps_bhw, ((0, 0), (radius, radius), (radius, radius)), mode="symmetric")
    h, w = maps_bhw.shape[1:]
    rows = sum(k[i] * padded[:, i : i + h, :] for i in range(2 * radius + 1))
    return sum(k[i] * rows[:, :, i : i + w] for i in range(2 * radius + 1))


def standardize(patches_bnd: jax.Array, eps: float) -> jax.Array:
    """Per image and channel over the tokens: (x - mean) / (unbiased std + eps)."""
    mean = patches_bnd.mean(axis=1, keepdims=True)
    std = jnp.std(patches_bnd, axis=1, keepdims=True, ddof=1)
    return (patches_bnd - mean) / (std + eps)


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / ||x||; a zero vector (a constant image's patches) stays zero instead of NaN."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def arrange_text(t_n: jax.Array, t_a: jax.Array, layout: str) -> jax.Array:
    """(B, E) x 2 -> (B, E, 2). "interleave" reproduces the official concat-then-view."""
    if layout == "stack":
        return jnp.stack([t_n, t_a], axis=-1)
    b, e = t_n.shape
    return jnp.concatenate([t_n, t_a], axis=-1).reshape(b, e, 2)


class Adapters(nnx.Module):
    """The trainable part: first Linear (no bias) of each official adapter, stacked per kind."""


    def __init__(self, visual_dim: int, text_dim: int, num_layers: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.patch = layers.param(rngs, init, (num_layers, visual_dim, text_dim),
                                  ("layers", "embed", "adapter"))
        self.cls = layers.param(rngs, init, (num_layers, visual_dim, text_dim),
                                ("layers", "embed", "adapter"))
        self.prompt = layers.param(rngs, init, (2, text_dim, text_dim),
                                   ("layers", "adapter_in", "adapter"))


def _logits(adapters, patches_lbnd, cls_lbd, text_be2, cfg: HeadConfig):
    """Grid-level cross-modal logits (L, B, N, 2), AACM logits (L, B, N) and global logits (B, 2)."""
    act = lambda x: jax.nn.leaky_relu(x, cfg.leaky_slope)  # noqa: E731
    patches_lbnd = sharding.constrain(patches_lbnd, (None, "act_batch", "act_tokens", "act_embed"))
    p = l2_normalize(act(jnp.einsum("lbnd,lde->lbne", patches_lbnd, adapters["patch"])))
    c = l2_normalize(act(jnp.einsum("lbd,lde->lbe", cls_lbd, adapters["cls"])))
    t_n = act(text_be2[..., 0] @ adapters["prompt"][0])
    t_a = act(text_be2[..., 1] @ adapters["prompt"][1])
    text = arrange_text(t_n, t_a, cfg.text_layout)  # (B, E, 2)
    cross = cfg.patch_logit_scale * jnp.einsum("lbne,bek->lbnk", p, text)
    aacm = cfg.aacm_logit_scale * jnp.einsum("lbne,lbe->lbn", p, c)
    g = (cfg.patch_logit_scale * jnp.einsum("lbe,bek->lbk", c, text)).mean(0)
    return cross, aacm, g


def head(
    adapters,
    patches_lbnd: jax.Array,
    cls_lbd: jax.Array,
    text_be2: jax.Array,
    grid: tuple[int, int],
    out_size: tuple[int, int],
    cfg: HeadConfig,
) -> dict[str, jax.Array]:
    """Maps and logits from (already standardised) features of L taps.

    `adapters` maps "patch", "cls", "prompt" to the adapter kernels (`trainable_params(model)`,
    or the plain dict the trainer optimises). Returns `M`, `A` (B, H, W, 2), `g` (B, 2).
    """
    cross, aacm, g = _logits(adapters, patches_lbnd, cls_lbd, text_be2, cfg)
    n_layers, b = cross.shape[:2]
    logits = jnp.concatenate([cross, aacm[..., None]], axis=-1).reshape(n_layers * b, *grid, 3)
    up = upsample_bilinear(logits, out_size).reshape(n_layers, b, *out_size, 3)
    m = jax.nn.softmax(up[..., :2], axis=-1).mean(0)
    s = jax.nn.sigmoid(up[..., 2:])
    a = jnp.concatenate([1 - s, s], axis=-1).mean(0)
    return {"M": m, "A": a, "g": g}


def anomaly_map(adapters, patches_lbnd, cls_lbd, text_be2, grid, out_size, cfg: HeadConfig):
    """Inference only: `M[..., 1]` (B, H, W) and `g` (B, 2), a third of `head`'s upsampling.

    A 2-way softmax is the sigmoid of the logit difference and upsampling is linear, so
    `softmax(up(l))[1] = sigmoid(up(l_a - l_n))`; the AACM map is not needed at inference.
    """
    cross, _, g = _logits(adapters, patches_lbnd, cls_lbd, text_be2, cfg)
    n_layers, b = cross.shape[:2]
    diff = (cross[..., 1] - cross[..., 0]).reshape(n_layers * b, *grid, 1)
    up = upsample_bilinear(diff, out_size).reshape(n_layers, b, *out_size)
    return jax.nn.sigmoid(up).mean(0), g


def image_scores(maps_bhw: jax.Array, g_b2: jax.Array, mode: str) -> jax.Array:
    glob = jax.nn.softmax(g_b2, axis=-1)[:, 1]
    peak = maps_bhw.reshape(maps_bhw.shape[0], -1).max(axis=-1)
    return {"global": glob, "max": peak, "mean_of_both": 0.5 * (glob + peak)}[mode]


def extract_taps(backbone: dinov3.DinoV3, images_bhwc: jax.Array, feature_layers: Sequence[int]):
    """Final-normed patch tokens (L, B, N, D) and CLS tokens (L, B, D) of the tapped blocks, in
    the order of `feature_layers`, fp32, without gradient: the one backbone pass of the head and
    of the few-shot bank."""
    taps = backbone.get_intermediate_layers(images_bhwc, n=feature_layers, return_class_token=True)
    order = np.argsort(np.argsort(feature_layers))  # outputs come in ascending block order
    patches = jnp.stack([taps[i][0] for i in order]).astype(jnp.float32)
    cls = jnp.stack([taps[i][1] for i in order]).astype(jnp.float32)
    return jax.lax.stop_gradient(patches), jax.lax.stop_gradient(cls)


def extract_features(backbone: dinov3.DinoV3, images_bhwc: jax.Array, cfg: HeadConfig, *,
                     with_taps: bool = False):
    """Standardised patch tokens (L, B, N, D) and CLS tokens (L, B, D) of the tapped blocks, in
    the order of `cfg.feature_layers`, fp32, without gradient; `with_taps=True` adds, from the
    same pass, the L2-normalized final-normed patch tokens (L, B, N, D) (the few-shot features)."""
    patches, cls = extract_taps(backbone, images_bhwc, cfg.feature_layers)
    standardized = jax.vmap(lambda x: standardize(x, cfg.standardize_eps))(patches)
    if with_taps:
        return standardized, cls, l2_normalize(patches)
    return standardized, cls


# ---------------------------------------------------------------------------------------------
# The model


class ADDinoV3(nnx.Module):
    """Frozen backbone and text tower, trainable `adapters`."""

    def __init__(self, backbone: dinov3.DinoV3, text_tower: clip_text.TextTower | None,
                 config: HeadConfig = HeadConfig(), *, rngs: nnx.Rngs | None = None,
                 text_dim: int | None = None, adapters: Adapters | None = None):
        dinov3.select_blocks(config.feature_layers, backbone.config.depth)  # validates the taps
        if text_tower is None and text_dim is None:
            raise ValueError("give a text tower or the text feature dimension (text_dim)")
        self.config = config
        self.backbone = backbone
        self.text_tower = text_tower
        self.text_dim = text_tower.config.embed_dim if text_tower is not None else text_dim
        if adapters is None and rngs is None:
            raise ValueError("give rngs (new adapters) or trained adapters")
        self.adapters = adapters or Adapters(backbone.config.embed_dim, self.text_dim,
                                             len(config.feature_layers), rngs=rngs)

    def features(self, images_bhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Frozen features: standardised patches (L, B, N, D) and CLS tokens (L, B, D), fp32."""
        return extract_features(self.backbone, images_bhwc, self.config)

    def __call__(self, images_bhwc: jax.Array, text_be2: jax.Array) -> dict[str, jax.Array]:
        """Training-time forward: `M`, `A` (B, H, W, 2) and `g` (B, 2).

        `text_be2` holds each image's (E, 2) [normal, abnormal] prototypes (see `text_features`).
        """
        p = self.backbone.config.patch_size
        grid = (images_bhwc.shape[1] // p, images_bhwc.shape[2] // p)
        patches, cls = self.features(images_bhwc)
        return head(trainable_params(self), patches, cls, jax.lax.stop_gradient(text_be2), grid,
                    images_bhwc.shape[1:3], self.config)

    def text_features(self, class_names: Sequence[str]) -> np.ndarray:
        """(C, E, 2) prototypes per class name, computed once by the frozen text tower."""
        if self.text_tower is None:
            raise ValueError("this model has no text tower; pass text features explicitly")
        return prompts.text_features(self.text_tower, class_names)

    def predict(self, images_bhwc, class_names: Sequence[str] | str, *,
                text_be2=None) -> tuple[jax.Array, jax.Array]:
        """Pixel anomaly maps (B, H, W) and image scores (B,) for images of the given classes."""
        b = images_bhwc.shape[0]
        if text_be2 is None:
            names = [class_names] * b if isinstance(class_names, str) else list(class_names)
            if len(names) != b:
                raise ValueError(f"{len(names)} class names for {b} images")
            uniq = list(dict.fromkeys(names))
            table = self.text_features(uniq)
            text_be2 = table[[uniq.index(n) for n in names]]
        return _predict_jit(self.backbone, trainable_params(self), jnp.asarray(images_bhwc),
                            jnp.asarray(text_be2), self.config)


def predict_step(backbone: dinov3.DinoV3, adapters: dict[str, jax.Array], images_bhwc: jax.Array,
                 text_be2: jax.Array, cfg: HeadConfig, *, with_taps: bool = False):
    """The one inference computation (eval, predict, `ADDinoV3.predict`): pixel maps (B, H, W)
    and image scores (B,) of normalised images and their classes' (E, 2) prototypes;
    `with_taps=True` also returns the unit-norm tapped patch tokens (L, B, N, D) of the same
    backbone pass (the queries of a few-shot memory bank)."""
    p = backbone.config.patch_size
    grid = (images_bhwc.shape[1] // p, images_bhwc.shape[2] // p)
    patches, cls, *taps = extract_features(backbone, images_bhwc, cfg, with_taps=with_taps)
    maps, g = anomaly_map(adapters, patches, cls, text_be2, grid, images_bhwc.shape[1:3], cfg)
    if cfg.smoothing_sigma > 0:
        maps = gaussian_blur(maps, cfg.smoothing_sigma)
    return (maps, image_scores(maps, g, cfg.image_score), *taps)


@nnx.jit(static_argnums=(4,))
def _predict_jit(backbone, adapters, images, text_be2, cfg):
    return predict_step(backbone, adapters, images, text_be2, cfg)


# The one trainability filter, used by the optimizer and the gradient: parameters under `adapters`.
TRAINABLE = nnx.All(nnx.Param, nnx.PathContains("adapters"))


def trainable(model: ADDinoV3) -> nnx.State:
    return nnx.state(model, TRAINABLE)


def trainable_params(model: ADDinoV3) -> dict[str, jax.Array]:
    """The trainable parameters (selected by `TRAINABLE`) as the plain dict `head` consumes."""
    return nnx.to_pure_dict(trainable(model))["adapters"]


def set_trainable_params(model: ADDinoV3, params: dict[str, jax.Array]) -> None:
    state = trainable(model)
    nnx.replace_by_pure_dict(state, {"adapters": params})  # checks the structure
    nnx.update(model, state)
