"""A plain, un-sharded statement of the few-shot branch for tests: the bank from the tapped,
unit-norm patch tokens of every view of the references, and its maps and scores. The product
runs the same math through `runtime.inference.Predictor` on a mesh; tests compare the two."""

import jax.numpy as jnp
from flax import nnx

from addinov3_jax.models import fewshot
from addinov3_jax.models import model as ad


def features(backbone, images_bhwc, layers):
    """Unit-norm final-normed patch tokens (L, B, N, D) of `layers`, in that order."""
    return _features(backbone, jnp.asarray(images_bhwc, jnp.float32), tuple(layers))


@nnx.jit(static_argnums=2)  # one program per shape (eagerly, every call would compile the scan)
def _features(backbone, images_bhwc, layers):
    return ad.l2_normalize(ad.extract_taps(backbone, images_bhwc, layers)[0])


def build_bank(backbone, refs_khwc, layers, config, seed=0):
    views = [features(backbone, v, layers)
             for v in fewshot.augment_views(jnp.asarray(refs_khwc), config.augment,
                                            config.rotation_angles)]
    return fewshot.bank_from_features(views, config, shots=len(refs_khwc), seed=seed)


def predict(bank, patches_lbnd, grid, out_size, config):
    return fewshot.predict_features(bank.features_lmd, patches_lbnd, grid, out_size, config)
