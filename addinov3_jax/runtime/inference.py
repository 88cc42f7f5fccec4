"""Inference on the mesh: `Predictor`, the one entry point of eval, predict, the demo, the
benchmarks and the tests, and `Predictor.run`, the one inference loop.

`Predictor(model, mesh, rules, fewshot_config)` places the model by the rules (towers loaded on
the same mesh do not move) and jits the predict steps of `runtime/steps.py` once. `run(batches,
table, bank=)` takes process-local batches (`image`, `class_id` and `valid` rows; every process
feeds its own rows), runs the zero-shot or the fused few-shot step, and yields each batch with
the global result gathered to the host (`maps`, `scores` of its valid rows in order).
`predict_files` is the "score these image files" loop of `predict` and `calibrate` (decode,
preprocess, `run`); `reference_bank` builds the bank of a folder of normal images and describes
it (the settings that change scores). `build_bank` runs the backbone over reference images on
the mesh and returns a replicated (or, with `shard_bank`, row-split) `fewshot.MemoryBank`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from addinov3_jax.data import pipeline
from addinov3_jax.data.records import DataError, decode_image
from addinov3_jax.data.records import image_size as image_size_of
from addinov3_jax.io import text_cache
from addinov3_jax.models import fewshot, sharding
from addinov3_jax.models import model as ad
from addinov3_jax.runtime import distributed, steps


def place_model(model: ad.ADDinoV3, mesh, rules) -> ad.ADDinoV3:
    """`model` with every variable moved into the rules' sharding on `mesh` (towers that were
    loaded with the same mesh and rules are already there: nothing moves)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))
    return model


def pad_rows(rows: np.ndarray, count: int) -> np.ndarray:
    """`rows` padded to `count` rows by repeating the last one (one shape, one compilation)."""
    rows = np.asarray(rows)
    if len(rows) >= count:
        return rows
    return np.concatenate([rows, np.repeat(rows[-1:], count - len(rows), 0)])


class Predictor:
    """Pixel maps and image scores of batches of normalised images, on a mesh.

    Args:
      model: an `ADDinoV3`; its variables are moved onto `mesh` by the rules (`place_model`)
        unless they are there already.
      mesh, rules: the mesh (default: `distributed.default_mesh()`) and the logical-axis rules.
      fewshot_config: settings of the few-shot branch (`build_bank`, `run(..., bank=)`);
        default `fewshot.FewShotConfig()`.
    """

    def __init__(self, model: ad.ADDinoV3, mesh=None, rules=sharding.DEFAULT_RULES,
                 fewshot_config: fewshot.FewShotConfig | None = None):
        self.mesh, self.rules = mesh or distributed.default_mesh(), rules
        self.model = place_model(model, self.mesh, rules)
        self.graphdef, self.backbone_state = nnx.split(model.backbone)
        self.adapters = ad.trainable_params(model)
        self.fewshot = fewshot_config or fewshot.FewShotConfig()
        self._step, self._fewshot_step, self._taps = steps.jit_predict_steps(
            self.graphdef, model.config, self.fewshot, self.mesh, rules)
        self.batch_split = sharding.data_parallel_size(self.mesh, rules)

    @property
    def backbone_config(self):
        return self.model.backbone.config

    def text_table(self, words: Sequence[str], cache_dir=None) -> jax.Array:
        """(C, E, 2) prototypes of `words`, computed once (and cached on disk), replicated."""
        if self.model.text_tower is None:
            raise ValueError("this model has no text tower; pass text features explicitly")
        with sharding.use(self.mesh, self.rules):
            table = text_cache.text_features(self.model.text_tower, list(words),
                                               cache_dir=cache_dir)
        return jax.device_put(jnp.asarray(table), NamedSharding(self.mesh, PartitionSpec()))

    def local_rows(self, global_batch: int) -> int:
        """Rows each process feeds for a global batch (checked to split evenly)."""
        n = jax.process_count()
        if global_batch % n or global_batch % self.batch_split:
            raise ValueError(f"batch size {global_batch} must be divisible by the {n} processes "
                             f"and the {self.batch_split}-way batch split of the mesh")
        return global_batch // n

    def to_global(self, local: np.ndarray) -> jax.Array:
        """Process-local rows -> a global array split over the `batch` rule."""
        return distributed.global_batch({"x": np.asarray(local)}, self.mesh, self.rules, {"x": 0})["x"]

    def __call__(self, images_bhwc, class_ids_b, table,
                 bank: fewshot.MemoryBank | None = None) -> tuple[jax.Array, jax.Array]:
        """Maps (B, H, W) and scores (B,) as global arrays, for process-local numpy rows; with a
        `bank` (from `build_bank`), fused with the few-shot branch (`fewshot.fuse`)."""
        images = self.to_global(np.asarray(images_bhwc, np.float32))
        ids = self.to_global(np.asarray(class_ids_b, np.int32))
        with sharding.use(self.mesh, self.rules):
            if bank is None:
                return self._step(self.backbone_state, self.adapters, images, ids, table)
            return self._fewshot_step(self.backbone_state, self.adapters, images, ids, table,
                                      bank.features_lmd)

    def run(self, batches: Iterable[dict], table,
            bank: fewshot.MemoryBank | None = None) -> Iterator[dict]:
        """The inference loop. Each process-local batch (`image` (b, H, W, 3), `class_id` (b,),
        `valid` (b,), any other keys) is predicted on the mesh; yields the batch with the
        global batch's keys gathered to the host and `maps` / `scores` of its valid rows only
        (in the global order: process 0's rows first)."""
        single = jax.process_count() == 1  # the local rows are the global batch
        for batch in batches:
            maps, scores = self(batch["image"], batch["class_id"], table, bank=bank)
            rows = {k: np.asarray(v) if single else distributed.gather(self.to_global(v))
                    for k, v in batch.items() if k not in ("image", "class_id")}
            valid = rows["valid"].astype(bool)
            out = {k: v[valid] for k, v in rows.items()}
            out["maps"] = distributed.gather(maps)[valid].astype(np.float32)
            out["scores"] = distributed.gather(scores)[valid]
            yield out

    def build_bank(self, references_khwc, *, seed: int = 0, batch_size: int = 8) -> fewshot.MemoryBank:
        """The few-shot bank of k normalised reference images (k, H, W, 3) (the same array on
        every process), over the views of the few-shot config; the backbone runs on the mesh in
        global batches of `batch_size` rows (padded); the bank comes back replicated."""
        refs = np.asarray(references_khwc, np.float32)
        if refs.ndim != 4 or refs.shape[0] == 0:
            raise ValueError(f"reference images must be (k>0, H, W, 3), got {refs.shape}")
        rows = -(-batch_size // self.batch_split) * self.batch_split
        views = []
        for view in fewshot.augment_views(refs, self.fewshot.augment, self.fewshot.rotation_angles):
            view = np.asarray(view)
            parts = []
            for start in range(0, len(view), rows):
                chunk = view[start : start + rows]
                padded = pad_rows(chunk, rows)
                sharded = jax.make_array_from_callback(
                    padded.shape, sharding.batch_sharding(self.mesh, self.rules, 4),
                    lambda idx, padded=padded: padded[idx])
                with sharding.use(self.mesh, self.rules):
                    taps = self._taps(self.backbone_state, sharded)
                parts.append(distributed.gather(taps)[:, : len(chunk)])
            views.append(jnp.asarray(np.concatenate(parts, axis=1)))
        bank = fewshot.bank_from_features(views, self.fewshot, shots=len(refs), seed=seed)
        if self.fewshot.shard_bank:  # rows split over every device of the mesh
            return fewshot.shard_bank(bank, self.mesh)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        feats = np.asarray(bank.features_lmd)
        return dataclasses.replace(bank, features_lmd=jax.make_array_from_callback(
            feats.shape, replicated, lambda idx: feats[idx]))


def map_max(amap: np.ndarray, height: int, width: int) -> float:
    """max of the map upsampled to (height, width), a block of rows at a time."""
    return max(float(block.max()) for _, block in ad.resize_map_rows(amap, height, width))


def read_error(path: Path, e: Exception) -> str:
    """Why an input could not be read, without repeating its path."""
    text = str(e) if isinstance(e, DataError) else (getattr(e, "strerror", None) or str(e))
    return text.removeprefix(f"{path}: ")


def predict_files(predictor: Predictor, paths: Sequence[Path], table, *, image_size: int,
                  batch_size: int, bank: fewshot.MemoryBank | None = None,
                  skipped: list[dict] | None = None, max_side: int | None = None) -> Iterator[dict]:
    """Maps and scores of image files (any sizes), `batch_size` at a time through `run`: yields
    per batch `paths`, `originals` (PIL images decoded with at most `max_side` on the longest
    side), `sizes` ((width, height) of the files), `maps` (network resolution) and `scores`.
    Unreadable files are appended to `skipped` (`image`, `error`) and left out."""
    bb = predictor.backbone_config
    class_ids = np.zeros(batch_size, np.int32)
    skipped = [] if skipped is None else skipped
    decoded: list[tuple[list[Path], list, list]] = []  # host-side images of the batch in flight

    def batches():
        for start in range(0, len(paths), batch_size):
            chunk, originals, sizes = [], [], []
            for p in paths[start : start + batch_size]:
                try:
                    data = Path(p).read_bytes()
                    originals.append(decode_image(data, str(p), max_side=max_side))
                    sizes.append(image_size_of(data, str(p)))
                    chunk.append(p)
                except (DataError, OSError) as e:
                    skipped.append({"image": str(p), "error": read_error(p, e)})
            if not chunk:
                continue
            decoded.append((chunk, originals, sizes))
            images = np.stack([pipeline.preprocess_image(im, image_size, bb.pixel_mean, bb.pixel_std)
                               for im in originals])
            yield {"image": pad_rows(images, batch_size), "class_id": class_ids,  # one shape
                   "valid": (np.arange(batch_size) < len(chunk)).astype(np.int32)}

    for result in predictor.run(batches(), table, bank=bank):
        chunk, originals, sizes = decoded.pop(0)
        yield {"paths": chunk, "originals": originals, "sizes": sizes, "maps": result["maps"],
               "scores": result["scores"]}


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reference_bank(predictor: Predictor, refs: Sequence[Path], *, image_size: int,
                   batch_size: int, folder: str | os.PathLike | None = None
                   ) -> tuple[fewshot.MemoryBank, dict]:
    """The few-shot bank of the normal images `refs` and its description (`folder`, `count`,
    `images`, their `sha256`, `bank_rows` and every few-shot setting), as `scores.json` and a
    calibration record it."""
    bb = predictor.backbone_config
    bank = predictor.build_bank(pipeline.load_images(list(refs), image_size, bb.pixel_mean,
                                                     bb.pixel_std), batch_size=batch_size)
    fs = predictor.fewshot
    settings = {k: v for k, v in dataclasses.asdict(fs).items() if k not in ("shots", "seeds")}
    info = {"folder": None if folder is None else str(folder), "count": len(refs),
            "augment": fs.augment, "fusion": fs.fusion, "fusion_weight": fs.fusion_weight,
            "bank_rows": bank.rows, "images": [str(p) for p in refs],
            "sha256": [file_sha256(p) for p in refs], "settings": settings}
    return bank, info
