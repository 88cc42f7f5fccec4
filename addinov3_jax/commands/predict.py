"""`addinov3 predict`: anomaly maps and scores for your own images (any sizes), batched.

Writes, under the output directory (locked while a run uses it; every file replaced atomically):
* `scores.csv`: one row per image (written after every batch to `.scores.csv.<pid>.partial`,
  renamed at the end, also after a crash or Ctrl-C);
* `scores.json` (at the end, also after a crash): class name, score mode, colour scale, the rows,
  the files that could not be read (`skipped`, with the reason) and the rows whose heatmap could
  not be drawn (`not_drawn`; drawing never loses a score);
* `heatmaps/<name>.png`: image | overlay side by side at the original size (longest side capped
  at `DISPLAY_MAX_SIDE`), a colour bar with tick labels and the image score;
* optionally `maps/<name>.npy`: the float32 map at the original size (written per batch).

Names are the file stems, made unique across folders (`_unique_names`). A rerun into the same
output clears what a killed run left and removes the heatmaps / maps of inputs it does not have.
Large photos are decoded at reduced scale (`decode_image(max_side=...)`) and their full-size maps
are never held in memory (`map_max`, `save_full_map` work a block of rows at a time).

Calibrated (`calibration`, from `addinov3 calibrate`): every row gains `verdict` (score >
image threshold: "defective") and `normalized_score` (`calibration.NORMALIZED_SCORE`, the
threshold at 0.5); `masks/<name>.png` holds map > pixel threshold at the image's size and the
row's `regions` its 8-connected components (box, area, peak); heatmaps colour only what lies
above the pixel threshold. (The mask and regions need the full-size map of one image at a time.)
`report.html` shows the rows with their heatmaps and masks.

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
import functools
import hashlib
import json
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from addinov3_jax import calibration as calib
from addinov3_jax import plots, reporting
from addinov3_jax.data import references
from addinov3_jax.data.records import IMAGE_SUFFIXES, DataError, decode_image
from addinov3_jax.io import model_dir
from addinov3_jax.io import workdir as workdir_io
from addinov3_jax.models import fewshot, sharding
from addinov3_jax.models import model as ad
from addinov3_jax.runtime import distributed, inference
from addinov3_jax.runtime.inference import Predictor, map_max

SCALES = ("run", "fixed")
CSV_FIELDS = ("image", "name", "score", "max_pixel", "width", "height")
CALIBRATED_FIELDS = ("verdict", "normalized_score", "defect_regions")  # with a calibration
PENDING = ".pending_maps"  # network-resolution maps waiting for the run's colour scale (per run)
# Heatmaps of larger images are drawn with the longest side reduced to this (the scores, the
# `max_pixel` column and `maps/*.npy` stay at the original size).
DISPLAY_MAX_SIDE = 2048


@dataclasses.dataclass
class Prediction:
    """What `predict` wrote: one row per image and the inputs it skipped (with the reason)."""

    images: list[dict]
    skipped: list[dict]
    scale: tuple[float, float]
    not_drawn: list[dict] = dataclasses.field(default_factory=list)  # rows kept, picture failed


def expand(inputs: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None
           ) -> tuple[list[Path], list[dict]]:
    """Files as given, folders expanded to their images (sorted, recursively, following
    symbolic links to folders once). Hidden files and folders (".DS_Store", "._x.jpg") are
    ignored; any other file that is not an image (by suffix) is skipped and reported, as is a
    file given explicitly that is not one; the same file reached twice counts once. Files under
    `exclude` (the output folder, when it lies inside an input folder: its heatmaps are not
    inputs) are left out. A missing path is an error (nothing has been computed yet)."""
    out, skipped, seen = [], [], set()
    skip_below = os.path.realpath(exclude) + os.sep if exclude is not None else None

    def add(path: Path) -> None:
        key = os.path.realpath(path)
        if key in seen:
            return
        seen.add(key)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            out.append(path)
        else:
            skipped.append({"image": str(path), "error": f"not an image file (suffix "
                            f"{path.suffix or 'none'!r}; expected one of {', '.join(IMAGE_SUFFIXES)})"})

    for item in map(Path, inputs):
        if item.is_dir():
            for path in _walk(item):
                if skip_below and os.path.realpath(path).startswith(skip_below):
                    continue
                if not path.exists():
                    skipped.append({"image": str(path), "error": "broken symbolic link"})
                else:
                    add(path)
        elif item.is_file():
            add(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    if not out and not skipped:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    return out, skipped


def _walk(folder: Path) -> list[Path]:
    """The non-hidden files below `folder`, sorted; each real folder visited once (links
    followed, loops cut)."""
    files, visited = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in names if not n.startswith(".")]
    return sorted(files)


def load_model(checkpoint: str | os.PathLike, mesh=None,
               rules=sharding.DEFAULT_RULES) -> ad.ADDinoV3:
    """A model directory (`model.json`) or a training workdir containing `model/`, loaded
    straight into the rules' shardings on `mesh` (no device ever holds a whole copy of a
    sharded tower)."""
    return model_dir.load(model_dir.resolve(checkpoint), mesh=mesh, rules=rules)


def predict(model: ad.ADDinoV3, inputs, class_name: str, output: str | os.PathLike, *,
            image_size: int = 512, batch_size: int = 8, save_maps: bool = False,
            scale: str = "run", text_cache_dir: str | os.PathLike | None = None,
            mesh=None, reference: str | os.PathLike | None = None,
            fewshot_config: fewshot.FewShotConfig | None = None,
            calibration: dict | None = None, model_identity: dict | None = None) -> Prediction:
    """Maps and scores for `inputs` (files / folders); see the module docstring for the outputs.

    `calibration` (a record of `calibration.read`): every row gains `verdict` and
    `normalized_score`, `masks/<name>.png` and `regions` (pixel threshold); it is refused before
    anything is computed when `model_identity` (`model_dir.identity`), the image size, the score
    mode or the few-shot bank differ from the calibration's.

    Runs `inference.Predictor` on `mesh` (default: the devices that split `batch_size` evenly).
    `reference`: a folder of normal images of the class; their memory bank (settings:
    `fewshot_config`, default `FewShotConfig()`) is fused with every prediction. The output
    folder is locked for the run (a second `predict` into it is refused).

    Raises `DataError` (after writing `scores.json`) when no input could be read.
    """
    cfg = model.backbone.config
    check_arguments(scale=scale, image_size=image_size, batch_size=batch_size,
                    patch_size=cfg.patch_size, reference=reference)
    out = Path(output)
    if calibration is not None:
        calib.check_compatible(calibration, identity=model_identity or {}, settings=run_settings(
            model, class_name, image_size, reference, fewshot_config))
    paths, skipped = expand(inputs, exclude=out)
    workdir_io.ensure_writable(out, "--output")
    with workdir_io.WorkdirLock(out, command="predict"):
        return _predict(model, paths, skipped, class_name, out, image_size=image_size,
                        batch_size=batch_size, save_maps=save_maps, scale=scale,
                        text_cache_dir=text_cache_dir, mesh=mesh, reference=reference,
                        fewshot_config=fewshot_config, calibration=calibration)


def run_settings(model: ad.ADDinoV3, class_name: str, image_size: int, reference=None,
                 fewshot_config: fewshot.FewShotConfig | None = None) -> dict:
    """The settings of a run that change its scores (what a calibration must share with it);
    the bank is described by its files' checksums, without computing it."""
    ref = None
    if reference is not None:
        refs = references.reference_paths(reference)
        fs = fewshot_config or fewshot.FewShotConfig()
        ref = {"folder": str(reference), "count": len(refs), "images": [str(p) for p in refs],
               "sha256": [inference.file_sha256(p) for p in refs],
               "settings": {k: v for k, v in dataclasses.asdict(fs).items()
                            if k not in ("shots", "seeds")}}
    return {"class_name": class_name, "image_size": image_size,
            "image_score": model.config.image_score, "reference": ref}


def check_arguments(*, scale: str, image_size: int, batch_size: int, patch_size: int = 16,
                    reference=None) -> None:
    """One line per bad argument, before anything is loaded or written."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size}")
    if image_size < patch_size or image_size % patch_size:
        raise ValueError(f"--image-size must be a positive multiple of the patch size {patch_size} "
                         f"(e.g. {max(patch_size, image_size // patch_size * patch_size)}), got {image_size}")
    if reference is not None and not Path(reference).is_dir():
        raise DataError(f"{reference}: --reference takes a folder of normal images of the class"
                        + (", not a file" if Path(reference).exists() else "; no such folder"))


def _predict(model, paths, skipped, class_name, out: Path, *, image_size, batch_size, save_maps,
             scale, text_cache_dir, mesh, reference, fewshot_config, calibration) -> Prediction:
    from tqdm.auto import tqdm

    previous = _clear_leftovers(out)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    if save_maps:
        (out / "maps").mkdir(parents=True, exist_ok=True)
    pixel_threshold = calibration["pixel_threshold"] if calibration else None
    if pixel_threshold is not None:
        (out / "masks").mkdir(parents=True, exist_ok=True)
    pending = out / f"{PENDING}.{os.getpid()}"  # this run's own
    if scale == "run":
        pending.mkdir(exist_ok=True)
    predictor = Predictor(model, mesh or distributed.default_mesh(batch_size),
                          fewshot_config=fewshot_config)
    bank, ref_info = None, None
    if reference is not None:
        bank, ref_info = inference.reference_bank(
            predictor, references.reference_paths(reference), image_size=image_size,
            batch_size=batch_size, folder=reference)
    # (1, E, 2), once per class (cached on disk); nothing to encode when no input is an image.
    table = predictor.text_table([class_name], cache_dir=text_cache_dir) if paths else None
    names = _unique_names(paths)
    rows: list[dict] = []
    not_drawn: list[dict] = []
    lo, hi = np.inf, -np.inf
    complete = False
    partial = out / f".scores.csv.{os.getpid()}.partial"  # renamed to scores.csv at the end
    fields = CSV_FIELDS + (CALIBRATED_FIELDS if calibration else ())
    draw = functools.partial(_draw_safely, threshold=pixel_threshold)

    try:
        # surrogateescape: file names that are not valid UTF-8 are written back as their bytes
        with open(partial, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            results = inference.predict_files(predictor, paths, table, image_size=image_size,
                                              batch_size=batch_size, bank=bank, skipped=skipped,
                                              max_side=DISPLAY_MAX_SIDE)
            for result in tqdm(results, desc="predict", unit="batch",
                               total=-(-len(paths) // batch_size), disable=not paths):
                originals, maps = result["originals"], result["maps"]
                batch_rows = []
                for p, (w, h), m, s in zip(result["paths"], result["sizes"], maps, result["scores"],
                                           strict=True):
                    name = names[p]
                    if save_maps:
                        with workdir_io.write_guard(out / "maps"):
                            save_full_map(out / "maps" / f"{name}.npy", m, h, w)
                    row = {"image": str(p), "name": name, "score": float(s),
                           "max_pixel": map_max(m, h, w), "width": w, "height": h}
                    if calibration:
                        with workdir_io.write_guard(out / "masks"):
                            _decide(row, m, calibration, out)
                    if scale == "run":
                        with workdir_io.write_guard(pending):
                            np.save(pending / f"{name}.npy", m)
                    lo, hi = min(lo, float(m.min())), max(hi, float(m.max()))
                    batch_rows.append(row)
                with workdir_io.write_guard(out / "scores.csv"):
                    writer.writerows(batch_rows)
                    f.flush()
                rows += batch_rows
                if scale == "fixed":  # after the rows are kept: drawing never loses a result
                    for im, row, m in zip(originals, batch_rows, maps, strict=True):
                        draw(out, row, m, class_name, (0.0, 1.0), not_drawn, image=im)
        complete = True
    finally:  # also after a crash or Ctrl-C: index, then draw, every finished map
        used = (0.0, 1.0) if scale == "fixed" or not rows else (lo, hi)
        if partial.exists():
            os.replace(partial, out / "scores.csv")
        index = functools.partial(_write_index, out, model, class_name, scale, used, ref_info,
                                  rows, skipped, not_drawn, calibration)
        index(complete)
        if scale == "run":
            for row in rows:
                try:
                    m = np.load(pending / f"{row['name']}.npy")
                except (OSError, ValueError) as e:
                    not_drawn.append({"image": row["image"], "error": f"map lost ({e})"})
                    continue
                draw(out, row, m, class_name, used, not_drawn)
            shutil.rmtree(pending, ignore_errors=True)
        if not_drawn:
            index(complete)
        if complete:
            _remove_stale(out, previous, {r["name"] for r in rows})
        _write_report(out)
    if not rows:
        first = skipped[0] if skipped else {"image": "-", "error": "no input"}
        raise DataError(f"none of the {len(skipped)} input(s) could be read (first: {first['image']}: "
                        f"{first['error']}); see {out / 'scores.json'}")
    return Prediction(rows, skipped, used, not_drawn)


def _write_report(out: Path) -> None:
    """`report.html` from `scores.json` (a failure is a warning: every result is already kept)."""
    try:
        reporting.write(out / "report.html", reporting.predict_page(
            out, json.loads((out / "scores.json").read_text())))
    except Exception as e:  # noqa: BLE001 - the page is a view of files already written
        warnings.warn(f"{out / 'report.html'} not written: {_one_line(e)}", stacklevel=2)


def _decide(row: dict, amap: np.ndarray, calibration: dict, out: Path) -> None:
    """`verdict`, `normalized_score` and, with a pixel threshold, `masks/<name>.png` (map >
    pixel threshold at the image's size) and the defect `regions` of one row."""
    t = calibration["image_threshold"]
    row["verdict"] = calib.verdict(row["score"], t)
    row["normalized_score"] = calib.normalized_score(row["score"], t,
                                                     calibration["good_scores"]["min"])
    thr = calibration.get("pixel_threshold")
    if thr is None:
        return
    full = ad.resize_map(amap, row["height"], row["width"])
    mask = calib.defect_mask(full, thr)
    row["regions"] = calib.regions(mask, full)
    row["defect_regions"] = len(row["regions"])
    picture = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    workdir_io.atomic_write(out / "masks" / f"{row['name']}.png",
                            lambda tmp: picture.save(tmp, format="PNG"))


def _write_index(out: Path, model, class_name, scale, used, ref_info, rows, skipped, not_drawn,
                 calibration, complete: bool) -> None:
    index = {"class_name": class_name, "image_score": model.config.image_score,
             "scale": {"mode": scale, "min": used[0], "max": used[1]}, "complete": complete,
             "reference": ref_info, "images": rows, "skipped": skipped, "not_drawn": not_drawn}
    if calibration:
        index["calibration"] = {
            "file": calibration.get("file"), "alpha": calibration["alpha"], "n": calibration["n"],
            "image_threshold": calibration["image_threshold"],
            "pixel_threshold": calibration.get("pixel_threshold"),
            "normalized_score": calib.NORMALIZED_SCORE,
            "defective": sum(r.get("verdict") == "defective" for r in rows)}
    workdir_io.atomic_write_text(out / "scores.json", workdir_io.strict_json(index, indent=2) + "\n")


def _clear_leftovers(out: Path) -> set[str]:
    """Removes what a killed earlier run left in `out` (we hold its lock, so none is running);
    returns the output names of the previous finished run (from its `scores.json`)."""
    for leftover in [*out.glob(f"{PENDING}*"), *out.glob(".scores.csv.*.partial"),
                     *out.glob("heatmaps/.*.tmp"), *out.glob("maps/.*.tmp"), *out.glob(".*.tmp")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    try:
        old = json.loads((out / "scores.json").read_text())
        return {r["name"] for r in old.get("images", []) if isinstance(r, dict) and "name" in r}
    except (OSError, ValueError, TypeError, AttributeError):
        return set()


def _remove_stale(out: Path, previous: set[str], current: set[str]) -> None:
    """The heatmaps / maps of a previous run into the same output whose inputs this run did not
    have: removed, so the folder matches `scores.json`."""
    for name in previous - current:
        (out / "heatmaps" / f"{name}.png").unlink(missing_ok=True)
        (out / "masks" / f"{name}.png").unlink(missing_ok=True)
        (out / "maps" / f"{name}.npy").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Maps at the original size, without full-size copies; heatmaps at a bounded display size


def save_full_map(path: Path, amap: np.ndarray, height: int, width: int) -> None:
    """The map upsampled to (height, width) as float32 `.npy`, written block by block (memory
    mapped), atomically."""
    def write(tmp: Path) -> None:
        full = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(height, width))
        for start, block in ad.resize_map_rows(amap, height, width):
            full[start : start + len(block)] = block
        full.flush()
        del full

    workdir_io.atomic_write(path, write)


def _draw_safely(out: Path, row: dict, amap: np.ndarray, class_name: str,
                 scale: tuple[float, float], not_drawn: list[dict], image=None,
                 threshold: float | None = None) -> None:
    """The heatmap of `row` (its image decoded again unless given, at most `DISPLAY_MAX_SIDE`
    on its longest side; with a pixel `threshold`, coloured only above it); a failure is noted
    in `not_drawn`, never raised: the scores are kept."""
    try:
        if image is None:
            image = decode_image(Path(row["image"]).read_bytes(), row["image"],
                                 max_side=DISPLAY_MAX_SIDE)
        w, h = image.size
        caption = f"{row['name']} ({class_name})" + (f", {row['verdict']}" if "verdict" in row else "")
        picture = plots.overlay(np.asarray(image), ad.resize_map(amap, h, w), scale=scale,
                                score=row["score"], caption=caption, threshold=threshold)
        workdir_io.atomic_write(out / "heatmaps" / f"{row['name']}.png",
                                lambda tmp: picture.save(tmp, format="PNG"))
    except Exception as e:  # noqa: BLE001 - any drawing failure: note it, keep the scores
        not_drawn.append({"image": row["image"], "error": _one_line(e)})


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _unique_names(paths: list[Path]) -> dict[Path, str]:
    """Output stems, one per input and never the same for two (compared case-insensitively, as
    macOS and Windows file systems do): the file's stem, with as many parent folders prefixed
    (and the extension appended) as it takes to tell it from every other input; where the
    joined names still meet (`x/a_b.png` and `a/b.png` both read `a_b`), a short hash of the
    path is appended to each."""
    def name(p: Path, depth: int, ext: bool) -> str:
        parts = [*p.parent.parts[len(p.parent.parts) - depth:], p.stem + (f"_{p.suffix[1:]}" if ext else "")]
        return "_".join(x for x in parts if x not in ("/", ""))

    out: dict[Path, str] = {}
    for p in paths:
        for depth in range(len(p.parent.parts) + 1):
            for ext in (False, True):
                candidate = name(p, depth, ext)
                if sum(name(q, depth, ext).lower() == candidate.lower() for q in paths) == 1:
                    break
            else:
                continue
            break
        out[p] = candidate
    counts = Counter(n.lower() for n in out.values())
    for p, n in out.items():
        if counts[n.lower()] > 1:
            out[p] = f"{n}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"
    return out
