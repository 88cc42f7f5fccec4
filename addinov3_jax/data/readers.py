"""Readers for the eight benchmarks in their distributed layouts, `meta.json`, and users' folders.

Facts: shared/reference/datasets.md. Each reader returns `Record`s (absolute paths) and a
`Report` of what was skipped. Masks of MVTec-style sets are paired with images by sorted position,
like the official loaders; when the counts differ, by file stem, and anything left unpaired is a
bad sample (never a silently wrong label).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from addinov3_jax.data import synthetic
from addinov3_jax.data.records import DataError, Record, Report, check_sample, list_images

# The choices of `data.on_bad_sample` and `data.source` (config.py and the CLI read them here).
ON_BAD_SAMPLE = ("error", "skip")
SOURCES = ("raw", "tfds")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    layout: str  # "mvtec" | "visa" | "tn3k" | "meta" | "folder"
    classes: tuple[str, ...]
    readable: dict[str, str]
    normal_dir: str = "good"
    mask_threshold: float = 0.5  # binarisation after resizing (VisA: any non-zero, as official)
    image_level: bool = True  # False for the all-anomalous medical sets
    classes_from_disk: bool = False  # the class list is whatever class folders exist


def _spec(name, layout, readable, **kw):
    return DatasetSpec(name, layout, tuple(sorted(readable)), dict(readable), **kw)


MVTEC = {c: c.replace("_", " ") for c in (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")}
VISA = {"candle": "candle", "capsules": "capsules", "cashew": "cashew", "chewinggum": "chewing gum",
        "fryum": "fryum", "macaroni1": "macaroni", "macaroni2": "macaroni",
        "pcb1": "printed circuit board", "pcb2": "printed circuit board",
        "pcb3": "printed circuit board", "pcb4": "printed circuit board",
        "pipe_fryum": "pipe fryum"}
MPDD = {"bracket_black": "black bracket", "bracket_brown": "brown bracket",
        "bracket_white": "white bracket", "connector": "connector", "metal_plate": "metal plate",
        "tubes": "tubes"}

DATASETS: dict[str, DatasetSpec] = {
    "mvtec": _spec("mvtec", "mvtec", MVTEC),
    "visa": _spec("visa", "visa", VISA, mask_threshold=0.0),
    "btad": _spec("btad", "mvtec", {"01": "product", "02": "product", "03": "product"},
                  normal_dir="ok"),
    "mpdd": _spec("mpdd", "mvtec", MPDD),
    "isic": _spec("isic", "mvtec", {"01": "skin"}, image_level=False),
    "colondb": _spec("colondb", "mvtec", {"01": "colon"}, image_level=False),
    "clinicdb": _spec("clinicdb", "mvtec", {"01": "colon"}, image_level=False),
    "tn3k": _spec("tn3k", "tn3k", {"01": "thyroid"}, image_level=False),
    # The generated dataset of `data/synthetic.py` (MVTec layout).
    "synthetic": _spec("synthetic", "mvtec", synthetic.READABLE, classes_from_disk=True),
}


def _stem(p: Path) -> str:
    s = p.stem
    for suffix in ("_mask", "_segmentation", "_Segmentation", "_gt"):
        s = s.removesuffix(suffix)
    return s


def _pair(images: list[Path], masks: list[Path], where: str, report: Report, policy: str):
    """Mask per image: sorted position when the counts agree, else matching stems."""
    if len(images) == len(masks):
        return list(zip(images, masks, strict=True))
    by_stem = {_stem(m): m for m in masks}
    pairs = []
    for img in images:
        if _stem(img) in by_stem:
            pairs.append((img, by_stem[_stem(img)]))
        else:
            report.add(str(img), f"anomalous image without a mask ({len(images)} images but "
                                 f"{len(masks)} masks in {where})", policy)
    return pairs


def read_mvtec_style(root: Path, spec: DatasetSpec, classes, split, report, policy) -> list[Record]:
    records = []
    for cls in classes:
        cdir = root / cls / split
        if not cdir.is_dir():
            report.add(str(cdir), f"class folder missing (expected {root}/{cls}/{split}/...)", policy)
            continue
        defects = sorted(d.name for d in cdir.iterdir() if d.is_dir())
        n_before = len(records)
        for defect in defects:
            images = list_images(cdir / defect)
            common = dict(dataset=spec.name, split=split, class_folder=cls,
                          class_name=spec.readable.get(cls, cls), defect=defect)
            if defect == spec.normal_dir:
                records += [Record(image_path=str(p), mask_path=None, label=0, **common)
                            for p in images]
                continue
            masks = list_images(root / cls / "ground_truth" / defect)
            for img, mask in _pair(images, masks, f"{root / cls / 'ground_truth' / defect}", report,
                                   policy):
                records.append(Record(image_path=str(img), mask_path=str(mask), label=1, **common))
        if len(records) == n_before:
            report.add(str(cdir), "empty class folder: no images found", policy)
    return records


def read_visa(root: Path, spec: DatasetSpec, classes, split, report, policy) -> list[Record]:
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        if (root / "meta.json").is_file():
            return read_meta(root, spec, classes, split, report, policy)
        raise DataError(f"{csv_path}: missing; VisA needs split_csv/1cls.csv (shipped with the "
                        "dataset) or a meta.json (`addinov3 data make-meta`)")
    records = []
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"object", "split", "label", "image", "mask"}
    if not rows or not need <= set(rows[0]):
        raise DataError(f"{csv_path}: expected the columns {sorted(need)}")
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        label = (row["label"] or "").strip()
        if label not in ("normal", "anomaly"):
            raise DataError(f"{csv_path}: row {line} ({row['image']}): label {row['label']!r} is "
                            "neither 'normal' nor 'anomaly'; fix the file (a row is never guessed)")
        if row["split"] != split or row["object"] not in classes:
            continue
        anomalous = label == "anomaly"
        mask = row["mask"].strip() if anomalous else ""
        if anomalous and not mask:
            report.add(str(root / row["image"]), "anomalous row without a mask in 1cls.csv", policy)
            continue
        records.append(Record(spec.name, split, row["object"], spec.readable[row["object"]],
                              str(root / row["image"]), str(root / mask) if mask else None,
                              int(anomalous), ""))
    return records


def read_tn3k(root: Path, spec: DatasetSpec, classes, split, report, policy) -> list[Record]:
    images, masks = list_images(root / f"{split}-image"), list_images(root / f"{split}-mask")
    if not images:
        raise DataError(f"{root / f'{split}-image'}: no images (TN3K layout: test-image/, test-mask/)")
    return [Record(spec.name, split, "01", spec.readable["01"], str(i), str(m), 1, "")
            for i, m in _pair(images, masks, str(root / f"{split}-mask"), report, policy)]


def read_meta(root: Path, spec: DatasetSpec, classes, split, report, policy) -> list[Record]:
    """Records from a `meta.json` ({split: {class: [{img_path, mask_path, cls_name, ...}]}})."""
    path = root / "meta.json"
    try:
        meta = json.loads(path.read_text())
        entries = meta[split]
        if not isinstance(entries, dict):
            raise TypeError(f"meta[{split!r}] is a {type(entries).__name__}, expected an object")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: malformed meta.json ({type(e).__name__}: {e}); regenerate it "
                        "with `addinov3 data make-meta`") from e
    records = []
    for cls in classes:
        for i, item in enumerate(entries.get(cls, [])):
            try:
                img, mask = item["img_path"], item.get("mask_path") or ""
                label = int(item["anomaly"])
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}: {split}/{cls}[{i}] lacks img_path / anomaly ({e})") from e
            for rel in (img, mask):
                if rel and os.path.isabs(rel):
                    raise DataError(f"{path}: {split}/{cls}[{i}] has an absolute path {rel!r}; "
                                    "meta.json paths must be relative to the dataset root "
                                    "(regenerate with `addinov3 data make-meta`)")
            if label == 1 and not mask:
                report.add(str(root / img), "anomalous entry without mask_path in meta.json", policy)
                continue
            records.append(Record(spec.name, split, cls, spec.readable.get(cls, cls.replace("_", " ")),
                                  str(root / img), str(root / mask) if mask else None, label,
                                  item.get("specie_name", "")))
    return records


def write_meta(root: str | os.PathLike, records: Sequence[Record]) -> Path:
    """Writes `root/meta.json` (paths relative to root) for `records`."""
    root = Path(root).resolve()
    meta: dict = {}
    for r in records:
        rel = lambda p: os.path.relpath(Path(p).resolve(), root)  # noqa: E731
        meta.setdefault(r.split, {}).setdefault(r.class_folder, []).append({
            "img_path": rel(r.image_path), "mask_path": rel(r.mask_path) if r.mask_path else "",
            "cls_name": r.class_folder, "specie_name": r.defect, "anomaly": r.label})
    meta.setdefault("train", {})
    meta.setdefault("test", {})
    (root / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root / "meta.json"


def read_folder(root: Path, classes, split, report, policy) -> list[Record]:
    """A user's folder: `{root}/{class}/normal/*`, `{root}/{class}/anomalous/*` and optionally
    `{root}/{class}/masks/*` (masks matched by file stem, `_mask` suffix allowed). A class without
    a `masks` folder is image-level only (its anomalies have no mask)."""
    records = []
    for cls in classes:
        cdir = root / cls
        normal, anomalous = list_images(cdir / "normal"), list_images(cdir / "anomalous")
        if not normal and not anomalous:
            report.add(str(cdir), "empty class folder: expected normal/ and/or anomalous/ images",
                       policy)
            continue
        name = cls.replace("_", " ")
        records += [Record("folder", split, cls, name, str(p), None, 0, "good") for p in normal]
        if (cdir / "masks").is_dir():
            masks = {_stem(m): m for m in list_images(cdir / "masks")}
            for p in anomalous:
                if _stem(p) in masks:
                    records.append(Record("folder", split, cls, name, str(p), str(masks[_stem(p)]),
                                          1, "anomalous"))
                else:
                    report.add(str(p), f"anomalous image without a mask in {cdir / 'masks'}", policy)
        else:
            records += [Record("folder", split, cls, name, str(p), None, 1, "anomalous")
                        for p in anomalous]
    return records


def read(
    name: str,
    root: str | os.PathLike,
    *,
    split: str = "test",
    classes: Sequence[str] | None = None,
    on_bad_sample: str = "error",
    validate: bool = True,
) -> tuple[list[Record], Report]:
    """All records of dataset `name` ("mvtec", ..., "meta:<name>" or "folder") under `root`.

    Args:
      classes: a subset of class folders (default: all, sorted).
      on_bad_sample: "error" raises `DataError` naming the file; "skip" drops it into the report.
      validate: open every image / mask header (and decode images) to catch broken files now.
    """
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    report = Report()
    use_meta = name.startswith("meta:")
    base = name.removeprefix("meta:")
    if base == "folder":
        known = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    elif base in DATASETS:
        known = DATASETS[base].classes
        if DATASETS[base].classes_from_disk:
            known = tuple(c for c in known if (root / c).is_dir())
    else:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, folder, meta:<name>")
    chosen = tuple(known if classes is None else classes)
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise DataError(f"unknown class name(s) {unknown} for {base}; known: {', '.join(known)}")
    if base == "folder":
        records = read_folder(root, chosen, split, report, on_bad_sample)
    else:
        spec = DATASETS[base]
        reader = read_meta if use_meta else {"mvtec": read_mvtec_style, "visa": read_visa,
                                            "tn3k": read_tn3k}[spec.layout]
        records = reader(root, spec, chosen, split, report, on_bad_sample)
    seen, unique = set(), []
    for r in records:
        if r.image_path in seen:
            report.duplicates.append(r.image_path)
            continue
        seen.add(r.image_path)
        unique.append(r)
    if validate:
        good = []
        for r in unique:
            problem = check_sample(r)
            if problem:
                report.add(r.image_path, problem, on_bad_sample)
            else:
                good.append(r)
        unique = good
    if not unique:
        raise DataError(f"{root}: no usable {split} images for {name} (classes {list(chosen)})")
    return unique, report


def spec_for(name: str) -> DatasetSpec | None:
    return DATASETS.get(name.removeprefix("meta:"))
