"""grain input pipelines over the raw-folder source or the ArrayRecord (TFDS) source.

Both sources yield the same dicts (original file bytes + metadata), decoded and preprocessed by
the same code, so they give identical pixels. Preprocessing follows the official code: PIL
bilinear resize to 512x512, [0, 1], normalisation with the backbone's pixel mean / std (ImageNet
for the LVD-1689M weights); masks resized the same way and binarised (> 0.5, VisA > 0). The one
implementation is `preprocess_image` / `preprocess_mask`, also used by `predict`.

* `train_dataset`: seeded shuffle that changes every epoch, per-process sharding, batching with
  full batches only, optional worker prefetch; its iterator is checkpointable
  (`get_state` / `set_state`).
* `eval_dataset`: ordered and complete; the last batch is padded and `valid` marks real rows.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np
from PIL import Image

from addinov3_jax.data.records import DataError, Record, decode_image, decode_mask, object_word

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def preprocess_image(image: Image.Image, size: tuple[int, int] | int, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD) -> np.ndarray:
    """The network input for one decoded RGB image: PIL bilinear resize to `size` ((H, W) or an
    int), [0, 1], `(x - mean) / std` per channel -> float32 (H, W, 3).

    The one implementation used by the grain pipelines, `predict` and anything else that feeds
    the backbone; pass the backbone's `config.pixel_mean` / `pixel_std` (ImageNet statistics for
    the LVD-1689M weights, other values for the SAT-493M ones)."""
    h, w = (size, size) if isinstance(size, int) else size
    if image.mode != "RGB":
        image = image.convert("RGB")
    x = np.asarray(image.resize((w, h), Image.BILINEAR), np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess_mask(mask: Image.Image | None, size: tuple[int, int] | int,
                    threshold: float = 0.5) -> np.ndarray:
    """The ground truth for one decoded mask (`records.decode_mask`, 0 / 255): PIL bilinear
    resize to `size`, binarised at `value / 255 > threshold` -> float32 (H, W) of 0 / 1;
    all zeros for None (a normal image)."""
    h, w = (size, size) if isinstance(size, int) else size
    if mask is None:
        return np.zeros((h, w), np.float32)
    m = np.asarray(mask.resize((w, h), Image.BILINEAR), np.float32) / 255.0
    return (m > threshold).astype(np.float32)


class RecordSource(grain.sources.RandomAccessDataSource):
    """The raw-folder source: a list of `Record`s read from disk on access."""

    def __init__(self, records: Sequence[Record]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return record_to_example(self.records[i])

    def __repr__(self) -> str:
        return f"RecordSource({len(self.records)} records)"


def record_to_example(r: Record) -> dict:
    """The stored form of a record (also what the TFDS builders write)."""
    try:
        image = Path(r.image_path).read_bytes()
        mask = Path(r.mask_path).read_bytes() if r.mask_path else b""
    except OSError as e:
        raise DataError(f"{e.filename}: cannot read ({e.strerror})") from e
    return {"image": image, "mask": mask, "label": r.label, "has_mask": int(r.mask_path is not None),
            "class_folder": r.class_folder, "class_name": r.class_name, "defect": r.defect,
            "image_path": r.image_path, "object_word_path": Path(r.image_path).parts[-4]
            if len(Path(r.image_path).parts) >= 4 else r.class_folder}


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Decodes and preprocesses one example; `classes` maps object words to `class_id`.

    `mean` / `std` are the backbone's pixel statistics (`dinov3.Config.pixel_mean` / `pixel_std`;
    ImageNet by default)."""

    size: tuple[int, int] = (512, 512)
    mask_threshold: float = 0.5
    classes: tuple[str, ...] = ()
    class_name_source: str = "readable"  # "path" (the official object word) or "fixed"
    fixed_word: str = ""  # the word of "fixed"
    mean: tuple[float, ...] = tuple(IMAGENET_MEAN)
    std: tuple[float, ...] = tuple(IMAGENET_STD)

    def word(self, ex: dict) -> str:
        return object_word(self.class_name_source, _text(ex["class_name"]),
                           _text(ex["object_word_path"]), self.fixed_word)

    def __call__(self, ex: dict) -> dict:
        what = _text(ex["image_path"])
        image = preprocess_image(decode_image(bytes(ex["image"]), what), self.size, self.mean, self.std)
        m = decode_mask(bytes(ex["mask"]), what + " (mask)") if len(ex["mask"]) else None
        mask = preprocess_mask(m, self.size, self.mask_threshold)
        word = self.word(ex)
        if self.classes and word not in self.classes:
            raise DataError(f"{what}: class {word!r} is not among the pipeline's classes {self.classes}")
        return {"image": image, "mask": mask, "label": np.int32(ex["label"]),
                "has_mask": np.int32(ex["has_mask"]),
                "class_id": np.int32(self.classes.index(word) if self.classes else -1)}


def class_words(source, class_name_source: str = "readable", fixed_word: str = "") -> tuple[str, ...]:
    """Sorted distinct object words of a source (reads metadata only for a RecordSource)."""
    if isinstance(source, RecordSource):
        words = {r.object_word(class_name_source, fixed_word) for r in source.records}
    else:
        words = {object_word(class_name_source, _text(source[i]["class_name"]),
                             _text(source[i]["object_word_path"]), fixed_word)
                 for i in range(len(source))}
    return tuple(sorted(words))


def train_dataset(
    source,
    preprocess: Preprocess,
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    worker_count: int = 0,
) -> grain.IterDataset:
    """Shuffled (differently every epoch), sharded, batched training data.

    Each process takes every `shard_count`-th example starting at `shard_index` (its own disjoint
    part), shuffles it with `seed`, repeats it `num_epochs` times (forever when None) and emits
    full batches only. Iterate with `iter(ds)`; the iterator's `get_state()` / `set_state()`
    checkpoint the exact position.
    """
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) < batch_size:
        raise DataError(f"{len(ds)} training examples on this process, fewer than one batch of "
                        f"{batch_size}; lower the batch size")
    ds = ds.shuffle(seed=seed).repeat(num_epochs).map(preprocess).batch(batch_size, drop_remainder=True)
    return _prefetch(ds.to_iter_dataset(), worker_count)


AUTO_WORKERS_MAX = 16


def host_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_worker_count(worker_count: int) -> int:
    """grain worker processes for `worker_count`: >= 0 as given (0 = in-process), -1 (auto) =
    `min(cores - 1, 16)`, one core left for the training / evaluation loop, and 0 on hosts with
    fewer than 4 cores, where worker processes cost more than they decode (benchmarks/RESULTS.md).
    """
    if worker_count >= 0:
        return int(worker_count)
    if worker_count != -1:
        raise ValueError(f"worker_count must be >= 0 or -1 (auto), got {worker_count}")
    cores = host_cores()
    return 0 if cores < 4 else min(cores - 1, AUTO_WORKERS_MAX)


def _prefetch(ds: grain.IterDataset, worker_count: int) -> grain.IterDataset:
    """Worker-process prefetch (grain reads absl flags, which a library caller may not have parsed;
    scripts using workers need an `if __name__ == "__main__":` guard)."""
    worker_count = resolve_worker_count(worker_count)
    if worker_count == 0:
        return ds
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


def load_images(paths: Sequence[str | os.PathLike], size: int, mean=IMAGENET_MEAN,
                std=IMAGENET_STD) -> np.ndarray:
    """(k, size, size, 3) network inputs of image files (e.g. few-shot references), decoded and
    preprocessed like every other image (`decode_image`, `preprocess_image`)."""
    if not paths:
        raise DataError("no images to load")
    return np.stack([preprocess_image(decode_image(Path(p).read_bytes(), str(p)), size, mean, std)
                     for p in paths])


def steps_per_epoch(num_examples: int, batch_size: int, shard_count: int = 1) -> int:
    return (num_examples // shard_count) // batch_size


def eval_dataset(
    source,
    preprocess: Preprocess,
    *,
    batch_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
    worker_count: int = 0,
) -> grain.IterDataset:
    """Every example exactly once, in order. Batches carry `index` (position in the source) and
    `valid`; the last batch is padded (repeating the last example) with `valid = 0` rows.
    With several processes each takes a contiguous, equally padded block."""
    n = len(source)
    per_shard = -(-n // shard_count)
    per_shard = -(-per_shard // batch_size) * batch_size
    start = shard_index * per_shard
    get = _PaddedGet(source, preprocess, start, n)
    ds = grain.MapDataset.range(per_shard).map(get).batch(batch_size)
    return _prefetch(ds.to_iter_dataset(), worker_count)


@dataclasses.dataclass(frozen=True)
class _PaddedGet:
    """Example `start + i` of the source, or a repeat of the last one marked `valid = 0`."""

    source: object
    preprocess: Preprocess
    start: int
    n: int

    def __call__(self, i: int) -> dict:
        j = self.start + int(i)
        ex = self.preprocess(self.source[min(j, self.n - 1)])
        ex["index"] = np.int32(min(j, self.n - 1))
        ex["valid"] = np.int32(j < self.n)
        return ex
