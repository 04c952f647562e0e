"""The evaluation report's HTML sections: header, summary cards, metric tables, galleries and their tiles."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from distributed_anomaly.data.images import read_image
from distributed_anomaly.data.mvtec import GOOD, Record
from distributed_anomaly.data.sizes import ImageSize, size_text
from distributed_anomaly.errors import UserError
from distributed_anomaly.htmlpage import card, dash, esc, fmt, png_uri
from distributed_anomaly.postprocess import PostProcessor, Prediction
from distributed_anomaly.rundir import load_config
from distributed_anomaly.runner import resize_map
from distributed_anomaly.visualize import heatmap_rgb, outline, resize_mask

THUMB_SIZE = 144  # px, longest side of each tile panel (<= 256)
GT_RGB = (64, 230, 90)  # ground-truth outline
PRED_RGB = (235, 40, 40)  # predicted mask
BOX_RGB = (255, 212, 59)  # predicted boxes
THRESHOLD_SOURCES = {
    "user": "set by the user (--threshold)",
    "target_fpr": "at the target false-alarm rate on the normal calibration images (--target-fpr)",
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


def tile_panels(
    record: Record, gt_mask: np.ndarray, pred: Prediction, size: int = THUMB_SIZE
) -> list[tuple[str, Image.Image]]:
    """The panels of one gallery tile: image with ground-truth outline, heatmap, and (with a pixel
    threshold) the predicted mask and boxes over the image, ground truth outlined."""
    image = Image.fromarray(read_image(record.path))
    scale = min(1.0, size / max(image.size))
    w, h = max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))
    thumb = np.asarray(image.resize((w, h), Image.LANCZOS) if (w, h) != image.size else image, dtype=np.uint8)
    gt_edge = outline(resize_mask(gt_mask, (h, w)))

    with_gt = thumb.copy()
    with_gt[gt_edge] = GT_RGB
    norm = np.clip(resize_map(np.ascontiguousarray(pred.anomaly_map, dtype=np.float32), (h, w)), 0.0, 1.0)
    heat = (0.45 * thumb + 0.55 * heatmap_rgb(norm)).astype(np.uint8)
    panels = [("image", Image.fromarray(with_gt)), ("heatmap", Image.fromarray(heat))]
    if pred.mask is not None:
        pm = resize_mask(pred.mask, (h, w))
        gray = thumb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        shown = np.repeat((0.85 * gray)[..., None], 3, axis=2)  # grey base: the prediction stands out
        shown[pm] = 0.45 * shown[pm] + 0.55 * np.array(PRED_RGB, dtype=np.float32)
        shown = shown.astype(np.uint8)
        shown[outline(pm, 1)] = PRED_RGB
        shown[gt_edge] = GT_RGB
        canvas = Image.fromarray(shown)
        draw = ImageDraw.Draw(canvas)
        sy, sx = h / pred.anomaly_map.shape[0], w / pred.anomaly_map.shape[1]
        for x1, y1, x2, y2, _ in pred.boxes:
            draw.rectangle(
                [
                    round(x1 * sx),
                    round(y1 * sy),
                    max(round(x2 * sx) - 1, round(x1 * sx)),
                    max(round(y2 * sy) - 1, round(y1 * sy)),
                ],
                outline=BOX_RGB,
                width=2,
            )
        panels.append(("prediction", canvas))
    return panels


# --------------------------------------------------------------------------------------------------------
# plots


def display_name(r: Record, multi_category: bool) -> str:
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
    """The folder holding the test images (whatever the layout's depth), or how many categories they span."""
    categories = {r.category for r in records}
    if len(categories) > 1:
        return f"{len(categories)} categories"
    return _show_path(Path(os.path.commonpath([str(Path(r.path).parent) for r in records])))


def header(run_dir: Path, records, metrics: dict, post: PostProcessor, image_size: ImageSize) -> str:
    cfg = None
    info: dict = {}
    try:
        cfg, _, info = load_config(run_dir)
    except (UserError, OSError):  # maps without a saved run still get a report, with less in its header
        pass
    n_anom = sum(r.label for r in records)
    items = []
    if cfg is not None:
        model = cfg.model.upper() + (f" · {cfg.n_features} features" if cfg.model == "padim" and cfg.n_features else "")
        items += [("model", model), ("backbone", f"{cfg.backbone} ({', '.join(cfg.layers)})")]
    items.append(("image size", f"{size_text(cfg.image_size if cfg else image_size)} px"))
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
        items.append(
            (
                "trained on",
                f"{info['num_train_images']} normal images"
                + (f", {info['num_val_images']} held out" if info.get("num_val_images") else ""),
            )
        )
    dl = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in items)
    title = f"{(cfg.model.upper() + ' on ') if cfg else ''}{', '.join(sorted({r.category for r in records}))}"
    return (
        f"<header><h1>Evaluation report: {esc(title)}</h1>"
        f'<p class="sub">{esc(_show_path(run_dir))}</p><dl class="meta">{dl}</dl></header>'
    )


def summary(metrics: dict, counts: dict, threshold: float | None) -> str:
    cards = [
        card("Image AUROC", fmt(metrics.get("image_auroc"))),
        card("Pixel AUROC", fmt(metrics.get("pixel_auroc"))),
        card("AUPRO", fmt(metrics.get("aupro")), "FPR ≤ 0.3"),
    ]
    n_def = sum(v["count"] for d, v in counts.items() if d != GOOD)
    n_good = counts.get(GOOD, {}).get("count", 0)
    if threshold is None:
        cards.append(card("Image F1-max", fmt(metrics.get("image_f1_max")), "no threshold: best over all"))
    else:
        det = sum(v["detected"] for d, v in counts.items() if d != GOOD)
        fa = counts.get(GOOD, {}).get("false_alarms") or 0
        cards += [
            card("Image F1", fmt(metrics.get("image_f1")), "at the threshold"),
            card("Defects detected", f"{det} / {n_def}", f"{n_def - det} missed", "good" if det == n_def else "bad")
            if n_def
            else card("Defects detected", "—", "no anomalous test images"),
            card("False alarms", f"{fa} / {n_good}", "normal images flagged", "bad" if fa else "good")
            if n_good
            else card("False alarms", "—", "no normal test images"),
        ]
    return (
        f'<section id="summary"><h2>Summary</h2><p class="lead">Headline numbers on the test split.'
        f'</p><div class="cards">{"".join(cards)}</div></section>'
    )


def metrics_tables(metrics: dict, counts: dict, threshold: float | None) -> str:
    rows = "".join(
        f'<tr><td>{esc(name)}<span class="desc">{esc(desc)}</span></td>'
        f'<td class="num">{esc(fmt(metrics.get(key)))}</td></tr>'
        for key, name, desc in METRIC_ROWS
    )
    overall = f'<table class="overall"><tr><th>metric</th><th class="num">value</th></tr>{rows}</table>'
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
            rate = f'{frac:.0%}<span class="bar"><span style="width:{frac * 100:.0f}%"></span></span>'
        body.append(
            f'<tr data-defect="{esc(d)}"><td>{esc(d)}</td><td class="num">{c["count"]}</td>'
            f'<td class="num">{esc(fmt(auc))}</td><td class="num">{dash(c["detected"])}</td>'
            f'<td class="num">{dash(c["missed"])}</td><td class="num">{rate}</td></tr>'
        )
    if GOOD in counts:
        g = counts[GOOD]
        fa = (
            "no threshold"
            if g["false_alarms"] is None
            else (
                f"{g['false_alarms']} false alarm{'s' if g['false_alarms'] != 1 else ''} · specificity "
                f"{1 - g['false_alarms'] / g['count']:.0%}"
            )
        )
        body.append(
            f'<tr class="normal" data-defect="{GOOD}"><td>good (normal)</td>'
            f'<td class="num">{g["count"]}</td><td class="num">—</td>'
            f'<td colspan="3" class="num">{esc(fa)}</td></tr>'
        )
    per_table = (
        '<table class="per-defect"><tr><th>defect type</th><th class="num">images</th>'
        '<th class="num">image AUROC</th><th class="num">detected</th><th class="num">missed</th>'
        f'<th class="num">recall</th></tr>{"".join(body)}</table>'
    )
    lead = (
        "Per-defect AUROC compares each defect type against the normal test images; detected/missed count "
        "images at the image threshold."
        if threshold is not None
        else "Per-defect AUROC compares each defect type against the normal test images. No threshold, so no "
        "detected/missed counts."
    )
    notes = metrics.get("notes") or []
    notes_html = f'<ul class="notes">{"".join(f"<li>{esc(n)}</li>" for n in notes)}</ul>' if notes else ""
    return (
        f'<section id="metrics"><h2>Metrics</h2><p class="lead">{esc(lead)}</p><div class="tables">'
        f"<div><h3>Overall</h3>{overall}</div><div><h3>Per defect type</h3>{per_table}</div></div>"
        f"{notes_html}</section>"
    )


def gallery(gid: str, title: str, lead: str, shown: list[int], total: int, empty: str, tiles: dict, legend: str) -> str:
    if not shown:
        body = f'<p class="missing">{esc(empty)}</p>'
    else:
        body = legend + f'<div class="gallery">{"".join(tiles[i].replace("@GALLERY@", gid) for i in shown)}</div>'
    count = f"{total}" if len(shown) == total else f"showing {len(shown)} of {total}"
    return (
        f'<section id="{gid}" class="gallery-section" data-total="{total}"><h2>{esc(title)} '
        f"<small>({esc(count)})</small></h2>"
        f'<p class="lead">{esc(lead)}</p>{body}</section>'
    )


def tile(i: int, r: Record, gt: np.ndarray, pred: Prediction, name: str) -> str:
    panels = tile_panels(r, gt, pred)
    imgs = "".join(
        f'<div><img src="{png_uri(img)}" alt="{esc(label)}: {esc(name)}" width="{img.size[0]}" '
        f'height="{img.size[1]}"><span>{esc(label)}</span></div>'
        for label, img in panels
    )
    if pred.label is None:
        badge = ("anomalous", "") if r.label else ("normal", "normal")
    elif r.label:
        badge = ("detected", "detected") if pred.label else ("missed", "missed")
    else:
        badge = ("false alarm", "false-alarm") if pred.label else ("normal", "normal")
    truth = f"defect: {r.defect}" if r.label else "normal"
    return (
        f'<figure class="tile" data-gallery="@GALLERY@" data-index="{i}">'
        f'<div class="panels" style="--n:{len(panels)}">{imgs}</div>'
        f'<figcaption><span class="name" title="{esc(r.path)}">{esc(name)}</span>'
        f'<span class="badge {badge[1]}">{esc(badge[0])}</span>'
        f'<span class="score">score {pred.score:.2f} · raw {pred.raw_score:.4g} · {esc(truth)}</span>'
        f"</figcaption></figure>"
    )


def gallery_specs(labels: np.ndarray, threshold: float | None) -> list[tuple[str, str, str, str]]:
    """(id, title, lead, text when empty) of the three galleries; without a threshold they rank by score only."""
    no_t = (
        "No threshold (--val-fraction 0 and no --threshold): images carry no labels, so these galleries "
        "rank by score only. "
    )
    no_anomalous, no_normal = "No anomalous images in the test split.", "No normal images in the test split."
    if threshold is None:
        return [
            (
                "missed",
                "Lowest-scoring defects",
                no_t + "Anomalous images with the lowest scores: the first to be missed at any threshold.",
                no_anomalous,
            ),
            (
                "false-alarms",
                "Highest-scoring normal images",
                no_t + "Normal images with the highest scores: the first false alarms at any threshold.",
                no_normal,
            ),
            ("top-defects", "Highest-scoring defects", no_t + "Anomalous images, highest score first.", no_anomalous),
        ]
    return [
        (
            "missed",
            "Missed defects",
            "Anomalous images scored below the image threshold, lowest score first.",
            "None: every anomalous test image reached the threshold." if labels.any() else no_anomalous,
        ),
        (
            "false-alarms",
            "False alarms",
            "Normal images at or above the image threshold, highest score first.",
            "None: no normal test image reached the threshold." if (~labels).any() else no_normal,
        ),
        (
            "top-defects",
            "Highest-scoring defects",
            "Anomalous images, highest score first: what the model finds most clearly.",
            no_anomalous,
        ),
    ]


def gallery_legend(post: PostProcessor) -> str:
    """What the colours of the gallery tiles mean, for this run's thresholds."""
    items = ['<span><span class="swatch gt"></span>ground truth</span>']
    if post.pixel_threshold is not None:
        items += [
            '<span><span class="swatch pred"></span>predicted mask</span>',
            '<span><span class="swatch box"></span>predicted boxes</span>',
            '<span>heatmap 0<span class="jet"></span>1 (0.5 = pixel threshold)</span>',
        ]
    else:
        items.append('<span>heatmap 0<span class="jet"></span>1 (min–max of the calibration maps)</span>')
    if post.image_threshold is not None:
        items.append("<span>score: normalised, 0.5 = image threshold; raw: max of the map</span>")
    return f'<div class="legend">{"".join(items)}</div>'
