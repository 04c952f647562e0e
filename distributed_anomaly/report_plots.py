"""The evaluation report's figures: ROC / precision-recall curves and the image-score distribution."""

from __future__ import annotations

import numpy as np

from distributed_anomaly import metrics as metrics_lib
from distributed_anomaly.data.mvtec import GOOD
from distributed_anomaly.htmlpage import fig_img, figure, fmt

MAX_CURVE_POINTS = 1500  # points drawn per curve (the curve itself is computed exactly)
MAX_CURVE_PIXELS = 4_000_000  # pixel curves are drawn from a seeded random subset beyond this many pixels
NORMAL_COLOR, ANOMALY_COLOR = "#3b6fd1", "#e03e3e"
IMAGE_CURVE_COLOR, PIXEL_CURVE_COLOR = "#3b6fd1", "#f08c00"


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


def operating_points(scores, labels, preds, masks, threshold) -> tuple[dict | None, dict | None]:
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


# One figure's drawing calls in order, top to bottom: splitting them would scatter one picture's code.
def curves_figure(scores, labels, maps, masks, image_point, pixel_point, metrics) -> tuple[str | None, list[str]]:
    """ROC and PR curves at image and pixel level in one figure (an <img>); None when no curve is defined."""
    notes: list[str] = []
    curves = []
    if labels.any() and not labels.all():
        curves.append(
            (
                "image",
                scores,
                labels,
                image_point,
                IMAGE_CURVE_COLOR,
                f"image (AUROC {fmt(metrics.get('image_auroc'))})",
            )
        )
    else:
        notes.append("image-level curves need both normal and anomalous test images")
    if masks.any() and not masks.all():
        pix_s, pix_y, sampled = _pixel_sample(maps, masks)
        if pix_y.any() and not pix_y.all():
            curves.append(
                (
                    "pixel",
                    pix_s,
                    pix_y,
                    pixel_point,
                    PIXEL_CURVE_COLOR,
                    f"pixel (AUROC {fmt(metrics.get('pixel_auroc'))})",
                )
            )
            if sampled:
                notes.append(
                    f"pixel curves drawn from a random {MAX_CURVE_PIXELS:,} of {maps.size:,} pixels "
                    "(metrics use every pixel)"
                )
    else:
        notes.append("pixel-level curves need anomalous pixels in the test masks")
    if not curves:
        return None, notes
    fig, (roc_ax, pr_ax) = figure(10.0, 4.0, 2)
    for level, s, y, point, color, label in curves:
        fpr, tpr, _ = metrics_lib.roc_curve(s, y)
        fpr, tpr = _thin(fpr, tpr)
        roc_ax.plot(fpr, tpr, color=color, lw=2, label=label)
        precision, recall, _ = metrics_lib.precision_recall_curve(s, y)
        precision, recall = _thin(precision, recall)
        pr_ax.plot(
            recall, precision, color=color, lw=2, label=f"{level} (F1-max {fmt(metrics.get(level + '_f1_max'))})"
        )
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
    return fig_img(fig, "ROC and precision-recall curves"), notes


# One figure's drawing calls in order, top to bottom: splitting them would scatter one picture's code.
def scores_figure(records, scores, labels, threshold) -> str:
    """Histogram of image scores, normal vs anomalous, and one row of points per defect type."""
    fig, (hist_ax, strip_ax) = figure(10.0, 3.8, 2)
    lo, hi = float(scores.min()), float(scores.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    span = hi - lo or max(abs(hi), 1.0)
    bins = np.linspace(lo - 0.02 * span, hi + 0.02 * span, int(np.clip(len(scores) // 2, 10, 40)) + 1)
    for sel, color, name in ((~labels, NORMAL_COLOR, "normal"), (labels, ANOMALY_COLOR, "anomalous")):
        if sel.any():
            hist_ax.hist(
                scores[sel],
                bins=bins,
                color=color,
                alpha=0.55,
                label=f"{name} ({int(sel.sum())})",
                edgecolor=color,
                linewidth=0.8,
            )
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
        wrong = (
            np.zeros(len(records), bool)
            if threshold is None
            else ((scores >= threshold) if d == GOOD else (scores < threshold))
        )
        for mask, kw in (
            (sel & ~wrong, {"s": 28, "alpha": 0.8}),
            (sel & wrong, {"s": 60, "alpha": 1.0, "edgecolors": "black", "linewidths": 1.2}),
        ):
            if mask.any():
                strip_ax.scatter(scores[mask], y + jitter[mask], color=color, zorder=3, **kw)
    strip_ax.set_yticks(range(len(rows)), rows)
    strip_ax.set_ylim(len(rows) - 0.5, -0.5)
    strip_ax.set(xlabel="image score")
    strip_ax.grid(False, axis="y")
    strip_ax.set_title("By defect type", fontsize=11, loc="left", fontweight="bold")
    if threshold is not None and ((scores >= threshold) != labels).any():
        strip_ax.scatter(
            [], [], s=60, color="white", edgecolors="black", linewidths=1.2, label="wrong side of the threshold"
        )
        strip_ax.legend(fontsize=9, frameon=False, loc="best")
    for ax in (hist_ax, strip_ax):
        ax.set_xlim(bins[0], bins[-1])
        if threshold is not None:
            ax.axvline(
                threshold,
                color="#212529",
                ls="--",
                lw=1.5,
                zorder=4,
                label=f"threshold {threshold:.3g}" if ax is hist_ax else None,
            )
    hist_ax.legend(fontsize=9, frameon=False)
    return fig_img(fig, "image score distribution")


# --------------------------------------------------------------------------------------------------------
# HTML
