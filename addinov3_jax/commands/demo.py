"""`addinov3 demo`: the embedded default, end to end, with no downloads.

1. Generates the synthetic anomaly dataset (MVTec layout) into `WORKDIR/data/synthetic`.
2. Builds the tiny random-init DINOv3 and CLIP text tower (or loads converted real weights given
   with `--dinov3` / `--clip-text`).
3. Trains the adapters on the auxiliary synthetic categories on 8 simulated devices.
4. Evaluates zero-shot on the held-out categories, the trained model next to the untrained one
   (same towers, adapters at their initial values), and writes `results.json`,
   `results_untrained.json`, `results.md`, heatmaps and curves.
5. Evaluates the trained model few-shot on the same categories, with 1 and 4 reference images
   from each class's train/good split per seed (seeds `FEWSHOT_SEEDS`), and writes
   `results_1shot.json` / `results_4shot.json` (same schema; heatmaps of the first seed under
   `fewshot_{k}shot/`); `results.md` puts zero-shot, 1-shot and 4-shot side by side.
6. Decisions: the 4-shot model is calibrated per held-out class at a false-alarm rate of
   `FALSE_ALARM_RATE` on its train/good images that are not references (split-conformal), and the
   false-alarm rate measured on the test good images and the detection rate on the defective ones
   are printed beside the AUROC table; `report.html` shows every table, the curves, and per
   class the misses and false alarms with their heatmaps and masks.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

FEWSHOT_SHOTS = (1, 4)
FEWSHOT_SEEDS = (0, 1, 2)
FALSE_ALARM_RATE = 0.05
# A 5% false-alarm rate needs >= 19 calibration images per class beyond the 4 references
# (train/good) and is measured meaningfully only on >= 100 test good images (25 per held-out
# class); the auxiliary (training) categories keep the defaults, so training time is unchanged.
HELD_OUT_TRAIN_NORMAL = 24
HELD_OUT_TEST_NORMAL = 25
SIDE_BY_SIDE = (("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "pixel AUPRO"),
                ("image_auroc", "image AUROC"))


def run(workdir: str = "demo_out", seed: int = 0, *, dinov3: str | None = None,
        clip_text: str | None = None, quick: bool = False, image_size: int | None = None,
        shots: tuple[int, ...] = FEWSHOT_SHOTS) -> int:
    """The demo in `workdir`; `shots`: the few-shot evaluations (() = zero-shot only)."""
    from flax import nnx

    from addinov3_jax import config as config_lib
    from addinov3_jax.data import synthetic
    from addinov3_jax.io.workdir import strict_json
    from addinov3_jax.models import model as ad
    from addinov3_jax.runtime import evaluator as evaluate
    from addinov3_jax.runtime import setup
    from addinov3_jax.runtime import trainer as train

    t0 = time.perf_counter()
    workdir = Path(workdir)
    cfg = config_lib.demo_config("quick" if quick else "")
    cfg.seed = seed
    root = workdir / "data" / "synthetic"
    cfg.data.root = str(root)
    cfg.eval.datasets.synthetic.root = str(root)
    if dinov3:
        cfg.model.backbone = dinov3
        from addinov3_jax.runtime import setup

        depth = setup.backbone_config(cfg.model).depth  # metadata only, no weights read
        cfg.model.feature_layers = tuple(depth * (i + 1) // 4 - 1 for i in range(4))
    if clip_text:  # real text features: class names mean something again
        cfg.model.text_tower = clip_text
        cfg.model.class_name_source = "readable"
        cfg.model.class_name = ""
    if image_size:
        cfg.data.image_size = image_size
    if not root.exists():
        print(f"demo: generating the synthetic dataset in {root}")
    held_out = tuple(cfg.eval.datasets.synthetic.classes)
    synthetic.ensure(root, seed=seed, normal=dict.fromkeys(held_out, HELD_OUT_TEST_NORMAL),
                     train_normal=dict.fromkeys(held_out, HELD_OUT_TRAIN_NORMAL))

    print(f"demo: training on {', '.join(cfg.data.classes)} "
          f"({evaluate.device_summary()}, backbone {cfg.model.backbone}, text {cfg.model.text_tower})")
    rt = setup.setup(cfg)  # validated once; training and the zero-shot evaluations run on it
    summary = train.train(rt, workdir / "train")

    trained = rt.load_model(workdir / "train" / "model")
    untrained = ad.ADDinoV3(trained.backbone, trained.text_tower, trained.config,
                            rngs=nnx.Rngs(seed + 2))  # the adapters training started from

    print(f"demo: evaluating zero-shot on the held-out {', '.join(cfg.eval.datasets.synthetic.classes)}")
    untrained_curves: dict = {}
    r_un = evaluate.run_from_config(rt, workdir / "untrained", model=untrained,
                                    curves_out=untrained_curves)
    shutil.copy(workdir / "untrained" / "results.json", workdir / "results_untrained.json")
    r_tr = evaluate.run_from_config(
        rt, workdir, model=trained, curves_name="trained",
        curves_compare={k: {"untrained": v} for k, v in untrained_curves.items()})
    fewshot_results, t_fs = {}, time.perf_counter()
    panels: dict = {}
    for k in shots:
        print(f"demo: evaluating {k}-shot (train/good references, seeds {FEWSHOT_SEEDS})")
        fs_cfg = cfg.copy_and_resolve_references()
        fs_cfg.eval.shots, fs_cfg.eval.shot_seeds = k, FEWSHOT_SEEDS
        fs_cfg.eval.curves = False
        fs_cfg.eval.heatmaps_per_category = 2
        if k == max(shots):  # decisions with the best model
            fs_cfg.eval.calibration.false_alarm_rate = FALSE_ALARM_RATE
        fewshot_results[k] = evaluate.run_from_config(fs_cfg, workdir / f"fewshot_{k}shot",
                                                      model=trained,
                                                      panels_out=panels if k == max(shots) else None)
        shutil.copy(workdir / f"fewshot_{k}shot" / "results.json", workdir / f"results_{k}shot.json")
    t_fs = time.perf_counter() - t_fs
    table = evaluate.markdown(r_tr, r_un, titles=("trained", "untrained"))
    side = fewshot_table(r_tr, fewshot_results) + "\n" if fewshot_results else ""
    (workdir / "results.md").write_text(
        "# addinov3 demo\n\n" + side + "Zero-shot on held-out synthetic categories; each cell is "
        "`trained / untrained` (x100).\n\n" + table)
    mean_tr = r_tr["datasets"]["synthetic"]["mean"]["pixel_auroc"]
    mean_un = r_un["datasets"]["synthetic"]["mean"]["pixel_auroc"]
    decisions = (fewshot_results[max(shots)]["datasets"]["synthetic"].get("calibration")
                 if fewshot_results else None)
    print(table)
    print(side, end="")
    if decisions:
        print(decisions_line(decisions, max(shots)))
    _write_page(workdir, r_tr, r_un, fewshot_results, panels)
    report = {"train": summary, "seconds": round(time.perf_counter() - t0, 1),
              "fewshot_seconds": round(t_fs, 1),
              "held_out_pixel_auroc": {"trained": mean_tr, "untrained": mean_un},
              "fewshot": {f"{k}_shot": {
                  "seeds": list(FEWSHOT_SEEDS),
                  "mean": {key: r["datasets"]["synthetic"]["mean"][key] for key, _ in SIDE_BY_SIDE},
                  "std": {key: r["datasets"]["synthetic"]["mean_std"][key] for key, _ in SIDE_BY_SIDE},
              } for k, r in fewshot_results.items()}}
    if decisions:
        report["decisions"] = {"shots": max(shots), "false_alarm_rate_target": FALSE_ALARM_RATE,
                               **{k: decisions["mean"][k] for k in (
                                   "false_alarm_rate", "pooled_false_alarm_rate",
                                   "pooled_false_alarm_ci95", "num_good", "detection_rate",
                                   "f1_false_alarm_rate", "f1_detection_rate")}}
    (workdir / "demo_report.json").write_text(strict_json(report, indent=2) + "\n")
    print(f"demo: held-out mean pixel AUROC {_pct(mean_tr)} trained vs {_pct(mean_un)} untrained; "
          f"{summary['steps']} training steps; {report['seconds']} s in total")
    if fewshot_results:
        fs_line = ", ".join(f"{_pct(r['datasets']['synthetic']['mean']['pixel_auroc'])} {k}-shot"
                            for k, r in fewshot_results.items())
        print(f"demo: held-out mean pixel AUROC with the trained model: {_pct(mean_tr)} zero-shot, "
              f"{fs_line} (mean over seeds {list(FEWSHOT_SEEDS)}; {report['fewshot_seconds']} s)")
    print(f"demo: wrote {workdir}/results.json, results_untrained.json, "
          + "".join(f"results_{k}shot.json, " for k in fewshot_results)
          + "results.md, report.html, heatmaps/, curves/")
    if cfg.model.backbone == "tiny":
        print("demo: note: the towers are random-init tiny models (no downloads); pass converted "
              "weights with --dinov3 DIR --clip-text DIR for real numbers.")
    return 0


def decisions_line(cal: dict, shots: int) -> str:
    """One line: the measured false-alarm rate (pooled over the held-out test good images, 95%
    interval) and the detection rate at the calibrated threshold, and the F1-optimal pair."""
    m = cal["mean"]
    lo, hi = m["pooled_false_alarm_ci95"]
    return (f"demo: decisions ({shots}-shot, calibrated at a false-alarm rate of "
            f"{cal['false_alarm_rate_target']:g} on train/good images): measured false alarms "
            f"{_pct(m['pooled_false_alarm_rate'])}% of {m['num_good']} test good images (95% CI "
            f"{_pct(lo)}-{_pct(hi)}), detections {_pct(m['detection_rate'])}% of the defective "
            f"ones; at the F1-optimal threshold (uses the labels): false alarms "
            f"{_pct(m['f1_false_alarm_rate'])}%, detections {_pct(m['f1_detection_rate'])}%")


def _write_page(workdir: Path, trained: dict, untrained: dict, fewshot_results: dict,
                panels: dict, dataset: str = "synthetic") -> None:
    """`report.html`: trained vs untrained, zero / k shots, then the best few-shot run's page
    (tables, decisions, misses and false alarms) with the zero-shot curves."""
    from addinov3_jax import reporting
    from addinov3_jax.runtime.evaluator import METRIC_KEYS

    tr, un = trained["datasets"][dataset], untrained["datasets"][dataset]
    rows = [(cls, *[f"{reporting.fmt(row[k])} / {reporting.fmt(un['categories'][cls][k])}"
                    for k in METRIC_KEYS]) for cls, row in tr["categories"].items()]
    mean = [("mean", *[f"{reporting.fmt(tr['mean'][k])} / {reporting.fmt(un['mean'][k])}"
                       for k in METRIC_KEYS])]
    intro = ["<h2>Zero-shot on the held-out categories: trained / untrained</h2>",
             reporting.table(["category", *METRIC_KEYS], rows, mean_rows=mean,
                             attrs='class="trained-untrained"')]
    if fewshot_results:
        cols = ["zero-shot"] + [f"{k}-shot" for k in fewshot_results]
        shot_rows = [(title, tr["mean"][key], *[r["datasets"][dataset]["mean"][key]
                                                 for r in fewshot_results.values()])
                     for key, title in SIDE_BY_SIDE]
        intro += ["<h2>Trained model: zero-shot and few-shot (mean over categories and seeds)</h2>",
                  reporting.table(["metric", *cols], shot_rows, attrs='class="shots"')]
    best = fewshot_results[max(fewshot_results)] if fewshot_results else trained
    title = f"addinov3 demo ({best.get('shots', 0)}-shot model below)" if fewshot_results else "addinov3 demo"
    reporting.write(workdir / "report.html", reporting.eval_page(
        best, workdir, panels, title=title, intro=intro, curves_dir=workdir / "curves",
        curves_title="Curves (zero-shot, trained vs untrained)"))


def fewshot_table(zero: dict, shots: dict[int, dict], dataset: str = "synthetic") -> str:
    """Markdown: held-out means of the trained model, zero-shot / k-shot side by side (x100;
    k-shot: mean ± std over seeds)."""
    cols = ["zero-shot"] + [f"{k}-shot" for k in shots]
    lines = ["Trained model on the held-out synthetic categories, mean over categories (x100); "
             f"few-shot: mean ± std over seeds {list(FEWSHOT_SEEDS)}, references from train/good.",
             "", "| metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, title in SIDE_BY_SIDE:
        cells = [_pct(zero["datasets"][dataset]["mean"][key])]
        for r in shots.values():
            e = r["datasets"][dataset]
            cells.append(f"{_pct(e['mean'][key])} ± {_pct(e['mean_std'][key])}")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.1f}"
