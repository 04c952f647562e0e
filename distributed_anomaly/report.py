"""A self-contained HTML evaluation report: what was flagged, what was missed, where the false alarms are.

`write_report` turns the test-split maps, masks, post-processor and metrics of a run into RUN_DIR/report.html:

- a header (model, backbone, image size, thresholds and where they came from);
- the metrics overall and per defect type, with detected/missed counts at the image threshold;
- ROC and precision-recall curves at image and pixel level, with the operating point at the threshold;
- the distribution of image scores of normal and anomalous test images, threshold drawn;
- galleries of missed defects, false alarms and the highest-scoring defects, each tile showing the image with
  its ground-truth outline, the heatmap, and the predicted mask and boxes.

Everything is inline — images are base64 PNG data URIs, the stylesheet is a <style> block, there is no
JavaScript — so the file opens anywhere, offline, and can be mailed or archived as one file. Galleries are
bounded (MAX_TILES tiles of THUMB_SIZE px panels, 256-colour PNGs) so the file stays small whatever the size
of the test split: about 300 KB for the demo washer, about 1 MB for a fine texture such as the demo tile.
Plots use matplotlib's Agg canvas directly (never pyplot's global state).

Without an image threshold (`--val-fraction 0` and no `--threshold`) images carry no labels: the galleries
rank by score only and the report says so. A test split with one class only gets its undefined curves
replaced by a sentence instead of an exception.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from distributed_anomaly import __version__
from distributed_anomaly import metrics as M
from distributed_anomaly.data.mvtec import GOOD, Record
from distributed_anomaly.errors import UserError
from distributed_anomaly.fileio import write_bytes
from distributed_anomaly.postprocess import PostProcessor, Prediction

REPORT = "report.html"
MAX_TILES = 12  # per gallery
THUMB_SIZE = 144  # px, longest side of each tile panel (<= 256)
MAX_CURVE_POINTS = 1500  # points drawn per curve (the curve itself is computed exactly)
MAX_CURVE_PIXELS = 4_000_000  # pixel curves are drawn from a seeded random subset beyond this many pixels

NORMAL_COLOR, ANOMALY_COLOR = "#3b6fd1", "#e03e3e"
IMAGE_CURVE_COLOR, PIXEL_CURVE_COLOR = "#3b6fd1", "#f08c00"
GT_RGB = (64, 230, 90)  # ground-truth outline
PRED_RGB = (235, 40, 40)  # predicted mask
BOX_RGB = (255, 212, 59)  # predicted boxes

THRESHOLD_SOURCES = {
    "user": "set by the user (--threshold)",
    "f1_optimal": "F1-optimal on calibration images with anomalies",
    "normal_3sigma": "mean + 3σ of the normal calibration images' scores",
    "none": "none: threshold-free metrics only",
}

METRIC_ROWS = (
    ("image_auroc", "Image AUROC", "how well image scores rank anomalous above normal images"),
    ("image_f1", "Image F1", "at the image threshold"),
    ("image_f1_max", "Image F1-max", "best image F1 over all thresholds"),
    ("pixel_auroc", "Pixel AUROC", "per-pixel ranking against the ground-truth masks"),
    ("pixel_f1", "Pixel F1", "predicted masks against ground truth"),
    ("pixel_f1_max", "Pixel F1-max", "best pixel F1 over all thresholds"),
    ("aupro", "AUPRO", "per-region overlap, normalised area up to FPR 0.3"),
    ("box_precision", "Box precision", "predicted boxes matching a ground-truth region at IoU ≥ 0.5"),
    ("box_recall", "Box recall", "ground-truth regions found by a box at IoU ≥ 0.5"),
    ("box_f1", "Box F1", ""),
)


# --------------------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------------------


def write_report(run_dir: str | os.PathLike, records: Sequence[Record], maps: np.ndarray,
                 masks: np.ndarray | None, post: PostProcessor, metrics: dict,
                 out_path: str | os.PathLike | None = None) -> Path:
    """Write the HTML report of a run's test split (default RUN_DIR/report.html) and return its path.

    `maps` are the raw (N, S, S) test maps in record order, `masks` the (N, S, S) bool ground truth at the
    same resolution (None: loaded from the records), `metrics` what `evaluation.compute_metrics` returned
    for them. The run's config.json, if present, fills the header.
    """
    run_dir = Path(run_dir)
    if not records:
        raise ValueError("no test images to report on")
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or len(maps) != len(records):
        raise ValueError(f"maps must be (N, S, S) with N = {len(records)} records, got shape {maps.shape}")
    if masks is None:
        from distributed_anomaly.data.loader import load_masks

        masks = load_masks(records, maps.shape[-1])
    masks = np.asarray(masks, dtype=bool)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    out = Path(out_path) if out_path is not None else run_dir / REPORT
    page = _render(run_dir, list(records), maps, masks, post, metrics)
    write_bytes(out, page.encode("utf-8"))
    return out


def report_for_run(run_dir: str | os.PathLike, data: str | os.PathLike | None = None, *, batch_size: int = 32,
                   progress: bool = False) -> Path:
    """Re-evaluate a saved run (as `evaluate --report` does: metrics.json is rewritten too) and write its report."""
    from distributed_anomaly.training import evaluate_run

    return Path(evaluate_run(run_dir, data, batch_size, progress, report=True)["report"])


# --------------------------------------------------------------------------------------------------------
# what the report shows, as plain data (tested without rendering)
# --------------------------------------------------------------------------------------------------------


def image_scores(maps: np.ndarray) -> np.ndarray:
    return maps.reshape(len(maps), -1).max(axis=1).astype(np.float64)


def per_defect_counts(records: Sequence[Record], scores: np.ndarray, threshold: float | None) -> dict:
    """{defect: {count, detected, missed}} for each defect type and {good: {count, false_alarms}};
    detected/missed/false_alarms are None without a threshold."""
    defects = np.array([r.defect for r in records])
    flagged = None if threshold is None else scores >= threshold
    table: dict = {}
    for d in sorted(set(defects.tolist()) - {GOOD}):
        sel = defects == d
        n_hit = None if flagged is None else int(flagged[sel].sum())
        table[d] = {"count": int(sel.sum()), "detected": n_hit,
                    "missed": None if n_hit is None else int(sel.sum()) - n_hit}
    good = defects == GOOD
    if good.any():
        table[GOOD] = {"count": int(good.sum()),
                       "false_alarms": None if flagged is None else int(flagged[good].sum())}
    return table


def gallery_indices(labels: np.ndarray, scores: np.ndarray, threshold: float | None,
                    limit: int = MAX_TILES) -> dict[str, tuple[list[int], int]]:
    """{gallery id: (indices shown, total qualifying)} for "missed", "false-alarms" and "top-defects".

    With a threshold: anomalous images below it (lowest score first), normal images at or above it
    (highest first), anomalous images by score (highest first). Without one, the first two become the
    lowest-scoring anomalous and highest-scoring normal images.
    """
    labels = np.asarray(labels, dtype=bool)
    idx = np.arange(len(scores))
    if threshold is None:
        missed, false = idx[labels], idx[~labels]
    else:
        missed, false = idx[labels & (scores < threshold)], idx[~labels & (scores >= threshold)]
    anomalous = idx[labels]

    def pick(sel: np.ndarray, descending: bool) -> tuple[list[int], int]:
        order = np.argsort(-scores[sel] if descending else scores[sel], kind="stable")
        return [int(i) for i in sel[order][:limit]], len(sel)

    return {"missed": pick(missed, False), "false-alarms": pick(false, True), "top-defects": pick(anomalous, True)}


# --------------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------------


def _png_uri(img: Image.Image) -> str:
    """PNG data URI of an RGB image reduced to a 256-colour palette (octree: no visible banding on
    photos or heatmaps, a quarter of the bytes)."""
    buf = io.BytesIO()
    img.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fig_img(fig, alt: str) -> str:
    """A matplotlib figure as an <img> tag (Agg canvas, no pyplot; no metadata naming a website)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None}, facecolor="white")
    img = Image.open(buf)
    return (f"<img class=\"plot\" src=\"{_png_uri(img)}\" alt=\"{_e(alt)}\" width=\"{img.size[0]}\" "
            f"height=\"{img.size[1]}\">")


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(img) > 127


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def tile_panels(record: Record, gt_mask: np.ndarray, pred: Prediction,
                size: int = THUMB_SIZE) -> list[tuple[str, Image.Image]]:
    """The panels of one gallery tile: image with ground-truth outline, heatmap, and (with a pixel
    threshold) the predicted mask and boxes over the image, ground truth outlined."""
    from distributed_anomaly.data.images import read_image
    from distributed_anomaly.predict import heatmap_rgb, resize_map

    image = Image.fromarray(read_image(record.path))
    scale = min(1.0, size / max(image.size))
    w, h = max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))
    thumb = np.asarray(image.resize((w, h), Image.LANCZOS) if (w, h) != image.size else image, dtype=np.uint8)
    gt_edge = _outline(_resize_mask(gt_mask, (h, w)))

    with_gt = thumb.copy()
    with_gt[gt_edge] = GT_RGB
    norm = np.clip(resize_map(np.ascontiguousarray(pred.anomaly_map, dtype=np.float32), (h, w)), 0.0, 1.0)
    heat = (0.45 * thumb + 0.55 * heatmap_rgb(norm)).astype(np.uint8)
    panels = [("image", Image.fromarray(with_gt)), ("heatmap", Image.fromarray(heat))]
    if pred.mask is not None:
        pm = _resize_mask(pred.mask, (h, w))
        gray = thumb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        shown = np.repeat((0.85 * gray)[..., None], 3, axis=2)  # grey base: the prediction stands out
        shown[pm] = 0.45 * shown[pm] + 0.55 * np.array(PRED_RGB, dtype=np.float32)
        shown = shown.astype(np.uint8)
        shown[_outline(pm, 1)] = PRED_RGB
        shown[gt_edge] = GT_RGB
        canvas = Image.fromarray(shown)
        draw = ImageDraw.Draw(canvas)
        sy, sx = h / pred.anomaly_map.shape[0], w / pred.anomaly_map.shape[1]
        for x1, y1, x2, y2, _ in pred.boxes:
            draw.rectangle([round(x1 * sx), round(y1 * sy), max(round(x2 * sx) - 1, round(x1 * sx)),
                            max(round(y2 * sy) - 1, round(y1 * sy))], outline=BOX_RGB, width=2)
        panels.append(("prediction", canvas))
    return panels


# --------------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float, ncols: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(True, color="#e9ecef", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.tick_params(labelsize=9, colors="#495057")
    return fig, axes


def _thin(*arrays: np.ndarray, n: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, ...]:
    if len(arrays[0]) <= n:
        return arrays
    idx = np.unique(np.linspace(0, len(arrays[0]) - 1, n).round().astype(np.int64))
    return tuple(a[idx] for a in arrays)


def _pixel_sample(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """All pixels, or a seeded random subset of MAX_CURVE_PIXELS for drawing (metrics stay exact)."""
    flat_maps, flat_masks = maps.ravel(), masks.ravel()
    if flat_maps.size <= MAX_CURVE_PIXELS:
        return flat_maps, flat_masks, False
    idx = np.random.default_rng(0).integers(0, flat_maps.size, MAX_CURVE_PIXELS)
    return flat_maps[idx], flat_masks[idx], True


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}"
    return str(v)


def _curves_figure(scores, labels, maps, masks, image_point, pixel_point, metrics) -> tuple[str | None, list[str]]:
    """ROC and PR curves at image and pixel level in one figure (an <img>); None when no curve is defined."""
    notes: list[str] = []
    curves = []
    if labels.any() and not labels.all():
        curves.append(("image", scores, labels, image_point, IMAGE_CURVE_COLOR,
                       f"image (AUROC {_fmt(metrics.get('image_auroc'))})"))
    else:
        notes.append("image-level curves need both normal and anomalous test images")
    if masks.any() and not masks.all():
        pix_s, pix_y, sampled = _pixel_sample(maps, masks)
        if pix_y.any() and not pix_y.all():
            curves.append(("pixel", pix_s, pix_y, pixel_point, PIXEL_CURVE_COLOR,
                           f"pixel (AUROC {_fmt(metrics.get('pixel_auroc'))})"))
            if sampled:
                notes.append(f"pixel curves drawn from a random {MAX_CURVE_PIXELS:,} of {maps.size:,} pixels "
                             "(metrics use every pixel)")
    else:
        notes.append("pixel-level curves need anomalous pixels in the test masks")
    if not curves:
        return None, notes
    fig, (roc_ax, pr_ax) = _figure(10.0, 4.0, 2)
    for level, s, y, point, color, label in curves:
        fpr, tpr, _ = M.roc_curve(s, y)
        fpr, tpr = _thin(fpr, tpr)
        roc_ax.plot(fpr, tpr, color=color, lw=2, label=label)
        precision, recall, _ = M.precision_recall_curve(s, y)
        precision, recall = _thin(precision, recall)
        pr_ax.plot(recall, precision, color=color, lw=2,
                   label=f"{level} (F1-max {_fmt(metrics.get(level + '_f1_max'))})")
        if point is not None:
            roc_ax.plot(point["fpr"], point["tpr"], "o", ms=8, mfc="white", mec=color, mew=2)
            pr_ax.plot(point["recall"], point["precision"], "o", ms=8, mfc="white", mec=color, mew=2)
    roc_ax.plot([0, 1], [0, 1], ":", color="#adb5bd", lw=1)
    roc_ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="false positive rate", ylabel="true positive rate")
    roc_ax.set_title("ROC", fontsize=11, loc="left", fontweight="bold")
    pr_ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="recall", ylabel="precision")
    pr_ax.set_title("Precision–recall", fontsize=11, loc="left", fontweight="bold")
    if image_point is not None or pixel_point is not None:
        roc_ax.plot([], [], "o", ms=7, mfc="white", mec="#495057", mew=2, label="at the threshold")
    roc_ax.legend(loc="lower right", fontsize=9, frameon=False)
    pr_ax.legend(loc="lower left", fontsize=9, frameon=False)
    return _fig_img(fig, "ROC and precision-recall curves"), notes


def _scores_figure(records, scores, labels, threshold) -> str:
    """Histogram of image scores, normal vs anomalous, and one row of points per defect type."""
    fig, (hist_ax, strip_ax) = _figure(10.0, 3.8, 2)
    lo, hi = float(scores.min()), float(scores.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    span = hi - lo or max(abs(hi), 1.0)
    bins = np.linspace(lo - 0.02 * span, hi + 0.02 * span, int(np.clip(len(scores) // 2, 10, 40)) + 1)
    for sel, color, name in ((~labels, NORMAL_COLOR, "normal"), (labels, ANOMALY_COLOR, "anomalous")):
        if sel.any():
            hist_ax.hist(scores[sel], bins=bins, color=color, alpha=0.55, label=f"{name} ({int(sel.sum())})",
                         edgecolor=color, linewidth=0.8)
    hist_ax.set(xlabel="image score (max of the anomaly map)", ylabel="test images")
    hist_ax.yaxis.get_major_locator().set_params(integer=True)
    hist_ax.set_title("Image scores", fontsize=11, loc="left", fontweight="bold")

    defects = sorted({r.defect for r in records} - {GOOD})
    rows = ([GOOD] if any(r.defect == GOOD for r in records) else []) + defects
    names = np.array([r.defect for r in records])
    jitter = np.random.default_rng(0).uniform(-0.18, 0.18, len(records))
    for y, d in enumerate(rows):
        sel = names == d
        color = NORMAL_COLOR if d == GOOD else ANOMALY_COLOR
        wrong = np.zeros(len(records), bool) if threshold is None else (
            (scores >= threshold) if d == GOOD else (scores < threshold))
        for mask, kw in ((sel & ~wrong, {"s": 28, "alpha": 0.8}),
                         (sel & wrong, {"s": 60, "alpha": 1.0, "edgecolors": "black", "linewidths": 1.2})):
            if mask.any():
                strip_ax.scatter(scores[mask], y + jitter[mask], color=color, zorder=3, **kw)
    strip_ax.set_yticks(range(len(rows)), rows)
    strip_ax.set_ylim(len(rows) - 0.5, -0.5)
    strip_ax.set(xlabel="image score")
    strip_ax.grid(False, axis="y")
    strip_ax.set_title("By defect type", fontsize=11, loc="left", fontweight="bold")
    if threshold is not None and ((scores >= threshold) != labels).any():
        strip_ax.scatter([], [], s=60, color="white", edgecolors="black", linewidths=1.2,
                         label="wrong side of the threshold")
        strip_ax.legend(fontsize=9, frameon=False, loc="best")
    for ax in (hist_ax, strip_ax):
        ax.set_xlim(bins[0], bins[-1])
        if threshold is not None:
            ax.axvline(threshold, color="#212529", ls="--", lw=1.5, zorder=4,
                       label=f"threshold {threshold:.3g}" if ax is hist_ax else None)
    hist_ax.legend(fontsize=9, frameon=False)
    return _fig_img(fig, "image score distribution")


# --------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------

CSS = """
:root { --fg:#212529; --muted:#6c757d; --line:#e3e6ea; --bg:#f4f5f7; --card:#fff;
        --ok:#2b8a3e; --bad:#c92a2a; --warn:#e8590c; --accent:#3b6fd1; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font:14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width:1200px; margin:0 auto; padding:24px 20px 40px; }
header h1 { margin:0 0 2px; font-size:24px; font-weight:650; letter-spacing:-0.01em; }
header .sub { color:var(--muted); margin:0 0 14px; }
.meta { display:grid; grid-template-columns:repeat(auto-fill, minmax(220px, 1fr)); gap:6px 18px; margin:0; }
.meta div { min-width:0; }
.meta dt { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.meta dd { margin:0; font-weight:550; overflow-wrap:anywhere; }
nav { margin:18px 0 6px; display:flex; flex-wrap:wrap; gap:6px; }
nav a { color:var(--accent); text-decoration:none; background:var(--card); border:1px solid var(--line);
        border-radius:999px; padding:2px 12px; font-size:13px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:18px 20px;
          margin:16px 0; }
section h2 { margin:0 0 4px; font-size:18px; }
section h2 small { color:var(--muted); font-weight:400; font-size:14px; }
section > p.lead { margin:0 0 14px; color:var(--muted); }
.cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(150px, 1fr)); gap:12px; }
.card { border:1px solid var(--line); border-radius:8px; padding:10px 14px; }
.card .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .value { font-size:26px; font-weight:650; font-variant-numeric:tabular-nums; }
.card .hint { color:var(--muted); font-size:12px; }
.card.good .value { color:var(--ok); } .card.bad .value { color:var(--bad); }
.tables { display:grid; grid-template-columns:minmax(0, 5fr) minmax(0, 6fr); gap:24px; }
@media (max-width: 900px) { .tables { grid-template-columns:1fr; } }
h3 { font-size:14px; margin:0 0 8px; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
th, td { padding:4px 8px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { font-size:12px; color:var(--muted); font-weight:600; text-transform:uppercase; letter-spacing:.03em; }
td.num, th.num { text-align:right; white-space:nowrap; }
td .desc { display:block; color:var(--muted); font-size:11.5px; line-height:1.3; }
tr.normal td { background:#f8f9fb; }
.bar { display:inline-block; width:70px; height:8px; background:#ffe3e3; border-radius:4px; overflow:hidden;
       vertical-align:middle; margin-left:6px; }
.bar span { display:block; height:100%; background:var(--ok); }
.notes { margin:12px 0 0; padding-left:18px; color:var(--muted); font-size:13px; }
.plot { width:100%; height:auto; display:block; }
.missing { color:var(--muted); font-style:italic; margin:8px 0; }
.legend { display:flex; flex-wrap:wrap; gap:6px 18px; align-items:center; color:var(--muted); font-size:13px;
          margin:0 0 12px; }
.swatch { display:inline-block; width:14px; height:10px; border-radius:2px; vertical-align:middle; margin-right:5px; }
.swatch.gt { background:none; border:2px solid rgb(64,230,90); }
.swatch.pred { background:rgba(235,40,40,.7); }
.swatch.box { background:none; border:2px solid rgb(255,212,59); }
.jet { display:inline-block; width:120px; height:10px; border-radius:2px; vertical-align:middle; margin:0 5px;
       background:linear-gradient(90deg,#00007f,#0000ff 12%,#00ffff 37%,#ffff00 63%,#ff0000 88%,#7f0000); }
.gallery { display:grid; grid-template-columns:repeat(auto-fill, minmax(360px, 1fr)); gap:14px; }
.tile { margin:0; border:1px solid var(--line); border-radius:8px; padding:8px; background:#fcfcfd; }
.panels { display:grid; grid-template-columns:repeat(var(--n, 3), 1fr); gap:4px; }
.panels div { margin:0; text-align:center; min-width:0; }
.panels img { width:100%; height:auto; display:block; border-radius:4px; background:#000; }
.panels span { font-size:11px; color:var(--muted); }
.tile figcaption { display:flex; flex-wrap:wrap; align-items:baseline; gap:4px 10px; margin-top:6px; }
.tile .name { font-weight:600; overflow-wrap:anywhere; flex:1 1 auto; min-width:0; }
.tile .score { font-variant-numeric:tabular-nums; color:var(--muted); font-size:13px; }
.badge { font-size:11px; font-weight:650; text-transform:uppercase; letter-spacing:.04em; border-radius:4px;
         padding:1px 6px; color:#fff; background:#868e96; }
.badge.missed, .badge.false-alarm { background:var(--bad); }
.badge.detected { background:var(--ok); } .badge.normal { background:var(--accent); }
footer { color:var(--muted); font-size:12px; text-align:center; margin-top:24px; }
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _dash(v) -> str:
    return "—" if v is None else _e(v)


def _display_name(r: Record, multi_category: bool) -> str:
    p = Path(r.path)
    name = f"{p.parent.name}/{p.name}"
    return f"{r.category}/{name}" if multi_category else name


def _show_path(p: str | os.PathLike) -> str:
    """Relative to the working directory when inside it (shorter, and what the user typed), else absolute."""
    p = Path(os.path.abspath(p))
    try:
        return str(p.relative_to(os.getcwd()))
    except ValueError:
        return str(p)


def _test_roots(records: Sequence[Record]) -> str:
    roots = sorted({_show_path(Path(r.path).parent.parent.parent) for r in records})
    return roots[0] if len(roots) == 1 else f"{len(roots)} categories"


def _header(run_dir: Path, records, metrics: dict, post: PostProcessor, image_size: int) -> str:
    cfg = None
    info: dict = {}
    try:
        from distributed_anomaly.rundir import load_config

        cfg, _, info = load_config(run_dir)
    except (UserError, OSError):  # maps without a saved run still get a report, with less in its header
        pass
    n_anom = sum(r.label for r in records)
    items = []
    if cfg is not None:
        model = cfg.model.upper() + (f" · {cfg.n_features} features" if cfg.model == "padim" and cfg.n_features
                                     else "")
        items += [("model", model), ("backbone", f"{cfg.backbone} ({', '.join(cfg.layers)})")]
    items.append(("image size", f"{cfg.image_size if cfg else image_size} px"))
    src = post.threshold_source
    items.append(("threshold source", THRESHOLD_SOURCES.get(src, src)))
    if post.image_threshold is not None:
        pix = "n/a" if post.pixel_threshold is None else f"{post.pixel_threshold:.4g}"
        items.append(("image / pixel threshold", f"{post.image_threshold:.4g} / {pix}"))
    if metrics.get("calibrated_on"):
        items.append(("calibrated on", metrics["calibrated_on"]))
    items.append(("test images", f"{len(records)} ({len(records) - n_anom} normal, {n_anom} anomalous)"))
    items.append(("test data", _test_roots(records)))
    if info.get("num_train_images") is not None:
        items.append(("trained on", f"{info['num_train_images']} normal images"
                      + (f", {info['num_val_images']} held out" if info.get("num_val_images") else "")))
    dl = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in items)
    title = f"{(cfg.model.upper() + ' on ') if cfg else ''}{', '.join(sorted({r.category for r in records}))}"
    return (f"<header><h1>Evaluation report: {_e(title)}</h1>"
            f"<p class=\"sub\">{_e(_show_path(run_dir))}</p><dl class=\"meta\">{dl}</dl></header>")


def _summary(metrics: dict, counts: dict, threshold: float | None) -> str:
    def card(label, value, hint="", cls=""):
        return (f"<div class=\"card {cls}\"><div class=\"label\">{_e(label)}</div>"
                f"<div class=\"value\">{_e(value)}</div><div class=\"hint\">{_e(hint)}</div></div>")

    cards = [card("Image AUROC", _fmt(metrics.get("image_auroc"))),
             card("Pixel AUROC", _fmt(metrics.get("pixel_auroc"))),
             card("AUPRO", _fmt(metrics.get("aupro")), "FPR ≤ 0.3")]
    n_def = sum(v["count"] for d, v in counts.items() if d != GOOD)
    n_good = counts.get(GOOD, {}).get("count", 0)
    if threshold is None:
        cards.append(card("Image F1-max", _fmt(metrics.get("image_f1_max")), "no threshold: best over all"))
    else:
        det = sum(v["detected"] for d, v in counts.items() if d != GOOD)
        fa = counts.get(GOOD, {}).get("false_alarms") or 0
        cards += [card("Image F1", _fmt(metrics.get("image_f1")), "at the threshold"),
                  card("Defects detected", f"{det} / {n_def}", f"{n_def - det} missed",
                       "good" if det == n_def else "bad") if n_def else
                  card("Defects detected", "—", "no anomalous test images"),
                  card("False alarms", f"{fa} / {n_good}", "normal images flagged", "bad" if fa else "good")
                  if n_good else card("False alarms", "—", "no normal test images")]
    return (f"<section id=\"summary\"><h2>Summary</h2><p class=\"lead\">Headline numbers on the test split."
            f"</p><div class=\"cards\">{''.join(cards)}</div></section>")


def _metrics_tables(metrics: dict, counts: dict, threshold: float | None) -> str:
    rows = "".join(f"<tr><td>{_e(name)}<span class=\"desc\">{_e(desc)}</span></td>"
                   f"<td class=\"num\">{_e(_fmt(metrics.get(key)))}</td></tr>" for key, name, desc in METRIC_ROWS)
    overall = f"<table class=\"overall\"><tr><th>metric</th><th class=\"num\">value</th></tr>{rows}</table>"
    per = metrics.get("per_defect") or {}
    body = []
    for d, c in counts.items():
        if d == GOOD:
            continue
        auc = (per.get(d) or {}).get("image_auroc")
        if c["detected"] is None:
            rate = "—"
        else:
            frac = c["detected"] / c["count"] if c["count"] else 0.0
            rate = f"{frac:.0%}<span class=\"bar\"><span style=\"width:{frac * 100:.0f}%\"></span></span>"
        body.append(f"<tr data-defect=\"{_e(d)}\"><td>{_e(d)}</td><td class=\"num\">{c['count']}</td>"
                    f"<td class=\"num\">{_e(_fmt(auc))}</td><td class=\"num\">{_dash(c['detected'])}</td>"
                    f"<td class=\"num\">{_dash(c['missed'])}</td><td class=\"num\">{rate}</td></tr>")
    if GOOD in counts:
        g = counts[GOOD]
        fa = "no threshold" if g["false_alarms"] is None else (
            f"{g['false_alarms']} false alarm{'s' if g['false_alarms'] != 1 else ''} · specificity "
            f"{1 - g['false_alarms'] / g['count']:.0%}")
        body.append(f"<tr class=\"normal\" data-defect=\"{GOOD}\"><td>good (normal)</td>"
                    f"<td class=\"num\">{g['count']}</td><td class=\"num\">—</td>"
                    f"<td colspan=\"3\" class=\"num\">{_e(fa)}</td></tr>")
    per_table = ("<table class=\"per-defect\"><tr><th>defect type</th><th class=\"num\">images</th>"
                 "<th class=\"num\">image AUROC</th><th class=\"num\">detected</th><th class=\"num\">missed</th>"
                 f"<th class=\"num\">recall</th></tr>{''.join(body)}</table>")
    lead = ("Per-defect AUROC compares each defect type against the normal test images; detected/missed count "
            "images at the image threshold." if threshold is not None else
            "Per-defect AUROC compares each defect type against the normal test images. No threshold, so no "
            "detected/missed counts.")
    notes = metrics.get("notes") or []
    notes_html = f"<ul class=\"notes\">{''.join(f'<li>{_e(n)}</li>' for n in notes)}</ul>" if notes else ""
    return (f"<section id=\"metrics\"><h2>Metrics</h2><p class=\"lead\">{_e(lead)}</p><div class=\"tables\">"
            f"<div><h3>Overall</h3>{overall}</div><div><h3>Per defect type</h3>{per_table}</div></div>"
            f"{notes_html}</section>")


def _operating_points(scores, labels, preds, masks, threshold) -> tuple[dict | None, dict | None]:
    def point(pred: np.ndarray, truth: np.ndarray) -> dict | None:
        tp = int((pred & truth).sum())
        fp = int((pred & ~truth).sum())
        p, n = int(truth.sum()), int((~truth).sum())
        if not p or not n:
            return None
        return {"fpr": fp / n, "tpr": tp / p, "recall": tp / p, "precision": tp / (tp + fp) if tp + fp else 1.0}

    if threshold is None:
        return None, None
    image = point(scores >= threshold, labels)
    pixel = None
    if preds and preds[0].mask is not None:
        pixel = point(np.stack([p.mask for p in preds]), masks)
    return image, pixel


def _gallery(gid: str, title: str, lead: str, shown: list[int], total: int, empty: str, tiles: dict,
             legend: str) -> str:
    if not shown:
        body = f"<p class=\"missing\">{_e(empty)}</p>"
    else:
        body = legend + f"<div class=\"gallery\">{''.join(tiles[i].replace('@GALLERY@', gid) for i in shown)}</div>"
    count = f"{total}" if len(shown) == total else f"showing {len(shown)} of {total}"
    return (f"<section id=\"{gid}\" class=\"gallery-section\" data-total=\"{total}\"><h2>{_e(title)} "
            f"<small>({_e(count)})</small></h2>"
            f"<p class=\"lead\">{_e(lead)}</p>{body}</section>")


def _tile(i: int, r: Record, gt: np.ndarray, pred: Prediction, name: str) -> str:
    panels = tile_panels(r, gt, pred)
    imgs = "".join(f"<div><img src=\"{_png_uri(img)}\" alt=\"{_e(label)}: {_e(name)}\" width=\"{img.size[0]}\" "
                   f"height=\"{img.size[1]}\"><span>{_e(label)}</span></div>" for label, img in panels)
    if pred.label is None:
        badge = ("anomalous", "") if r.label else ("normal", "normal")
    elif r.label:
        badge = ("detected", "detected") if pred.label else ("missed", "missed")
    else:
        badge = ("false alarm", "false-alarm") if pred.label else ("normal", "normal")
    truth = f"defect: {r.defect}" if r.label else "normal"
    return (f"<figure class=\"tile\" data-gallery=\"@GALLERY@\" data-index=\"{i}\">"
            f"<div class=\"panels\" style=\"--n:{len(panels)}\">{imgs}</div>"
            f"<figcaption><span class=\"name\" title=\"{_e(r.path)}\">{_e(name)}</span>"
            f"<span class=\"badge {badge[1]}\">{_e(badge[0])}</span>"
            f"<span class=\"score\">score {pred.score:.2f} · raw {pred.raw_score:.4g} · {_e(truth)}</span>"
            f"</figcaption></figure>")


def _render(run_dir: Path, records: list[Record], maps: np.ndarray, masks: np.ndarray, post: PostProcessor,
            metrics: dict) -> str:
    scores = image_scores(maps)
    labels = np.array([r.label for r in records], dtype=bool)
    threshold = post.image_threshold
    preds = post.predict_batch(maps)
    counts = per_defect_counts(records, scores, threshold)
    galleries = gallery_indices(labels, scores, threshold, MAX_TILES)
    multi = len({r.category for r in records}) > 1
    tiles = {i: _tile(i, records[i], masks[i], preds[i], _display_name(records[i], multi))
             for i in sorted({i for shown, _ in galleries.values() for i in shown})}

    image_point, pixel_point = _operating_points(scores, labels, preds, masks, threshold)
    curves, curve_notes = _curves_figure(scores, labels, maps, masks, image_point, pixel_point, metrics)
    curves = curves or ""
    curves += "".join(f"<p class=\"missing\">{_e(n)}.</p>" for n in curve_notes)
    point_note = (" Circles mark the operating point at the threshold (pixel: the predicted masks)."
                  if threshold is not None else "")
    scores_img = _scores_figure(records, scores, labels, threshold)

    no_t = ("No threshold (--val-fraction 0 and no --threshold): images carry no labels, so these galleries "
            "rank by score only. ")
    no_anomalous, no_normal = "No anomalous images in the test split.", "No normal images in the test split."
    if threshold is None:
        gal_specs = [
            ("missed", "Lowest-scoring defects",
             no_t + "Anomalous images with the lowest scores: the first to be missed at any threshold.",
             no_anomalous),
            ("false-alarms", "Highest-scoring normal images",
             no_t + "Normal images with the highest scores: the first false alarms at any threshold.", no_normal),
            ("top-defects", "Highest-scoring defects", no_t + "Anomalous images, highest score first.",
             no_anomalous)]
    else:
        gal_specs = [
            ("missed", "Missed defects", "Anomalous images scored below the image threshold, lowest score first.",
             "None: every anomalous test image reached the threshold." if labels.any() else no_anomalous),
            ("false-alarms", "False alarms", "Normal images at or above the image threshold, highest score first.",
             "None: no normal test image reached the threshold." if (~labels).any() else no_normal),
            ("top-defects", "Highest-scoring defects",
             "Anomalous images, highest score first: what the model finds most clearly.", no_anomalous)]
    legend_items = ["<span><span class=\"swatch gt\"></span>ground truth</span>"]
    if post.pixel_threshold is not None:
        legend_items += ["<span><span class=\"swatch pred\"></span>predicted mask</span>",
                         "<span><span class=\"swatch box\"></span>predicted boxes</span>",
                         "<span>heatmap 0<span class=\"jet\"></span>1 (0.5 = pixel threshold)</span>"]
    else:
        legend_items.append("<span>heatmap 0<span class=\"jet\"></span>1 (min–max of the calibration maps)</span>")
    if threshold is not None:
        legend_items.append("<span>score: normalised, 0.5 = image threshold; raw: max of the map</span>")
    legend = f"<div class=\"legend\">{''.join(legend_items)}</div>"
    gallery_html = "".join(_gallery(gid, title, lead, *galleries[gid], empty, tiles, legend)
                           for gid, title, lead, empty in gal_specs)
    nav = "".join(f"<a href=\"#{gid}\">{_e(name)}</a>" for gid, name in (
        ("summary", "Summary"), ("metrics", "Metrics"), ("curves", "Curves"), ("scores", "Scores"),
        *((gid, title) for gid, title, _, _ in gal_specs)))
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Evaluation report: {_e(run_dir.name)}</title>
<style>{CSS}</style></head>
<body><main>
{_header(run_dir, records, metrics, post, maps.shape[-1])}
<nav>{nav}</nav>
{_summary(metrics, counts, threshold)}
{_metrics_tables(metrics, counts, threshold)}
<section id="curves"><h2>ROC and precision–recall curves</h2><p class="lead">Image level (image score = max of
the map) and pixel level (every pixel against the ground-truth masks).{_e(point_note)}</p>{curves}</section>
<section id="scores"><h2>Score distribution</h2><p class="lead">Image scores of normal and anomalous test images{
    ", with the image threshold dashed" if threshold is not None else "; no threshold to draw"}.</p>
{scores_img}</section>
{gallery_html}
<footer>distributed_anomaly {_e(__version__)} · generated {_e(generated)} · self-contained file, no network needed
</footer>
</main></body></html>
"""
