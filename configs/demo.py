"""The synthetic tiny configuration that `addinov3 demo` runs (no downloads).

    addinov3 train --config configs/demo.py --workdir runs/demo
    addinov3 eval --config configs/demo.py --workdir runs/demo

Trains the adapters of a random-init tiny DINOv3 + tiny CLIP text tower on three synthetic
categories and evaluates zero-shot on the three held-out ones. The synthetic data is generated
into `data.root` when missing.
"""

from addinov3_jax import config


def get_config(arg: str = ""):
    return config.demo_config(arg)
