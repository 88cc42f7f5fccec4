"""Helpers of the training, checkpointing and multi-process tests: the tiny training config on
conftest's `train_data`, the `addinov3 train` command for it, and comparisons of results."""

import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from addinov3_jax import config as config_lib

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("marble", "washer")  # conftest.TRAIN_DATA


def tiny_config(root, towers=None, **train_overrides):
    """The demo config on `root` (`CLASSES`, 64 px, 3 epochs, a checkpoint every 4 steps), on the
    converted towers in `towers` (conftest's `tiny_towers`) or else the random tiny ones."""
    c = config_lib.demo_config()
    if towers:
        c.model.backbone = str(Path(towers) / "backbone")
        c.model.text_tower = str(Path(towers) / "text_tower")
    c.data.root = str(root)
    c.data.classes = CLASSES
    c.data.image_size = 64
    c.train.epochs = 3
    c.train.log_every = 1
    c.train.checkpoint_every = 4
    for k, v in train_overrides.items():
        setattr(c.train, k, v)
    return c


def final_params(workdir):
    """The trained adapters of a finished run."""
    return load_file(str(Path(workdir) / "model" / "adapters" / "params.safetensors"))


def train_args(data, towers, workdir, epochs=4):
    """`addinov3 train` on conftest's `train_data` and `tiny_towers`: the same command in-process
    (`cli.main`) or as a subprocess (`train_cmd`), where a process boundary is the point (a kill,
    a Ctrl-C, several processes)."""
    return ["train", "--config", str(REPO / "configs" / "demo.py"), "--workdir", str(workdir),
            f"--config.data.root={data}", f"--config.data.classes={CLASSES!r}",
            f"--config.model.backbone={Path(towers) / 'backbone'}",
            f"--config.model.text_tower={Path(towers) / 'text_tower'}",
            "--config.data.image_size=64", f"--config.train.epochs={epochs}",
            "--config.train.checkpoint_every=2", "--config.train.log_every=1"]


def train_cmd(data, towers, workdir, epochs=4):
    return [sys.executable, "-m", "addinov3_jax.commands.cli", *train_args(data, towers, workdir, epochs)]


def results_metrics(results):
    """Every number of a results.json, by (dataset, category, metric)."""
    return {(d, c, k): v for d, e in results["datasets"].items()
            for c, row in e["categories"].items() for k, v in row.items()}


def assert_same_results(a, b, atol=1e-6):
    ma, mb = results_metrics(a), results_metrics(b)
    assert ma.keys() == mb.keys()
    for k in ma:
        np.testing.assert_allclose(ma[k], mb[k], atol=atol, rtol=0, err_msg=str(k))
