"""The `addinov3` command line: parses and dispatches; the work lives in the library modules."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

PATCH_SIZE = 16  # every DINOv3 variant's
# `configs/` of the source tree: `--config configs/demo.py` also works outside the repository root.
SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_empty(text: str) -> str:
    """argparse type: a word that is not blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a word, got an empty string")
    return text.strip()


def patch_multiple(text: str) -> int:
    """argparse type: an image size, a positive multiple of the patch size (16)."""
    value = positive_int(text)
    if value % PATCH_SIZE:
        lower = max(PATCH_SIZE, value // PATCH_SIZE * PATCH_SIZE)
        raise argparse.ArgumentTypeError(f"expected a positive multiple of the patch size "
                                         f"{PATCH_SIZE} (e.g. {lower} or {lower + PATCH_SIZE}), got {value}")
    return value


def _convert(args: argparse.Namespace) -> int:
    if args.kind == "model":
        missing = [f"--{n}" for n in ("dinov3", "clip-text", "adapters")
                   if getattr(args, n.replace("-", "_")) is None]
        if missing or args.source:
            raise UsageError("convert model takes --dinov3, --clip-text and --adapters (not --source)"
                             + (f"; missing {' '.join(missing)}" if missing else ""))
        from weight_conversion import model_dir

        spec = model_dir.convert_model(args.dinov3, args.clip_text, args.adapters, args.output,
                                       activation=args.activation, overwrite=args.overwrite)
        print(f"wrote {args.output}: model directory (backbone {spec['backbone_variant']}, text "
              f"tower {spec['text_tower_variant']}, adapters); load it with predict / eval")
        return 0
    if args.source is None:
        raise UsageError(f"convert {args.kind} needs --source PATH (or hf://ORG/REPO)")
    if args.kind == "dinov3":
        from weight_conversion import dinov3 as conv

        meta = conv.convert(args.source, args.output, variant=args.variant,
                            num_heads=args.num_heads, overwrite=args.overwrite)
    elif args.kind == "clip-text":
        from weight_conversion import clip_text as conv

        meta = conv.convert(args.source, args.output, variant=args.variant,
                            activation=args.activation, vocab=args.vocab, overwrite=args.overwrite)
    else:
        from weight_conversion import adapters as conv

        layers = tuple(int(i) for i in args.feature_layers.split(","))
        meta = conv.convert(args.source, args.output, feature_layers=layers,
                            overwrite=args.overwrite)
    print(f"wrote {args.output}: {meta['architecture']} {meta['variant']} "
          f"({meta['param_count']:,} parameters, from {meta['source_format']})")
    return 0


def _parity(args: argparse.Namespace) -> int:
    from addinov3_jax.commands import parity

    if (args.source is None) == (args.random is None):
        raise UsageError("give exactly one of --source PATH or --random VARIANT")
    if args.kind == "dinov3":
        size = tuple(int(s) for s in args.image_size.split(","))
        ok = parity.dinov3(source=args.source, random_variant=args.random,
                           image_size=size if len(size) == 2 else size * 2, seed=args.seed,
                           batch=args.batch, atol=args.atol, dtype=args.dtype)
    else:
        ok = parity.clip_text(source=args.source, random_variant=args.random,
                              activation=args.activation, seed=args.seed, atol=args.atol,
                              dtype=args.dtype)
    return 0 if ok else 1


def load_config(path: str, overrides: list[str]):
    """An ml_collections config file (`path[:arg]`) with `--config.a.b=value` overrides,
    validated (`config.validate`). Any problem is a `ConfigError` naming the field."""
    from absl import flags
    from ml_collections import config_flags

    from addinov3_jax import config as config_lib

    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise SystemExit(f"addinov3: unrecognized arguments: {' '.join(bad)}")
    file, colon, arg = path.partition(":")
    if file and not os.path.isfile(file) and os.path.isfile(SHIPPED_CONFIGS.parent / file):
        path = str(SHIPPED_CONFIGS.parent / file) + colon + arg  # `configs/x.py` from anywhere
    elif not file or not os.path.isfile(file):
        raise config_lib.ConfigError(f"{file}: no such config file (the shipped ones are "
                                     f"{', '.join(sorted(p.name for p in SHIPPED_CONFIGS.glob('*.py')))} "
                                     f"in {SHIPPED_CONFIGS})")
    fv = flags.FlagValues()
    argv = ["addinov3", f"--config={path}", *overrides]
    # sys_argv: the overrides are these, not the process's (library calls, tests).
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    try:
        fv(argv)
    except Exception as e:  # absl wraps errors of the file and of the overrides
        cause = e.__cause__ or e.__context__
        err = cause if isinstance(cause, config_lib.ConfigError) else e
        if isinstance(err, config_lib.ConfigError):
            if "Traceback" in str(err):  # ml_collections quotes the config file's error
                raise config_lib.ConfigError(_flag_message(err)) from None
            raise err from None
        raise config_lib.ConfigError(f"{path}: {_flag_message(e)}") from None
    return config_lib.validate(fv.config)


def _flag_message(e: Exception) -> str:
    """absl's error for a config file or override, on one line: a misspelt field's own message
    (not the KeyError's repr), the config file's error (not ml_collections' quoted traceback)."""
    cause, msg = e, str(e)
    while cause is not None:
        if isinstance(cause, KeyError) and cause.args:
            msg = str(cause.args[0])
            break
        cause = cause.__cause__ or cause.__context__
    if "Traceback (most recent call last)" in msg:
        last = msg.strip().splitlines()[-1]
        kind, _, text = last.partition(": ")
        msg = text if text and kind.rsplit(".", 1)[-1].endswith(("Error", "Exception")) else last
    msg = " ".join(msg.split())
    return msg.replace("flag --config=", "").replace("Illegal value ", "bad value ")


def _set_host_devices(config) -> None:
    """Simulated CPU devices (`mesh` sizes) must be requested before JAX starts."""
    if "XLA_FLAGS" not in os.environ and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        n = max(1, config.mesh.data) * config.mesh.fsdp * config.mesh.tensor
        if n > 1:
            os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"


def _train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    _set_host_devices(config)
    from addinov3_jax.runtime import trainer as train

    return train.main_entry(config, args.workdir)


def _plan(args: argparse.Namespace) -> int:
    import json

    config = load_config(args.config, args.overrides)
    _set_host_devices(config)
    from addinov3_jax.commands import plan

    p = plan.plan(config)
    print(json.dumps(p, indent=2) if args.json else plan.table(p))
    return 0


def _dataset_names() -> list[str]:
    from addinov3_jax.data.readers import DATASETS

    return list(DATASETS)


def _data_inspect(args: argparse.Namespace) -> int:
    from collections import Counter

    from addinov3_jax.data import readers

    records, report = readers.read(args.name, args.root, split=args.split,
                                   on_bad_sample=args.on_bad_sample)
    counts = Counter((r.class_folder, r.label) for r in records)
    print(f"{args.name} {args.split}: {len(records)} images")
    for cls in sorted({r.class_folder for r in records}):
        masks = sum(1 for r in records if r.class_folder == cls and r.has_mask)
        print(f"  {cls:<16} normal {counts[(cls, 0)]:>5}  anomalous {counts[(cls, 1)]:>5}  "
              f"masks {masks:>5}")
    print(report.summary())
    return 0


def _data_make_meta(args: argparse.Namespace) -> int:
    from addinov3_jax.data import readers

    records = []
    for split in args.splits.split(","):
        recs, report = readers.read(args.name, args.root, split=split,
                                    on_bad_sample=args.on_bad_sample)
        records += recs
        print(report.summary())
    print(f"wrote {readers.write_meta(args.root, records)} ({len(records)} records)")
    return 0


def _data_build(args: argparse.Namespace) -> int:
    from addinov3_jax.data import tfds_builders

    builder = tfds_builders.build(args.name, args.manual_dir, args.data_dir,
                                  on_bad_sample=args.on_bad_sample)
    print(f"built {builder.info.full_name} in {builder.data_dir}: "
          + ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items()))
    return 0


def _data_synthetic(args: argparse.Namespace) -> int:
    from addinov3_jax.data import synthetic

    root = synthetic.generate(args.output, size=args.size, normal=args.normal,
                              per_defect=args.per_defect, seed=args.seed)
    print(f"wrote the synthetic dataset to {root}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    if "XLA_FLAGS" not in os.environ and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    from addinov3_jax.commands import demo

    return demo.run(workdir=args.workdir, seed=args.seed, dinov3=args.dinov3,
                    clip_text=args.clip_text, quick=args.quick, image_size=args.image_size)


def _eval(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    _set_host_devices(config)
    from addinov3_jax.runtime import evaluator as evaluate

    results = evaluate.run_from_config(config, args.workdir)
    print(evaluate.markdown(results))
    print(f"wrote {args.workdir}/results.json, results.md, heatmaps/, curves/")
    return 0


def _fewshot_config(args: argparse.Namespace):
    """The few-shot settings of `--reference` / `--fusion` / `--augment` (None without a bank)."""
    if args.reference is None:
        if args.fusion is not None or args.augment is not None:
            raise UsageError("--fusion and --augment need --reference DIR (a folder of normal images)")
        return None
    from addinov3_jax.models import fewshot

    return fewshot.FewShotConfig(fusion=args.fusion or "add", augment=args.augment or "none")


def false_alarm_rate(text: str) -> float:
    """argparse type: a probability strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), e.g. 0.05, got {value}")
    return value


def _calibrate(args: argparse.Namespace) -> int:
    from addinov3_jax.commands import calibrate

    record, path = calibrate.calibrate(
        args.checkpoint, args.class_name, args.good, args.false_alarm_rate,
        reference=args.reference, shots=args.shots, output=args.output,
        image_size=args.image_size, batch_size=args.batch_size, fewshot_config=_fewshot_config(args))
    g = record["good_scores"]
    print(f"calibrated {args.class_name!r} on {record['n']} good images at a false-alarm rate of "
          f"{record['alpha']:g}: image threshold {record['image_threshold']:.6g} (the "
          f"{record['k']}-th smallest score; good scores {g['min']:.4g} .. {g['max']:.4g}), pixel "
          f"threshold {record['pixel_threshold']:.6g}")
    if record.get("split") and "bank" in record["split"]:
        print(f"few-shot bank: {', '.join(record['split']['bank'])} (predict --reference must hold "
              "exactly these images)")
    print(f"wrote {path}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from addinov3_jax.commands import predict
    from addinov3_jax.io import model_dir

    fs = _fewshot_config(args)
    calibration = identity = None
    if args.fail_on_defect and args.calibration is None:
        raise UsageError("--fail-on-defect needs --calibration auto|FILE (the threshold)")
    if args.calibration is not None:
        from addinov3_jax import calibration as calib

        directory = model_dir.resolve(args.checkpoint)
        path = (directory / "calibration" / calib.file_name(args.class_name)
                if args.calibration == "auto" else Path(args.calibration))
        calibration = calib.read(path)
        identity = model_dir.identity(directory)
    from addinov3_jax.runtime import distributed

    if args.fsdp > 1 or args.tensor > 1:  # parameters split over fsdp x tensor devices
        mesh = distributed.make_mesh(-1, args.fsdp, args.tensor)
    else:  # data parallel: every device a replica (the most devices that split the batch)
        mesh = distributed.default_mesh(args.batch_size)
    model = predict.load_model(args.checkpoint, mesh)  # straight onto the mesh, sharded
    result = predict.predict(model, args.images, args.class_name, args.output,
                             image_size=args.image_size, batch_size=args.batch_size,
                             save_maps=args.save_maps, scale=args.scale,
                             text_cache_dir=model_dir.text_cache_dir(args.checkpoint, args.output),
                             mesh=mesh, reference=args.reference, fewshot_config=fs,
                             calibration=calibration, model_identity=identity)
    for item in result.skipped:
        print(f"skipped {item['image']}: {item['error']}", file=sys.stderr)
    for item in result.not_drawn:
        print(f"no heatmap for {item['image']} (its scores are kept): {item['error']}", file=sys.stderr)
    lo, hi = result.scale
    if args.reference is not None:
        print(f"few-shot: fused with a memory bank of the normal images in {args.reference}")
    print(f"wrote heatmaps and scores for {len(result.images)} images to {args.output} "
          f"(colour scale {args.scale}: {lo:.4g} .. {hi:.4g})"
          + (f"; skipped {len(result.skipped)} unreadable (listed in scores.json)" if result.skipped else ""))
    if calibration is not None:
        bad = [r for r in result.images if r.get("verdict") == "defective"]
        print(f"verdicts ({calibration['file']}, image threshold {calibration['image_threshold']:.6g}): "
              f"{len(bad)} defective, {len(result.images) - len(bad)} good; masks in "
              f"{Path(args.output) / 'masks'}")
        if args.fail_on_defect and bad:
            return 3
    return 0


def _export(args: argparse.Namespace) -> int:
    from addinov3_jax.commands import export

    if args.reference is None and (args.fusion is not None or args.augment is not None):
        raise UsageError("--fusion and --augment need --reference DIR (a folder of normal images)")
    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    manifest = export.export(args.checkpoint, args.class_name, args.output, format=args.format,
                             image_size=args.image_size, reference=args.reference,
                             calibration=args.calibration, fusion=args.fusion, augment=args.augment,
                             platforms=platforms, overwrite=args.overwrite)
    err = manifest["verification"]["max_abs_error"]
    print(f"wrote {args.output}: {args.format} detector for {args.class_name!r} at "
          f"{args.image_size}x{args.image_size} ({', '.join(manifest['files'])}, {export.MANIFEST}); "
          f"matches predict within {err['map']:.2g} (maps) and {err['score']:.2g} (scores), "
          f"tolerance {export.RTOL:g} relative")
    return 0


def _add_bank_args(p: argparse.ArgumentParser, reference_help: str) -> None:
    """--reference / --fusion / --augment: the few-shot bank, as predict, calibrate and export
    take it."""
    from addinov3_jax.models import fewshot

    p.add_argument("--reference", default=None, metavar="DIR", help=reference_help)
    p.add_argument("--fusion", choices=fewshot.FUSIONS, default=None,
                   help="with --reference: add = zero-shot + few-shot/2 (default), none = few-shot only")
    p.add_argument("--augment", choices=tuple(fewshot.AUGMENTS), default=None,
                   help="with --reference: views of each reference image in the bank (default none)")


def build_parser() -> argparse.ArgumentParser:
    from addinov3_jax.commands import predict as predict_lib
    from addinov3_jax.data import readers
    from addinov3_jax.models import clip_text, layers

    parser = argparse.ArgumentParser(
        prog="addinov3",
        description="AD-DINOv3 zero-shot anomaly detection in JAX (frozen DINOv3 + CLIP text).",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (before the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("convert", help="convert PyTorch / Hugging Face weights to a converted dir",
                       description="Convert a checkpoint; the format is auto-detected.")
    p.add_argument("kind", choices=["dinov3", "clip-text", "adapters", "model"],
                   help="model: assemble a model directory from --dinov3, --clip-text, --adapters")
    p.add_argument("--source", default=None,
                   help="official .pth/.pt, HF directory, .safetensors, OpenCLIP file, or "
                        "hf://ORG/REPO (fetched with huggingface_hub; honours HF_HOME, HF_HUB_OFFLINE)")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty output directory")
    p.add_argument("--dinov3", default=None,
                   help="model: the backbone (converted dir, original file / HF dir or hf://...)")
    p.add_argument("--clip-text", default=None,
                   help="model: the text tower (converted dir, original file / HF dir or hf://...)")
    p.add_argument("--adapters", default=None,
                   help="model: the adapters (converted dir or official .pth)")
    p.add_argument("--variant", default=None, help="expected variant (default: auto-detect)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="dinov3: heads of a custom model whose shapes match no variant")
    p.add_argument("--activation", choices=tuple(clip_text.ACTIVATIONS), default=None,
                   help="clip-text: MLP activation stored in the metadata (default: per source)")
    p.add_argument("--vocab", default=None,
                   help="clip-text: bpe_simple_vocab_16e6.txt.gz to store beside the weights")
    p.add_argument("--feature-layers", default="5,11,17,23",
                   help="adapters: the backbone blocks the adapters were trained on")
    p.set_defaults(run=_convert)

    p = sub.add_parser("parity", help="per-layer error table against the PyTorch reference",
                       description="Runs transformers' model and ours on the same input; exits "
                                   "non-zero past the tolerance. Needs torch + transformers: "
                                   "pip install -c requirements/constraints.txt -e '.[test]'")
    p.add_argument("kind", choices=["dinov3", "clip-text"])
    p.add_argument("--source", default=None, help="checkpoint to compare (any supported format)")
    p.add_argument("--random", default=None, metavar="VARIANT",
                   help="compare randomly initialised models of this variant (no file needed)")
    p.add_argument("--image-size", default="224", help="dinov3: H or H,W (default 224)")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--activation", choices=tuple(clip_text.ACTIVATIONS), default="quick_gelu",
                   help="clip-text with --random: activation of both towers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atol", type=float, default=None, help="tolerance (default per model)")
    p.add_argument("--dtype", choices=layers.DTYPES, default="float32",
                   help="bfloat16: also run ours in bf16 and report its error against the "
                        "reference and against our fp32 (relative L2 per layer)")
    p.set_defaults(run=_parity)

    p = sub.add_parser("train", help="train the adapters (configs/<name>.py)",
                       description="Train (or resume) in WORKDIR. Override any config field with "
                                   "--config.FIELD=VALUE, e.g. --config.train.epochs=10.")
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--workdir", required=True)
    p.set_defaults(run=_train)

    p = sub.add_parser("plan", help="per-device memory of the compiled steps (no allocation)",
                       description="Lowers and compiles the feature, train and predict steps for the "
                                   "config's mesh from abstract shapes only (no weights, no data) "
                                   "and prints per-device parameter, optimizer and temporary bytes.")
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_plan)

    p = sub.add_parser("eval", help="zero-shot or few-shot evaluation, writes results.json / results.md",
                       description="Evaluate WORKDIR/model on config.eval.datasets (NAME: root, classes) "
                                   "and "
                                   "write results.json, results.md, heatmaps/ and curves/ there. "
                                   "Override fields with --config.FIELD=VALUE; few-shot: "
                                   "--config.eval.shots=K --config.eval.shot_seeds='(0,1,2)' "
                                   "(references from each class's train/good images).")
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--workdir", required=True)
    p.set_defaults(run=_eval)

    p = sub.add_parser("predict", help="anomaly maps for your own images",
                       description="Heatmap overlays (PNG), optional raw maps (NPY) and image "
                                   "scores (CSV / JSON) for images of any size.")
    p.add_argument("--checkpoint", required=True, help="a model dir or a training workdir")
    p.add_argument("--class-name", required=True, type=non_empty,
                   help="the object word for the prompts (the demo's model knows 'object')")
    p.add_argument("--output", required=True)
    p.add_argument("--image-size", type=patch_multiple, default=512,
                   help="network input size, a multiple of 16 (default 512)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--fsdp", type=positive_int, default=1, metavar="N",
                   help="split the model's parameters over N devices (e.g. vit7b16 on 8 x 16 GB); "
                        "the batch is split over all devices, so --batch-size must divide evenly")
    p.add_argument("--tensor", type=positive_int, default=1, metavar="N",
                   help="split heads / hidden units over N devices (tensor parallelism)")
    p.add_argument("--save-maps", action="store_true", help="also write maps/<name>.npy")
    p.add_argument("--scale", choices=predict_lib.SCALES, default="run",
                   help="heatmap colours: run = min..max of this run's maps (default), fixed = 0..1")
    _add_bank_args(p, "few-shot: a folder of normal images of the class; their patch memory "
                      "bank is fused with the zero-shot maps and scores")
    p.add_argument("--calibration", default=None, metavar="auto|FILE",
                   help="verdicts, normalized scores, masks/ and defect regions from a calibration "
                        "(auto: <model dir>/calibration/<class>.json, from addinov3 calibrate)")
    p.add_argument("--fail-on-defect", action="store_true",
                   help="with --calibration: exit status 3 when any image is defective")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.set_defaults(run=_predict)

    p = sub.add_parser("calibrate", help="a threshold with a guaranteed false-alarm rate, from good images",
                       description="Split-conformal calibration: scores the good images with the "
                                   "predict path and stores the image and pixel thresholds at which a "
                                   "new good image is flagged with probability <= the false-alarm "
                                   "rate, as calibration/<class>.json in the model directory.")
    p.add_argument("--checkpoint", required=True, help="a model dir or a training workdir")
    p.add_argument("--class-name", required=True, type=non_empty)
    p.add_argument("--good", required=True, metavar="DIR",
                   help="a folder of good images of the class (never the few-shot bank's)")
    p.add_argument("--false-alarm-rate", required=True, type=false_alarm_rate, metavar="A",
                   help="e.g. 0.05; needs at least ceil(1/A) - 1 good images (19 for 0.05)")
    _add_bank_args(p, "few-shot bank (as predict --reference); the --good folder itself is split: "
                      "its first --shots images form the bank, the rest calibrate")
    p.add_argument("--shots", type=positive_int, default=4,
                   help="bank size when --reference is the --good folder (default 4)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="write here instead of <model dir>/calibration/<class>.json")
    p.add_argument("--image-size", type=patch_multiple, default=512)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.set_defaults(run=_calibrate)

    from addinov3_jax.commands.export import baked_in

    p = sub.add_parser(
        "export", help="a detector you can ship: ONNX or StableHLO (uint8 images -> maps, scores)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill("Exports the predict path for one class at one image size: uint8 images "
                    "(B, S, S, 3) -> map (B, S, S) float32, score (B,) float32 [, verdict (B,) "
                    "bool]; the batch B is free. Images must already be S x S (resize with PIL "
                    "bilinear, as predict does). Attention is exported with the plain XLA formula "
                    "(the cuDNN fused kernel cannot be exported). The artifact is checked against "
                    "predict (onnxruntime on CPU / serving.load) and refused beyond the tolerance; "
                    "detector.json beside it records class, size, model checksums, settings, "
                    "input / output names and the tolerance met.", 96),
        epilog="baked in:\n" + "\n".join(f"  - {line}" for line in baked_in(True, True, "onnx"))
        + "\n  (few-shot bank with --reference, verdict with --calibration; StableHLO keeps the "
          "arrays in weights.safetensors, passed as arguments)")
    p.add_argument("--checkpoint", required=True, help="a model dir or a training workdir")
    p.add_argument("--class-name", required=True, type=non_empty,
                   help="the object word for the prompts")
    p.add_argument("--format", choices=["onnx", "stablehlo"], required=True)
    p.add_argument("--image-size", type=patch_multiple, default=512,
                   help="S: the exported input size, a multiple of the patch size (default 512)")
    p.add_argument("--output", required=True, help="directory to write (created atomically)")
    _add_bank_args(p, "few-shot: normal images of the class; their memory bank is baked in")
    p.add_argument("--calibration", default=None, metavar="auto|FILE",
                   help="JSON with image_threshold and pixel_threshold (auto: <model>/calibration/"
                        "<class>.json); adds verdict = score > image_threshold")
    p.add_argument("--platforms", default="cpu,cuda,tpu",
                   help="stablehlo: platforms of the one artifact (default cpu,cuda,tpu; must include "
                        "this machine's, where it is checked)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(run=_export)

    p = sub.add_parser("data", help="inspect, index, build or generate datasets",
                       description="Dataset tools. NAME: " + ", ".join(_dataset_names())
                       + ", folder (your own: CLASS/normal, CLASS/anomalous, CLASS/masks) or "
                       "meta:NAME (read through ROOT/meta.json).")
    dsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = dsub.add_parser("inspect", help="count images per class and split")
    q.add_argument("name")
    q.add_argument("--root", required=True)
    q.add_argument("--split", default="test")
    q.add_argument("--on-bad-sample", choices=readers.ON_BAD_SAMPLE, default="error")
    q.set_defaults(run=_data_inspect)
    q = dsub.add_parser("make-meta", help="write ROOT/meta.json (relative paths) for a dataset")
    q.add_argument("name")
    q.add_argument("--root", required=True)
    q.add_argument("--splits", default="test", help="comma-separated splits to index")
    q.add_argument("--on-bad-sample", choices=readers.ON_BAD_SAMPLE, default="error")
    q.set_defaults(run=_data_make_meta)
    q = dsub.add_parser("build", help="build ArrayRecord files with the TFDS builder")
    q.add_argument("name")
    q.add_argument("--manual-dir", required=True, help="the raw dataset root")
    q.add_argument("--data-dir", required=True, help="TFDS data dir to write")
    q.add_argument("--on-bad-sample", choices=readers.ON_BAD_SAMPLE, default="error")
    q.set_defaults(run=_data_build)
    q = dsub.add_parser("synthetic", help="generate the synthetic anomaly dataset (MVTec layout)")
    q.add_argument("--output", required=True)
    q.add_argument("--size", type=positive_int, default=128)
    q.add_argument("--normal", type=positive_int, default=10)
    q.add_argument("--per-defect", type=positive_int, default=8)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(run=_data_synthetic)

    p = sub.add_parser("demo", help="the embedded default: runs end to end with no downloads",
                       description="Synthetic data, tiny random towers (or your converted weights), "
                                   "training on 8 simulated devices, zero-shot evaluation of the "
                                   "trained vs the untrained model.")
    p.add_argument("--workdir", default="demo_out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dinov3", default=None, help="converted DINOv3 directory (optional)")
    p.add_argument("--clip-text", default=None, help="converted CLIP text directory (optional)")
    p.add_argument("--quick", action="store_true", help="64 px, 2 epochs (a smoke test)")
    p.add_argument("--image-size", type=patch_multiple, default=None,
                   help="network input size, a multiple of 16 (default 128; real weights deserve 512)")
    p.set_defaults(run=_demo)
    return parser


class UsageError(ValueError):
    """A command line that cannot be run as given."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input, not a bug: reported as one line (`--debug` for the traceback)."""
    from addinov3_jax.data.records import DataError
    from addinov3_jax.io.checkpoint_io import CheckpointError
    from addinov3_jax.io.workdir import WorkdirBusy
    from addinov3_jax.models.tokenizer import TokenizerError

    return (CheckpointError, DataError, TokenizerError, UsageError, WorkdirBusy, ValueError, OSError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if args.command in ("train", "eval", "plan"):
        args.overrides = extra
    elif extra:
        build_parser().parse_args(argv)  # reports the unknown arguments and exits
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"addinov3 {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # known user errors: one clear line, exit 2; --debug: the traceback
        if args.debug or not isinstance(e, _user_errors()):
            raise
        print(f"addinov3 {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
