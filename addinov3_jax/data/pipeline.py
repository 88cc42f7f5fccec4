"""grain input pipelines over the raw-folder source or the ArrayRecord (TFDS) source.

Both sources yield the same dicts (original file bytes + metadata), decoded and preprocessed by
the same code, so they give identical pixels. Preprocessing follows the official code: PIL
bilinear resize to 512x512, [0, 1], normalisation with the backbone's pixel mean / std (ImageNet
for the LVD-1689M weights); masks resized the same way and binarised (> 0.5, VisA > 0). The one
implementation is `preprocess_image` / `preprocess_mask`, also used by `predict`.

* `train_dataset`: one global order (a permutation of all examples per epoch, seeded by
  `(seed, epoch)`) cut into full global batches, of which each process reads only its rows;
  optional worker prefetch; its iterator is checkpointable by global position (`get_state` /
  `set_state`), so any number of processes continues the same sequence.
* `ordered_batches`: every example once in global batches (the feature cache's input).
* `eval_dataset`: ordered and complete; the last batch is padded and `valid` marks real rows.
"""

from __future__ import annotations

import dataclasses
import functools
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

    @classmethod
    def for_backbone(cls, backbone_config, image_size: int, words=(), *,
                     class_name_source: str = "readable", fixed_word: str = "",
                     mask_threshold: float = 0.5) -> Preprocess:
        """The preprocessing that feeds a backbone (its pixel mean / std) square images of
        `image_size`: the one construction that training and evaluation share."""
        return cls(size=(image_size, image_size), mask_threshold=mask_threshold, classes=tuple(words),
                   class_name_source=class_name_source, fixed_word=fixed_word,
                   mean=tuple(backbone_config.pixel_mean), std=tuple(backbone_config.pixel_std))

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


ORDER = "global/1"  # the format of a training iterator's state (`TrainIterator.get_state`)


@functools.lru_cache(maxsize=2)
def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example indices of training epoch `epoch`, shuffled: a permutation seeded by
    `(seed, epoch)`, the same on every process and for any number of processes."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.flags.writeable = False
    return order


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full global batches per epoch (the remainder of each epoch's order is dropped)."""
    return num_examples // batch_size


@dataclasses.dataclass(frozen=True)
class _GlobalRows:
    """Position `k` of a process's stream -> its example: global batch `k // len(rows)`, row
    `rows[k % len(rows)]` of it. Global batch g is `epoch_order(e)[j*B : (j+1)*B]` for
    `e, j = divmod(g, steps_per_epoch)` when `shuffle`, else examples `g*B ... g*B + B - 1` with
    the last example repeated past the end (`valid = 0`). `preprocess=None` yields the index only.
    """

    source: object
    preprocess: object
    num_examples: int
    batch_size: int
    seed: int
    rows: tuple[int, ...]
    shuffle: bool

    def __call__(self, k: int) -> dict:
        g, r = divmod(int(k), len(self.rows))
        pos = self.rows[r]
        if self.shuffle:
            epoch, j = divmod(g, steps_per_epoch(self.num_examples, self.batch_size))
            i, valid = int(epoch_order(self.num_examples, self.seed, epoch)[j * self.batch_size + pos]), 1
        else:
            i = g * self.batch_size + pos
            i, valid = min(i, self.num_examples - 1), int(i < self.num_examples)
        ex = {} if self.preprocess is None else self.preprocess(self.source[i])
        ex["index"], ex["valid"] = np.int32(i), np.int32(valid)
        return ex


def _rows(rows, batch_size: int) -> tuple[int, ...]:
    rows = tuple(range(batch_size)) if rows is None else tuple(int(r) for r in rows)
    if not rows or len(set(rows)) != len(rows) or min(rows) < 0 or max(rows) >= batch_size:
        raise ValueError(f"rows must be distinct positions in a global batch of {batch_size}, "
                         f"got {rows}")
    return rows


class TrainData:
    """The training stream of one process: `num_epochs` epochs of full global batches in one
    global order (`epoch_order`), of which this process reads only its `rows`.

    `iter()` gives a `TrainIterator`; its state is the global position (epoch, global step), so
    a checkpoint written by any number of processes resumes on any other number."""

    def __init__(self, source, preprocess, *, batch_size: int, seed: int, num_epochs: int,
                 rows=None, worker_count: int = 0):
        n = len(source)
        self.batch_size, self.seed, self.num_examples = int(batch_size), int(seed), n
        self.steps_per_epoch = steps_per_epoch(n, self.batch_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"{n} training examples are fewer than one batch of {batch_size}; "
                            "lower the batch size")
        self.total_steps = int(num_epochs) * self.steps_per_epoch
        self.worker_count = worker_count
        self._rows = _GlobalRows(source, preprocess, n, self.batch_size, self.seed,
                                 _rows(rows, self.batch_size), shuffle=True)

    def __len__(self) -> int:
        return self.total_steps

    def __iter__(self) -> TrainIterator:
        return TrainIterator(self)

    def batches_from(self, step: int) -> grain.IterDataset:
        """This process's batches of global steps `step, step + 1, ...` (grain, prefetched)."""
        local = len(self._rows.rows)
        ds = grain.MapDataset.range(step * local, self.total_steps * local).map(self._rows)
        return _prefetch(ds.batch(local, drop_remainder=True).to_iter_dataset(), self.worker_count)


class TrainIterator:
    """Batches of a `TrainData`; `get_state()` / `set_state()` hold the global position
    `{"order", "epoch", "step", ...}`, not grain's per-process internals."""

    def __init__(self, data: TrainData):
        self.data, self.step, self._it = data, 0, None

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict:
        if self.step >= self.data.total_steps:
            raise StopIteration
        if self._it is None:  # started lazily, so a `set_state` first starts no workers twice
            self._it = iter(self.data.batches_from(self.step))
        batch = next(self._it)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        d = self.data
        return {"order": ORDER, "epoch": self.step // d.steps_per_epoch, "step": self.step,
                "batch_size": d.batch_size, "seed": d.seed, "num_examples": d.num_examples}

    def set_state(self, state: dict) -> None:
        d = self.data
        if not isinstance(state, dict) or state.get("order") != ORDER:
            raise DataError("the checkpoint's data position is in an older format (per-process "
                            "grain iterator state), which does not say where the global order "
                            "stands; resume it with the version that wrote it, or start a new "
                            "--workdir")
        for key in ("batch_size", "seed", "num_examples"):
            if state[key] != getattr(d, key):
                raise DataError(f"the checkpoint's data position is of a run with {key}="
                                f"{state[key]}, this one has {getattr(d, key)}; use the same "
                                "data and settings, or a new --workdir")
        step = int(state["step"])
        if not 0 <= step <= d.total_steps or state["epoch"] != step // d.steps_per_epoch:
            raise DataError(f"the checkpoint's data position (epoch {state['epoch']}, step "
                            f"{step}) is outside this run's {d.total_steps} steps")
        self.step, self._it = step, None


def train_dataset(source, preprocess, *, batch_size: int, seed: int, num_epochs: int,
                  rows=None, worker_count: int = 0) -> TrainData:
    """Shuffled (differently every epoch, the same on every process), batched training data.

    `batch_size` is the global batch. Epoch e is `epoch_order(len(source), seed, e)` cut into
    full batches; this process reads `rows` of each global batch (positions in it, e.g. the
    rows its devices hold: `runtime.distributed.process_rows`; all of them by default), so processes
    read disjoint parts and none reads the whole dataset. Batches carry `index` (the example's
    position in the source). `preprocess=None` yields `index` only (for the feature cache).
    """
    return TrainData(source, preprocess, batch_size=batch_size, seed=seed, num_epochs=num_epochs,
                     rows=rows, worker_count=worker_count)


def ordered_batches(source, preprocess, *, batch_size: int, rows=None,
                    worker_count: int = 0) -> grain.IterDataset:
    """Every example once, in order, in global batches (`index`, `valid`; the last batch padded
    with `valid = 0` rows), of which this process reads `rows` (as `train_dataset`)."""
    n = len(source)
    get = _GlobalRows(source, preprocess, n, batch_size, 0, _rows(rows, batch_size), shuffle=False)
    ds = grain.MapDataset.range(-(-n // batch_size) * len(get.rows)).map(get)
    return _prefetch(ds.batch(len(get.rows)).to_iter_dataset(), worker_count)


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
