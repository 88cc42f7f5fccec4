"""Where XLA CPU spends a DINOv3 ViT-L/16 block at 512x512 (1029 tokens), piece by piece, next to
PyTorch's kernels for the same pieces; `--sweep` repeats the block under several XLA flag sets
(each in a fresh process: XLA reads its flags once).

    python benchmarks/bench_cpu_block.py --reps 5
    python benchmarks/bench_cpu_block.py --sweep --reps 5
"""

import argparse
import json
import os
import subprocess
import sys
import time

FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_thunks": "--xla_cpu_use_thunk_runtime=false",
    "no_multi_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
}


def best(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def run_pieces(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from addinov3_jax.models import dinov3, layers

    dtype = jnp.dtype(args.dtype)
    t, d, h = args.tokens, 1024, 16
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, t, d)), dtype)
    w_qkv = jnp.asarray(rng.standard_normal((d, 3 * d)) / 32, dtype)
    w_o = jnp.asarray(rng.standard_normal((d, d)) / 32, dtype)
    w1 = jnp.asarray(rng.standard_normal((d, 4 * d)) / 32, dtype)
    w2 = jnp.asarray(rng.standard_normal((4 * d, d)) / 64, dtype)
    hid = jnp.asarray(rng.standard_normal((args.batch, t, 4 * d)), dtype)
    q = jnp.asarray(rng.standard_normal((args.batch, t, h, d // h)), dtype)
    scale, bias = jnp.ones(d), jnp.zeros(d)
    block = dinov3.Block(dinov3.get_config("vitl16"), rngs=nnx.Rngs(0))
    if dtype != jnp.float32:
        layers.cast_params(block, dtype)
    graphdef, state = nnx.split(block)
    sin, cos = dinov3.rope_tables(dinov3.rope_coords(32, 32), jnp.asarray(dinov3.exact_periods(64)))

    pieces = {
        "layer_norm": (jax.jit(lambda x: layers.layer_norm(x, scale, bias, 1e-5)), (x,)),
        "qkv matmul": (jax.jit(lambda x: x @ w_qkv), (x,)),
        "attention core": (jax.jit(lambda q: layers.attention(q, q, q, implementation="xla")), (q,)),
        "proj matmul": (jax.jit(lambda x: x @ w_o), (x,)),
        "fc1 matmul": (jax.jit(lambda x: x @ w1), (x,)),
        "gelu exact": (jax.jit(layers.gelu_exact), (hid,)),
        "gelu tanh": (jax.jit(lambda v: jax.nn.gelu(v, approximate=True)), (hid,)),
        "fc2 matmul": (jax.jit(lambda v: v @ w2), (hid,)),
        "block": (jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, sin, cos)), (state, x)),
    }
    out = {}
    for name, (fn, a) in pieces.items():
        out[name] = best(lambda fn=fn, a=a: jax.block_until_ready(fn(*a)), args.reps)
    if args.torch:
        import torch
        import torch.nn.functional as F

        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        tx = torch.from_numpy(np.asarray(x, np.float32)).to(tdt)
        th = torch.from_numpy(np.asarray(hid, np.float32)).to(tdt)
        tq = torch.from_numpy(np.asarray(q, np.float32)).to(tdt).transpose(1, 2)
        tw = {k: torch.from_numpy(np.asarray(v, np.float32)).to(tdt).T.contiguous()
              for k, v in dict(qkv=w_qkv, o=w_o, w1=w1, w2=w2).items()}
        ln = torch.nn.LayerNorm(d).to(tdt)
        tpieces = {
            "layer_norm": lambda: ln(tx), "qkv matmul": lambda: F.linear(tx, tw["qkv"]),
            "attention core": lambda: F.scaled_dot_product_attention(tq, tq, tq),
            "proj matmul": lambda: F.linear(tx, tw["o"]), "fc1 matmul": lambda: F.linear(tx, tw["w1"]),
            "gelu exact": lambda: F.gelu(th), "gelu tanh": lambda: F.gelu(th, approximate="tanh"),
            "fc2 matmul": lambda: F.linear(th, tw["w2"]),
        }
        with torch.inference_mode():
            for name, fn in tpieces.items():
                out["torch " + name] = best(fn, args.reps)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1029)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--torch", action="store_true", help="also time PyTorch's kernels")
    ap.add_argument("--sweep", action="store_true", help="the block under each flag set")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.sweep:
        for name, flags in FLAG_SETS.items():
            env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
            cmd = [sys.executable, __file__, "--json", "--reps", str(args.reps), "--dtype",
                   args.dtype, "--tokens", str(args.tokens)]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode:
                print(f"{name:<24} failed: {res.stderr.strip().splitlines()[-1][:120]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{name:<24} block {r['block']:8.1f} ms  matmuls "
                  f"{sum(r[k] for k in r if 'matmul' in k):7.1f} ms  attention "
                  f"{r['attention core']:6.1f} ms  gelu {r['gelu exact']:6.1f} ms  ({flags})",
                  flush=True)
        return
    out = run_pieces(args)
    if args.json:
        print(json.dumps(out))
        return
    import jax

    print(f"{jax.devices()[0]}, {args.dtype}, batch {args.batch}, {args.tokens} tokens, "
          f"min of {args.reps} (ms)")
    for k, v in out.items():
        if k.startswith("torch "):
            continue
        ref = out.get("torch " + k)
        print(f"  {k:<16}{v:9.2f}" + (f"   torch {ref:9.2f}   ratio {ref / v:5.2f}x" if ref else ""))


if __name__ == "__main__":
    main()
