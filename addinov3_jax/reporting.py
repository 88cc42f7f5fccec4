"""`report.html`: one self-contained page per run (eval, predict, the demo) that opens anywhere.

No network: the CSS is inline, the pictures are PNG files beside the page (relative links, URL
quoted), and every piece of text is HTML-escaped. Numbers in the metric tables are the values of
`results.json` to four decimals (`fmt`), so the page can be checked against the file.

Eval pages: per dataset the METRICS table, the decisions table (with a calibration: thresholds,
false-alarm / detection rates, confusion counts, the F1-optimal pair), the curves and per class
the misses (defective images with the lowest scores) and false alarms (good images with the
highest), each with its heatmap, ground-truth outline and, with a pixel threshold, its mask
(`plots.save_report_panels`). Predict pages: one row per image (score, verdict, normalized
score, regions) with its heatmap and mask.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from addinov3_jax.io import workdir as workdir_io

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px;
       color: #1d1d1f; background: #fff; max-width: 1400px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 21px; margin-top: 32px;
  border-bottom: 2px solid #ddd; } h3 { font-size: 17px; margin-top: 22px; }
table { border-collapse: collapse; margin: 10px 0 18px; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 9px; text-align: right; }
th { background: #f0f2f5; } td:first-child, th:first-child { text-align: left; }
tr.mean td { font-weight: bold; background: #fafafa; }
table.decisions { font-size: 13px; } table.decisions th { max-width: 110px; }
table { display: block; overflow-x: auto; max-width: 100%; }
.note { color: #555; font-size: 13px; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; border: 1px solid #ddd; padding: 6px; background: #fafafa; }
figure img { display: block; min-height: 256px; max-width: 100%; image-rendering: auto; }
figcaption { font-size: 13px; margin-top: 4px; }
.bad { color: #b00020; font-weight: bold; } .good { color: #1b7f3b; font-weight: bold; }
img.curves { max-width: 100%; min-height: 256px; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    """A table number: four decimals, `n/a` for null / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def href(path: str | os.PathLike, base: str | os.PathLike) -> str:
    """`path` relative to the page's folder `base`, URL-quoted (and attribute-escaped)."""
    return esc(quote(Path(os.path.relpath(path, base)).as_posix()))


def table(header: Sequence[str], rows: Iterable[Sequence], *, attrs: str = "",
          mean_rows: Iterable[Sequence] = ()) -> str:
    """An HTML table; cells are formatted with `fmt` and escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = [f"<tr>{''.join(f'<td>{esc(fmt(c))}</td>' for c in row)}</tr>" for row in rows]
    body += [f"<tr class=\"mean\">{''.join(f'<td>{esc(fmt(c))}</td>' for c in row)}</tr>"
             for row in mean_rows]
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure(path, base, caption: str, *, alt: str = "") -> str:
    return (f'<figure><img src="{href(path, base)}" alt="{esc(alt or caption)}" loading="lazy">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def page(title: str, sections: Iterable[str], subtitle: str = "") -> str:
    sub = f'<p class="note">{esc(subtitle)}</p>' if subtitle else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1>{sub}{''.join(sections)}</body></html>\n")


def write(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir_io.atomic_write_text(path, text)
    return path


# ---------------------------------------------------------------------------------------------
# Eval


def metrics_table(name: str, entry: Mapping) -> str:
    """The METRICS rows of one dataset (`data-dataset` names it), as in `results.json`."""
    keys = [k for k in entry["mean"] if k != "num_images"]
    rows = [(cls, *[row[k] for k in keys], row["num_images"])
            for cls, row in entry["categories"].items()]
    mean = entry["mean"]
    return table(["category", *keys, "images"], rows, attrs=f'class="metrics" data-dataset="{esc(name)}"',
                 mean_rows=[("mean", *[mean[k] for k in keys], mean["num_images"])])


DECISION_COLUMNS = (("n", "calibration images"), ("image_threshold", "image threshold"),
                    ("pixel_threshold", "pixel threshold"),
                    ("false_alarm_rate", "false-alarm rate"), ("detection_rate", "detection rate"),
                    ("pixel_false_alarm_rate", "good images with a mask"),
                    ("f1_threshold", "F1-optimal threshold"),
                    ("f1_false_alarm_rate", "F1-optimal: false-alarm rate"),
                    ("f1_detection_rate", "F1-optimal: detection rate"))


def decisions_table(name: str, cal: Mapping) -> str:
    keys = [k for k, _ in DECISION_COLUMNS]
    rows = []
    for cls, r in cal["categories"].items():
        if "note" in r:
            rows.append((cls, r["n"], *["n/a"] * (len(keys) + 1)))
            continue
        lo, hi = r["false_alarm_ci95"]
        c = r["confusion"]
        rows.append((cls, *[r[k] for k in keys], f"{fmt(lo)}-{fmt(hi)}",
                     f"{c['tp']} / {c['fp']} / {c['tn']} / {c['fn']}"))
    m = cal["mean"]
    lo, hi = m["pooled_false_alarm_ci95"]
    mean = ("mean", "", "", "", m["false_alarm_rate"], m["detection_rate"], m["pixel_false_alarm_rate"],
            "", m["f1_false_alarm_rate"], m["f1_detection_rate"],
            f"pooled {fmt(m['pooled_false_alarm_rate'])} ({fmt(lo)}-{fmt(hi)}, {m['num_good']} good)",
            "")
    notes = "".join(f'<p class="note">{esc(cls)}: {esc(r["note"])}</p>'
                    for cls, r in cal["categories"].items() if "note" in r)
    return (f"<h3>Decisions at a target false-alarm rate of {esc(cal['false_alarm_rate_target'])}</h3>"
            '<p class="note">Thresholds calibrated (split-conformal) on each class\'s train/good images; '
            "rates measured on the test images: false alarms among the good ones, detections among "
            "the defective ones; the F1-optimal threshold needs the labels and is shown for "
            "comparison.</p>"
            + table(["category", *[label for _, label in DECISION_COLUMNS], "false-alarm 95% CI",
                     "tp / fp / tn / fn"], rows,
                    attrs=f'class="decisions" data-dataset="{esc(name)}"', mean_rows=[mean]) + notes)


def examples_section(dataset: str, cls: str, examples: Mapping, base) -> str:
    parts = [f"<h3>{esc(dataset)} / {esc(cls)}: misses and false alarms</h3>"]
    for kind, title in (("misses", "defective images with the lowest scores"),
                        ("false_alarms", "good images with the highest scores")):
        items = examples.get(kind, [])
        if not items:
            continue
        figs = []
        for it in items:
            verdict = f", verdict {it['verdict']}" if "verdict" in it else ""
            figs.append(figure(it["file"], base, f"{Path(it['image']).name} ({it['defect']}), "
                                                 f"score {it['score']:.4g}{verdict}"))
            if "mask_file" in it:
                figs.append(figure(it["mask_file"], base, f"{Path(it['image']).name}: defect mask"))
        parts.append(f"<p>{esc(title)}</p><div class=\"gallery\">{''.join(figs)}</div>")
    return "".join(parts)


def eval_page(results: Mapping, out_dir, panels: Mapping, *, title: str = "addinov3 evaluation",
              intro: Sequence[str] = (), curves_dir=None, curves_title: str = "Curves") -> str:
    """The page of an evaluation written into `out_dir` (pictures linked relative to it);
    `intro`: HTML sections put first (the demo's comparison tables); `curves_dir`: where
    `curves/<dataset>/<class>.png` live (default `out_dir/curves`)."""
    out_dir = Path(out_dir)
    curves_dir = Path(curves_dir) if curves_dir else out_dir / "curves"
    shots = results.get("shots", 0)
    subtitle = (f"{shots}-shot, mean over seeds {results.get('seeds')}" if shots else "zero-shot")
    sections = list(intro)
    for name, entry in results["datasets"].items():
        sections.append(f"<h2>{esc(name)}</h2>")
        sections.append(metrics_table(name, entry))
        for cls, ns in entry.get("notes", {}).items():
            sections += [f'<p class="note">{esc(cls)}: {esc(n)}</p>' for n in ns]
        if "calibration" in entry:
            sections.append(decisions_table(name, entry["calibration"]))
        for cls in entry["categories"]:
            if (name, cls) in panels:
                sections.append(examples_section(name, cls, panels[(name, cls)], out_dir))
        curves = [c for c in (curves_dir / name / f"{cls}.png" for cls in entry["categories"])
                  if c.is_file()]
        if curves:
            sections.append(f"<h3>{esc(curves_title)}</h3>" + "".join(
                f'<img class="curves" src="{href(c, out_dir)}" alt="{esc(c.stem)} curves">'
                for c in curves))
    return page(title, sections, subtitle)


# ---------------------------------------------------------------------------------------------
# Predict


def predict_page(out_dir, index: Mapping) -> str:
    """The page of a `predict` run (its `scores.json` as `index`)."""
    out_dir = Path(out_dir)
    cal = index.get("calibration")
    header = ["image", "score", "max pixel", "width", "height"]
    if cal:
        header += ["verdict", "normalized score", "defect regions"]
    rows, figs = [], []
    for r in index["images"]:
        row = [r["name"], r["score"], r["max_pixel"], r["width"], r["height"]]
        if cal:
            row += [r.get("verdict"), r.get("normalized_score"), r.get("defect_regions", "")]
        rows.append(row)
        heat = out_dir / "heatmaps" / f"{r['name']}.png"
        if heat.is_file():
            verdict = f", {r['verdict']}" if "verdict" in r else ""
            figs.append(figure(heat, out_dir, f"{r['name']}: score {r['score']:.4g}{verdict}"))
        mask = out_dir / "masks" / f"{r['name']}.png"
        if mask.is_file():
            figs.append(figure(mask, out_dir, f"{r['name']}: defect mask"))
    sections = []
    if cal:
        sections.append(
            f"<p>Calibration <code>{esc(cal.get('file'))}</code>: image threshold "
            f"{esc(fmt(cal['image_threshold']))}, pixel threshold {esc(fmt(cal.get('pixel_threshold')))}, "
            f"target false-alarm rate {esc(cal['alpha'])} ({esc(cal['n'])} good images); "
            f"<span class=\"bad\">{esc(cal['defective'])} defective</span>. Normalized score: "
            f"<code>{esc(cal['normalized_score'])}</code> (threshold at 0.5).</p>")
    sections.append(table(header, rows, attrs='class="predictions"'))
    for s in index.get("skipped", []):
        sections.append(f'<p class="note">skipped {esc(s["image"])}: {esc(s["error"])}</p>')
    sections.append(f"<div class=\"gallery\">{''.join(figs)}</div>")
    return page(f"addinov3 predict: {index['class_name']}", sections,
                f"score mode {index['image_score']}; colour scale {index['scale']['mode']}")
