"""Few-shot reference images: the seeded draw of k train/good records per class, and the images of
a folder of normal samples (`predict --reference DIR`)."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from addinov3_jax.data.records import DataError, Record, list_images


def sample_references(records: Sequence[Record], k: int, seed: int) -> list[Record]:
    """k distinct reference records of one class, drawn with `seed` from its train-split normal
    images (the candidates are sorted by path first, so the draw depends on nothing else).

    Raises `DataError` for a test-split record, mixed classes, or fewer than k candidates.
    """
    records = list(records)
    if k == 0:
        return []
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if not records:
        raise DataError(f"no train/good records to draw {k} reference image(s) from")
    bad = [r.image_path for r in records if r.split != "train"]
    if bad:
        raise DataError(f"reference images must come from the train split; got {len(bad)} record(s) "
                        f"of another split, e.g. {bad[0]} (read them with split='train')")
    classes = sorted({(r.dataset, r.class_folder) for r in records})
    if len(classes) > 1:
        raise DataError(f"sample_references takes one class's records, got {classes}")
    (dataset, cls), = classes
    pool = sorted((r for r in records if r.label == 0), key=lambda r: r.image_path)
    if len(pool) < k:
        raise DataError(f"{dataset}/{cls}: {k} reference image(s) requested but the train split "
                        f"has only {len(pool)} normal image(s); lower shots")
    rng = np.random.default_rng([int(seed), zlib.crc32(f"{dataset}/{cls}".encode())])
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def reference_paths(directory: str | os.PathLike) -> list[Path]:
    """The images of a folder of normal references (`predict --reference DIR`), sorted."""
    paths = list_images(Path(directory))
    if not paths:
        raise DataError(f"{directory}: no reference images (expected .png/.jpg/... files of "
                        "normal samples of the class)")
    return paths


def calibration_records(records: Sequence[Record], bank: Sequence[Record] = ()) -> list[Record]:
    """The normal train-split records of one class that may calibrate a threshold: every one
    that is not a few-shot reference of the `bank` (those score unrealistically low against it),
    sorted by path. Test-split records are refused."""
    bad = [r.image_path for r in records if r.split != "train"]
    if bad:
        raise DataError(f"calibration images must come from the train split; got {len(bad)} "
                        f"record(s) of another split, e.g. {bad[0]}")
    in_bank = {os.path.realpath(r.image_path) for r in bank}
    return sorted((r for r in records if r.label == 0 and os.path.realpath(r.image_path) not in in_bank),
                  key=lambda r: r.image_path)
