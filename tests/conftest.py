"""Shared test setup: fp32 'highest' matmul precision everywhere, CPU only, JAX's persistent
compilation cache (shared with the subprocess tests), and the fixtures several files use."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight simulated CPU devices for the sharded training tests (must precede the JAX import).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Compiled programs are cached on disk (git-ignored build dir): a step compiled by one test, by a
# subprocess or by the previous run is loaded, not recompiled. Environment variables, so that the
# subprocesses the tests start use the same cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / "build" / "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The subprocesses compute like this process (a run resumed in-process from a killed
# subprocess's checkpoint must be bitwise the uninterrupted one).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """`synthetic_data(categories, **options)`: the root of a synthetic dataset (MVTec layout,
    `data.synthetic.generate`), generated once per (categories, options) in a session (one xdist
    worker) and shared by every test that asks for the same one."""
    from addinov3_jax.data import synthetic

    made = {}

    def make(categories=None, **options):
        categories = tuple(categories or synthetic.CATEGORIES)
        key = (categories, tuple(sorted(options.items())))
        if key not in made:
            root = tmp_path_factory.mktemp("synthetic") / "synthetic"
            made[key] = synthetic.generate(root, categories=categories, **options)
        return made[key]

    return make


# The two datasets most tests share: tests that train on the same data at the same size also
# share compiled steps through the persistent compilation cache.
TRAIN_DATA = dict(categories=("marble", "washer"), size=64, normal=3, per_defect=2)
EVAL_DATA = dict(categories=("pill", "weave"), size=64, normal=3, per_defect=2, train_normal=3)


@pytest.fixture(scope="session")
def train_data(synthetic_data):
    """Two auxiliary categories (18 images at 64 px) for the training tests."""
    return synthetic_data(**TRAIN_DATA)


@pytest.fixture(scope="session")
def eval_data(synthetic_data):
    """Two held-out categories (test split and 3 train/good images each, 64 px) for the
    evaluation, few-shot and sharding tests."""
    return synthetic_data(**EVAL_DATA)


def tiny_model():
    """The tiny random AD-DINOv3 (backbone seed 0, text tower seed 1, adapters seed 2; taps 0-3):
    the towers a run with seed 0 builds from the demo config."""
    from flax import nnx

    from addinov3_jax.models import clip_text, dinov3
    from addinov3_jax.models import model as ad

    backbone = dinov3.create("tiny", rngs=nnx.Rngs(0))
    text = clip_text.create("tiny", rngs=nnx.Rngs(1))
    return ad.ADDinoV3(backbone, text, ad.HeadConfig(feature_layers=(0, 1, 2, 3)), rngs=nnx.Rngs(2))


@pytest.fixture(scope="module")
def tiny():
    """`tiny_model()` for the eval tests (one per test file: tests may change its adapters)."""
    return tiny_model()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny):
    """The `tiny` model saved as a model directory (what `predict`, `calibrate`, `export` load)."""
    from addinov3_jax.io import model_dir as model_io

    path = tmp_path_factory.mktemp("tiny_model") / "model"
    model_io.save(tiny, path)
    return path


@pytest.fixture(scope="session")
def tiny_towers(tmp_path_factory):
    """`tiny_model()` saved as a model directory, whose converted `backbone/` and `text_tower/` the
    training tests pass as `model.backbone` / `model.text_tower` (`runs.tiny_config(...,
    towers=)`): read shard by shard on any mesh in 0.2 s, where the random init compiles for 3-4 s
    per tower on every new mesh and in every new process. The random init on a mesh draws these
    same weights (test_sharding.py); test_train.py keeps one run on random towers."""
    from addinov3_jax.io import model_dir as model_io

    return model_io.save(tiny_model(), tmp_path_factory.mktemp("tiny_towers") / "model")


@pytest.fixture(scope="session")
def mixing_model_dir(tmp_path_factory):
    """A tiny model directory whose blocks mix the tokens (the sharding and multi-process
    evaluation tests compare metrics, which need scores that differ between images)."""
    import jax.numpy as jnp

    from addinov3_jax.io import model_dir as model_io

    model = tiny_model()
    # LayerScale 1 instead of the 1e-5 init: the random blocks then mix the tokens, so that image
    # scores differ between images (with 1e-5 they tie up to rounding and AUROC is noise).
    for ls in (model.backbone.blocks.ls1, model.backbone.blocks.ls2):
        ls.set_value(jnp.ones_like(ls[...]))
    return model_io.save(model, tmp_path_factory.mktemp("scale_model") / "model")


# The order in which `make test` hands whole files to its two workers (`--no-loadscope-reorder`;
# xdist would otherwise order files by their number of tests). Measured, not alphabetical: a
# file one test long but 20 s (bf16) goes first, the files that compile the training and
# evaluation steps run before the files that reuse them from the persistent compilation cache
# (sharding, checkpointing, distributed, the demo in evaluate), and short files come last, so
# that neither worker idles at the end. A file not listed runs after these.
FILE_ORDER = ("bf16", "attention", "data", "first_hour", "dinov3", "cli", "fewshot", "metrics",
              "calibration", "model", "tokenizer", "clip_text", "export", "config", "predict",
              "sharding", "checkpointing", "distributed", "fewshot_eval", "evaluate", "plots",
              "benchmarks", "train", "report", "convert", "plan", "readme")


def pytest_collection_modifyitems(items):
    rank = {f"test_{name}.py": i for i, name in enumerate(FILE_ORDER)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: test order kept
