"""The synthetic tiny configuration that `addinov3 demo` runs (no downloads).

    addinov3 train --config configs/demo.py --workdir runs/demo
    addinov3 eval --config configs/demo.py --workdir runs/demo
    addinov3 predict --checkpoint runs/demo --class-name object photos/ --output out/

Trains the adapters of a random-init tiny DINOv3 + tiny CLIP text tower on
6 synthetic categories (`config.AUXILIARY`) and evaluates zero-shot on the
4 held-out ones (`config.HELD_OUT`). Every class is prompted with the one word "object" (`model.class_name`),
which is therefore the `--class-name` the trained model knows. The synthetic data is generated
into `data.root` (`demo_data/synthetic`, relative to the current folder) when missing;
`configs/demo.py` is found from any folder of a source checkout.
"""

from addinov3_jax import config


def get_config(arg: str = ""):
    return config.demo_config(arg)
