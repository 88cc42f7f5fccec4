"""Shared test setup: fp32 'highest' matmul precision everywhere, CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
