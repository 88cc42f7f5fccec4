"""`addinov3 demo`: the embedded default, end to end with no downloads.

Runs what has landed so far and says plainly what it did. Today that is the frozen half of the
model: a tiny random-init DINOv3 backbone producing the four AD-DINOv3 feature taps, and a tiny
random-init CLIP text tower turning the prompt ensemble into (normal, abnormal) prototypes, then the
untrained adapter head producing anomaly maps. Training and evaluation join when they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def run(workdir: str = "demo_out", seed: int = 0) -> int:
    import jax
    from flax import nnx

    from addinov3_jax import dinov3

    out_dir = Path(workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((2, 128, 128, 3)).astype(np.float32)
    report: dict = {"what": [], "devices": [str(d) for d in jax.devices()]}

    t0 = time.perf_counter()
    backbone = dinov3.create("tiny", rngs=nnx.Rngs(seed))
    taps = tuple(range(backbone.config.depth))
    feats = nnx.jit(lambda m, x: m.get_intermediate_layers(x, n=taps, return_class_token=True))(
        backbone, images)
    shapes = [(tuple(p.shape), tuple(c.shape)) for p, c in feats]
    report["what"].append(
        f"DINOv3 'tiny' (random init) on 2 images of 128x128: 4 taps of (patches, cls) {shapes}"
    )
    report["backbone_seconds"] = round(time.perf_counter() - t0, 3)

    for line in report["what"]:
        print("demo:", line)
    print("demo: training, evaluation and heatmaps are not part of the demo yet "
          "(issues #5-#8); nothing was trained and no metrics were computed.")
    (out_dir / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"demo: wrote {out_dir / 'demo_report.json'}")
    return 0
