"""Exported detectors vs our JAX predict step, CPU, one process, interleaved (random weights).

Writes a model directory (DINOv3 `--variant` at random weights, a small random text tower with the
paper's 768-wide prototypes), exports it with `addinov3 export`'s library function (ONNX, and
StableHLO with `--stablehlo`; each export is checked against predict as it is written), then
times, per image at `--batch`, round after round: onnxruntime (CPU) on the ONNX file, our jitted
predict step (`inference.Predictor`, what `addinov3 predict` runs) and, with `--stablehlo`, the
StableHLO artifact through `serving.load`; with `--torch`, the PyTorch transformers backbone
alone (the official pipeline's backbone call). Also reports artifact sizes against the weights.

    python benchmarks/bench_export.py --variant vitl16 --size 512 --batch 1 --rounds 5 --stablehlo
"""

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from addinov3_jax import serving  # noqa: E402
from addinov3_jax.commands import export  # noqa: E402
from addinov3_jax.io import model_dir as model_io  # noqa: E402
from addinov3_jax.models import clip_text, dinov3  # noqa: E402
from addinov3_jax.models import model as ad  # noqa: E402
from addinov3_jax.runtime import distributed, inference  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="vitl16")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stablehlo", action="store_true")
    ap.add_argument("--torch", action="store_true")
    ap.add_argument("--workdir", default=None, help="kept when given (default: a temp dir, removed)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_export."))
    try:
        run(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path):
    model_dir = work / "model"
    if not model_dir.exists():
        text_cfg = dataclasses.replace(clip_text.get_config("tiny"), embed_dim=768)
        depth = dinov3.get_config(args.variant).depth  # the paper's taps (5, 11, 17, 23) at depth 24
        taps = tuple(depth * i // 4 - 1 for i in (1, 2, 3, 4))
        model = ad.ADDinoV3(dinov3.create(args.variant, rngs=nnx.Rngs(0)),
                            clip_text.TextTower(text_cfg, rngs=nnx.Rngs(1)),
                            ad.HeadConfig(feature_layers=taps), rngs=nnx.Rngs(2))
        model_io.save(model, model_dir)
        del model
    weights = (model_dir / "backbone" / "params.safetensors").stat().st_size + (
        model_dir / "adapters" / "params.safetensors").stat().st_size

    timings = {}
    t0 = time.perf_counter()
    onnx_manifest = export.export(model_dir, "bottle", work / "onnx", format="onnx",
                                  image_size=args.size, overwrite=True)
    timings["export onnx (incl. check)"] = time.perf_counter() - t0
    runners = {}
    import onnxruntime as ort

    session = ort.InferenceSession(str(work / "onnx" / export.ONNX_FILE), providers=["CPUExecutionProvider"])
    runners["onnxruntime"] = lambda x: session.run(None, {export.INPUT_NAME: x})
    hlo_manifest = None
    if args.stablehlo:
        t0 = time.perf_counter()
        hlo_manifest = export.export(model_dir, "bottle", work / "stablehlo", format="stablehlo",
                                     image_size=args.size, overwrite=True)
        timings["export stablehlo (incl. check)"] = time.perf_counter() - t0
        detect = serving.load(work / "stablehlo")
        runners["stablehlo (serving.load)"] = lambda x: detect(x)["score"]

    model = model_io.load(model_dir)
    predictor = inference.Predictor(model, distributed.default_mesh(args.batch))
    table = predictor.text_table(["bottle"])
    cfg = model.backbone.config
    mean, std = np.asarray(cfg.pixel_mean, np.float32), np.asarray(cfg.pixel_std, np.float32)
    ids = np.zeros(args.batch, np.int32)

    def ours(x):
        maps, scores = predictor((x.astype(np.float32) / 255.0 - mean) / std, ids, table)
        return np.asarray(maps), np.asarray(scores)

    runners["jax predict step (jit)"] = ours
    if args.torch:
        import torch
        from addinov3_jax.weight_conversion import dinov3 as dino_conv
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        torch.set_num_threads(os.cpu_count())
        tb = DINOv3ViTModel(DINOv3ViTConfig(**dino_conv.hf_config(dinov3.get_config(args.variant)))).eval()

        def torch_backbone(x):
            with torch.inference_mode():
                t = torch.from_numpy((x.astype(np.float32) / 255.0 - mean) / std).permute(0, 3, 1, 2)
                return tb(t.contiguous(), output_hidden_states=True)

        runners["torch transformers backbone only"] = torch_backbone

    x = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    for fn in runners.values():  # warm-up / compile
        fn(x)
    times = {k: [] for k in runners}
    for _ in range(args.rounds):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn(x)
            times[name].append((time.perf_counter() - t0) / args.batch)

    print(f"# {args.variant} at {args.size}x{args.size}, batch {args.batch}, {args.rounds} interleaved "
          f"rounds, {os.cpu_count()} CPU cores (shared with other jobs: absolute times vary)")
    ref = np.median(times["jax predict step (jit)"])
    print("| runtime | median s/image | min s/image | vs jax |\n|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {np.median(t):.3f} | {np.min(t):.3f} | {np.median(t) / ref:.2f}x |")
    onnx_bytes = dir_bytes(work / "onnx") - (work / "onnx" / export.MANIFEST).stat().st_size
    print(f"\nweights (backbone + adapters safetensors): {weights / 1e6:.1f} MB; function arrays "
          f"(incl. prototypes): {onnx_manifest['weights_bytes'] / 1e6:.1f} MB")
    print(f"onnx: {onnx_bytes / 1e6:.1f} MB ({onnx_bytes / weights:.3f}x the weights), files "
          f"{list(onnx_manifest['files'])}; check error {onnx_manifest['verification']['max_abs_error']}")
    if hlo_manifest is not None:
        module = (work / "stablehlo" / export.STABLEHLO_FILE).stat().st_size
        wfile = (work / "stablehlo" / export.WEIGHTS_FILE).stat().st_size
        print(f"stablehlo: module {module / 1e6:.2f} MB + weights {wfile / 1e6:.1f} MB "
              f"({(module + wfile) / weights:.3f}x); check error "
              f"{hlo_manifest['verification']['max_abs_error']}")
    for k, v in timings.items():
        print(f"{k}: {v:.1f} s")


if __name__ == "__main__":
    main()
