"""bf16 vs fp32 on the demo setup: tiny towers, 128 px synthetic data, adapters trained (fp32,
cached features) on the auxiliary categories, zero-shot evaluation on the held-out ones with the
towers in fp32 and in bf16 (`compute_dtype`, bf16 parameters). Prints the map differences and
every metric for both. Image scores are `max` of the map: the demo's random tiny towers give an
image-independent global score (`softmax(g)[1]` constant to 1e-6), whose AUROC is tie noise.

    python benchmarks/bench_bf16.py --steps 300
"""

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from addinov3_jax import config, metrics
from addinov3_jax.data import pipeline, readers, synthetic
from addinov3_jax.models import clip_text, dinov3, losses
from addinov3_jax.models import model as ad


def load(root, classes, size):
    records, _ = readers.read("synthetic", root, classes=classes)
    src = pipeline.RecordSource(records)
    pre = pipeline.Preprocess(size=(size, size), classes=pipeline.class_words(src))
    return next(iter(pipeline.eval_dataset(src, pre, batch_size=len(src)))), pre.classes


def towers(dtype, image_score="max"):
    bb = dinov3.create("tiny", rngs=nnx.Rngs(0), compute_dtype=dtype, param_dtype=dtype)
    tt = clip_text.create("tiny", rngs=nnx.Rngs(1), compute_dtype=dtype)
    return ad.ADDinoV3(bb, tt, ad.HeadConfig(feature_layers=(0, 1, 2, 3),
                                                        image_score=image_score), rngs=nnx.Rngs(2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    c = config.demo_config()
    size = c.data.image_size
    root = synthetic.ensure(tempfile.mkdtemp() + "/synthetic")
    train, _ = load(root, c.data.classes, size)
    test, words = load(root, c.eval.classes, size)
    grid = (size // 16,) * 2

    m32 = towers(jnp.float32)
    text32 = jnp.asarray(m32.text_features(["object"]))[0]  # the demo's fixed class word
    patches, cls = m32.features(jnp.asarray(train["image"]))
    params = ad.trainable_params(m32)
    opt = optax.adamw(args.lr, weight_decay=1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state, idx):
        def loss_fn(p):
            out = ad.head(p, patches[:, idx], cls[:, idx], jnp.broadcast_to(text32, (len(idx),
                          *text32.shape)), grid, (size, size), m32.config)
            return losses.total(out, jnp.asarray(train["mask"])[idx],
                                jnp.asarray(train["label"])[idx])["loss"]
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    rng = np.random.default_rng(0)
    for _ in range(args.steps):
        params, state, loss = step(params, state, rng.permutation(len(train["label"]))[: args.batch])
    print(f"trained {args.steps} steps on {len(train['label'])} auxiliary images, "
          f"final loss {float(loss):.4f}")

    results = {}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        m = towers(dtype)
        ad.set_trainable_params(m, params)
        text = jnp.asarray(m.text_features(["object"]))
        maps, scores = m.predict(jnp.asarray(test["image"]), "object",
                                 text_be2=jnp.broadcast_to(text, (len(test["label"]), *text.shape[1:])))
        results[name] = (np.asarray(maps), np.asarray(scores))
    (a, sa), (b, sb) = results["fp32"], results["bf16"]
    print("distinct image scores: fp32", len(np.unique(sa)), "bf16", len(np.unique(sb)),
          "of", len(sa), "; range", sa.min(), sa.max())
    d = np.abs(a - b)
    print(f"{len(test['label'])} held-out images ({', '.join(words)}), {size}x{size}: "
          f"|map bf16 - map fp32| max {d.max():.2e}, mean {d.mean():.2e}; "
          f"|score diff| max {np.abs(sa - sb).max():.2e}")
    keys = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
            "pixel_aupro")
    rows = {}
    for name, (maps, scores) in results.items():
        per = []
        for cidx in range(len(words)):
            sel = test["class_id"] == cidx
            pm = metrics.pixel_metrics(test["mask"][sel].astype(np.uint8), maps[sel])
            im = metrics.classification_metrics(test["label"][sel], scores[sel])
            per.append([im["auroc"], im["ap"], im["f1_max"], pm["auroc"], pm["ap"], pm["f1_max"],
                        pm["aupro"]])
        rows[name] = 100 * np.mean(per, axis=0)
    print(f"{'mean over categories (x100)':<28}" + "".join(f"{k:>13}" for k in keys))
    for name in ("fp32", "bf16"):
        print(f"{name:<28}" + "".join(f"{v:>13.2f}" for v in rows[name]))
    print(f"{'|bf16 - fp32| (points)':<28}" + "".join(
        f"{v:>13.2f}" for v in np.abs(rows["bf16"] - rows["fp32"])))


if __name__ == "__main__":
    main()
