"""`addinov3 export`: a detector you can ship, as ONNX or as a StableHLO artifact.

The exported function is the whole `predict` path for one class at one image size:

  images (B, S, S, 3) uint8 RGB -> map (B, S, S) float32, score (B,) float32 [, verdict (B,) bool]

with, inside: scaling to [0, 1] and the backbone's mean / std, the DINOv3 backbone, the head with
the class's text prototypes as constants, optionally the few-shot memory bank of `--reference`
(built exactly as `predict --reference` builds it) and the calibration's image threshold
(`verdict = score > image_threshold`). The batch is symbolic. `predict` resizes on the host (PIL
bilinear) before the network, so the exported function takes images already at S x S: resize
them the same way (`PIL.Image.resize((S, S), Image.BILINEAR)`; an S x S image is not touched).

Formats (files beside `detector.json`, which records class, size, model identity, settings,
input / output names and the verified tolerance):
* `onnx`: `detector.onnx` (+ `detector.onnx.data` when the weights pass 2 GB), converted by
  jax2onnx from the same JAX function (no hand-written graph); the backbone runs unrolled with the
  plain XLA attention formula. Verified in onnxruntime (CPU) before anything is written.
* `stablehlo`: `detector.stablehlo` (a `jax.export` artifact for several platforms) and
  `weights.safetensors` (every array the function reads: passed as arguments, not baked into
  the module); `addinov3_jax.serving.load(DIR)` runs it with jax, numpy and safetensors only.

The output directory appears only once complete and verified (written beside it, then renamed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("onnx", "stablehlo")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
MANIFEST = "detector.json"
ONNX_FILE = "detector.onnx"
STABLEHLO_FILE = "detector.stablehlo"
WEIGHTS_FILE = "weights.safetensors"
INPUT_NAME = "images"
OUTPUT_NAMES = ("map", "score", "verdict")
# Maps and scores of the artifact must match `predict` within RTOL * max(1, max |predict|).
RTOL = 1e-4
ONNX_PROTO_LIMIT = 2**31 - 2**25  # protobuf's 2 GB, less room for the graph itself
ONNX_OPSET = 23


class ExportError(ValueError):
    """An export that cannot be made or does not match `predict`; the message says why."""


# ---------------------------------------------------------------------------------------------
# Model access: the only place this module calls into the model code. `_build` returns the
# pure function to export (params, uint8 images) -> (maps, scores), its arrays, and the
# `predict` path itself (for the constants baked in and for the check).


@dataclasses.dataclass
class Detector:
    """A class-specific detector: `forward(params, images_u8)` -> (maps, scores), traceable;
    `params` its arrays by flat name; `reference(images_u8)` the same through `predict`'s
    host preprocessing and jitted step; `info` what `detector.json` records about it."""

    forward: Callable[[dict[str, Any], Any], tuple[Any, Any]]
    params: dict[str, np.ndarray]
    reference: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    info: dict[str, Any]


def _build(checkpoint, class_name: str, image_size: int, *, reference=None, fusion=None,
           augment=None, scan_layers: bool = True) -> Detector:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from PIL import Image

    from addinov3_jax.data import references
    from addinov3_jax.data.pipeline import load_images, preprocess_image
    from addinov3_jax.io import model_dir
    from addinov3_jax.models import fewshot
    from addinov3_jax.models import model as ad
    from addinov3_jax.runtime import distributed, inference

    directory = model_dir.resolve(checkpoint)
    # What predict runs (default tower options); and the same weights with export options.
    predictor = inference.Predictor(model_dir.load(directory), distributed.default_mesh(1), fewshot_config=(
        fewshot.FewShotConfig(fusion=fusion or "add", augment=augment or "none") if reference else None))
    served = model_dir.load(directory, tower_options={"attention_impl": "xla",
                                                      "scan_layers": scan_layers})
    cfg, bcfg = served.config, served.backbone.config
    patch = bcfg.patch_size
    if image_size <= 0 or image_size % patch:
        raise ExportError(f"--image-size {image_size} must be a positive multiple of the backbone's "
                          f"patch size {patch}")
    size, grid = (image_size, image_size), (image_size // patch, image_size // patch)
    mean, std = np.asarray(bcfg.pixel_mean, np.float32), np.asarray(bcfg.pixel_std, np.float32)

    table = predictor.text_table([class_name])  # (1, E, 2), what predict bakes per batch
    bank, fs, bank_info = None, predictor.fewshot, None
    if reference is not None:
        refs = references.reference_paths(reference)
        bank = predictor.build_bank(load_images(refs, image_size, bcfg.pixel_mean, bcfg.pixel_std),
                                    batch_size=8)
        bank_info = {"folder": str(reference), "count": len(refs), "rows": bank.rows,
                     "images": {p.name: _sha256(p.read_bytes()) for p in refs},
                     "settings": dataclasses.asdict(fs)}

    graphdef, state = nnx.split(served.backbone)
    arrays = {"backbone": state, "adapters": ad.trainable_params(served),
              "text_e2": np.asarray(distributed.gather(table))[0]}
    if bank is not None:
        arrays["bank_lmd"] = np.asarray(distributed.gather(bank.features_lmd))
        # One nearest-neighbour block (no loop in the graph): the same exact maximum.
        fs = dataclasses.replace(fs, block_size=int(arrays["bank_lmd"].shape[1]))
    named, treedef = _flatten(arrays)

    def forward(params, images_u8):
        tree = jax.tree.unflatten(treedef, [params[k] for k in named])
        x = (images_u8.astype(jnp.float32) / 255.0 - mean) / std
        backbone = nnx.merge(graphdef, tree["backbone"])
        text = jnp.broadcast_to(tree["text_e2"], (x.shape[0], *tree["text_e2"].shape))
        if "bank_lmd" not in tree:
            return ad.predict_step(backbone, tree["adapters"], x, text, cfg)
        maps, scores, taps = ad.predict_step(backbone, tree["adapters"], x, text, cfg, with_taps=True)
        fs_maps, fs_scores = fewshot.predict_features(tree["bank_lmd"], taps, grid, size, fs)
        return fewshot.fuse(maps, scores, fs_maps, fs_scores, fs.fusion, fs.fusion_weight)

    def reference_fn(images_u8):
        x = np.stack([preprocess_image(Image.fromarray(im), image_size, bcfg.pixel_mean, bcfg.pixel_std)
                      for im in images_u8])
        with jax.default_matmul_precision("highest"):
            maps, scores = predictor(x, np.zeros(len(x), np.int32), table, bank=bank)
        return distributed.gather(maps), distributed.gather(scores)

    info = {"model": _model_identity(directory), "head": cfg.to_dict(),
            "backbone": {"patch_size": patch, "pixel_mean": mean.tolist(), "pixel_std": std.tolist(),
                         "attention": "xla", "scan_layers": scan_layers},
            "fewshot": bank_info}
    return Detector(forward, {k: np.asarray(v) for k, v in named.items()}, reference_fn, info)


def _model_identity(directory: Path) -> dict[str, Any]:
    """The model directory, the checksum of its `model.json` and each part's variant and file
    checksums (from the part's `addinov3.json`)."""
    spec_file = directory / "model.json"
    spec = json.loads(spec_file.read_text())
    ident: dict[str, Any] = {"directory": str(directory.absolute()),
                             "model_json_sha256": _sha256(spec_file.read_bytes())}
    for part in ("backbone", "text_tower", "adapters"):
        path = Path(spec[part]) if Path(spec[part]).is_absolute() else directory / spec[part]
        meta = json.loads((path / "addinov3.json").read_text())
        ident[part] = {k: meta[k] for k in ("architecture", "variant", "source_format", "files")
                       if k in meta}
    return ident


# ---------------------------------------------------------------------------------------------
# The command


def export(checkpoint, class_name: str, output, *, format: str = "onnx", image_size: int = 512,
           reference=None, calibration=None, fusion: str | None = None, augment: str | None = None,
           platforms: Sequence[str] = DEFAULT_PLATFORMS, check_images: int = 3,
           overwrite: bool = False) -> dict[str, Any]:
    """Exports the detector of `class_name` to `output` and returns its `detector.json`.

    `calibration`: a JSON file with `image_threshold` and `pixel_threshold` (or "auto":
    `<model dir>/calibration/<class>.json`); adds the `verdict` output. The artifact is checked
    against `predict` on `check_images` images (batches of all of them and of one) and refused
    (nothing written) when maps or scores differ by more than `RTOL * max(1, max |predict|)`.
    """
    from addinov3_jax.io import checkpoint_io

    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    bad = [p for p in platforms if p not in PLATFORMS]
    if format == "stablehlo" and (bad or not platforms):
        raise ExportError(f"platforms must be among {PLATFORMS}, got {list(platforms)}")
    if format == "stablehlo":
        from addinov3_jax import serving

        here = serving.backend_platform()
        if here not in platforms:
            raise ExportError(f"a StableHLO export is checked on this machine ({here}): add {here} to "
                              f"the platforms {', '.join(platforms)}")
    if check_images < 1:
        raise ExportError(f"check_images must be >= 1, got {check_images}")
    checkpoint_io.check_output(output, overwrite=overwrite)  # fail before any heavy work
    thresholds = _read_calibration(calibration, checkpoint, class_name)
    detector = _build(checkpoint, class_name, image_size, reference=reference, fusion=fusion,
                      augment=augment, scan_layers=format != "onnx")
    forward = _with_verdict(detector.forward, thresholds)
    names = list(OUTPUT_NAMES[: 3 if thresholds else 2])
    images = check_batch(image_size, check_images)
    want = detector.reference(images)

    manifest: dict[str, Any] = {
        "format": format, "class_name": class_name, "image_size": image_size,
        "input": {"name": INPUT_NAME, "shape": ["B", image_size, image_size, 3], "dtype": "uint8",
                  "layout": "NHWC, RGB, 0..255",
                  "resize": f"resize to {image_size}x{image_size} with PIL bilinear first (as predict)"},
        "outputs": [{"name": n, "shape": ["B", image_size, image_size] if n == "map" else ["B"],
                     "dtype": "bool" if n == "verdict" else "float32"} for n in names],
        "baked_in": baked_in(detector.info["fewshot"] is not None, thresholds is not None, format),
        **detector.info, "calibration": thresholds,
        "weights_bytes": int(sum(v.nbytes for v in detector.params.values())),
        "created_by": _versions(format),
    }
    with checkpoint_io.atomic_directory(output, overwrite=overwrite) as tmp:
        if format == "onnx":
            files = _write_onnx(tmp, forward, detector.params, image_size, names)
        else:
            files = _write_stablehlo(tmp, forward, detector.params, image_size, tuple(platforms))
            manifest.update({"platforms": list(platforms), "weights": WEIGHTS_FILE})
        manifest["files"] = {f: checkpoint_io.sha256_file(tmp / f) for f in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
        run = _onnx_runner(tmp, names) if format == "onnx" else _stablehlo_runner(tmp)
        manifest["verification"] = _verify(run, images, want, thresholds, manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return manifest


def baked_in(fewshot: bool, calibration: bool, format: str = "onnx") -> list[str]:
    """What an exported detector contains, in the words of `--help`."""
    where = "constants in the graph" if format == "onnx" else "arguments, read from weights.safetensors"
    return [
        "uint8 -> [0, 1] scaling and the backbone's pixel mean / std (images must already be S x S)",
        "the DINOv3 backbone (plain XLA attention formula" + (", blocks unrolled)" if format == "onnx"
                                                              else ")"),
        "the head: the trained adapters and the class's text prototypes",
        *(["the few-shot memory bank of --reference and its fusion with the zero-shot map and score"]
          if fewshot else []),
        *(["the calibration's image threshold: verdict = score > image_threshold"] if calibration else []),
        f"every weight, prototype and bank row: {where}",
    ]


def check_batch(image_size: int, count: int) -> np.ndarray:
    """Deterministic uint8 check images (count, S, S, 3): noise, a smooth gradient with a bright
    square, blocks; repeated with other seeds beyond three."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:image_size, 0:image_size] / max(image_size - 1, 1)
    out = []
    for i in range(count):
        if i % 3 == 0:
            im = rng.integers(0, 256, (image_size, image_size, 3))
        elif i % 3 == 1:
            im = np.stack([255 * xx, 255 * yy, 128 + 0 * xx], -1)
            s = image_size // 4
            im[s : 2 * s, s : 2 * s] = 250
        else:
            blocks = rng.integers(0, 256, (4, 4, 3))
            im = np.repeat(np.repeat(blocks, -(-image_size // 4), 0), -(-image_size // 4), 1)
            im = im[:image_size, :image_size]
        out.append(np.asarray(im, np.uint8))
    return np.stack(out)


def _with_verdict(forward, thresholds):
    if thresholds is None:
        return forward

    def with_verdict(params, images):
        maps, scores = forward(params, images)
        return maps, scores, scores > np.float32(thresholds["image_threshold"])

    return with_verdict


def _read_calibration(calibration, checkpoint, class_name: str) -> dict[str, Any] | None:
    if calibration is None:
        return None
    path = Path(calibration)
    if str(calibration) == "auto":
        from addinov3_jax import calibration as calib
        from addinov3_jax.io import model_dir

        path = model_dir.resolve(checkpoint) / "calibration" / calib.file_name(class_name)
        if not path.is_file():
            raise ExportError(f"--calibration auto: {path} does not exist (run `addinov3 calibrate` "
                              "for this class, or give a JSON file)")
    try:
        data = json.loads(path.read_text())
        out = {k: float(data[k]) for k in ("image_threshold", "pixel_threshold")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path}: not a calibration file with numeric image_threshold and "
                          f"pixel_threshold ({type(e).__name__}: {e})") from e
    if not all(np.isfinite(list(out.values()))):
        raise ExportError(f"{path}: thresholds must be finite, got {out}")
    return {"file": str(path), **out}


def _verify(run, images, want, thresholds, manifest) -> dict[str, Any]:
    """Runs the written artifact on all check images and on the first alone; raises ExportError
    when a map or score is off by more than the tolerance, or a verdict differs away from it."""
    want_maps, want_scores = np.asarray(want[0], np.float64), np.asarray(want[1], np.float64)
    err = {"map": 0.0, "score": 0.0}
    for idx in (slice(None), slice(0, 1)):
        got = run(images[idx])
        for name, g, w in (("map", got[0], want_maps[idx]), ("score", got[1], want_scores[idx])):
            if np.asarray(g).shape != w.shape:
                raise ExportError(f"the exported {name} has shape {np.asarray(g).shape}, predict "
                                  f"gives {w.shape}")
            err[name] = max(err[name], float(np.abs(np.asarray(g, np.float64) - w).max()))
        if thresholds is not None:
            t = thresholds["image_threshold"]
            near = np.abs(want_scores[idx] - t) <= RTOL * max(1.0, np.abs(want_scores).max())
            if np.any((np.asarray(got[2]) != (want_scores[idx] > t)) & ~near):
                raise ExportError("the exported verdicts differ from score > image_threshold")
    scale = {"map": max(1.0, float(np.abs(want_maps).max())),
             "score": max(1.0, float(np.abs(want_scores).max()))}
    bad = {k: v for k, v in err.items() if v > RTOL * scale[k]}
    if bad:
        raise ExportError(f"the {manifest['format']} artifact does not match predict: max abs error "
                          + ", ".join(f"{k} {v:.3g} > {RTOL * scale[k]:.3g}" for k, v in bad.items())
                          + "; nothing written")
    return {"reference": "addinov3 predict's step (inference.Predictor, fp32, highest precision) on "
                         "PIL-preprocessed images",
            "images": int(len(images)), "batches": [int(len(images)), 1],
            "tolerance": {"rtol": RTOL, "rule": "max |artifact - predict| <= rtol * max(1, max |predict|)"},
            "max_abs_error": err}


# ---------------------------------------------------------------------------------------------
# ONNX


def _write_onnx(tmp: Path, forward, params, image_size: int, names):
    """jax2onnx conversion of `forward` with `params` as constants; external data above 2 GB.
    Returns the files written."""
    import jax
    import jax.numpy as jnp
    import onnx_ir
    from jax2onnx import to_onnx

    from addinov3_jax.commands import onnx_einsum

    for name in ("jax2onnx", "onnx_ir"):  # plugin discovery and serialisation chatter
        logging.getLogger(name).setLevel(logging.ERROR)
    onnx_einsum.install()  # einsums as MatMul: onnxruntime's CPU Einsum is ~20x slower
    consts = {k: jnp.asarray(v) for k, v in params.items()}
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"B, {image_size}, {image_size}, 3"), jnp.uint8)
    with jax.default_matmul_precision("highest"):
        model = to_onnx(lambda images: forward(consts, images), [spec], model_name="addinov3_detector",
                        opset=ONNX_OPSET, return_mode="ir", input_names=[INPUT_NAME],
                        output_names=list(names))
    big = sum(v.nbytes for v in params.values()) > ONNX_PROTO_LIMIT
    files = [ONNX_FILE, *([ONNX_FILE + ".data"] if big else [])]
    onnx_ir.save(model, tmp / ONNX_FILE, external_data=files[1] if big else None)
    return files


def _onnx_runner(directory: Path, names):
    """The written file in onnxruntime (CPU): images -> the outputs `names`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(directory / ONNX_FILE), providers=["CPUExecutionProvider"])
    return lambda images: session.run(list(names), {INPUT_NAME: images})


# ---------------------------------------------------------------------------------------------
# StableHLO


def _write_stablehlo(tmp: Path, forward, params, image_size: int, platforms) -> list[str]:
    """`jax.export` of `forward` for `platforms`, the weights as arguments (a safetensors file
    beside the module). Returns the files written."""
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    weights = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"B, {image_size}, {image_size}, 3"), jnp.uint8)
    with jax.default_matmul_precision("highest"):
        exported = jax.export.export(jax.jit(forward), platforms=platforms)(weights, spec)
    (tmp / STABLEHLO_FILE).write_bytes(exported.serialize())
    save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(tmp / WEIGHTS_FILE))
    return [STABLEHLO_FILE, WEIGHTS_FILE]


def _stablehlo_runner(directory: Path):
    """The written directory through `serving.load` on this machine's backend."""
    from addinov3_jax import serving

    detect = serving.load(directory)
    return lambda images: tuple(detect(images).values())


# ---------------------------------------------------------------------------------------------


def _flatten(tree) -> tuple[dict[str, Any], Any]:
    """`{name: leaf}` with '/'-joined paths (NNX variables' `/value` dropped) and the treedef."""
    import jax

    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    named = {}
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
        named[name] = leaf
    return named, treedef


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _versions(format: str) -> dict[str, str]:
    from importlib import metadata

    pkgs = ["addinov3-jax", "jax", "jaxlib"] + (["jax2onnx", "onnx-ir", "onnxruntime"]
                                                 if format == "onnx" else [])
    out = {}
    for p in pkgs:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "unknown"
    if format == "onnx":
        out["opset"] = str(ONNX_OPSET)
    return out

