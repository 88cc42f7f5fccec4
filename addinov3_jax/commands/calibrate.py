"""`addinov3 calibrate`: split-conformal image and pixel thresholds of one class from good images
only (`calibration.py` has the math), written as `calibration/<class>.json` in the model
directory (or `--output FILE`), atomically.

The good images are scored by the predict path (`inference.predict_files`, `Predictor.run`) with
the same preprocessing, few-shot bank and settings that `addinov3 predict --calibration` will use;
the file records them (model identity: the checksums of the model directory's parts; image size;
score mode; the bank's files, checksums and settings), and predict refuses a run that differs.

Calibration images never enter the few-shot bank: when `--reference` is the `--good` folder, its
first `shots` images (sorted by path) form the bank and the rest calibrate (the split is
recorded); images of another `--reference` folder that also lie in `--good` (same bytes) are left
out of the calibration.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path

from addinov3_jax import calibration as calib
from addinov3_jax.data import references
from addinov3_jax.io import model_dir
from addinov3_jax.io import workdir as workdir_io
from addinov3_jax.models import fewshot, sharding
from addinov3_jax.runtime import distributed, inference
from addinov3_jax.runtime.inference import Predictor


def split_images(good: str | os.PathLike, reference: str | os.PathLike | None, shots: int
                 ) -> tuple[list[Path], list[Path] | None, dict | None]:
    """(calibration images, bank images or None, the split record or None)."""
    goods = references.reference_paths(good)
    if reference is None:
        return goods, None, None
    if os.path.realpath(reference) == os.path.realpath(good):
        if shots < 1:
            raise calib.CalibrationError(f"--shots must be >= 1, got {shots}")
        bank, rest = goods[:shots], goods[shots:]
        return rest, bank, {"folder": str(good), "bank": [str(p) for p in bank],
                            "rule": f"the first {shots} images (sorted by path) form the bank, "
                                    "the rest calibrate"}
    bank = references.reference_paths(reference)
    in_bank = {inference.file_sha256(p) for p in bank}
    kept = [p for p in goods if inference.file_sha256(p) not in in_bank]
    split = None
    if len(kept) < len(goods):
        split = {"excluded": [str(p) for p in goods if p not in kept],
                 "rule": "good images that are also bank images do not calibrate"}
    return kept, bank, split


def calibrate(checkpoint: str | os.PathLike, class_name: str, good: str | os.PathLike,
              false_alarm_rate: float, *, reference: str | os.PathLike | None = None,
              shots: int = 4, output: str | os.PathLike | None = None, image_size: int = 512,
              batch_size: int = 8, fewshot_config: fewshot.FewShotConfig | None = None,
              mesh=None) -> tuple[dict, Path]:
    """Scores the good images, computes the thresholds and writes the record; returns it and its
    path. Refuses (`CalibrationError`) too few good images before loading the model."""
    directory = model_dir.resolve(checkpoint)
    images, bank_paths, split = split_images(good, reference, shots)
    n_needed = calib.min_good_images(false_alarm_rate)
    if len(images) < n_needed:
        raise calib.CalibrationError(
            f"need at least {n_needed} good images for a false-alarm rate of {false_alarm_rate:g}; "
            f"got {len(images)}" + (" (after the few-shot bank's images)" if split else ""))
    target = Path(output) if output else directory / "calibration" / calib.file_name(class_name)
    identity = model_dir.identity(directory)
    mesh = mesh or distributed.default_mesh(batch_size)
    model = model_dir.load(directory, mesh=mesh, rules=sharding.DEFAULT_RULES)
    predictor = Predictor(model, mesh, fewshot_config=fewshot_config)
    bank, ref_info = None, None
    if bank_paths is not None:
        bank, ref_info = inference.reference_bank(predictor, bank_paths, image_size=image_size,
                                                  batch_size=batch_size, folder=reference)
    table = predictor.text_table([class_name], cache_dir=model_dir.text_cache_dir(
        directory, target.parent))
    skipped: list[dict] = []
    scores, max_pixels, used = [], [], []
    for result in inference.predict_files(predictor, images, table, image_size=image_size,
                                          batch_size=batch_size, bank=bank, skipped=skipped):
        for p, (w, h), m, s in zip(result["paths"], result["sizes"], result["maps"],
                                   result["scores"], strict=True):
            scores.append(float(s))
            max_pixels.append(inference.map_max(m, h, w))
            used.append(str(p))
    if skipped:
        first = skipped[0]
        raise calib.CalibrationError(f"{len(skipped)} good image(s) could not be read (first: "
                                     f"{first['image']}: {first['error']}); fix or remove them")
    record = calib.calibrate(scores, max_pixels, false_alarm_rate)
    record.update({
        "class_name": class_name,
        "normalized_score": calib.NORMALIZED_SCORE,
        "model": {"dir": str(directory.absolute()), "identity": identity},
        "settings": {"class_name": class_name, "image_size": image_size,
                     "image_score": model.config.image_score, "reference": ref_info,
                     "fewshot": None if ref_info is None else {
                         k: v for k, v in dataclasses.asdict(predictor.fewshot).items()
                         if k not in ("shots", "seeds")}},
        "good": {"folder": str(good), "images": used, "scores": scores, "max_pixels": max_pixels},
        "split": split,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    })
    target.parent.mkdir(parents=True, exist_ok=True)
    workdir_io.atomic_write_text(target, workdir_io.strict_json(record, indent=2) + "\n")
    return record, target
