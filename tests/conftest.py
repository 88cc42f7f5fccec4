"""Shared test setup: fp32 'highest' matmul precision everywhere, CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight simulated CPU devices for the sharded training tests (must precede the JAX import).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
