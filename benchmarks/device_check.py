"""The accelerator numbers, in one command (random weights at the real sizes, no downloads).

    python benchmarks/device_check.py --out device_check.json          # GPU / TPU: < 8 min on an H200
    python benchmarks/device_check.py --cpu-smoke --out smoke.json     # the reduced run (tests)

Measures, for the detected platform:
* DINOv3 ViT-L/16 512x512 frozen feature forward (the 4 taps, final norm, standardisation) in
  bf16 at batch 32 and 64: images/s, model FLOPs utilisation (FLOPs from XLA's cost analysis of
  the unrolled forward, peak from `PEAK_BF16_TFLOPS`), compile times, and the same at batch 64
  with XLA attention instead of the automatic choice (cuDNN flash attention on GPU);
* feature-cache fill: host images -> device -> features -> host bf16 arrays, images/s;
* the cached training step (adapters + AACM head, losses, AdamW) at batch 64, images/s;
* end-to-end evaluation on a few hundred synthetic PNGs: grain decoding (auto worker count),
  the jitted inference map, and pixel / image metrics per category, images/s;
* peak device memory (`device.memory_stats()`, where the platform reports it).

On CPU (and with `--cpu-smoke`) a reduced version runs: small towers and images, 1-2 iterations.
Prints a table and writes JSON: `device_kind`, `peak_tflops`, `platform`, `jax_version`, `date`,
`measurements` (a list of `{name, value, unit, batch, dtype, image_size, ...}`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Dense (no sparsity) bf16 peak TFLOP/s per chip, vendor data sheets. First match of a substring of
# the lower-cased `device_kind` wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("gh200", 989.4), ("h200", 989.4), ("h100 pcie", 756.0), ("h100", 989.4), ("h800", 989.4),
    ("b200", 2250.0), ("a100", 312.0), ("a800", 312.0), ("l40s", 362.1), ("l40", 181.0),
    ("l4", 121.0), ("a10", 125.0), ("v100", 125.0),  # V100: fp16 tensor cores (no bf16)
    ("tpu v6", 918.0), ("tpu7", 2307.0), ("tpu v5 lite", 197.0), ("tpu v5e", 197.0),
    ("tpu v5p", 459.0), ("tpu v5", 459.0), ("tpu v4", 275.0), ("tpu v3", 123.0),
)

PROFILES = {
    # Accelerators: the paper configuration.
    "full": dict(backbone="vitl16", taps=(5, 11, 17, 23), text_dim=768, image_size=512,
                 batches=(32, 64), xla_batch=64, iters=10, cache_batch=32, cache_batches=4,
                 train_batch=64, train_iters=20, eval_batch=32, eval_base=2, eval_copies=10),
    # CPU without --cpu-smoke: a small real variant.
    "cpu": dict(backbone="vits16", taps=(2, 5, 8, 11), text_dim=512, image_size=224,
                batches=(4,), xla_batch=None, iters=2, cache_batch=4, cache_batches=2,
                train_batch=8, train_iters=2, eval_batch=8, eval_base=1, eval_copies=2),
    # --cpu-smoke: seconds, for the test suite.
    "smoke": dict(backbone="tiny", taps=(0, 1, 2, 3), text_dim=64, image_size=64,
                  batches=(2,), xla_batch=None, iters=2, cache_batch=2, cache_batches=2,
                  train_batch=4, train_iters=2, eval_batch=8, eval_base=1, eval_copies=1),
}
EVAL_CATEGORIES = ("weave", "marble", "pill", "washer")


def peak_tflops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((v for k, v in PEAK_BF16_TFLOPS if k in kind), None)


class Recorder:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name, value, unit, *, batch=None, dtype=None, image_size=None, **extra):
        row = {"name": name, "value": float(value), "unit": unit, "batch": batch, "dtype": dtype,
               "image_size": image_size, **extra}
        self.rows.append(row)
        notes = ", ".join(f"{k}={_fmt(v)}" for k, v in extra.items())
        print(f"{name:<30}{_fmt(value):>12} {unit:<9}{batch if batch is not None else '':>6} "
              f"{dtype or '':>9} {image_size if image_size is not None else '':>5}  {notes}",
              flush=True)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def peak_memory_gib(device):
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**30


def timed(fn, *args, iters: int):
    """(seconds per call over `iters` calls after one warm-up call, last output)."""
    import jax

    out = jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters, out


def compile_seconds(jitted, *args):
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return time.perf_counter() - t0, compiled


# ---------------------------------------------------------------------------------------------


def one_device_mesh(device=None):
    """The (1, 1, 1) mesh of `device` (default: the first) and the default rules."""
    import jax

    from addinov3_jax.models import sharding
    from addinov3_jax.runtime import distributed

    return (distributed.make_mesh(1, 1, 1, devices=[device or jax.devices()[0]]),
            sharding.DEFAULT_RULES)


def feature_step(graphdef, cfg, mesh, rules):
    """The product's jitted frozen-feature step (`steps.jit_feature_step`): standardised patches
    (L,B,N,D) and CLS (L,B,D), fp32; call and lower it under `sharding.use(mesh, rules)`."""
    from addinov3_jax.runtime import steps

    return steps.jit_feature_step(graphdef, cfg, mesh, rules)


def model_flops(variant, taps, batch, size) -> float:
    """FLOPs of one feature forward from XLA's cost analysis of the unrolled, XLA-attention
    lowering (a scanned loop is counted once, custom attention kernels not at all)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from addinov3_jax.models import dinov3, sharding
    from addinov3_jax.models import model as ad

    abstract = nnx.eval_shape(lambda: dinov3.create(
        variant, rngs=nnx.Rngs(0), scan_layers=False, compute_dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16, attention_impl="xla"))
    graphdef, state = nnx.split(abstract)
    mesh, rules = one_device_mesh()
    fwd = feature_step(graphdef, ad.HeadConfig(feature_layers=taps), mesh, rules)
    with sharding.use(mesh, rules):
        cost = fwd.lower(state, jax.ShapeDtypeStruct((batch, size, size, 3),
                                                     jnp.float32)).cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def run_backbone(p, rec, device, peak):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from addinov3_jax.models import dinov3, sharding
    from addinov3_jax.models import model as ad

    size, taps = p["image_size"], p["taps"]
    cfg = ad.HeadConfig(feature_layers=taps)
    mesh, rules = one_device_mesh(device)
    flops_per_image = model_flops(p["backbone"], taps, 1, size)
    rec.add("backbone_model_flops", flops_per_image / 1e9, "GFLOP/img", batch=1, dtype="bfloat16",
            image_size=size, variant=p["backbone"], source="cost_analysis, unrolled")
    models = {}
    for impl in ("auto", "xla"):
        bb = dinov3.create(p["backbone"], rngs=nnx.Rngs(0), compute_dtype=jnp.bfloat16,
                           param_dtype=jnp.bfloat16, attention_impl=impl)
        models[impl] = nnx.split(bb)
    runs = [("auto", b) for b in p["batches"]]
    if p["xla_batch"]:
        runs.append(("xla", p["xla_batch"]))
    rng = np.random.default_rng(0)
    for impl, b in runs:
        graphdef, state = models[impl]
        fwd = feature_step(graphdef, cfg, mesh, rules)
        x = jax.device_put(rng.standard_normal((b, size, size, 3)).astype(np.float32), device)
        with sharding.use(mesh, rules):
            secs, compiled = compile_seconds(fwd, state, x)
        resolved = dinov3_backend(impl, jnp.bfloat16, graphdef)
        common = dict(batch=b, dtype="bfloat16", image_size=size, variant=p["backbone"],
                      attention=resolved)
        rec.add("backbone_compile", secs, "s", **common)
        dt, _ = timed(compiled, state, x, iters=p["iters"])
        rec.add("backbone_forward", b / dt, "images/s", **common, iters=p["iters"])
        if peak:
            rec.add("backbone_mfu", flops_per_image * b / dt / (peak * 1e12), "fraction", **common,
                    peak_tflops=peak)
    return models["auto"]


def dinov3_backend(impl, dtype, graphdef) -> str:
    """The attention implementation `layers.attention` resolves to for this backbone."""
    import jax
    import jax.numpy as jnp

    from addinov3_jax.models import layers

    head_dim = 64  # every DINOv3 ViT up to ViT-H+ (the 7B: 128)
    q = jax.ShapeDtypeStruct((1, 1, 1, head_dim), jnp.dtype(dtype))
    return layers.attention_backend(q, None if impl == "auto" else impl)


def run_cache_fill(p, rec, device, bb):
    """Host images -> device -> features -> host bf16 arrays: the trainer's `memory` cache
    (`feature_step`, then `FeatureCache.write`)."""
    import jax
    import ml_dtypes
    import numpy as np

    from addinov3_jax.models import dinov3, sharding
    from addinov3_jax.models import model as ad
    from addinov3_jax.runtime.feature_cache import FeatureCache

    graphdef, state = bb
    size, b, n_batches = p["image_size"], p["cache_batch"], p["cache_batches"]
    mesh, rules = one_device_mesh(device)
    fwd = feature_step(graphdef, ad.HeadConfig(feature_layers=p["taps"]), mesh, rules)
    batches = [np.random.default_rng(i).standard_normal((b, size, size, 3)).astype(np.float32)
               for i in range(n_batches)]
    bcfg = dinov3.get_config(p["backbone"])
    cache = FeatureCache(b * n_batches, len(p["taps"]), (size // bcfg.patch_size) ** 2,
                         bcfg.embed_dim, size, "memory", "bfloat16")
    labels = {"mask": np.zeros((b, size, size), np.uint8), "label": np.zeros(b, np.int32),
              "class_id": np.zeros(b, np.int32)}
    with sharding.use(mesh, rules):
        jax.block_until_ready(fwd(state, jax.device_put(batches[0], device)))  # compile
        t0 = time.perf_counter()
        for i, x in enumerate(batches):
            patches, cls = fwd(state, jax.device_put(x, device))
            cache.write(np.arange(i * b, (i + 1) * b), np.asarray(patches), np.asarray(cls), labels)
        dt = time.perf_counter() - t0
    assert cache.arrays["patches"].dtype == ml_dtypes.bfloat16
    rec.add("feature_cache_fill", b * n_batches / dt, "images/s", batch=b, dtype="bfloat16",
            image_size=size, cache_dtype="bfloat16", batches=n_batches,
            mb_per_image=cache.arrays["patches"][0].nbytes / 2**20)


def run_train_step(p, rec, device):
    """The cached step of the trainer: a batch gathered from a device `FeatureCache` (bf16),
    then `steps.jit_train_step` (head, losses, AdamW) on a `TrainState`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from addinov3_jax import config as config_lib
    from addinov3_jax.models import dinov3, sharding
    from addinov3_jax.models import model as ad
    from addinov3_jax.runtime import setup, steps
    from addinov3_jax.runtime.feature_cache import FeatureCache

    bcfg = dinov3.get_config(p["backbone"])
    size, b, taps = p["image_size"], p["train_batch"], p["taps"]
    grid = (size // bcfg.patch_size,) * 2
    n, d, e, n_layers = grid[0] * grid[1], bcfg.embed_dim, p["text_dim"], len(taps)
    head_cfg = ad.HeadConfig(feature_layers=taps)
    mesh, rules = one_device_mesh(device)
    cache_n = 2 * b
    rng = np.random.default_rng(0)
    cache = FeatureCache(cache_n, n_layers, n, d, size, "device", "bfloat16")
    masks = np.zeros((cache_n, size, size), np.uint8)
    masks[: cache_n // 2, size // 4 : size // 2, size // 4 : size // 2] = 1
    cache.write(np.arange(cache_n), rng.standard_normal((n_layers, cache_n, n, d), np.float32),
                rng.standard_normal((n_layers, cache_n, d), np.float32),
                {"mask": masks, "label": (np.arange(cache_n) < cache_n // 2).astype(np.int32),
                 "class_id": np.arange(cache_n, dtype=np.int32) % b})
    cache.finalize(mesh, rules)
    frozen = {"text": jax.device_put(rng.standard_normal((b, e, 2)).astype(np.float32), device)}
    tx, _ = steps.make_optimizer(config_lib.base_config(), p["train_iters"] + 1)
    state, shardings = steps.init_train_state(setup.adapters_fn(d, e, n_layers, 0), tx, mesh, rules)
    train_step = steps.jit_train_step(tx, head_cfg, size, bcfg.patch_size, shardings, mesh)
    idx = [rng.permutation(cache_n)[:b] for _ in range(p["train_iters"] + 1)]
    common = dict(batch=b, dtype="float32", image_size=size, cache_dtype="bfloat16")
    with sharding.use(mesh, rules):
        secs, compiled = compile_seconds(train_step, state, frozen, cache.lookup(idx[0]))
        rec.add("train_step_compile", secs, "s", **common)
        state, terms = compiled(state, frozen, cache.lookup(idx[0]))
        jax.block_until_ready(terms)
        t0 = time.perf_counter()
        for i in range(p["train_iters"]):
            state, terms = compiled(state, frozen, cache.lookup(idx[i + 1]))
        jax.block_until_ready(terms)
        dt = (time.perf_counter() - t0) / p["train_iters"]
    loss = float(terms["loss"])
    if not np.isfinite(loss) or jnp.dtype(terms["loss"].dtype) != jnp.float32:
        raise RuntimeError(f"train step loss is {loss}")
    rec.add("train_step_cached", b / dt, "images/s", **common, iters=p["train_iters"])


def synthetic_eval_set(root: Path, p) -> Path:
    """A few hundred synthetic PNGs: rendered once (slow at 512 px), then copied."""
    from addinov3_jax.data import synthetic

    synthetic.generate(root, categories=EVAL_CATEGORIES, size=p["image_size"],
                       normal=p["eval_base"], per_defect=p["eval_base"], train_normal=0)
    for copy in range(1, p["eval_copies"]):
        for f in sorted(root.glob("*/test/*/*.png")):
            new = f.with_name(f"{copy:02d}{f.name}")
            shutil.copyfile(f, new)
            mask = f.parents[2] / "ground_truth" / f.parent.name / f"{f.stem}_mask.png"
            if mask.exists():
                shutil.copyfile(mask, mask.with_name(f"{copy:02d}{f.stem}_mask.png"))
    return root


def run_eval(p, rec, device, bb, workdir: Path):
    import jax
    import numpy as np
    from flax import nnx

    from addinov3_jax import metrics
    from addinov3_jax.data import pipeline, readers
    from addinov3_jax.models import model as ad
    from addinov3_jax.runtime.inference import Predictor

    size, b = p["image_size"], p["eval_batch"]
    t0 = time.perf_counter()
    root = synthetic_eval_set(workdir / "synthetic", p)
    gen_s = time.perf_counter() - t0
    records, _ = readers.read("synthetic", root, classes=EVAL_CATEGORIES)
    source = pipeline.RecordSource(records)
    words = pipeline.class_words(source)
    pre = pipeline.Preprocess(size=(size, size), classes=words)
    workers = pipeline.resolve_worker_count(-1)
    model = ad.ADDinoV3(nnx.merge(*bb), None, ad.HeadConfig(feature_layers=p["taps"]),
                        rngs=nnx.Rngs(1), text_dim=p["text_dim"])
    # The inference entry point of `eval` / `predict`, on a one-device mesh.
    predictor = Predictor(model, *one_device_mesh(device))
    table = jax.device_put(np.random.default_rng(0).standard_normal(
        (len(words), p["text_dim"], 2)).astype(np.float32), device)
    for _ in range(2):
        jax.block_until_ready(predictor(np.zeros((b, size, size, 3), np.float32),
                                        np.zeros(b, np.int32), table))

    n = len(source)
    t0 = time.perf_counter()
    maps = np.zeros((n, size, size), np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    scores, labels = np.zeros(n, np.float32), np.zeros(n, np.int32)
    class_ids = np.zeros(n, np.int32)
    for batch in pipeline.eval_dataset(source, pre, batch_size=b, worker_count=workers):
        m, s = predictor(batch["image"], batch["class_id"], table)
        valid = batch["valid"].astype(bool)
        idx = batch["index"][valid]
        maps[idx], scores[idx] = np.asarray(m)[valid], np.asarray(s)[valid]
        masks[idx] = batch["mask"][valid].astype(np.uint8)
        labels[idx], class_ids[idx] = batch["label"][valid], batch["class_id"][valid]
    t_model = time.perf_counter()
    results = {}
    for c, word in enumerate(words):
        sel = class_ids == c
        results[word] = {**metrics.pixel_metrics(masks[sel], maps[sel]),
                         **{f"image_{k}": v for k, v in
                            metrics.classification_metrics(labels[sel], scores[sel]).items()}}
    t1 = time.perf_counter()
    if not all(np.isfinite(r["auroc"]) for r in results.values()):
        raise RuntimeError(f"undefined pixel metrics: {results}")
    rec.add("eval_end_to_end", n / (t1 - t0), "images/s", batch=b, dtype="bfloat16",
            image_size=size, images=n, workers=workers, decode_and_model_s=t_model - t0,
            metrics_s=t1 - t_model, synthetic_generation_s=gen_s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="the reduced run, on CPU")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    device = jax.devices()[0]
    platform = device.platform
    profile = "smoke" if args.cpu_smoke else ("cpu" if platform == "cpu" else "full")
    p = PROFILES[profile]
    kind = device.device_kind
    peak = peak_tflops(kind) if platform != "cpu" else None
    from addinov3_jax.data import pipeline

    print(f"device: {kind} ({platform}, {jax.device_count()} device(s)), jax {jax.__version__}, "
          f"profile {profile}, peak bf16 {peak or 'unknown'} TFLOP/s, "
          f"{pipeline.host_cores()} host cores")
    print(f"{'name':<30}{'value':>12} {'unit':<9}{'batch':>6} {'dtype':>9} {'size':>5}  notes")
    rec = Recorder()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        bb = run_backbone(p, rec, device, peak)
        run_cache_fill(p, rec, device, bb)
        mem = peak_memory_gib(device)
        run_train_step(p, rec, device)
        run_eval(p, rec, device, bb, Path(tmp))
    if mem is not None:
        rec.add("peak_memory_after_features", mem, "GiB")
        rec.add("peak_memory", peak_memory_gib(device), "GiB")
    rec.add("total_wall_time", time.perf_counter() - started, "s")
    report = {
        "device_kind": kind, "peak_tflops": peak,
        "peak_tflops_note": "dense bf16 per chip, vendor data sheet (PEAK_BF16_TFLOPS)",
        "platform": platform, "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device_count": jax.device_count(), "host_cores": pipeline.host_cores(),
        "profile": profile, "measurements": rec.rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
