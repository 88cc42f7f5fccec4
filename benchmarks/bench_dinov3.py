"""DINOv3 forward on CPU: our jitted `dinov3.create` model vs transformers' `DINOv3ViTModel`.

Both sides run interleaved in one process (ours, then theirs, `--reps` times), torch with as many
threads as XLA's CPU client uses (the cores this process may run on); prints the min and median
of each side and the ratios (torch time / our time; > 1 means we are faster), and the CPU model
and flags. `--impls auto,xla` also times our model with other attention implementations in the
same interleaving (an A/B of `layers.attention`). Random weights (speed only).

    python benchmarks/bench_dinov3.py --variant vitl16 --size 512 --batch 1 --reps 5
    python benchmarks/bench_dinov3.py --size 224 --batch 8 --dtype bfloat16 --impls auto,xla
    python benchmarks/bench_dinov3.py --core --impls xla,blockwise --reps 9

`--core` times the attention core alone (`layers.attention` on the variant's q, k, v for this
size and batch) against `torch.nn.functional.scaled_dot_product_attention`, same interleaving.
"""

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np
import torch
from _timing import interleaved
from flax import nnx
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from addinov3_jax.models import dinov3, layers
from weight_conversion import dinov3 as conv

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_description() -> str:
    """CPU model name and the SIMD flags that matter for fp32 / bf16 matmuls."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    have = [f for f in CPU_FLAGS if f in flags]
    missing = [f for f in CPU_FLAGS if f not in flags]
    return f"{model}; flags: {' '.join(have) or '-'} (absent: {' '.join(missing) or '-'})"


def summary(times: list[float]) -> tuple[float, float]:
    return min(times), statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="vitl16")
    ap.add_argument("--size", type=int, default=512, help="image side, e.g. 512 or 224")
    ap.add_argument("--batch", type=int, default=1, help="e.g. 1 or 8")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="both sides: our compute/param dtype, the torch module's dtype")
    ap.add_argument("--impls", default="auto",
                    help="comma-separated attention implementations of ours to time "
                         f"({', '.join(str(x) for x in layers.ATTENTION_IMPLEMENTATIONS[1:])})")
    ap.add_argument("--core", action="store_true", help="time the attention core only")
    args = ap.parse_args()

    threads = len(os.sched_getaffinity(0))  # what XLA's CPU client sizes its pool by
    torch.set_num_threads(threads)
    cfg = dinov3.get_config(args.variant)
    ref = DINOv3ViTModel(DINOv3ViTConfig(**conv.hf_config(cfg))).eval()
    ref = ref.to(getattr(torch, args.dtype))
    tokens = (args.size // cfg.patch_size) ** 2 + 1 + cfg.num_registers
    print(f"cpu: {cpu_description()}; {os.cpu_count()} cores, {threads} usable")
    print(f"jax {jax.__version__} {jax.devices()}, torch {torch.__version__} threads "
          f"{torch.get_num_threads()}, attention {ref.config._attn_implementation}")
    print(f"{args.variant} {args.size}x{args.size} ({tokens} tokens), batch {args.batch}, "
          f"{args.dtype}, {args.reps} interleaved reps; load average {os.getloadavg()}")

    if args.core:
        sides = attention_core_sides(args, cfg, tokens)
    else:
        sides = forward_sides(args, cfg, ref, tokens)
    _, times = interleaved(sides, args.reps)
    theirs = list(sides)[-1]
    t_min, t_med = summary(times[theirs])
    for name, ts in times.items():
        lo, med = summary(ts)
        ratio = "" if name == theirs else (
            f"; ratio torch/ours: min {t_min / lo:.2f}x, median {t_med / med:.2f}x")
        print(f"{name:22s} min {lo:8.4f} s  median {med:8.4f} s  "
              f"({args.batch / med:.2f} img/s){ratio}")


def attention_core_sides(args, cfg, tokens):
    """`layers.attention` per implementation vs torch SDPA (what transformers' DINOv3 attention
    calls) on random (batch, tokens, heads, head_dim) q, k, v."""
    rng = np.random.default_rng(0)
    shape = (args.batch, tokens, cfg.num_heads, cfg.head_dim)
    qkv = [jax.numpy.asarray(rng.standard_normal(shape), args.dtype) for _ in range(3)]
    qkv_t = [torch.from_numpy(np.asarray(x, np.float32).transpose(0, 2, 1, 3).copy())
             .to(getattr(torch, args.dtype)) for x in qkv]
    sides = {}
    for impl in args.impls.split(","):
        fn = jax.jit(lambda q, k, v, impl=impl: layers.attention(q, k, v, implementation=impl))
        print(f"ours attention_impl={impl} runs {layers.attention_backend(qkv[0], impl)!r}")
        sides[f"ours[{impl}]"] = lambda fn=fn: fn(*qkv).block_until_ready()

    def theirs():
        with torch.inference_mode():
            torch.nn.functional.scaled_dot_product_attention(*qkv_t)

    sides["torch sdpa"] = theirs
    return sides


def forward_sides(args, cfg, ref, tokens):
    """Our jitted forward per attention implementation vs the transformers model."""
    x = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3))
    x = x.astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(getattr(torch, args.dtype))
    sides = {}
    for impl in args.impls.split(","):
        model = dinov3.create(cfg, rngs=nnx.Rngs(0), compute_dtype=args.dtype,
                              param_dtype=args.dtype, attention_impl=impl)
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x)["x_norm_patchtokens"])
        t0 = time.perf_counter()
        compiled = fwd.lower(state, x).compile()
        q = jax.ShapeDtypeStruct((args.batch, tokens, cfg.num_heads, cfg.head_dim),
                                 np.dtype(args.dtype))
        print(f"ours attention_impl={impl} (runs {layers.attention_backend(q, impl)!r}): "
              f"compile {time.perf_counter() - t0:.2f} s")
        sides[f"ours[{impl}]"] = lambda c=compiled, s=state: c(s, x).block_until_ready()

    def theirs():
        with torch.inference_mode():
            ref(xt)

    sides["transformers"] = theirs
    return sides


if __name__ == "__main__":
    main()
