"""TFDS builders (ArrayRecord, no TensorFlow) for every supported dataset.

Each builder reads the raw dataset from the manual dir with `readers.read` and stores, per image,
the original file bytes of image and mask plus the record's metadata. No TensorFlow is needed:
features are byte strings and scalars, the file format is ArrayRecord, and the examples keep the
readers' order (shuffling disabled) so evaluation order is stable.

    addinov3 data build mvtec --manual-dir /data/mvtec_anomaly_detection --data-dir ~/tfds
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from addinov3_jax.data import readers
from addinov3_jax.data.pipeline import record_to_example
from addinov3_jax.data.records import DataError

TEXT_FIELDS = ("image", "mask", "class_folder", "class_name", "defect", "image_path", "object_word_path")


class _Builder(tfds.core.GeneratorBasedBuilder):
    """Base class; subclasses set DATASET (a `readers` dataset name) and SPLITS."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Original file bytes + record metadata."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Point --manual-dir at the dataset root in its distributed layout."
    DATASET = ""
    SPLITS: tuple[str, ...] = ("test",)
    on_bad_sample = "error"

    def _info(self):
        spec = readers.spec_for(self.DATASET)
        features = {k: tfds.features.Text() for k in TEXT_FIELDS}
        features.update(label=tfds.features.Scalar(dtype=np.int64),
                        has_mask=tfds.features.Scalar(dtype=np.int64))
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                dataset=self.DATASET, classes=list(spec.classes) if spec else [],
                readable=dict(spec.readable) if spec else {},
                mask_threshold=spec.mask_threshold if spec else 0.5),
            description=f"{self.DATASET} for addinov3-jax (image / mask file bytes and metadata).")

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        return {split: self._generate_examples(root, split) for split in self.SPLITS}

    def _generate_examples(self, root, split):
        records, report = readers.read(self.DATASET, os.fspath(root), split=split,
                                       on_bad_sample=self.on_bad_sample)
        if report.skipped or report.duplicates:
            print(report.summary())
        for i, r in enumerate(records):
            yield f"{i:08d}", record_to_example(r)


def _make(name: str, splits=("test",)) -> type:
    cls_name = "Addinov3" + "".join(p.capitalize() for p in name.split("_"))
    return type(cls_name, (_Builder,), {"DATASET": name, "SPLITS": splits, "__module__": __name__})


# Only the test splits matter for zero-shot work; MVTec-layout sets also get their train split.
BUILDERS: dict[str, type] = {
    name: _make(name, ("test", "train") if name in ("mvtec", "mpdd", "synthetic") else ("test",))
    for name in readers.DATASETS
}


def build(name: str, manual_dir, data_dir, *, on_bad_sample: str = "error"):
    """Builds the ArrayRecord files; returns the builder (use `.as_data_source()[split]`).

    A missing or empty `manual_dir` is refused before anything is written; when the build fails,
    whatever it created under `data_dir` is removed (no half-built dataset folder is left)."""
    if name not in BUILDERS:
        raise DataError(f"no TFDS builder for {name!r}; known: {', '.join(BUILDERS)}")
    manual = Path(manual_dir).expanduser()
    if not manual.is_dir() or not any(manual.iterdir()):
        raise DataError(f"{manual}: the manual dir (the raw {name} dataset root) "
                        f"{'is empty' if manual.is_dir() else 'does not exist'}")
    data_dir = Path(data_dir).expanduser()
    existed = data_dir.exists()
    before = set(data_dir.iterdir()) if existed else set()
    try:
        builder = BUILDERS[name](data_dir=os.fspath(data_dir), file_format="array_record")
        builder.on_bad_sample = on_bad_sample
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual)))
    except BaseException:
        if not existed:
            shutil.rmtree(data_dir, ignore_errors=True)
        elif data_dir.is_dir():
            for entry in set(data_dir.iterdir()) - before:
                shutil.rmtree(entry, ignore_errors=True)
        raise
    return builder


def data_source(name: str, data_dir, split: str = "test"):
    """Random-access source over built ArrayRecord files (no TensorFlow)."""
    builder = BUILDERS[name](data_dir=os.fspath(data_dir), file_format="array_record")
    return builder.as_data_source()[split]
