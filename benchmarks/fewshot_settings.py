"""How the demo's few-shot settings were chosen: on a validation split of the AUXILIARY synthetic
categories only (fresh images of the training categories, generated with another seed), never on
the held-out ones. Evaluates the demo's trained model at `--shots` over 3 seeds for each
augmentation x fusion choice and prints a table (mean pixel AUROC / AUPRO / image AUROC, and the
spread over seeds of the pixel AUROC); the best mean pixel AUROC + AUPRO is the demo's choice.

    addinov3 demo --workdir runs/demo            # trains the model this script loads
    python benchmarks/fewshot_settings.py --model runs/demo/train/model
"""

import argparse
import itertools
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from addinov3_jax import config as config_lib  # noqa: E402
from addinov3_jax.data import synthetic  # noqa: E402
from addinov3_jax.io import model_dir
from addinov3_jax.models import fewshot  # noqa: E402
from addinov3_jax.runtime import evaluator as evaluate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the demo's trained model (WORKDIR/train/model)")
    ap.add_argument("--data", default="/tmp/addinov3_fewshot_val", help="validation data folder")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--augment", default="none,flip,rot90,dihedral")
    ap.add_argument("--fusion", default="add:0.5,add:1,add:2,none:1")
    args = ap.parse_args()
    # Seed 1: other images than the demo's (seed 0) of the categories the adapters trained on.
    root = synthetic.ensure(args.data, categories=config_lib.AUXILIARY, seed=1)
    model = model_dir.load(args.model)
    cfg = config_lib.demo_config()
    opts = evaluate.EvalOptions(image_size=cfg.data.image_size, batch_size=cfg.eval.batch_size,
                                class_name_source=cfg.model.class_name_source,
                                fixed_word=cfg.model.class_name,
                                heatmaps_per_category=0, curves=False)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    runs = [("zero-shot", None)]
    for aug, fus in itertools.product(args.augment.split(","), args.fusion.split(",")):
        mode, weight = fus.split(":")
        runs.append((f"{aug}, {mode} (weight {weight})" if mode == "add" else f"{aug}, none",
                     fewshot.FewShotConfig(shots=args.shots, seeds=seeds, augment=aug,
                                           fusion=mode, fusion_weight=float(weight))))
    print(f"validation: {', '.join(config_lib.AUXILIARY)} (synthetic seed 1), {args.shots} shots, "
          f"seeds {seeds}\n")
    print("| augment, fusion | pixel AUROC | pixel AUPRO | image AUROC | pixel AUROC std | s |")
    print("|---|---|---|---|---|---|")
    for name, fs in runs:
        t0 = time.perf_counter()
        r = evaluate.evaluate(model, [("synthetic", str(root), config_lib.AUXILIARY)],
                              "/tmp/addinov3_fewshot_val_out", opts=opts, fewshot_config=fs)
        e = r["datasets"]["synthetic"]
        m, sd = e["mean"], e.get("mean_std", {}).get("pixel_auroc", 0.0)
        print(f"| {name} | {m['pixel_auroc']:.3f} | {m['pixel_aupro']:.3f} | "
              f"{m['image_auroc']:.3f} | {sd:.3f} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
