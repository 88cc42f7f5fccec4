"""DINOv3 ViT-L/16 forward at 512x512, fp32 (or `--dtype bfloat16`): ours vs transformers.

Interleaved repetitions in one process, median ratio (torch time / our time; > 1 means we are
faster). Also compile time with and without `scan_layers`. Random weights (speed only).

    python benchmarks/bench_dinov3.py --variant vitl16 --size 512 --batches 1,4 --reps 3
"""

import argparse
import statistics
import time

import jax
import numpy as np
import torch
from flax import nnx
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from addinov3_jax.models import dinov3
from weight_conversion import dinov3 as conv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="vitl16")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="both sides: our compute/param dtype, the torch module's dtype")
    ap.add_argument("--no-unrolled", action="store_true", help="skip the unrolled compile")
    args = ap.parse_args()
    cfg = dinov3.get_config(args.variant)
    torch.set_num_threads(torch.get_num_threads())
    ref = DINOv3ViTModel(DINOv3ViTConfig(**conv.hf_config(cfg))).eval()
    if args.dtype == "bfloat16":
        ref = ref.to(torch.bfloat16)
    print(f"devices: {jax.devices()}, torch threads: {torch.get_num_threads()}")

    results = {}
    for scan in (True,) if args.no_unrolled else (True, False):
        model = dinov3.create(cfg, rngs=nnx.Rngs(0), scan_layers=scan, compute_dtype=args.dtype,
                              param_dtype=args.dtype)
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x)["x_norm_patchtokens"])
        x = jax.ShapeDtypeStruct((1, args.size, args.size, 3), np.float32)
        t0 = time.perf_counter()
        fwd.lower(state, x).compile()
        results[f"compile_scan={scan}"] = time.perf_counter() - t0
        print(f"compile time scan_layers={scan}: {results[f'compile_scan={scan}']:.2f} s")
        if scan:
            scan_fwd, scan_state = fwd, state
    for b in [int(v) for v in args.batches.split(",")]:
        x = np.random.default_rng(0).standard_normal((b, args.size, args.size, 3)).astype(np.float32)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(getattr(torch, args.dtype))
        scan_fwd(scan_state, x).block_until_ready()  # compile for this batch
        with torch.inference_mode():
            ref(xt)
        ours, theirs = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            scan_fwd(scan_state, x).block_until_ready()
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.inference_mode():
                ref(xt)
            theirs.append(time.perf_counter() - t0)
        o, t = statistics.median(ours), statistics.median(theirs)
        print(f"batch {b}: ours {o:.3f} s, transformers {t:.3f} s, ratio {t / o:.2f}x "
              f"(ours {b / o:.2f} img/s)")


if __name__ == "__main__":
    main()
