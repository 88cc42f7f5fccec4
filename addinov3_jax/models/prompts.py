"""The AD-DINOv3 prompt ensemble and its (normal, abnormal) text prototypes.

For an object word: 7 normal states and 5 abnormal states, each filled into 35 templates
(state-major), encoded by the frozen text tower, L2-normalised, averaged per group and normalised
again -> a (E, 2) matrix [normal, abnormal] (shared/reference/clip_text.md §5). The tower is
frozen, so this depends only on the word: it is computed once per class (all classes in one jitted
call; `io.text_cache` keeps it on disk), never per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw",
                 "{} without defect", "{} without damage")
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.",
    "a photo of my {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.",
    "a photo of a large {}.", "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
)
NUM_NORMAL = len(NORMAL_STATES) * len(TEMPLATES)  # 245
NUM_ABNORMAL = len(ABNORMAL_STATES) * len(TEMPLATES)  # 175


def sentences(word: str) -> list[str]:
    """The 420 sentences for `word`: 245 normal then 175 abnormal, state-major."""
    return [t.format(s.format(word)) for states in (NORMAL_STATES, ABNORMAL_STATES)
            for s in states for t in TEMPLATES]


def prototypes(embeddings_ne: jax.Array) -> jax.Array:
    """(420, E) normalised sentence embeddings -> (E, 2) [normal, abnormal] prototypes."""
    e = embeddings_ne / jnp.linalg.norm(embeddings_ne, axis=-1, keepdims=True)
    groups = (e[:NUM_NORMAL].mean(0), e[NUM_NORMAL:].mean(0))
    return jnp.stack([g / jnp.linalg.norm(g) for g in groups], axis=-1)


@nnx.jit(static_argnames="chunk")
def _encode_classes(model, ids_cst: jax.Array, chunk: int) -> jax.Array:
    """(C, 420, T) ids -> (C, E, 2), encoding `chunk` sentences at a time with `lax.map`."""
    c, s, t = ids_cst.shape
    flat = ids_cst.reshape(-1, t)
    pad = (-flat.shape[0]) % chunk
    flat = jnp.concatenate([flat, jnp.broadcast_to(flat[:1], (pad, t))])
    emb = jax.lax.map(model.encode, flat.reshape(-1, chunk, t)).reshape(-1, model.config.embed_dim)
    return jax.vmap(prototypes)(emb[: c * s].reshape(c, s, -1))


def text_features(model, class_names: Sequence[str], *, tokenizer=None, full_context: bool = False,
                  chunk: int = 512) -> np.ndarray:
    """(C, E, 2) prototypes [normal, abnormal] for each object word in `class_names` (all in one
    jitted call; `io.text_cache.text_features` adds the on-disk cache).

    Args:
      model: a `clip_text.TextTower`.
      tokenizer: defaults to the one stored with the weights, else the default vocabulary.
      full_context: run at the full 77-token context like the reference code. By default the
        context is cut to the longest sentence (identical up to fp32 rounding thanks to the causal
        mask, and several times faster).
    """
    from addinov3_jax.models import clip_text

    tokenizer = tokenizer or clip_text.load_tokenizer(model.tokenizer_dir)
    words = list(dict.fromkeys(class_names))
    ids = np.stack([tokenizer(sentences(w), model.config.context_length) for w in words])
    if not full_context:  # (C, 420, 77) cut to the longest sentence, a multiple of 8
        length = int((ids != 0).sum(-1).max())
        ids = ids[..., : min(model.config.context_length, -(-length // 8) * 8)]
    feats = np.asarray(_encode_classes(model, jnp.asarray(ids),
                                       min(chunk, ids.size // ids.shape[-1])))
    return feats[[words.index(w) for w in class_names]]
