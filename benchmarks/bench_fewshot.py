"""Few-shot memory bank at the paper scale: 16 shots of ViT-L/16 at 512 px (1024 patches x 4 layers
x 1024 dims per image). Random unit features of the right shapes stand in for the backbone (its
forward is timed by bench_dinov3.py); the bank is built from them, its memory footprint reported,
and one test image is queried against it: our blocked exact 1-NN (fp32 and bf16) vs a plain
NumPy brute force of the same quantity, same data, same run.

    python benchmarks/bench_fewshot.py --shots 16 --size 512
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from addinov3_jax.models import fewshot


def timed(fn, repeats=3):
    """Best of `repeats` calls after one warm-up call (compilation, first touch of memory)."""
    out = jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return out, best


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=1, help="test images per query call")
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--coreset", type=float, default=0.1)
    args = ap.parse_args()
    n = (args.size // 16) ** 2
    rng = np.random.default_rng(0)
    views = [unit(rng.standard_normal((args.layers, args.shots, n, args.dim), np.float32))]
    views = [jnp.asarray(v) for v in views]
    test = jnp.asarray(unit(rng.standard_normal((args.layers, args.queries, n, args.dim), np.float32)))
    print(f"{args.shots} shots x {n} patches x {args.layers} layers x dim {args.dim}; "
          f"{args.queries} test image(s) per query; {jax.device_count()} {jax.default_backend()} device(s)")

    rows = []
    for dtype in ("float32", "bfloat16"):
        cfg = fewshot.FewShotConfig(bank_dtype=dtype, block_size=args.block)
        bank, t = timed(lambda cfg=cfg: fewshot.bank_from_features(views, cfg))
        rows.append((f"build from features ({dtype})", t, bank.nbytes, bank.rows))
    cfg = fewshot.FewShotConfig(coreset_ratio=args.coreset, block_size=args.block)
    core, t = timed(lambda: fewshot.bank_from_features(views, cfg), repeats=1)
    rows.append((f"build + coreset {args.coreset:g} (projection 128)", t, core.nbytes, core.rows))

    banks = {d: fewshot.bank_from_features(views, fewshot.FewShotConfig(bank_dtype=d)) for d in
             ("float32", "bfloat16")}
    query = {}
    for d, bank in banks.items():
        query[d], t = timed(lambda bank=bank: fewshot.patch_scores(bank, test, block_size=args.block))
        rows.append((f"query 1-NN ({d}, blocks of {args.block})", t, None, None))
    query["coreset"], t = timed(lambda: fewshot.patch_scores(core, test, block_size=args.block))
    rows.append(("query 1-NN (coreset bank, float32)", t, None, None))
    bank_np = np.asarray(banks["float32"].features_lmd)
    test_np = np.asarray(test).reshape(args.layers, -1, args.dim)
    ref, t_ref = timed(lambda: (1 - np.stack([(q @ b.T).max(-1) for q, b in zip(test_np, bank_np,
                                                                               strict=True)])).mean(0))
    rows.append(("query, NumPy brute force (float32 matmul)", t_ref, None, None))

    print("\n| step | time (s) | bank bytes | bank rows |\n|---|---|---|---|")
    for name, t, nbytes, m in rows:
        size = f"{nbytes:,} ({nbytes / 2**20:.0f} MiB)" if nbytes else ""
        print(f"| {name} | {t:.3f} | {size} | {m or ''} |")
    ref = ref.reshape(args.queries, n)
    for d in ("float32", "bfloat16"):
        err = float(np.abs(np.asarray(query[d]) - ref).max())
        print(f"max |ours {d} - NumPy| = {err:.1e}")
    t32 = [t for name, t, *_ in rows if name.startswith("query 1-NN (float32")][0]
    print(f"ratio NumPy / ours (fp32): {t_ref / t32:.2f}x; "
          f"bank fp32 {banks['float32'].nbytes:,} B, bf16 {banks['bfloat16'].nbytes:,} B")


if __name__ == "__main__":
    main()
