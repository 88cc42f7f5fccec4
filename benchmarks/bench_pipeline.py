"""Input pipeline throughput.

1. Per CPU core: decode + bilinear resize to 512x512 + normalise (`pipeline.Preprocess`, one
   process, no workers) for PNG and JPEG sources at 512x512 and at the benchmark datasets' sizes
   (MVTec-like 1024x1024 PNG, VisA-like 1500x1000 JPEG), and the cores that keep an accelerator
   fed at `--target` images/s.
2. The grain pipeline (raw-folder source, 700x700 PNG) with 0 and 2 workers and the automatic
   worker count (`data.worker_count = -1`).

    python benchmarks/bench_pipeline.py --images 96 --batch 8 --target 540
"""

import argparse
import io
import math
import tempfile
import time
from pathlib import Path

from PIL import Image

from addinov3_jax.data import pipeline, readers, synthetic

CATEGORIES = ("weave", "pill", "marble", "washer")


def per_core(base: list[Image.Image], fmt: str, size: tuple[int, int], n: int, reps: int) -> float:
    """Images/s of `Preprocess` on one core for `fmt` files of `size` (W, H): best of `reps`."""
    encoded = []
    for img in base:
        buf = io.BytesIO()
        img.resize(size, Image.BICUBIC).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG"
                                                                  else {}))
        encoded.append(buf.getvalue())
    pre = pipeline.Preprocess(size=(512, 512))
    examples = [{"image": encoded[i % len(encoded)], "mask": b"", "label": 0, "has_mask": 0,
                 "class_name": "x", "object_word_path": "x", "image_path": f"{i}.{fmt.lower()}"}
                for i in range(n)]
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for ex in examples:
            pre(ex)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--target", type=float, default=540.0, help="accelerator images/s to feed")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())

    base_root = synthetic.generate(tmp / "base", categories=CATEGORIES, size=512, normal=2,
                                   per_defect=0, train_normal=0)
    base = [Image.open(p).convert("RGB") for p in sorted(base_root.glob("*/test/good/*.png"))]
    print(f"per core (one process): decode + resize to 512x512 + normalise, best of {args.reps}, "
          f"{args.images} images; cores to feed {args.target:.0f} images/s")
    for fmt, size, what in (("PNG", (512, 512), "512x512 PNG"), ("JPEG", (512, 512), "512x512 JPEG"),
                            ("PNG", (1024, 1024), "1024x1024 PNG (MVTec-like)"),
                            ("JPEG", (1500, 1000), "1500x1000 JPEG (VisA-like)")):
        rate = per_core(base, fmt, size, args.images, args.reps)
        print(f"  {what:<28} {rate:8.1f} images/s/core -> {math.ceil(args.target / rate):3d} cores")

    root = tmp / "synthetic"
    per = max(1, args.images // (4 * 3 + 4))
    synthetic.generate(root, categories=CATEGORIES, size=700, normal=per, per_defect=per)
    records, _ = readers.read("synthetic", root, classes=CATEGORIES)
    src = pipeline.RecordSource(records)
    pre = pipeline.Preprocess(size=(512, 512), classes=pipeline.class_words(src))
    print(f"grain: {len(src)} images of 700x700 PNG -> 512x512, host cores "
          f"{pipeline.host_cores()}, auto workers {pipeline.resolve_worker_count(-1)}")
    for workers in (0, 2, -1):
        ds = pipeline.train_dataset(src, pre, batch_size=args.batch, seed=0, num_epochs=2,
                                    worker_count=workers)
        # Timed from the start, worker start-up included: excluding a first batch would let
        # grain's read-ahead threads fill their buffer untimed (the 0-worker rate would be inflated).
        t0, n = time.perf_counter(), 0
        for batch in ds:
            n += len(batch["label"])
        dt = time.perf_counter() - t0
        print(f"  workers={workers}: {n / dt:.1f} images/s")


if __name__ == "__main__":
    main()
