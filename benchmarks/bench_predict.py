"""`predict` throughput at the paper sizes (DINOv3 ViT-L/16 + CLIP ViT-L/14 text, 512x512, CPU,
random weights) vs the official pipeline's structure (one image at a time through the backbone
plus 420 prompt encodings per image, PyTorch), same run, as a ratio. Ours is `model.predict`,
i.e. `model.predict_step`, the computation the `Predictor`'s steps jit.

    python benchmarks/bench_predict.py --batch 4
    python benchmarks/bench_predict.py --smoke    # tiny towers, 64 px, no PyTorch reference
"""

import argparse
import time

import numpy as np
from flax import nnx

from addinov3_jax.models import clip_text, dinov3
from addinov3_jax.models import model as ad


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny towers at 64 px, without the PyTorch reference (a check, not a number)")
    args = ap.parse_args(argv)
    if args.smoke:
        model = ad.ADDinoV3(dinov3.create("tiny", rngs=nnx.Rngs(0)),
                            clip_text.create("tiny", rngs=nnx.Rngs(1)),
                            ad.HeadConfig(feature_layers=(0, 1, 2, 3)), rngs=nnx.Rngs(2))
        args.size, args.batch = 64, 2
    else:
        model = ad.ADDinoV3(dinov3.create("vitl16", rngs=nnx.Rngs(0)),
                            clip_text.create("vitl14_336", activation="gelu", rngs=nnx.Rngs(1)),
                            rngs=nnx.Rngs(2))
    t0 = time.perf_counter()
    text = model.text_features(["bottle"])
    t_text = time.perf_counter() - t0
    x = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    tb = np.repeat(text, args.batch, 0)
    maps, _ = model.predict(x, "bottle", text_be2=tb)  # compile
    maps.block_until_ready()
    t0 = time.perf_counter()
    model.predict(x, "bottle", text_be2=tb)[0].block_until_ready()
    ours = (time.perf_counter() - t0) / args.batch
    print(f"ours: {ours:.2f} s/image ({1 / ours:.2f} images/s) at batch {args.batch}; text "
          f"prototypes once per class: {t_text:.1f} s (incl. compile)")
    if args.smoke:
        return
    import _official

    t_bb, t_tx = _official.per_image_seconds(args.size)
    official = t_bb + t_tx
    print(f"official structure: {official:.2f} s/image (backbone {t_bb:.2f} s + 420 prompts "
          f"{t_tx:.2f} s)")
    print(f"ratio: {official / ours:.1f}x")


if __name__ == "__main__":
    main()
