"""Train AD-DINOv3 on the MVTec AD test split (all 15 classes); evaluate zero-shot on VisA.

    addinov3 train --config configs/train_mvtec.py --workdir runs/mvtec \
        --config.model.backbone=ckpt/dinov3_vitl16 --config.model.text_tower=ckpt/clip_l14_336 \
        --config.data.root=/data/mvtec_anomaly_detection

Override an evaluation root with `--config.eval.datasets.NAME.root=PATH`.
`--config=configs/train_mvtec.py:tiny` shrinks everything (random tiny towers, 64 px, 2 epochs).
"""

import ml_collections

from addinov3_jax import config


def get_config(arg: str = ""):
    config.check_arg(arg, ("", "tiny"), __file__)
    c = config.base_config()
    c.data.name = "mvtec"
    c.data.root = "data/mvtec_anomaly_detection"
    c.eval.datasets = ml_collections.ConfigDict(
        {"visa": config.dataset_entry("data/VisA_20220922")})
    if arg == "tiny":
        config.shrink(c)
    return c
