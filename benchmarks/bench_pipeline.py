"""Input pipeline throughput (images/s) at 512x512 with 0 and 2 grain workers, raw-folder source.

    python benchmarks/bench_pipeline.py --images 96 --batch 8
"""

import argparse
import tempfile
import time

from addinov3_jax.data import pipeline, readers, synthetic


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    root = tempfile.mkdtemp() + "/synthetic"
    per = max(1, args.images // (4 * 3 + 4))
    synthetic.generate(root, categories=("weave", "pill", "marble", "washer"), size=700,
                       normal=per, per_defect=per)
    records, _ = readers.read("synthetic", root, classes=("weave", "pill", "marble", "washer"))
    src = pipeline.RecordSource(records)
    pre = pipeline.Preprocess(size=(512, 512), classes=pipeline.class_words(src))
    print(f"{len(src)} images of 700x700 PNG -> 512x512")
    for workers in (0, 2):
        ds = pipeline.train_dataset(src, pre, batch_size=args.batch, seed=0, num_epochs=2,
                                    worker_count=workers)
        it = iter(ds)
        next(it)  # start-up (workers) excluded
        t0, n = time.perf_counter(), 0
        for batch in it:
            n += len(batch["label"])
        dt = time.perf_counter() - t0
        print(f"workers={workers}: {n / dt:.1f} images/s")


if __name__ == "__main__":
    main()
