"""The results table of a search: one row per trial, sorted by objective; CSV, console table, failure summary.

Pure (rows are plain dicts), so the table, the summary and the report can be tested without Ray.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from distributed_anomaly.fileio import write_bytes

STATUSES = ("completed", "pruned", "failed", "interrupted")
PARAM_COLUMNS = (
    "model",
    "backbone",
    "layers",
    "n_features",
    "coreset_ratio",
    "image_size",
    "lr",
    "batch_size",
    "epochs",
)
METRIC_COLUMNS = ("val_auroc", "synthetic_auroc", "val_pixel_auroc", "synthetic_pixel_auroc")
COST_COLUMN = "inference_gflops"  # the secondary objective: models.cost.inference_gflops of the trial's model
# Objectives equal to this many decimals tie (the table shows 4): the cheaper model ranks first.
TIE_DECIMALS = 4


def display_columns(objective: str) -> list[str]:
    """Table order for people: the objective, the other image-level objective, the parameters, then the rest."""
    other = [c for c in ("val_auroc", "synthetic_auroc") if c != objective]
    return [
        "rank",
        "trial",
        "status",
        "objective",
        *other,
        COST_COLUMN,
        *PARAM_COLUMNS,
        "val_pixel_auroc",
        "synthetic_pixel_auroc",
        "epochs_run",
        "seconds",
    ]


COLUMNS = (
    "rank",
    "trial",
    "optuna_trial",
    "status",
    "objective",
    *METRIC_COLUMNS,
    COST_COLUMN,
    *PARAM_COLUMNS,
    "epochs_run",
    "seconds",
    "error",
)


def sort_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Completed trials by objective (best first), then pruned ones by their last value, then the rest; ranked.
    Objectives that tie (equal to TIE_DECIMALS) go by inference cost, cheapest first (unknown cost last)."""
    order = {s: i for i, s in enumerate(STATUSES)}

    def key(r: Mapping[str, Any]) -> tuple:
        obj, cost = r.get("objective"), r.get(COST_COLUMN)
        return (
            order.get(r.get("status"), len(order)),
            obj is None,
            -round(obj or 0.0, TIE_DECIMALS),
            cost is None,
            cost or 0.0,
            r.get("optuna_trial") or 0,
            str(r.get("trial")),
        )

    out = [dict(r) for r in sorted(rows, key=key)]
    for i, r in enumerate(out, 1):
        r["rank"] = i
    return out


def short_error(error: Any, limit: int = 160) -> str:
    """'Type: first line of the message' of a trial's exception, unwrapping Ray's task-error wrapper."""
    if error is None:
        return ""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip()
    # RayTaskError text starts with the remote traceback; the user's message is the last line.
    lines = [l for l in text.splitlines() if l.strip()]
    if type(cause).__name__.startswith("RayTaskError") and lines:
        text = lines[-1]
    first = text.splitlines()[0] if text else ""
    out = f"{type(cause).__name__}: {first}" if not first.startswith(type(cause).__name__) else first
    return out if len(out) <= limit else out[: limit - 1] + "…"


def counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    c = Counter(r["status"] for r in rows)
    return {s: c.get(s, 0) for s in STATUSES}


def failure_reasons(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, int]]:
    """Distinct errors of the failed trials with how many trials each stopped, most frequent first."""
    c = Counter(r.get("error") or "unknown error" for r in rows if r["status"] == "failed")
    return c.most_common()


def summary_line(rows: Sequence[Mapping[str, Any]]) -> str:
    n = counts(rows)
    parts = [f"{n['completed']} completed", f"{n['pruned']} pruned by ASHA", f"{n['failed']} failed"]
    if n["interrupted"]:
        parts.append(f"{n['interrupted']} interrupted")
    text = f"{len(rows)} trials: " + ", ".join(parts)
    reasons = failure_reasons(rows)
    if reasons:
        text += "\nfailed: " + "; ".join(f"{k} x {why}" for why, k in reasons)
    return text


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 0.01 or abs(v) >= 1000 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    return write_bytes(path, buf.getvalue().encode())


def format_table(rows: Sequence[Mapping[str, Any]], objective: str, max_error: int = 60) -> str:
    """The console table: only the columns some trial has a value in."""
    cols = [*display_columns(objective), "error"]
    cols = [c for c in cols if c in ("rank", "trial", "status") or any(r.get(c) not in (None, "") for r in rows)]
    header = [objective if c == "objective" else c for c in cols]
    body = []
    for r in rows:
        cells = [_fmt(r.get(c)) for c in cols]
        if "error" in cols:
            e = cells[cols.index("error")]
            cells[cols.index("error")] = e if len(e) <= max_error else e[: max_error - 1] + "…"
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)
