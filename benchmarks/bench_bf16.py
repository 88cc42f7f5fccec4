"""bf16 vs fp32 on the demo setup: tiny towers, 128 px synthetic data, adapters trained (fp32,
cached features) on the auxiliary categories, zero-shot evaluation on the held-out ones with the
towers in fp32 and in bf16 (`compute_dtype`, bf16 parameters). Prints the map differences and
every metric for both. Image scores are `max` of the map: the demo's random tiny towers give an
image-independent global score (`softmax(g)[1]` constant to 1e-6), whose AUROC is tie noise.
Training and prediction run the product's steps on one device: the demo config's
`Runtime.feature_step` filling a device `FeatureCache`, `Runtime.train_step` on a `TrainState`
(constant learning rate, no warm-up), and `Predictor`.

    python benchmarks/bench_bf16.py --steps 300
    python benchmarks/bench_bf16.py --smoke    # 2 steps at 64 px: seconds
"""

import argparse
import tempfile

import jax.numpy as jnp
import numpy as np
from flax import nnx

from addinov3_jax import config, metrics
from addinov3_jax.data import pipeline, readers, synthetic
from addinov3_jax.models import clip_text, dinov3, sharding
from addinov3_jax.models import model as ad
from addinov3_jax.runtime import distributed, feature_cache, setup, steps
from addinov3_jax.runtime.inference import Predictor


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


def train_adapters(rt, model, data, table, steps_, batch, seed=0):
    """Adapters trained by the product's steps on a device cache of `model`'s features (fp32),
    from the run's initial adapters; returns (params, last loss)."""
    mesh, rules, t = rt.mesh, rt.rules, rt.config.train
    tx, _ = steps.make_optimizer(rt.config, steps_)
    state, shardings = steps.init_train_state(rt.adapters_fn(model.text_dim), tx, mesh, rules)
    features, train_step = rt.feature_step(nnx.graphdef(model.backbone)), rt.train_step(tx, shardings)
    n = len(data["label"])
    images = rt.global_batch({"image": data["image"]}, {"image": 0})["image"]
    with sharding.use(mesh, rules):
        patches, cls = features(nnx.state(model.backbone), images)
    cache = feature_cache.FeatureCache(n, patches.shape[0], patches.shape[2], patches.shape[3],
                                       rt.image_size, "device", t.feature_cache_dtype)
    cache.write(np.arange(n), distributed.gather(patches), distributed.gather(cls),
                {"mask": data["mask"], "label": data["label"], "class_id": np.zeros(n, np.int32)})
    cache.finalize(mesh, rules)
    frozen = {"text": jnp.asarray(table)}
    rng = np.random.default_rng(seed)
    with sharding.use(mesh, rules):
        for _ in range(steps_):
            state, terms = train_step(state, frozen, cache.lookup(rng.permutation(n)[:batch]))
    return state.params, float(terms["loss"])


def runtime(lr: float, size: int):
    """The demo config on one device: constant `lr`, images of `size`, image score `max`."""
    c = config.demo_config()
    c.model.image_score = "max"
    c.train.lr, c.train.warmup_fraction = lr, 0.0
    c.data.image_size = size
    c.mesh.data = 1
    return setup.setup(c)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--smoke", action="store_true", help="2 steps at 64 px (a check, not a number)")
    args = ap.parse_args(argv)
    c = config.demo_config()
    aux, held_out, size = c.data.classes, c.eval.datasets.synthetic.classes, c.data.image_size
    root = tempfile.mkdtemp() + "/synthetic"
    if args.smoke:
        aux, held_out, size, args.steps = aux[:2], held_out[:2], 64, 2
        root = synthetic.generate(root, categories=aux + held_out, size=size, normal=2,
                                  per_defect=2, train_normal=0)
    else:
        root = synthetic.ensure(root)
    rt = runtime(args.lr, size)
    train, _ = load(root, aux, size)
    test, words = load(root, held_out, size)

    m32 = towers(jnp.float32)
    table = m32.text_features(["object"])  # the demo's fixed class word: (1, E, 2)
    params, loss = train_adapters(rt, m32, train, table, args.steps, args.batch)
    print(f"trained {args.steps} steps on {len(train['label'])} auxiliary images, "
          f"final loss {loss:.4f}")

    results = {}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        m = m32 if name == "fp32" else towers(dtype)
        ad.set_trainable_params(m, params)
        predictor = Predictor(m, rt.mesh, rt.rules)
        maps, scores = predictor(test["image"], np.zeros(len(test["label"]), np.int32),
                                 predictor.text_table(["object"]))
        results[name] = (distributed.gather(maps), distributed.gather(scores))
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
