"""Few-shot mode: a memory bank of DINOv3 patch features from k normal images per class.

Method (shared/reference/fewshot.md; AnomalyDINO, Damm et al. 2025; the APRIL-GAN / WinCLIP+
few-shot branch; PatchCore's coreset, Roth et al. 2022):

  bank_l   = normalize(final-normed patch tokens of block l of the k references, all views)  (M, D)
  s_l(p)   = 1 - max_m <normalize(p_l), bank_l[m]>      per test patch, exact 1-NN      (B, N)
  s        = mean_l s_l                                  patch scores in [0, 2]          (B, N)
  map      = gaussian(up(s))                             like the zero-shot maps          (B, H, W)
  score    = mean of the top 1% of s (at least one patch), or max(s)                      (B,)

The tokens are the backbone's final-LayerNorm outputs of the tapped blocks, *not* the head's
per-image standardisation (which removes what is common to an image, a defect covering many
patches included). Nearest neighbours are exact: a blocked matmul with a running max over bank
blocks (memory bounded by `block_size` columns), optionally with the bank sharded over a mesh
(`shard_map`, then a max across devices; the rows are padded to a multiple of the shard count with
copies of a real row, which never change a maximum).

Fusion with the zero-shot head (`fuse`): both branches are put on [0, 1] by fixed maps, no data
statistics: the zero-shot map and score are already probabilities; the few-shot ones are
cosine distances halved, `(1 - cos) / 2` (as WinCLIP+), then `fused = zero + weight * few`
(APRIL-GAN adds the two; weight 1 = equal weights). No bank leaves the zero-shot arrays untouched.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from addinov3_jax.models.model import gaussian_blur, upsample_bilinear

# Views per reference image, before the extra small rotations (`rotation_angles`).
AUGMENTS = {"none": 1, "flip": 3, "rot90": 4, "dihedral": 8}
IMAGE_SCORES = ("mean_top", "max")
FUSIONS = ("add", "none")
BANK_DTYPES = ("float32", "bfloat16")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
    """Settings of the few-shot branch (defaults: AnomalyDINO's scoring, equal-weight fusion).

    shots: reference images per class (0 = zero-shot only); seeds: one bank per seed.
    augment: views of each reference: "none" (1), "flip" (identity, horizontal, vertical: 3),
      "rot90" (0/90/180/270 degrees: 4), "dihedral" (the 4 rotations of the image and of its
      mirror: 8); plus one view per entry of `rotation_angles` (small rotations, degrees,
      bilinear, reflected borders). Bank rows = shots x views x patches (before the coreset).
    coreset_ratio: fraction of bank rows kept by PatchCore's greedy k-center (1 = all);
      coreset_projection_dim: random Gaussian projection before it (0 = none).
    block_size: bank rows per matmul block of the nearest-neighbour search.
    bank_dtype: storage and matmul dtype of the bank ("bfloat16" halves memory, inexact).
    image_score: "mean_top" (mean of the top `top_fraction` of patch scores) or "max".
    smoothing_sigma: Gaussian smoothing of the few-shot map in pixels (PatchCore: 4; 0 = off).
    fusion: "add" (zero-shot + fusion_weight * normalized few-shot) or "none" (few-shot only).
    shard_bank: split the bank's rows over every device of the mesh (for banks too large to
      replicate): each device compares all test patches with its rows, then a max across
      devices; default False: the bank is replicated and the test patches stay batch-split.
    """

    shots: int = 0
    seeds: tuple[int, ...] = (0,)
    augment: str = "none"
    rotation_angles: tuple[float, ...] = ()
    coreset_ratio: float = 1.0
    coreset_projection_dim: int = 128
    block_size: int = 4096
    bank_dtype: str = "float32"
    image_score: str = "mean_top"
    top_fraction: float = 0.01
    smoothing_sigma: float = 4.0
    fusion: str = "add"
    fusion_weight: float = 1.0
    shard_bank: bool = False

    def __post_init__(self):
        _choice("augment", self.augment, AUGMENTS)
        _choice("image_score", self.image_score, IMAGE_SCORES)
        _choice("fusion", self.fusion, FUSIONS)
        _choice("bank_dtype", self.bank_dtype, BANK_DTYPES)
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "rotation_angles", tuple(float(a) for a in self.rotation_angles))
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.coreset_projection_dim < 0 or self.block_size < 1:
            raise ValueError("coreset_projection_dim must be >= 0 and block_size >= 1, got "
                             f"{self.coreset_projection_dim} and {self.block_size}")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.smoothing_sigma < 0 or self.fusion_weight < 0:
            raise ValueError("smoothing_sigma and fusion_weight must be >= 0, got "
                             f"{self.smoothing_sigma} and {self.fusion_weight}")

    @property
    def views(self) -> int:
        """Views per reference image."""
        return AUGMENTS[self.augment] + len(self.rotation_angles)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["features_lmd"],
                   meta_fields=["rows", "shots", "seed", "augment", "rotation_angles",
                                "coreset_ratio"])
@dataclasses.dataclass(frozen=True)
class MemoryBank:
    """Unit-norm patch features per tapped layer (L, M, D), M >= `rows` (extra rows: padding copies
    of real rows, which leave every nearest-neighbour maximum unchanged). A pytree."""

    features_lmd: jax.Array
    rows: int
    shots: int
    seed: int
    augment: str = "none"
    rotation_angles: tuple[float, ...] = ()
    coreset_ratio: float = 1.0

    @property
    def nbytes(self) -> int:
        return int(self.features_lmd.size * self.features_lmd.dtype.itemsize)


# ---------------------------------------------------------------------------------------------
# Features and views




def _rotate(images_bhwc: jax.Array, degrees: float) -> jax.Array:
    """Rotation about the image centre, bilinear, borders reflected (no artificial fill)."""
    _, h, w, _ = images_bhwc.shape
    t = np.deg2rad(degrees)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    src_y = cy + np.cos(t) * (y - cy) - np.sin(t) * (x - cx)
    src_x = cx + np.sin(t) * (y - cy) + np.cos(t) * (x - cx)
    coords = [jnp.asarray(src_y, jnp.float32), jnp.asarray(src_x, jnp.float32)]
    one = lambda im_hw: jax.scipy.ndimage.map_coordinates(im_hw, coords, order=1, mode="reflect")  # noqa: E731
    return jax.vmap(jax.vmap(one, in_axes=-1, out_axes=-1))(images_bhwc)


def augment_views(images_bhwc: jax.Array, augment: str = "none",
                  rotation_angles: Sequence[float] = ()) -> list[jax.Array]:
    """The views of `FewShotConfig.augment` (+ one per small rotation); identity first.

    Quarter turns of a non-square image swap H and W; each view is a separate batch.
    """
    _choice("augment", augment, AUGMENTS)
    x = jnp.asarray(images_bhwc)
    quarter = lambda v, k: jnp.rot90(v, k, axes=(1, 2))  # noqa: E731
    if augment == "none":
        views = [x]
    elif augment == "flip":
        views = [x, x[:, :, ::-1], x[:, ::-1]]
    elif augment == "rot90":
        views = [quarter(x, k) for k in range(4)]
    else:
        views = [quarter(v, k) for v in (x, x[:, :, ::-1]) for k in range(4)]
    return views + [_rotate(x, a) for a in rotation_angles]


# ---------------------------------------------------------------------------------------------
# Building the bank


def greedy_coreset(x_md: jax.Array, count: int, start: int = 0) -> jax.Array:
    """Indices (count,) of PatchCore's greedy k-center selection: begin at `start`, then repeatedly
    take the row farthest (Euclidean) from everything taken so far (first index on ties)."""
    x = jnp.asarray(x_md, jnp.float32)
    if not 1 <= count <= x.shape[0]:
        raise ValueError(f"coreset size {count} must be between 1 and the {x.shape[0]} rows")
    return _greedy(x, int(count), jnp.int32(start))


@functools.partial(jax.jit, static_argnums=1)
def _greedy(x, count, start):
    dist = lambda i: jnp.sum(jnp.square(x - x[i]), axis=-1)  # noqa: E731

    def step(t, carry):
        d, idx = carry
        nxt = jnp.argmax(d).astype(jnp.int32)
        return jnp.minimum(d, dist(nxt)), idx.at[t].set(nxt)

    idx = jnp.zeros(count, jnp.int32).at[0].set(start)
    return jax.lax.fori_loop(1, count, step, (dist(start), idx))[1]


def coreset_indices(features_lmd: jax.Array, ratio: float, projection_dim: int = 128,
                    seed: int = 0) -> jax.Array:
    """Rows kept by the coreset: one index set for all layers, chosen on the layers' features
    concatenated (M, L*D), after a seeded Gaussian random projection to `projection_dim` dims
    (PatchCore projects too) when that is smaller; the start row is drawn with the seed."""
    n_layers, m, d = features_lmd.shape
    x = jnp.moveaxis(jnp.asarray(features_lmd, jnp.float32), 0, 1).reshape(m, n_layers * d)
    k_proj, k_start = jax.random.split(jax.random.key(seed))
    if 0 < projection_dim < x.shape[1]:
        w = jax.random.normal(k_proj, (x.shape[1], projection_dim)) / np.sqrt(projection_dim)
        x = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
    count = max(1, int(round(ratio * m)))
    return greedy_coreset(x, count, int(jax.random.randint(k_start, (), 0, m)))


def bank_from_features(views_lbnd: Sequence[jax.Array], config: FewShotConfig = FewShotConfig(),
                       *, shots: int | None = None, seed: int = 0) -> MemoryBank:
    """A bank from unit-norm features of every view, each (L, B, N_v, D); rows ordered
    (view, image, patch), then the coreset (if `config.coreset_ratio` < 1) and the dtype."""
    bank = jnp.concatenate([v.reshape(v.shape[0], -1, v.shape[-1]) for v in views_lbnd], axis=1)
    if config.coreset_ratio < 1:
        keep = coreset_indices(bank, config.coreset_ratio, config.coreset_projection_dim, seed)
        bank = bank[:, jnp.sort(keep)]
    return MemoryBank(bank.astype(config.bank_dtype), int(bank.shape[1]),
                      int(views_lbnd[0].shape[1] if shots is None else shots), int(seed),
                      config.augment, config.rotation_angles, config.coreset_ratio)




def shard_bank(bank: MemoryBank, mesh: Mesh, axes: str | tuple[str, ...] | None = None) -> MemoryBank:
    """The bank padded to a multiple of the shard count and split over `axes` of `mesh` (default:
    all axes) along its rows; query it with `patch_scores(..., mesh=mesh, axes=axes)`."""
    axes = tuple(mesh.axis_names) if axes is None else (axes,) if isinstance(axes, str) else axes
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    feats = np.asarray(_pad_rows(bank.features_lmd, -(-bank.features_lmd.shape[1] // shards) * shards))
    target = NamedSharding(mesh, PartitionSpec(None, axes, None))  # every process: its rows
    feats = jax.make_array_from_callback(feats.shape, target, lambda idx: feats[idx])
    return dataclasses.replace(bank, features_lmd=feats)


def _pad_rows(bank_lmd: jax.Array, m: int) -> jax.Array:
    """Pads to m rows with copies of row 0 (a maximum over rows is unchanged by duplicates)."""
    extra = m - bank_lmd.shape[1]
    if extra == 0:
        return bank_lmd
    return jnp.concatenate([bank_lmd, jnp.repeat(bank_lmd[:, :1], extra, axis=1)], axis=1)


# ---------------------------------------------------------------------------------------------
# Querying


def nearest_similarity(queries_lqd: jax.Array, bank_lmd: jax.Array, block_size: int = 4096) -> jax.Array:
    """max_m <q, bank[m]> per layer and query (L, Q): exact, a running max over blocks of rows
    (at most `block_size` columns of similarities live at once).

    fp32 banks multiply at HIGHEST precision; bf16 banks in bf16 with fp32 accumulation.
    """
    m = bank_lmd.shape[1]
    blk = min(block_size, m)
    n_full = m // blk
    q = queries_lqd.astype(bank_lmd.dtype)
    precision = jax.lax.Precision.HIGHEST if bank_lmd.dtype == jnp.float32 else None

    def block_max(b_lkd):
        sims = jnp.einsum("lqd,lkd->lqk", q, b_lkd, precision=precision,
                          preferred_element_type=jnp.float32)
        return sims.max(axis=-1)

    # Full blocks are sliced in place (no copy of the bank), the remainder is one static block.
    best = block_max(bank_lmd[:, :blk])
    if n_full > 1:
        def step(i, best):
            b_lkd = jax.lax.dynamic_slice_in_dim(bank_lmd, i * blk, blk, axis=1)
            return jnp.maximum(best, block_max(b_lkd))

        best = jax.lax.fori_loop(1, n_full, step, best)
    if m > n_full * blk:
        best = jnp.maximum(best, block_max(bank_lmd[:, n_full * blk :]))
    return best


def _sharded_similarity(queries_lqd, bank_lmd, block_size, mesh, axes):
    def local(q, b):
        return jax.lax.pmax(nearest_similarity(q, b, block_size), axes)

    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(None, axes, None)),
                         out_specs=PartitionSpec(), check_vma=False)(queries_lqd, bank_lmd)


def patch_scores(bank: MemoryBank, normed_patches_lbnd: jax.Array, *, block_size: int = 4096,
                 mesh: Mesh | None = None, axes: tuple[str, ...] | None = None) -> jax.Array:
    """Patch anomaly scores (B, N): 1 - max cosine similarity to the bank, averaged over layers.

    `normed_patches_lbnd` are unit-norm test features (`features`), layers in the bank's order.
    With `mesh`, the bank must come from `shard_bank(bank, mesh, axes)`.
    """
    _check(bank, normed_patches_lbnd)
    return _patch_scores(bank.features_lmd, normed_patches_lbnd, block_size, mesh, axes)


def _check(bank: MemoryBank, patches_lbnd) -> None:
    (n_layers, _, _, d), (bl, _, bd) = patches_lbnd.shape, bank.features_lmd.shape
    if (n_layers, d) != (bl, bd):
        raise ValueError(f"test features have {n_layers} layers of dim {d}; the bank {bl} of dim "
                         f"{bd} (build both with the same backbone and feature_layers)")


# Jitted on the bank's array only, so banks of other classes / seeds of the same size reuse it.
@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _patch_scores(bank_lmd, patches_lbnd, block_size, mesh, axes):
    n_layers, b, n, d = patches_lbnd.shape
    q = patches_lbnd.reshape(n_layers, b * n, d)
    if mesh is None:
        sims = nearest_similarity(q, bank_lmd, block_size)
    else:
        axes = tuple(mesh.axis_names) if axes is None else axes
        sims = _sharded_similarity(q, bank_lmd, block_size, mesh, axes)
    return (1.0 - sims).mean(axis=0).reshape(b, n)


def anomaly_maps(scores_bn: jax.Array, grid: tuple[int, int], out_size: tuple[int, int],
                 sigma: float = 0.0) -> jax.Array:
    """Patch scores (B, N) -> pixel maps (B, H, W): bilinear (align_corners=True) like the
    zero-shot maps, then an optional Gaussian of `sigma` pixels."""
    b = scores_bn.shape[0]
    maps = upsample_bilinear(scores_bn.reshape(b, *grid, 1), out_size)[..., 0]
    return gaussian_blur(maps, sigma) if sigma > 0 else maps


def image_scores(scores_bn: jax.Array, mode: str = "mean_top", top_fraction: float = 0.01) -> jax.Array:
    """(B,) from patch scores: mean of the top `top_fraction` (at least one patch) or the max."""
    _choice("image_score", mode, IMAGE_SCORES)
    if mode == "max":
        return scores_bn.max(axis=-1)
    k = max(1, int(scores_bn.shape[-1] * top_fraction))
    return jax.lax.top_k(scores_bn, k)[0].mean(axis=-1)




def predict_features(bank_lmd: jax.Array, normed_patches_lbnd: jax.Array, grid: tuple[int, int],
                     out_size: tuple[int, int], config: FewShotConfig = FewShotConfig(), *,
                     mesh: Mesh | None = None):
    """`predict` on the bank's array (a traceable function for a caller's jitted step, e.g.
    `inference.Predictor`, whose test features come from the head's backbone pass); with `mesh`,
    the bank is `shard_bank(bank, mesh)`'s (rows over all axes)."""
    return _predict(bank_lmd, normed_patches_lbnd, tuple(grid), tuple(out_size), config, mesh, None)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _predict(bank_lmd, patches_lbnd, grid, out_size, config, mesh, axes):
    s = _patch_scores(bank_lmd, patches_lbnd, config.block_size, mesh, axes)
    return (anomaly_maps(s, grid, out_size, config.smoothing_sigma),
            image_scores(s, config.image_score, config.top_fraction))


def fuse(zero_maps, zero_scores, fs_maps=None, fs_scores=None, mode: str = "add",
         weight: float = 1.0):
    """Final maps and scores from the zero-shot and few-shot branches.

    Zero-shot maps / scores are probabilities in [0, 1]; few-shot ones are 1 - cosine in [0, 2]
    and are normalized to [0, 1] by halving. "add": zero + weight * few / 2 (weight 1 = equal
    weights); "none": the few-shot result as it is. Without a bank (`fs_maps is None`) the
    zero-shot inputs are returned as they are (the very same arrays).
    """
    _choice("fusion", mode, FUSIONS)
    if fs_maps is None and fs_scores is None:
        return zero_maps, zero_scores
    if fs_maps is None or fs_scores is None:
        raise ValueError("give both few-shot maps and scores, or neither")
    if mode == "none":
        return fs_maps, fs_scores
    return zero_maps + weight * (fs_maps / 2), zero_scores + weight * (fs_scores / 2)
