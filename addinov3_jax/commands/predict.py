"""`addinov3 predict`: anomaly maps and scores for your own images (any sizes), batched.

Writes, under the output directory:
* `scores.csv`: one row per image (appended after every batch, so a crash keeps what was done);
* `scores.json` (at the end, also after a crash): class name, score mode, colour scale, the rows
  and the files that could not be read (`skipped`, with the reason);
* `heatmaps/<name>.png`: image | overlay side by side at the original size, a colour bar with
  tick labels and the image score;
* optionally `maps/<name>.npy`: the float32 map at the original size (written per batch).

Unreadable inputs are skipped and reported (printed, and listed in `scores.json`); the run fails
only when nothing could be read.

Colour scale (`scale`): `"run"` (default) maps the smallest map value of the whole run to dark
blue and the largest to dark red, so differences between and within images are visible (raw maps
often peak near 1e-2); the heatmaps are therefore drawn once all maps are known. `"fixed"` uses
0..1 (comparable across runs, drawn per batch). The scale used is printed on every colour bar and
stored in `scores.json`.

Few-shot (`reference`): a folder of normal images of the class becomes a memory bank (same
preprocessing as the inputs), and every map and score is fused with the few-shot branch
(`fewshot.fuse`; with "add" the values lie in [0, 2], so prefer the "run" colour scale);
`scores.json` records the reference folder, count and settings.

The class's text prototypes are cached on disk (`text_cache_dir`), so the 420 prompts are encoded
once per class, not once per run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from addinov3_jax import plots
from addinov3_jax.data import references
from addinov3_jax.data.pipeline import load_images, preprocess_image
from addinov3_jax.data.records import IMAGE_SUFFIXES, DataError, decode_image
from addinov3_jax.io import model_dir
from addinov3_jax.models import fewshot, sharding
from addinov3_jax.models import model as ad
from addinov3_jax.runtime import distributed
from addinov3_jax.runtime.inference import Predictor, pad_rows

SCALES = ("run", "fixed")
CSV_FIELDS = ("image", "name", "score", "max_pixel", "width", "height")
PENDING = ".pending_maps"  # network-resolution maps waiting for the run's colour scale


@dataclasses.dataclass
class Prediction:
    """What `predict` wrote: one row per image and the inputs it skipped (with the reason)."""

    images: list[dict]
    skipped: list[dict]
    scale: tuple[float, float]


def expand(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[dict]]:
    """Files as given, folders expanded to their images (sorted, recursively). A file given
    explicitly that is not an image (by suffix) is skipped and reported; a missing path is an
    error (nothing has been computed yet)."""
    out, skipped = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            out += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            if item.suffix.lower() in IMAGE_SUFFIXES:
                out.append(item)
            else:
                skipped.append({"image": str(item), "error": f"not an image file (suffix "
                                f"{item.suffix or 'none'!r}; expected one of {', '.join(IMAGE_SUFFIXES)})"})
        else:
            raise DataError(f"{item}: no such file or folder")
    if not out and not skipped:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    return out, skipped


def resolve_model_dir(checkpoint: str | os.PathLike) -> Path:
    """The model directory (`model.json`) of a model dir or of a training workdir (`model/`)."""
    path = Path(checkpoint)
    for candidate in (path, path / "model"):
        if (candidate / model_dir.MODEL_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: neither a model directory ({model_dir.MODEL_FILE}) nor a training "
                            "workdir with model/ inside")


def load_model(checkpoint: str | os.PathLike, mesh=None,
               rules=sharding.DEFAULT_RULES) -> ad.ADDinoV3:
    """A model directory (`model.json`) or a training workdir containing `model/`, loaded
    straight into the rules' shardings on `mesh` (no device ever holds a whole copy of a
    sharded tower)."""
    return model_dir.load(resolve_model_dir(checkpoint), mesh=mesh, rules=rules)


def text_cache_dir(checkpoint: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Where the text prototypes are cached: `<model dir>/text_cache` when writable, else
    `<output>/text_cache`."""
    candidate = resolve_model_dir(checkpoint) / "text_cache"
    try:
        candidate.mkdir(exist_ok=True)
        if os.access(candidate, os.W_OK):
            return candidate
    except OSError:
        pass
    return Path(output) / "text_cache"


def predict(model: ad.ADDinoV3, inputs, class_name: str, output: str | os.PathLike, *,
            image_size: int = 512, batch_size: int = 8, save_maps: bool = False,
            scale: str = "run", text_cache_dir: str | os.PathLike | None = None,
            mesh=None, reference: str | os.PathLike | None = None,
            fewshot_config: fewshot.FewShotConfig | None = None) -> Prediction:
    """Maps and scores for `inputs` (files / folders); see the module docstring for the outputs.

    Runs `inference.Predictor` on `mesh` (default: the devices that split `batch_size` evenly).
    `reference`: a folder of normal images of the class; their memory bank (settings:
    `fewshot_config`, default `FewShotConfig()`) is fused with every prediction.

    Raises `DataError` (after writing `scores.json`) when no input could be read.
    """
    from tqdm.auto import tqdm

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    paths, skipped = expand(inputs)
    out = Path(output)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    if save_maps:
        (out / "maps").mkdir(parents=True, exist_ok=True)
    pending = out / PENDING
    if scale == "run":
        pending.mkdir(exist_ok=True)
    cfg = model.backbone.config
    predictor = Predictor(model, mesh or distributed.default_mesh(batch_size),
                          fewshot_config=fewshot_config)
    bank, ref_info = None, None
    if reference is not None:
        refs = references.reference_paths(reference)
        bank = predictor.build_bank(load_images(refs, image_size, cfg.pixel_mean, cfg.pixel_std),
                                    batch_size=batch_size)
        fs = predictor.fewshot
        ref_info = {"folder": str(reference), "count": len(refs), "augment": fs.augment,
                    "fusion": fs.fusion, "fusion_weight": fs.fusion_weight,
                    "bank_rows": bank.rows, "images": [str(p) for p in refs]}
    # (1, E, 2), once per class (cached on disk); nothing to encode when no input is an image.
    table = predictor.text_table([class_name], cache_dir=text_cache_dir) if paths else None
    class_ids = np.zeros(batch_size, np.int32)
    names = _unique_names(paths)
    rows: list[dict] = []
    lo, hi = np.inf, -np.inf
    complete = False
    decoded: list[tuple[list[Path], list]] = []  # host-side images of the batch in flight

    def batches():
        for start in range(0, len(paths), batch_size):
            chunk, originals = [], []
            for p in paths[start : start + batch_size]:
                try:
                    originals.append(decode_image(p.read_bytes(), str(p)))
                    chunk.append(p)
                except (DataError, OSError) as e:
                    skipped.append({"image": str(p), "error": str(e)})
            if not chunk:
                continue
            decoded.append((chunk, originals))
            images = np.stack([preprocess_image(im, image_size, cfg.pixel_mean, cfg.pixel_std)
                               for im in originals])
            yield {"image": pad_rows(images, batch_size), "class_id": class_ids,  # one shape
                   "valid": (np.arange(batch_size) < len(chunk)).astype(np.int32)}

    try:
        with open(out / "scores.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for result in tqdm(predictor.run(batches(), table, bank=bank), desc="predict",
                               unit="batch", total=-(-len(paths) // batch_size), disable=not paths):
                chunk, originals = decoded.pop(0)
                batch_rows = []
                for p, im, m, s in zip(chunk, originals, result["maps"], result["scores"],
                                       strict=True):
                    w, h = im.size
                    name = names[p]
                    full = ad.resize_map(m, h, w)
                    if save_maps:
                        np.save(out / "maps" / f"{name}.npy", full)
                    row = {"image": str(p), "name": name, "score": float(s),
                           "max_pixel": float(full.max()), "width": w, "height": h}
                    if scale == "fixed":
                        _draw(out, im, full, row, class_name, (0.0, 1.0))
                    else:
                        np.save(pending / f"{name}.npy", m)
                    lo, hi = min(lo, float(m.min())), max(hi, float(m.max()))
                    batch_rows.append(row)
                writer.writerows(batch_rows)
                f.flush()
                rows += batch_rows
        complete = True
    finally:  # also after a crash or Ctrl-C: draw and index every finished map
        used = (0.0, 1.0) if scale == "fixed" or not rows else (lo, hi)
        if scale == "run":
            for row in rows:
                m = np.load(pending / f"{row['name']}.npy")
                im = decode_image(Path(row["image"]).read_bytes(), row["image"])
                _draw(out, im, ad.resize_map(m, row["height"], row["width"]), row, class_name, used)
            shutil.rmtree(pending, ignore_errors=True)
        (out / "scores.json").write_text(json.dumps({
            "class_name": class_name, "image_score": model.config.image_score,
            "scale": {"mode": scale, "min": used[0], "max": used[1]}, "complete": complete,
            "reference": ref_info, "images": rows, "skipped": skipped}, indent=2) + "\n")
    if not rows:
        first = skipped[0] if skipped else {"image": "-", "error": "no input"}
        raise DataError(f"none of the {len(skipped)} input(s) could be read (first: {first['image']}: "
                        f"{first['error']}); see {out / 'scores.json'}")
    return Prediction(rows, skipped, used)


def _draw(out: Path, image, full_map: np.ndarray, row: dict, class_name: str,
          scale: tuple[float, float]) -> None:
    plots.overlay(np.asarray(image), full_map, scale=scale, score=row["score"],
                  caption=f"{row['name']} ({class_name})").save(out / "heatmaps" / f"{row['name']}.png")


def _unique_names(paths: list[Path]) -> dict[Path, str]:
    """Output stems: the file's stem, with as many parent folders prefixed (and the extension
    appended) as it takes to tell it from every other input."""
    def name(p: Path, depth: int, ext: bool) -> str:
        parts = [*p.parent.parts[len(p.parent.parts) - depth:], p.stem + (f"_{p.suffix[1:]}" if ext else "")]
        return "_".join(x for x in parts if x not in ("/", ""))

    out: dict[Path, str] = {}
    for p in paths:
        for depth in range(len(p.parent.parts) + 1):
            for ext in (False, True):
                candidate = name(p, depth, ext)
                if sum(name(q, depth, ext) == candidate for q in paths) == 1:
                    break
            else:
                continue
            break
        out[p] = candidate
    return out
