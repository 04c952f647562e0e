"""compare_anomalib's results: one row per tool and run, the side-by-side and parity tables, the memory scaling."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

# Parity limits the project is judged on (ours minus anomalib may not be below these).
PARITY = {
    "padim": {"image": -0.01, "pixel": -0.01},
    "stfpm": {"image": -0.05, "pixel": -0.03},
    "patchcore": {"image": -0.01, "pixel": -0.01},
}


@dataclass
class Row:
    category: str
    model: str
    backbone: str
    tool: str
    seed: int
    n_train: int
    image_auroc: float
    pixel_auroc: float
    fit_s: float
    fit_cpu_s: float
    fit_img_s: float
    infer_img_s: float
    infer_cpu_ms_per_img: float
    peak_mem_mb: float
    extra: dict = field(default_factory=dict)


def to_row(category: str, model: str, backbone: str, seed: int, r: dict, auc: tuple[float, float]) -> Row:
    n, epochs = r["num_train_images"], r.get("epochs", 1) or 1
    return Row(
        category,
        model,
        backbone,
        "ours" if r["tool"] == "ours" else "anomalib",
        seed,
        n,
        auc[0],
        auc[1],
        r["fit_seconds"],
        r["fit_cpu_seconds"],
        n * epochs / r["fit_seconds"],
        r["num_test_images"] / r["infer_seconds"],
        1000 * r["infer_cpu_seconds"] / r["num_test_images"],
        r["peak_mem_mb"],
        {k: r[k] for k in ("optimizer", "epochs", "tool", "peak_mem_kind", "bank_size", "coreset") if k in r},
    )


# --------------------------------------------------------------------------- report


def fmt_table(rows: list[Row]) -> str:
    """Throughput per CPU-second is the robust speed figure on a shared machine; wall figures are kept too."""
    head = (
        "| category | model | backbone | tool | seed | train imgs | image AUROC | pixel AUROC | fit wall s "
        "| fit CPU s | fit img/CPU-s | fit img/s wall | infer img/CPU-s | infer img/s wall | peak mem MB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        epochs = r.extra.get("epochs", 1) or 1
        lines.append(
            f"| {r.category} | {r.model} | {r.backbone} | {r.tool} | {r.seed} | {r.n_train} | "
            f"{r.image_auroc:.4f} | {r.pixel_auroc:.4f} | {r.fit_s:.1f} | {r.fit_cpu_s:.1f} | "
            f"{r.n_train * epochs / r.fit_cpu_s:.1f} | {r.fit_img_s:.2f} | "
            f"{1000 / r.infer_cpu_ms_per_img:.1f} | {r.infer_img_s:.2f} | {r.peak_mem_mb:.0f} |"
        )
    return "\n".join(lines)


def parity(rows: list[Row]) -> tuple[str, bool]:
    groups: dict[tuple, dict[str, list[Row]]] = {}
    for r in rows:
        groups.setdefault((r.category, r.model, r.backbone, r.n_train), {}).setdefault(r.tool, []).append(r)
    lines = [
        "| category | model | backbone | seeds | image AUROC ours / anomalib (Δ) | pixel AUROC ours / anomalib (Δ) "
        "| limit Δ image / pixel | map corr. | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ok_all = True
    for (cat, model, bb, _), tools in groups.items():
        if "ours" not in tools or "anomalib" not in tools:
            continue
        o, t = tools["ours"], tools["anomalib"]
        oi, op = np.mean([r.image_auroc for r in o]), np.mean([r.pixel_auroc for r in o])
        ti, tp = np.mean([r.image_auroc for r in t]), np.mean([r.pixel_auroc for r in t])
        lim = PARITY[model]
        ok = bool((oi - ti) >= lim["image"] - 1e-12 and (op - tp) >= lim["pixel"] - 1e-12)
        ok_all &= ok
        lines.append(
            f"| {cat} | {model} | {bb} | {len(o)} | {oi:.4f} / {ti:.4f} ({oi - ti:+.4f}) | "
            f"{op:.4f} / {tp:.4f} ({op - tp:+.4f}) | {lim['image']:+.2f} / {lim['pixel']:+.2f} | "
            f"{np.mean([r.extra.get('map_corr', np.nan) for r in t]):.4f} | {'PASS' if ok else 'FAIL'} |"
        )
    return "\n".join(lines), ok_all


def bank(r: Row) -> str:
    return str(r.extra.get("bank_size", "–"))


def speed(rows: list[Row]) -> str:
    """anomalib's figures over ours for each pair of one run (measured minutes apart, under the same load)."""
    # Each run_pair gives ours then anomalib: pair them in order (the same category and size may appear twice,
    # e.g. the demo data and the scaling runs).
    pending: dict[tuple, Row] = {}
    pairs: list[tuple[Row, Row]] = []
    for r in rows:
        key = (r.category, r.model, r.backbone, r.seed, r.n_train)
        if r.tool == "ours":
            pending[key] = r
        elif key in pending:
            pairs.append((pending.pop(key), r))
    lines = [
        "| category | model | train imgs | bank ours / anomalib | fit wall s ours / anomalib (×) "
        "| fit CPU s ours / anomalib (×) | fit img/s ours / anomalib | infer img/s ours / anomalib (×) "
        "| peak mem MB ours / anomalib |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o, m in pairs:
        lines.append(
            f"| {o.category} | {o.model} | {o.n_train} | {bank(o)} / {bank(m)} "
            f"| {o.fit_s:.1f} / {m.fit_s:.1f} ({m.fit_s / o.fit_s:.2f}×) "
            f"| {o.fit_cpu_s:.1f} / {m.fit_cpu_s:.1f} ({m.fit_cpu_s / o.fit_cpu_s:.2f}×) | {o.fit_img_s:.2f} / "
            f"{m.fit_img_s:.2f} | {o.infer_img_s:.2f} / {m.infer_img_s:.2f} ({o.infer_img_s / m.infer_img_s:.2f}×) "
            f"| {o.peak_mem_mb:.0f} / {m.peak_mem_mb:.0f} |"
        )
    return "\n".join(lines)


def scaling_table(rows: list[Row]) -> str:
    lines = [
        "| tool | train images | bank | image AUROC | pixel AUROC | fit wall s | fit CPU s | peak mem MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r.tool != "ours", r.n_train)):
        lines.append(
            f"| {r.tool} | {r.n_train} | {bank(r)} | {r.image_auroc:.4f} | {r.pixel_auroc:.4f} | {r.fit_s:.1f} | "
            f"{r.fit_cpu_s:.1f} | {r.peak_mem_mb:.0f} |"
        )
    return "\n".join(lines)


def report(results: list[dict]) -> bool:
    """Print the table(s) of one or more runs (several --json files from runs split across processes merge)."""
    rows = [Row(**r) for res in results for r in res["rows"]]
    scale_rows = [Row(**r) for res in results for r in res.get("scaling", [])]
    checks = [c for res in results for c in res.get("feature_checks", [])]
    args = results[0]["args"]
    ptab, ok = parity(rows + scale_rows)
    print(
        f"\n## Side by side with anomalib {args['anomalib_version']} (image size {args['image_size']}, STFPM "
        f"{args['epochs']} epochs, batch {args['batch_size']}, threads {args['threads']} (0 = torch default))\n"
    )
    for m in dict.fromkeys(res["machine"] for res in results):
        print(f"machine: {m}  ")
    print()
    print(fmt_table(rows))
    print("\n### Parity (ours − anomalib; a pair run with several seeds: their means)\n")
    print(ptab)
    print("\n### Fit speed and memory, ours / anomalib (× = anomalib's time over ours, ours' rate over anomalib's)\n")
    print(speed(rows + scale_rows))
    for model in dict.fromkeys(r.model for r in scale_rows):
        print(f"\n### {model} memory vs training-set size (mobilenet_v2, tile)\n")
        print(scaling_table([r for r in scale_rows if r.model == model]))
    if checks:
        print("\n### Same inputs and features (one test image, max |ours − anomalib|)\n")
        for c in checks:
            print(
                f"- {c['backbone']}: "
                + ", ".join(
                    f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items() if k != "backbone"
                )
            )
    opts = {r.tool: r.extra.get("optimizer") for r in rows if r.model == "stfpm"}
    if opts:
        print(f"\nSTFPM optimizer (each tool's default): {json.dumps(opts)}")
    return ok
