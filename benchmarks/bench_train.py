"""Training-step cost per image at the paper sizes (ViT-L/16 + ViT-L/14 text, 512x512, random
weights, CPU) vs the official step structure (per-image backbone, 420 prompts re-encoded per
image), and the epoch time with vs without the feature cache (extrapolated to the 2,162-image
VisA test split from per-image costs measured in this run). Ours is the product's own steps
(`Runtime.feature_step`, `Runtime.train_step` on a `TrainState`), on one device.

    python benchmarks/bench_train.py --batch 4
    python benchmarks/bench_train.py --smoke    # tiny towers, 64 px, no PyTorch reference: seconds
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _timing import interleaved
from flax import nnx

from addinov3_jax import config as config_lib
from addinov3_jax.models import sharding
from addinov3_jax.runtime import setup, steps


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--epoch-images", type=int, default=2162)
    ap.add_argument("--reps", type=int, default=3, help="timed calls of each step (the minimum is used)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny towers at 64 px, without the PyTorch reference (a check, not a number)")
    args = ap.parse_args(argv)

    cfg = config_lib.base_config()  # the paper's towers and taps
    if args.smoke:
        cfg.model.backbone = cfg.model.text_tower = "tiny"
        cfg.model.feature_layers, args.size, args.batch = (0, 1, 2, 3), 64, 2
    cfg.data.image_size = args.size
    cfg.mesh.data = 1  # one device
    rt = setup.setup(cfg)
    mesh, rules = rt.mesh, rt.rules
    backbone = setup.backbone(cfg.model, mesh, rules, cfg.seed)  # the text tower is not needed
    graphdef, bb_state = nnx.split(backbone)
    text_dim = setup.text_dim(cfg.model)
    b, n = args.batch, args.epoch_images
    tx, _ = steps.make_optimizer(cfg, cfg.train.epochs * max(n // b, 1))
    state, state_shardings = steps.init_train_state(rt.adapters_fn(text_dim), tx, mesh, rules)
    features, train_step = rt.feature_step(graphdef), rt.train_step(tx, state_shardings)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, args.size, args.size, 3)).astype(np.float32)
    frozen = {"text": jnp.asarray(rng.standard_normal((b, text_dim, 2)).astype(np.float32))}
    batch = rt.global_batch({"mask": (rng.random((b, args.size, args.size)) > 0.95).astype(np.float32),
                             "label": np.ones((b,), np.int32), "class_id": np.arange(b, dtype=np.int32)},
                            {"mask": 0, "label": 0, "class_id": 0})
    images = rt.global_batch({"image": x}, {"image": 0})["image"]
    with sharding.use(mesh, rules):
        batch["patches"], batch["cls"] = features(bb_state, images)

        def head_step():
            nonlocal state
            state, terms = jax.block_until_ready(train_step(state, frozen, batch))
            return terms

        # one warm-up call of each (the compilation), then the timed calls
        warm, times = interleaved({"features": lambda: jax.block_until_ready(features(bb_state, images)),
                                   "head": head_step}, 1 if args.smoke else args.reps)
        terms = warm["head"]
        feat_s, head_s = ([t / b for t in times[k]] for k in ("features", "head"))
        t_feat, t_head = min(feat_s), min(head_s)
    if not np.isfinite(float(terms["loss"])):
        raise RuntimeError(f"train step loss is {float(terms['loss'])}")
    ours = t_feat + t_head
    print(f"ours per image: features {t_feat:.2f} s + head step {t_head:.3f} s = {ours:.2f} s "
          f"(min of {len(feat_s)}; median {np.median(feat_s):.2f} s + {np.median(head_s):.3f} s)")
    if not args.smoke:
        import _official

        t_bb, t_tx = _official.per_image_seconds(args.size)
        official = t_bb + t_tx  # + the head's forward / backward, not counted (favours the official)
        print(f"official structure per image: backbone {t_bb:.2f} s + 420 prompts {t_tx:.2f} s = "
              f"{official:.2f} s (head excluded)")
        print(f"ratio per image, uncached: {official / ours:.1f}x; with the feature cache "
              f"(epochs after the first): {official / t_head:.0f}x")
    print(f"epoch over {n} images: without cache {n * ours / 60:.1f} min, with cache "
          f"{n * t_head / 60:.2f} min (+ a one-off {n * t_feat / 60:.1f} min to fill it)")


if __name__ == "__main__":
    main()
