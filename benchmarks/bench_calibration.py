"""Decisions on the demo's held-out categories: split-conformal thresholds calibrated on each
class's train/good images (never the references, never test images) at alpha 0.05 and 0.10, and
what they achieve on the test images: the false-alarm rate on the good ones (pooled over the
held-out classes, exact binomial 95% interval), the detection rate on the defective ones, next to
the F1-optimal threshold's pair (which needs the labels). The trained model of a finished demo
run, 4-shot (first reference seed), as the demo's decisions.

    addinov3 demo --workdir /tmp/demo && python benchmarks/bench_calibration.py --workdir /tmp/demo
"""

import argparse
import dataclasses
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from addinov3_jax import calibration as calib  # noqa: E402
from addinov3_jax import config as config_lib  # noqa: E402
from addinov3_jax.io import model_dir  # noqa: E402
from addinov3_jax.runtime import evaluator as evaluate  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True, help="a finished `addinov3 demo --workdir` run")
    ap.add_argument("--alphas", default="0.05,0.10")
    ap.add_argument("--shots", type=int, default=4)
    args = ap.parse_args()
    work = Path(args.workdir)
    cfg = config_lib.demo_config()
    model = model_dir.load(work / "train" / "model")
    fs = dataclasses.replace(config_lib.fewshot_config(cfg), shots=args.shots, seeds=(0,))
    print(f"demo model {work / 'train' / 'model'}; held-out {', '.join(config_lib.HELD_OUT)}; "
          f"{args.shots}-shot; {platform.processor() or platform.machine()}")
    print("\n| alpha | class | calibration images | false alarms (test good) | 95% CI | detection | "
          "F1-optimal: false alarms | F1-optimal: detection |\n|---|---|---|---|---|---|---|---|")
    for alpha in (float(a) for a in args.alphas.split(",")):
        opts = evaluate.EvalOptions(image_size=cfg.data.image_size, batch_size=cfg.eval.batch_size,
                                    class_name_source=cfg.model.class_name_source,
                                    fixed_word=cfg.model.class_name, heatmaps_per_category=0,
                                    curves=False, false_alarm_rate=alpha, report_examples=0)
        with tempfile.TemporaryDirectory() as out:
            results = evaluate.evaluate(model, [("synthetic", str(work / "data" / "synthetic"),
                                                 config_lib.HELD_OUT)], out, opts=opts,
                                        fewshot_config=fs)
        cal = results["datasets"]["synthetic"]["calibration"]
        for cls, r in cal["categories"].items():
            c = r["confusion"]
            lo, hi = r["false_alarm_ci95"]
            print(f"| {alpha:g} | {cls} | {r['n']} | {c['fp']}/{c['fp'] + c['tn']} = "
                  f"{r['false_alarm_rate']:.3f} | {lo:.3f}-{hi:.3f} | {c['tp']}/{c['tp'] + c['fn']} = "
                  f"{r['detection_rate']:.3f} | {r['f1_false_alarm_rate']:.3f} | "
                  f"{r['f1_detection_rate']:.3f} |")
        m = cal["mean"]
        lo, hi = m["pooled_false_alarm_ci95"]
        fp = round(m["pooled_false_alarm_rate"] * m["num_good"])
        print(f"| {alpha:g} | **pooled / mean** | | {fp}/{m['num_good']} = "
              f"{m['pooled_false_alarm_rate']:.3f} | {lo:.3f}-{hi:.3f} | {m['detection_rate']:.3f} "
              f"(mean) | {m['f1_false_alarm_rate']:.3f} | {m['f1_detection_rate']:.3f} |")
        print(f"|  | (guarantee: expected false-alarm rate <= {alpha:g}; needs >= "
              f"{calib.min_good_images(alpha)} calibration images) | | | | | | |")


if __name__ == "__main__":
    main()
