"""`addinov3 predict`: anomaly maps and scores for your own images (any sizes), batched.

Writes, under the output directory: `heatmaps/<name>.png` (image | overlay side by side, at the
original size), optionally `maps/<name>.npy` (float32 map at the original size) and
`scores.csv` + `scores.json` (image score per file).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from addinov3_jax import model as ad
from addinov3_jax import plots
from addinov3_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
from addinov3_jax.data.records import IMAGE_SUFFIXES, DataError, decode_image


def expand(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted, recursively)."""
    out = []
    for item in map(Path, inputs):
        if item.is_dir():
            out += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            out.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    if not out:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    return out


def load_model(checkpoint: str | os.PathLike) -> ad.ADDinoV3:
    """A model directory (`model.json`) or a training workdir containing `model/`."""
    path = Path(checkpoint)
    if (path / ad.MODEL_FILE).is_file():
        return ad.load(path)
    if (path / "model" / ad.MODEL_FILE).is_file():
        return ad.load(path / "model")
    raise FileNotFoundError(f"{path}: neither a model directory ({ad.MODEL_FILE}) nor a training "
                            "workdir with model/ inside")


def predict(model: ad.ADDinoV3, inputs, class_name: str, output: str | os.PathLike, *,
            image_size: int = 512, batch_size: int = 8, save_maps: bool = False) -> list[dict]:
    from tqdm.auto import tqdm

    paths = expand(inputs)
    out = Path(output)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    if save_maps:
        (out / "maps").mkdir(parents=True, exist_ok=True)
    text = model.text_features([class_name])  # (1, E, 2), once
    rows = []
    names = _unique_names(paths)
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch"):
        chunk = paths[start : start + batch_size]
        originals = [decode_image(p.read_bytes(), str(p)) for p in chunk]
        batch = np.stack([
            (np.asarray(im.resize((image_size, image_size), Image.BILINEAR), np.float32) / 255.0
             - IMAGENET_MEAN) / IMAGENET_STD for im in originals])
        # Pad to a full batch so every call has the same shape (one compilation).
        pad = batch_size - len(chunk)
        if pad:
            batch = np.concatenate([batch, np.repeat(batch[-1:], pad, 0)])
        maps, scores = model.predict(batch, class_name,
                                     text_be2=jnp.repeat(jnp.asarray(text), batch_size, 0))
        maps, scores = np.asarray(maps)[: len(chunk)], np.asarray(scores)[: len(chunk)]
        for p, im, m, s in zip(chunk, originals, maps, scores, strict=True):
            w, h = im.size
            full = np.asarray(ad.upsample_bilinear(jnp.asarray(m)[None, ..., None], (h, w)))[0, ..., 0]
            name = names[p]
            plots.overlay(np.asarray(im), np.clip(full, 0, 1)).save(out / "heatmaps" / f"{name}.png")
            if save_maps:
                np.save(out / "maps" / f"{name}.npy", full.astype(np.float32))
            rows.append({"image": str(p), "name": name, "score": float(s),
                         "max_pixel": float(full.max()), "width": w, "height": h})
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "scores.json").write_text(json.dumps({"class_name": class_name, "image_score":
                                                 model.config.image_score, "images": rows}, indent=2))
    return rows


def _unique_names(paths: list[Path]) -> dict[Path, str]:
    """Output stems; files with the same stem in different folders get their parent prefixed."""
    stems = [p.stem for p in paths]
    return {p: (p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}_{p.stem}") for p in paths}
