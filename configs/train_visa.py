"""Train AD-DINOv3 on the VisA test split (all 12 classes); evaluate zero-shot elsewhere.

    addinov3 train --config configs/train_visa.py --workdir runs/visa \
        --config.model.backbone=ckpt/dinov3_vitl16 --config.model.text_tower=ckpt/clip_l14_336 \
        --config.data.root=/data/VisA_20220922

Override an evaluation root with `--config.eval.datasets.NAME.root=PATH`.
`--config=configs/train_visa.py:tiny` shrinks everything (random tiny towers, 64 px, 2 epochs).
"""

import ml_collections

from addinov3_jax import config


def get_config(arg: str = ""):
    config.check_arg(arg, ("", "tiny"), __file__)
    c = config.base_config()
    c.data.name = "visa"
    c.data.root = "data/VisA_20220922"
    c.eval.datasets = ml_collections.ConfigDict({
        "mvtec": config.dataset_entry("data/mvtec_anomaly_detection"),
        "btad": config.dataset_entry("data/BTech_Dataset_transformed"),
        "mpdd": config.dataset_entry("data/MPDD"),
    })
    if arg == "tiny":
        config.shrink(c)
    return c
