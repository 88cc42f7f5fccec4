"""Pixel metrics on N maps of SxS on the CPU: ours (`metrics.pixel_metrics`: AUROC, AP, F1-max
and the reference AUPRO together) vs a plain vectorized NumPy statement of the MVTec reference
AUPRO (AUPRO only), interleaved `--reps` times in one process; min and median of each, the ratio,
the peak memory of each (tracemalloc: NumPy reports its allocations) per pixel, and a profile of
where each spends its time (cProfile, top entries). `--cflow` also times the 200-threshold loop
once. The two AUPRO values must agree.

    python benchmarks/bench_metrics.py --maps 100 --size 512 --reps 5
"""

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time
import tracemalloc

import numpy as np
from _timing import interleaved
from scipy import ndimage

from addinov3_jax import metrics


def numpy_reference_aupro(masks, maps, limit=0.3):
    fp_w, pro_w, n_regions = [], [], 0
    for m in masks:
        labels, count = ndimage.label(m, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.reshape(-1))
        w = np.where(labels > 0, 1.0 / sizes[labels], 0.0)
        n_regions += count
        fp_w.append((labels == 0).reshape(-1))
        pro_w.append(w.reshape(-1))
    fp_w, pro_w = np.concatenate(fp_w), np.concatenate(pro_w)
    s = maps.reshape(-1)
    order = np.argsort(-s, kind="stable")
    s = s[order]
    fpr = np.cumsum(fp_w[order]) / fp_w.sum()
    pro = np.cumsum(pro_w[order]) / n_regions
    keep = np.append(np.flatnonzero(s[:-1] != s[1:]), len(s) - 1)
    x = np.r_[0, fpr[keep], 1]
    y = np.r_[0, pro[keep], 1]
    i = np.searchsorted(x, limit, side="right")
    area = np.sum(0.5 * (y[1:i] + y[: i - 1]) * (x[1:i] - x[: i - 1]))
    y_star = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
    return (area + 0.5 * (y_star + y[i - 1]) * (limit - x[i - 1])) / limit


def peak_bytes(fn) -> int:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def profile(fn, top: int) -> str:
    prof = cProfile.Profile()
    prof.runcall(fn)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return "\n".join(lines[start - 1 :])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--maps", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cflow", action="store_true", help="also time the 200-threshold loop once")
    ap.add_argument("--profile", type=int, default=8, help="profile entries to print (0: none)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    masks = np.zeros((args.maps, args.size, args.size), bool)
    for k in range(args.maps // 2):
        for _ in range(3):
            y, x = rng.integers(0, args.size - 60, 2)
            masks[k, y : y + rng.integers(5, 60), x : x + rng.integers(5, 60)] = True
    maps = (rng.random(masks.shape, dtype=np.float32) * 0.6
            + ndimage.gaussian_filter(masks.astype(np.float32), (0, 4, 4)))
    n_px = masks.size
    print(f"{args.maps} maps of {args.size}x{args.size} ({n_px / 1e6:.1f} M pixels, "
          f"{masks.mean():.2%} anomalous), float32 maps; load average {os.getloadavg()}")

    t0 = time.perf_counter()
    gt = metrics.GroundTruth.from_masks(masks)
    t_gt = time.perf_counter() - t0
    sides = {"ours": lambda: metrics.pixel_metrics(masks, maps, ground_truth=gt)["aupro"],
             "reference": lambda: numpy_reference_aupro(masks, maps)}
    values, times = interleaved(sides, args.reps)  # the warm-up is the first touch of the memory
    for name, ts in times.items():
        peak = peak_bytes(sides[name])
        print(f"{name:10s} min {min(ts):6.2f} s  median {statistics.median(ts):6.2f} s  "
              f"peak {peak / 2**20:7.0f} MiB ({peak / n_px:5.1f} B/pixel)  "
              f"AUPRO {values[name]:.12f}")
    print(f"ground-truth components (once per dataset, not in 'ours'): {t_gt:.2f} s")
    print(f"|AUPRO diff| {abs(values['ours'] - values['reference']):.1e}")
    r_min = min(times["reference"]) / min(times["ours"])
    r_med = statistics.median(times["reference"]) / statistics.median(times["ours"])
    print(f"ratio reference / ours: min {r_min:.1f}x, median {r_med:.1f}x "
          f"(ours computes AUROC, AP and F1-max too)")
    if args.profile:
        for name, fn in sides.items():
            print(f"\nprofile of {name} (one call, cProfile, by own time):")
            print(profile(fn, args.profile))
    if args.cflow:
        t0 = time.perf_counter()
        cflow = metrics.aupro_200_thresholds(masks, maps)
        t_cflow = time.perf_counter() - t0
        print(f"200-threshold loop: {t_cflow:.2f} s, {t_cflow / min(times['ours']):.1f}x ours; "
              f"AUPRO(cflow) {cflow:.6f} (a different quantity)")


if __name__ == "__main__":
    main()
