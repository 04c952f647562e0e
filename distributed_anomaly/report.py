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

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from distributed_anomaly import __version__
from distributed_anomaly.data.loader import load_masks
from distributed_anomaly.data.mvtec import GOOD, Record
from distributed_anomaly.fileio import write_bytes
from distributed_anomaly.htmlpage import CSS, esc
from distributed_anomaly.postprocess import PostProcessor
from distributed_anomaly.report_plots import curves_figure, operating_points, scores_figure
from distributed_anomaly.report_sections import (
    THRESHOLD_SOURCES,
    display_name,
    gallery,
    gallery_legend,
    gallery_specs,
    header,
    metrics_tables,
    summary,
    tile,
)

REPORT = "report.html"
MAX_TILES = 12  # per gallery
__all__ = [
    "MAX_TILES",
    "REPORT",
    "THRESHOLD_SOURCES",
    "gallery_indices",
    "image_scores",
    "per_defect_counts",
    "write_report",
]


def write_report(
    run_dir: str | os.PathLike,
    records: Sequence[Record],
    maps: np.ndarray,
    masks: np.ndarray | None,
    post: PostProcessor,
    metrics: dict,
    out_path: str | os.PathLike | None = None,
) -> Path:
    """Write the HTML report of a run's test split (default RUN_DIR/report.html) and return its path.

    `maps` are the raw (N, H, W) test maps in record order, `masks` the (N, H, W) bool ground truth at the
    same resolution (None: loaded from the records), `metrics` what `evaluation.compute_metrics` returned
    for them. The run's config.json, if present, fills the header.
    """
    run_dir = Path(run_dir)
    if not records:
        raise ValueError("no test images to report on")
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or len(maps) != len(records):
        raise ValueError(f"maps must be (N, H, W) with N = {len(records)} records, got shape {maps.shape}")
    if masks is None:
        masks = load_masks(records, tuple(maps.shape[1:]))
    masks = np.asarray(masks, dtype=bool)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    out = Path(out_path) if out_path is not None else run_dir / REPORT
    page = _render(run_dir, list(records), maps, masks, post, metrics)
    write_bytes(out, page.encode("utf-8"))
    return out


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
        table[d] = {
            "count": int(sel.sum()),
            "detected": n_hit,
            "missed": None if n_hit is None else int(sel.sum()) - n_hit,
        }
    good = defects == GOOD
    if good.any():
        table[GOOD] = {"count": int(good.sum()), "false_alarms": None if flagged is None else int(flagged[good].sum())}
    return table


def gallery_indices(
    labels: np.ndarray, scores: np.ndarray, threshold: float | None, limit: int = MAX_TILES
) -> dict[str, tuple[list[int], int]]:
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


# The page template in one piece (its sections come from report_sections and report_plots).
def _render(
    run_dir: Path, records: list[Record], maps: np.ndarray, masks: np.ndarray, post: PostProcessor, metrics: dict
) -> str:
    scores = image_scores(maps)
    labels = np.array([r.label for r in records], dtype=bool)
    threshold = post.image_threshold
    preds = post.predict_batch(maps)
    counts = per_defect_counts(records, scores, threshold)
    galleries = gallery_indices(labels, scores, threshold, MAX_TILES)
    multi = len({r.category for r in records}) > 1
    tiles = {
        i: tile(i, records[i], masks[i], preds[i], display_name(records[i], multi))
        for i in sorted({i for shown, _ in galleries.values() for i in shown})
    }

    image_point, pixel_point = operating_points(scores, labels, preds, masks, threshold)
    curves, curve_notes = curves_figure(scores, labels, maps, masks, image_point, pixel_point, metrics)
    curves = curves or ""
    curves += "".join(f'<p class="missing">{esc(n)}.</p>' for n in curve_notes)
    point_note = (
        " Circles mark the operating point at the threshold (pixel: the predicted masks)."
        if threshold is not None
        else ""
    )
    scores_img = scores_figure(records, scores, labels, threshold)

    gal_specs = gallery_specs(labels, threshold)
    legend = gallery_legend(post)
    gallery_html = "".join(
        gallery(gid, title, lead, *galleries[gid], empty, tiles, legend) for gid, title, lead, empty in gal_specs
    )
    nav = "".join(
        f'<a href="#{gid}">{esc(name)}</a>'
        for gid, name in (
            ("summary", "Summary"),
            ("metrics", "Metrics"),
            ("curves", "Curves"),
            ("scores", "Scores"),
            *((gid, title) for gid, title, _, _ in gal_specs),
        )
    )
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Evaluation report: {esc(run_dir.name)}</title>
<style>{CSS}</style></head>
<body><main>
{header(run_dir, records, metrics, post, tuple(maps.shape[1:]))}
<nav>{nav}</nav>
{summary(metrics, counts, threshold)}
{metrics_tables(metrics, counts, threshold)}
<section id="curves"><h2>ROC and precision–recall curves</h2><p class="lead">Image level (image score = max of
the map) and pixel level (every pixel against the ground-truth masks).{esc(point_note)}</p>{curves}</section>
<section id="scores"><h2>Score distribution</h2><p class="lead">Image scores of normal and anomalous test images{
        ", with the image threshold dashed" if threshold is not None else "; no threshold to draw"
    }.</p>
{scores_img}</section>
{gallery_html}
<footer>distributed_anomaly {esc(__version__)} · generated {esc(generated)} · self-contained file, no network needed
</footer>
</main></body></html>
"""
