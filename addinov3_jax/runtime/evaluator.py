"""Evaluation: per-category and mean metrics, `results.json` / `results.md`, heatmaps and curve
plots; zero-shot, or few-shot with a memory bank per class and seed.

Protocol (shared/reference/metrics.md §10): every metric per category over its test images, then
the unweighted mean over categories. Maps are compared with masks at the network resolution (the
official 512x512 protocol: masks resized bilinearly and re-thresholded) or, with
`resolution="original"`, maps are upsampled bilinearly to each ground truth's original size.
A metric that is undefined for a category (one class only, no masks) is NaN with a note and is
left out of the mean.

Few-shot (`fewshot_config.shots` = k > 0; shared/reference/fewshot.md): for each class and each
seed, k references drawn (`data.references.sample_references`) from the class's **train** split normal
images (a dataset whose train split would share images with the test split is refused), one bank
built from them, and every test batch fused with it (`Predictor(..., bank=)`). `results.json`
then adds `"shots"` and `"seeds"` at the top level; per dataset, `categories` and `mean` are the
means over the seeds, `per_seed` holds each seed's `categories` and `mean`, `mean_std` the
standard deviation over seeds of the dataset means, and `references` the reference images drawn
per class and seed. Heatmaps and curves show the first seed.

Decisions (`false_alarm_rate` = alpha > 0): each class is calibrated (`calibration.calibrate`,
split-conformal) on its **train** split normal images that are not few-shot references (never
test images), and each dataset entry gains `calibration`: per class the thresholds and, on the
test images, the false-alarm rate on the good ones (with its 95% interval), the detection rate on
the defective ones and the confusion counts, next to the same pair at the F1-optimal threshold
(which needs the labels); `mean` averages the rates over classes. Few-shot: the first seed's bank.
The METRICS rows are unchanged. `report.html` (`reporting.eval_page`) shows the tables, the
curves and per class the misses and false alarms with their heatmaps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from addinov3_jax import calibration as calib
from addinov3_jax import config as config_lib
from addinov3_jax import metrics, plots, reporting
from addinov3_jax.data import pipeline, readers
from addinov3_jax.data import references as references_lib
from addinov3_jax.data.records import DataError, Record, decode_mask
from addinov3_jax.io import model_dir
from addinov3_jax.io import workdir as workdir_lib
from addinov3_jax.models import fewshot, sharding
from addinov3_jax.models import model as ad
from addinov3_jax.runtime import distributed
from addinov3_jax.runtime.inference import Predictor, place_model

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
               "pixel_aupro")


@dataclasses.dataclass
class EvalOptions:
    image_size: int = 512
    batch_size: int = 8
    resolution: str = "network"  # or "original"
    class_name_source: str = "readable"
    fixed_word: str = ""  # the word of class_name_source="fixed"
    heatmaps_per_category: int = 4
    curves: bool = True
    fpr_limit: float = 0.3
    worker_count: int = 0
    text_cache_dir: str | None = None
    false_alarm_rate: float = 0.0  # > 0: calibrate each class on its train/good images
    report_examples: int = 3  # misses and false alarms per class in report.html


def preprocess_for(predictor: Predictor, words: Sequence[str], opts: EvalOptions,
                   spec) -> pipeline.Preprocess:
    """The evaluation's preprocessing (size, the backbone's mean / std, the dataset's mask
    threshold)."""
    return pipeline.Preprocess.for_backbone(
        predictor.backbone_config, opts.image_size, words,
        class_name_source=opts.class_name_source, fixed_word=opts.fixed_word,
        mask_threshold=spec.mask_threshold if spec else 0.5)


def predict_records(predictor: Predictor, records: Sequence[Record], words: Sequence[str],
                    opts: EvalOptions, spec, desc: str = "eval",
                    bank: fewshot.MemoryBank | None = None):
    """Maps (N, S, S), scores (N,), masks (N, S, S) of `records` on the predictor's mesh (fused
    with the few-shot `bank` when given), through the one inference loop (`Predictor.run`).

    Each process decodes its own contiguous block of the records; the results are gathered so
    that every process returns all N rows (process 0 computes the metrics)."""
    from tqdm.auto import tqdm

    pre = preprocess_for(predictor, words, opts, spec)
    table = predictor.text_table(words, cache_dir=opts.text_cache_dir)
    n = len(records)
    maps = np.zeros((n, opts.image_size, opts.image_size), np.float32)
    masks = np.zeros_like(maps, dtype=np.uint8)
    scores = np.zeros(n, np.float32)
    ds = pipeline.eval_dataset(pipeline.RecordSource(records), pre,
                               batch_size=predictor.local_rows(opts.batch_size),
                               shard_index=jax.process_index(), shard_count=jax.process_count(),
                               worker_count=opts.worker_count)
    batches = ({k: b[k] for k in ("image", "class_id", "valid", "index", "mask")} for b in ds)
    show = jax.process_index() == 0
    for out in tqdm(predictor.run(batches, table, bank=bank), desc=desc, leave=False,
                    disable=not show):
        maps[out["index"]] = out["maps"]
        scores[out["index"]] = out["scores"]
        masks[out["index"]] = out["mask"].astype(np.uint8)
    return maps, scores, masks


def _original_resolution(records, maps):
    """Maps upsampled to each original mask size (`model.resize_map`, the one map resize), and
    the untouched binary ground truth."""
    out_maps, out_masks = [], []
    for r, m in zip(records, maps, strict=True):
        with Image.open(r.image_path) as im:
            w, h = im.size
        if r.mask_path:
            gt = np.asarray(decode_mask(Path(r.mask_path).read_bytes(), r.mask_path)) > 0
        else:
            gt = np.zeros((h, w), bool)
        out_maps.append(ad.resize_map(m, *gt.shape))
        out_masks.append(gt)
    return out_maps, out_masks


def category_metrics(labels, scores, masks, maps, *, has_masks: bool, fpr_limit: float,
                     curves: bool = False):
    """(METRICS dict, notes, curves) of one category; `masks` / `maps` are (N, H, W) arrays or
    lists of 2-D arrays of any sizes (original resolution: pixels pooled).

    The metrics come from one sort of the pixels (`metrics.pixel_metrics`, on the accelerator
    where there is one). With `curves=True` they are read off the curve points that
    `plots.save_curves` draws instead (the same counts and formulas), so a plot and
    `results.json` always agree; else the curves are None."""
    notes = []
    row: dict[str, float] = {}
    drawn: dict[str, metrics.Curves | None] | None = {"image": None, "pixel": None} if curves else None
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        notes.append(f"image metrics undefined: only {'anomalous' if labels[0] else 'normal'} images")
        row.update(image_auroc=math.nan, image_ap=math.nan, image_f1_max=math.nan)
    else:
        if curves:
            drawn["image"] = metrics.curves(labels, scores)
            c = drawn["image"].metrics()
        else:
            c = metrics.classification_metrics(labels, scores)
        row.update(image_auroc=c["auroc"], image_ap=c["ap"], image_f1_max=c["f1_max"])
    if not has_masks:
        notes.append("pixel metrics undefined: anomalous images without masks")
        row.update(pixel_auroc=math.nan, pixel_ap=math.nan, pixel_f1_max=math.nan, pixel_aupro=math.nan)
    else:
        if isinstance(maps, list):  # original resolution: different sizes, pooled pixels
            gt = metrics.GroundTruth.from_masks_list(masks)
            flat = np.concatenate([m.reshape(-1) for m in maps])
        else:
            gt, flat = metrics.GroundTruth.from_masks(masks), maps
        if curves:
            drawn["pixel"] = metrics.pixel_curves(None, flat, ground_truth=gt)
            p = drawn["pixel"].metrics(fpr_limit)
        else:
            p = metrics.pixel_metrics(None, flat, ground_truth=gt, fpr_limit=fpr_limit)
        positives = int(np.count_nonzero(gt.payload))
        if positives in (0, gt.payload.size):  # one pixel class only: every pixel metric undefined
            notes.append("pixel metrics undefined: no anomalous pixels (only normal images, or "
                         "empty masks)" if not positives else "pixel metrics undefined: no normal pixels")
            p = dict.fromkeys(("auroc", "ap", "f1_max", "aupro"), math.nan)
        row.update(pixel_auroc=p["auroc"], pixel_ap=p["ap"], pixel_f1_max=p["f1_max"],
                   pixel_aupro=p["aupro"])
    row["num_images"] = int(len(labels))
    return row, notes, drawn


def _per_key(rows: Sequence[dict], reduce) -> dict[str, float]:
    """`reduce` (e.g. np.mean) of each metric over `rows`, NaN values left out (NaN if all are)."""
    out = {}
    for k in METRIC_KEYS:
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        out[k] = float(reduce(vals)) if vals else math.nan
    return out


def mean_metrics(categories: dict[str, dict]) -> dict[str, float]:
    """Unweighted mean over categories; `num_images` is their total."""
    rows = list(categories.values())
    return {**_per_key(rows, np.mean), "num_images": int(sum(c["num_images"] for c in rows))}


def evaluate(model: ad.ADDinoV3, datasets: Sequence[tuple], out_dir: str | os.PathLike,
             *, classes: Sequence[str] | None = None, opts: EvalOptions | None = None,
             config: dict | None = None, on_bad_sample: str = "error",
             results_name: str = "results", mesh=None, rules=sharding.DEFAULT_RULES,
             curves_out: dict | None = None, curves_compare: dict | None = None,
             curves_name: str = "", fewshot_config: fewshot.FewShotConfig | None = None,
             panels_out: dict | None = None) -> dict:
    """Evaluates `model` on each `(dataset name, root)` or `(name, root, classes)`, on `mesh`
    (default: `distributed.default_mesh(batch_size)`); process 0 writes `{results_name}.json`,
    `.md`,
    `heatmaps/` and `curves/` under `out_dir`. Returns the results dict (complete on process 0;
    the other processes take part in the computation and return the skeleton).

    `fewshot_config` with `shots` > 0 evaluates few-shot (see the module docstring); None or
    `shots=0` is the zero-shot evaluation.
    `curves_out` (a dict) receives each category's curves keyed by (dataset, class);
    `curves_compare` maps such keys to `{run name: curves}` drawn beside this run (`curves_name`).
    `panels_out` (a dict) receives the report's example pictures keyed by (dataset, class).
    """
    opts = opts or EvalOptions()
    out_dir = Path(out_dir)
    is_main = jax.process_index() == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    shots = fewshot_config.shots if fewshot_config else 0
    seeds = fewshot_config.seeds if shots else (None,)
    predictor = Predictor(model, mesh or distributed.default_mesh(opts.batch_size), rules, fewshot_config)
    results: dict = {"datasets": {}, "config": config or {}, "shots": shots}
    panels: dict = {}  # (dataset, class) -> the report's example pictures
    if shots:
        results["seeds"] = list(seeds)
    for name, root, *own in datasets:
        classes_here = tuple(own[0]) if own and own[0] else classes
        spec = readers.spec_for(name)
        chosen = tuple(classes_here) if classes_here else None
        if spec and chosen:
            chosen = tuple(c for c in chosen if c in spec.classes) or None
        records, report = readers.read(name, root, split="test", classes=chosen,
                                       on_bad_sample=on_bad_sample)
        per_class: dict[str, list[Record]] = {}
        for r in records:
            per_class.setdefault(r.class_folder, []).append(r)
        alpha = opts.false_alarm_rate
        normals = _reference_pool(name, root, records, tuple(sorted(per_class)),
                                  on_bad_sample) if shots or alpha else {}
        decisions: dict = {}
        per_seed: dict = {seed: {} for seed in seeds}
        references: dict = {}
        notes = {}
        for cls, recs in sorted(per_class.items()):
            words = sorted({r.object_word(opts.class_name_source, opts.fixed_word) for r in recs})
            labels = np.array([r.label for r in recs])
            has_masks = all(r.has_mask for r in recs if r.label)
            for i, seed in enumerate(seeds):
                bank, refs = None, []
                if shots:
                    refs = references_lib.sample_references(normals.get(cls, []), shots, seed)
                    references.setdefault(cls, {})[str(seed)] = [r.image_path for r in refs]
                    bb = predictor.backbone_config
                    images = pipeline.load_images([r.image_path for r in refs], opts.image_size,
                                                  bb.pixel_mean, bb.pixel_std)
                    bank = predictor.build_bank(images, seed=seed, batch_size=opts.batch_size)
                desc = f"{name}/{cls}" + (f" ({shots}-shot, seed {seed})" if shots else "")
                maps, scores, masks = predict_records(predictor, recs, words, opts, spec,
                                                      desc=desc, bank=bank)
                good = None  # calibration scores: every process takes part, first seed only
                if alpha and not i:
                    good = _calibration_scores(predictor, references_lib.calibration_records(
                        normals.get(cls, []), refs), words, opts, spec, bank, alpha)
                if not is_main:  # metrics and pictures on process 0
                    continue
                if opts.resolution == "original":
                    pmaps, pmasks = _original_resolution(recs, maps)
                else:
                    pmaps, pmasks = maps, masks
                draw = opts.curves and has_masks and not i  # pictures of the first seed
                per_seed[seed][cls], cat_notes, cat_curves = category_metrics(
                    labels, scores, pmasks, pmaps, has_masks=has_masks, fpr_limit=opts.fpr_limit,
                    curves=draw)
                if i:  # pictures, notes and decisions of the first seed
                    continue
                if cat_notes:
                    notes[cls] = cat_notes
                decision = None
                if alpha:
                    decision = decisions[cls] = _decide(good, alpha, labels, scores, maps)
                examples = plots.save_report_panels(
                    out_dir / "report" / name / cls, recs, maps, masks, scores,
                    opts.report_examples, opts.image_size,
                    threshold=decision and decision.get("image_threshold"),
                    pixel_threshold=decision and decision.get("pixel_threshold"))
                panels[(name, cls)] = examples
                if opts.heatmaps_per_category:
                    plots.save_heatmaps(out_dir / "heatmaps" / name / cls, recs, maps, masks,
                                        opts.heatmaps_per_category, opts.image_size, scores=scores)
                if opts.curves and has_masks:
                    other = (curves_compare or {}).get((name, cls))
                    plots.save_curves(out_dir / "curves" / name / f"{cls}.png", cat_curves,
                                      title=f"{name} / {cls}", name=curves_name, compare=other,
                                      fpr_limit=opts.fpr_limit)
                    if curves_out is not None:
                        curves_out[(name, cls)] = cat_curves
        if shots:
            cats = {cls: seed_mean([per_seed[s][cls] for s in seeds]) for cls in per_seed[seeds[0]]}
            entry = {"categories": cats, "mean": mean_metrics(cats),
                     "per_seed": {str(s): {"categories": per_seed[s],
                                           "mean": mean_metrics(per_seed[s])} for s in seeds}}
            entry["mean_std"] = seed_std([entry["per_seed"][str(s)]["mean"] for s in seeds])
            entry["references"] = references
        else:
            cats = per_seed[None]
            entry = {"categories": cats, "mean": mean_metrics(cats)}
        if alpha and is_main:
            entry["calibration"] = {"false_alarm_rate_target": alpha, "seed": seeds[0],
                                    "categories": decisions, "mean": _decision_mean(decisions)}
        if notes:
            entry["notes"] = notes
        if report.skipped or report.duplicates:
            entry["skipped"] = [f"{p}: {why}" for p, why in report.skipped] + [
                f"{p}: duplicate" for p in report.duplicates]
        results["datasets"][name] = entry
    if is_main:
        # Strict JSON: undefined metrics (NaN in memory) are null in the file (DESIGN §4).
        workdir_lib.atomic_write_text(out_dir / f"{results_name}.json",
                                     workdir_lib.strict_json(results, indent=2) + "\n")
        workdir_lib.atomic_write_text(out_dir / f"{results_name}.md", markdown(results))
        page = out_dir / ("report.html" if results_name == "results" else f"{results_name}_report.html")
        reporting.write(page, reporting.eval_page(results, out_dir, panels))
    if panels_out is not None:
        panels_out.update(panels)
    return results


DECISION_RATES = ("false_alarm_rate", "detection_rate", "f1_false_alarm_rate", "f1_detection_rate",
                  "pixel_false_alarm_rate")


def _calibration_scores(predictor, pool: Sequence[Record], words, opts: EvalOptions, spec, bank,
                        alpha: float) -> tuple[np.ndarray, np.ndarray] | int:
    """(image scores, max map values) of one class's calibration images `pool` (fused with the
    few-shot `bank`), or their count when too few to calibrate at `alpha` (nothing computed)."""
    if len(pool) < calib.min_good_images(alpha):
        return len(pool)
    maps, scores, _ = predict_records(predictor, pool, words, opts, spec, desc="calibrate", bank=bank)
    return scores, maps.reshape(len(pool), -1).max(axis=1)


def _decide(good, alpha: float, labels, scores, maps) -> dict:
    """One class's calibration on its good images' (scores, max map values) `good` and what its
    thresholds achieve on the test images (`labels`, `scores`, `maps`), next to the F1-optimal
    threshold's pair."""
    n = good if isinstance(good, int) else len(good[0])
    row: dict = {"n": n}
    try:
        if isinstance(good, int):
            calib.conformal_threshold([0.0] * n, alpha)  # raises with the reason
        record = calib.calibrate(good[0], good[1], alpha)
    except calib.CalibrationError as e:
        row["note"] = str(e)
        return row
    labels = np.asarray(labels)
    at = calib.rates(labels, scores, record["image_threshold"])
    f1_t = calib.f1_optimal_threshold(labels, scores)
    f1 = calib.rates(labels, scores, f1_t) if not math.isnan(f1_t) else None
    good_max = np.asarray(maps).reshape(len(labels), -1).max(axis=1)[labels == 0]
    row.update(k=record["k"], image_threshold=record["image_threshold"],
               pixel_threshold=record["pixel_threshold"], num_good=int((labels == 0).sum()),
               num_defective=int((labels == 1).sum()), false_alarm_rate=at["false_alarm_rate"],
               false_alarm_ci95=at["false_alarm_ci95"], detection_rate=at["detection_rate"],
               confusion=at["confusion"],
               pixel_false_alarm_rate=float((good_max > record["pixel_threshold"]).mean())
               if len(good_max) else math.nan,
               f1_threshold=f1_t, f1_false_alarm_rate=f1["false_alarm_rate"] if f1 else math.nan,
               f1_detection_rate=f1["detection_rate"] if f1 else math.nan,
               f1_confusion=f1["confusion"] if f1 else None)
    return row


def _decision_mean(decisions: dict) -> dict:
    """Unweighted mean of each rate over the calibrated classes (NaN left out), and the pooled
    false-alarm rate over all their test good images with its 95% interval."""
    rows = [r for r in decisions.values() if "false_alarm_rate" in r]
    out: dict = {"classes": len(rows)}
    for k in DECISION_RATES:
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        out[k] = float(np.mean(vals)) if vals else math.nan
    fp = sum(r["confusion"]["fp"] for r in rows)
    good = sum(r["confusion"]["fp"] + r["confusion"]["tn"] for r in rows)
    out["pooled_false_alarm_rate"] = fp / good if good else math.nan
    out["pooled_false_alarm_ci95"] = list(calib.binomial_interval(fp, good))
    out["num_good"] = good
    return out


def _reference_pool(name: str, root, test_records: Sequence[Record], classes: tuple[str, ...],
                    on_bad_sample: str) -> dict[str, list[Record]]:
    """The train-split records of `classes`, per class: the few-shot references' pool. Refuses a
    dataset whose train split shares an image with its test split (e.g. a `folder` dataset, which
    has one set of images for every split)."""
    train, _ = readers.read(name, root, split="train", classes=classes, on_bad_sample=on_bad_sample)
    tests = {Path(r.image_path).resolve() for r in test_records}
    shared = [r.image_path for r in train if Path(r.image_path).resolve() in tests]
    if shared:
        raise DataError(f"{name} at {root}: its train split shares {len(shared)} image(s) with the "
                        f"test split (e.g. {shared[0]}); few-shot references must not be test "
                        "images: use a dataset with a separate train/good split, or shots=0")
    pool: dict[str, list[Record]] = {}
    for r in train:
        pool.setdefault(r.class_folder, []).append(r)
    return pool


def seed_mean(rows: Sequence[dict]) -> dict:
    """Per-metric mean of one category's METRICS over seeds (the same images each seed)."""
    return {**_per_key(rows, np.mean), "num_images": rows[0]["num_images"]}


def seed_std(rows: Sequence[dict]) -> dict:
    """Per-metric population standard deviation of METRICS over seeds."""
    return _per_key(rows, np.std)


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def markdown(results: dict, other: dict | None = None, titles=("", "")) -> str:
    """Per-category tables (x100); with `other`, each cell shows `ours / other`."""
    lines = []
    head = "| category | " + " | ".join(METRIC_KEYS) + " | images |"
    sep = "|---" * (len(METRIC_KEYS) + 2) + "|"
    for name, entry in results["datasets"].items():
        shots = f" ({results['shots']}-shot, mean over seeds {results['seeds']})" if results.get(
            "shots") else ""
        lines += [f"## {name}" + shots + (f" ({titles[0]} / {titles[1]})" if other else ""), "",
                  head, sep]
        rows = list(entry["categories"].items()) + [("**mean**", entry["mean"])]
        for cls, row in rows:
            o = None
            if other:
                src = other["datasets"][name]
                o = src["mean"] if cls == "**mean**" else src["categories"].get(cls)
            cells = [(_fmt(row[k]) + (f" / {_fmt(o[k])}" if o else "")) for k in METRIC_KEYS]
            lines.append(f"| {cls} | " + " | ".join(cells) + f" | {row['num_images']} |")
        if "mean_std" in entry:
            cells = [_fmt(entry["mean_std"][k]) for k in METRIC_KEYS]
            lines.append("| std over seeds | " + " | ".join(cells) + " | |")
        for cls, ns in entry.get("notes", {}).items():
            lines += [f"- {cls}: {n}" for n in ns]
        lines.append("")
        if "calibration" in entry:
            lines += decisions_markdown(entry["calibration"])
    lines.append("Metrics x100 per category, mean = unweighted mean over categories (n/a excluded). "
                 "AUPRO: MVTec reference algorithm, FPR limit 0.3.")
    return "\n".join(lines) + "\n"


def decisions_markdown(cal: dict) -> list[str]:
    """The calibration table of one dataset (x100): measured false-alarm rate on the test good
    images (95% interval) and detection rate at the conformal threshold, and the F1-optimal
    threshold's pair."""
    lines = [f"### Decisions at a target false-alarm rate of {cal['false_alarm_rate_target']:g} "
             "(calibrated on train/good images)", "",
             "| category | calibration images | threshold | false alarms (95% CI) | detection | "
             "F1-optimal: false alarms | F1-optimal: detection |", "|---" * 7 + "|"]
    for cls, r in cal["categories"].items():
        if "note" in r:
            lines.append(f"| {cls} | {r['n']} | - | {r['note']} | | | |")
            continue
        lo, hi = r["false_alarm_ci95"]
        lines.append(f"| {cls} | {r['n']} | {r['image_threshold']:.4g} | {_fmt(r['false_alarm_rate'])} "
                     f"({_fmt(lo)}-{_fmt(hi)}) | {_fmt(r['detection_rate'])} | "
                     f"{_fmt(r['f1_false_alarm_rate'])} | {_fmt(r['f1_detection_rate'])} |")
    m = cal["mean"]
    lo, hi = m["pooled_false_alarm_ci95"]
    pooled = _fmt(m["pooled_false_alarm_rate"])
    lines.append(f"| **mean** | | | {_fmt(m['false_alarm_rate'])} (pooled {pooled}, "
                 f"{_fmt(lo)}-{_fmt(hi)}, {m['num_good']} good) | {_fmt(m['detection_rate'])} | "
                 f"{_fmt(m['f1_false_alarm_rate'])} | {_fmt(m['f1_detection_rate'])} |")
    return [*lines, ""]


def run_from_config(config, workdir: str | os.PathLike, *, model: ad.ADDinoV3 | None = None,
                    results_name: str = "results", **options) -> dict:
    """`addinov3 eval`: the final model of `workdir` (or `model`) on `config.eval.datasets`, on
    the config's mesh (multi-host with `config.multihost`); few-shot when `config.eval.shots` > 0.
    `config` may be the `Runtime` of a config (`setup.setup(config)`)."""
    from addinov3_jax.runtime import setup

    rt = config if isinstance(config, setup.Runtime) else setup.setup(config)
    config, mesh, rules = rt.config, rt.mesh, rt.rules
    workdir = Path(workdir)
    if rt.is_main:
        workdir_lib.ensure_writable(workdir)
    if model is None:
        if not (workdir / "model" / model_dir.MODEL_FILE).is_file():
            raise FileNotFoundError(f"{workdir / 'model'}: no trained model; run `addinov3 train` "
                                    "with the same --workdir first")
        model = rt.load_model(workdir / "model")
    else:
        model = place_model(model, mesh, rules)
    datasets = []
    for name, entry in config.eval.datasets.items():
        if name == "synthetic":
            setup.check_synthetic_root(entry.root)
        datasets.append((name, entry.root, tuple(entry.classes)))
    opts = EvalOptions(image_size=config.data.image_size, batch_size=config.eval.batch_size,
                       resolution=config.eval.resolution,
                       class_name_source=config.model.class_name_source,
                       fixed_word=config.model.class_name,
                       heatmaps_per_category=config.eval.heatmaps_per_category,
                       curves=config.eval.curves, text_cache_dir=str(workdir / "text_cache"),
                       false_alarm_rate=config.eval.calibration.false_alarm_rate)
    return evaluate(model, datasets, workdir, opts=opts, config=json.loads(config.to_json_best_effort()),
                    results_name=results_name, mesh=mesh, rules=rules,
                    fewshot_config=config_lib.fewshot_config(config), **options)


def device_summary() -> str:
    return ", ".join(sorted({d.platform for d in jax.devices()})) + f" x{jax.device_count()}"
