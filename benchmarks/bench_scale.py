"""Scale-out benchmarks: the memory plan per mesh, and step time on 8 simulated devices vs 1.

    python benchmarks/bench_scale.py --plan     # `addinov3 plan` for vitl16 / vit7b16 on 3 meshes
    python benchmarks/bench_scale.py --steps    # feature + train step time, 8 CPU devices vs 1
    python benchmarks/bench_scale.py --smoke    # both, tiny backbone at 64 px, 1 rep: a check

The plan needs no weights and allocates nothing (abstract shapes, compiled memory analysis). The
step timing runs the product's steps (`Runtime.feature_step`, `Runtime.train_step`) on simulated
CPU devices: it shows the shape of the scaling (one host's cores
split 8 ways), not accelerator speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MESHES = {"data=8": (8, 1, 1), "fsdp=8": (1, 8, 1), "fsdp=4 x tensor=2": (1, 4, 2)}


def run_plan(backbone: str, mesh: tuple[int, int, int], batch: int, size: int) -> dict:
    cmd = [sys.executable, "-m", "addinov3_jax.commands.cli", "plan", "--json", "--config",
           str(REPO / "configs" / "train_visa.py"), f"--config.model.backbone={backbone}",
           f"--config.mesh.data={mesh[0]}", f"--config.mesh.fsdp={mesh[1]}",
           f"--config.mesh.tensor={mesh[2]}", f"--config.train.batch_size={batch}",
           f"--config.data.image_size={size}"]
    if backbone == "tiny":  # its 4 blocks are the taps
        cmd += ["--config.model.feature_layers=(0, 1, 2, 3)", "--config.model.text_tower=tiny"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def plan_table(batch: int, size: int, backbones=("vitl16", "vit7b16")) -> str:
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    rows = ["| backbone | mesh | backbone params total | backbone params / device | train state / device "
            "| feature step temp / device | train step temp / device |", "|---" * 7 + "|"]
    for backbone in backbones:
        for name, mesh in MESHES.items():
            p = run_plan(backbone, mesh, batch, size)
            rows.append(f"| {backbone} | {name} | {gib(p['backbone_param_bytes_total'])} GiB | "
                        f"{gib(p['backbone_param_bytes_per_device'])} GiB | "
                        f"{p['train_state_bytes_per_device'] / 2**20:.1f} MiB | "
                        f"{gib(p['feature_step']['temp_bytes_per_device'])} GiB | "
                        f"{gib(p['train_step']['temp_bytes_per_device'])} GiB |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


STEP_CODE = r"""
import json, sys, time
import jax, numpy as np
from flax import nnx
from addinov3_jax import config as config_lib
from addinov3_jax.models import sharding
from addinov3_jax.runtime import setup, steps
variant, size, batch, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = config_lib.base_config()
cfg.model.backbone, cfg.model.text_tower = variant, "tiny"
cfg.model.feature_layers = (2, 5, 8, 11) if variant != "tiny" else (0, 1, 2, 3)
cfg.data.image_size = size
rt = setup.setup(cfg)  # every device on the data axis
mesh, rules = rt.mesh, rt.rules
graphdef, state = nnx.split(setup.backbone(cfg.model, mesh, rules, cfg.seed))
text_dim = setup.text_dim(cfg.model)
tx, _ = steps.make_optimizer(cfg, 100)
ts, sh = steps.init_train_state(rt.adapters_fn(text_dim), tx, mesh, rules)
features, step = rt.feature_step(graphdef), rt.train_step(tx, sh)
images = rt.global_batch({"image": np.random.default_rng(0).standard_normal(
    (batch, size, size, 3), np.float32)}, {"image": 0})["image"]
frozen = {"text": jax.numpy.zeros((2, text_dim, 2))}
def timed(fn, n):
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best, out
with sharding.use(mesh, rules):
    t_feat, (p, c) = timed(lambda: features(state, images), reps + 1)
    b = rt.global_batch({"mask": np.zeros((batch, size, size), np.float32),
                         "label": np.zeros(batch, np.int32), "class_id": np.zeros(batch, np.int32)},
                        {"mask": 0, "label": 0, "class_id": 0})
    b["patches"], b["cls"] = p, c
    holder = [ts]
    def one():
        holder[0], terms = step(holder[0], frozen, b)
        return terms
    t_step, _ = timed(one, reps + 1)
print(json.dumps({"devices": jax.device_count(), "feature_step_s": t_feat, "train_step_s": t_step}))
"""


def run_steps(variant: str, size: int, batch: int, reps: int) -> str:
    out = []
    for n in (1, 8):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        res = subprocess.run([sys.executable, "-c", STEP_CODE, variant, str(size), str(batch), str(reps)],
                             env=env, capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    rows = ["| devices | feature step (s, best) | train step (s, best) |", "|---|---|---|"]
    rows += [f"| {r['devices']} | {r['feature_step_s']:.3f} | {r['train_step_s']:.4f} |" for r in out]
    rows.append(f"| 8 vs 1 | {out[0]['feature_step_s'] / out[1]['feature_step_s']:.2f}x | "
                f"{out[0]['train_step_s'] / out[1]['train_step_s']:.2f}x |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", action="store_true")
    ap.add_argument("--steps", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--step-variant", default="vits16")
    ap.add_argument("--step-size", type=int, default=224)
    ap.add_argument("--step-batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true",
                    help="the tiny backbone at 64 px, batch 8, 1 rep (a check, not a number)")
    args = ap.parse_args(argv)
    if not (args.plan or args.steps):
        args.plan = args.steps = True
    backbones = ("vitl16", "vit7b16")
    if args.smoke:
        backbones, args.step_variant, args.reps = ("tiny",), "tiny", 1
        args.batch, args.size = args.step_batch, args.step_size = 8, 64
    if args.plan:
        print(f"\n### Memory plan, batch {args.batch} at {args.size}px (8 devices)\n")
        print(plan_table(args.batch, args.size, backbones))
    if args.steps:
        print(f"\n### Step time, {args.step_variant} at {args.step_size}px, batch {args.step_batch}, "
              "simulated CPU devices\n")
        print(run_steps(args.step_variant, args.step_size, args.step_batch, args.reps))


if __name__ == "__main__":
    main()
