"""TUNE_DIR/report.html: a search at a glance, self-contained like the evaluation report (inline PNGs and
stylesheet, no script, nothing fetched).

- summary: trials completed / pruned / failed and why, the best trial with its held-out metrics and a link to
  its evaluation report (best/report.html, written beside it);
- the trials table, best first;
- the objective over time (every trial's value when it ended, best so far as a step line);
- parallel coordinates: every trial as a line through its parameter values to its objective;
- parameter importance (Optuna's PED-ANOVA) once enough trials completed;
- the search space as searched (after --fix).

Plots are drawn with matplotlib on the Agg canvas (htmlpage.fig_img), never pyplot's global state.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from distributed_anomaly import __version__
from distributed_anomaly.fileio import write_bytes
from distributed_anomaly.htmlpage import CSS, card, esc, fig_img, figure
from distributed_anomaly.tuning import results as R

REPORT = "report.html"
BEST_REPORT = "best/report.html"
SECTIONS = ("summary", "trials", "progress", "parameters", "importance", "space")
MODEL_COLORS = {"padim": "#3b6fd1", "stfpm": "#e8590c", "patchcore": "#2f9e44"}
STATUS_COLORS = {"completed": "#2b8a3e", "pruned": "#868e96", "failed": "#c92a2a", "interrupted": "#e8590c"}

EXTRA_CSS = """
.scroll { overflow-x:auto; }
table.trials td, table.trials th { white-space:nowrap; font-size:12.5px; }
table.trials td.err { white-space:normal; min-width:220px; color:var(--bad); font-size:12px; }
tr.best td { background:#ebfbee; }
.status { font-size:11px; font-weight:650; text-transform:uppercase; letter-spacing:.04em; border-radius:4px;
          padding:1px 6px; color:#fff; }
ul.space { margin:0; padding-left:18px; } ul.space code { font-weight:600; }
a.button { display:inline-block; margin-top:10px; padding:6px 14px; border-radius:6px; background:var(--accent);
           color:#fff; text-decoration:none; font-weight:600; }
"""


def _num(v: Any, digits: int = 4) -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return esc(v)


def _objective_figure(rows: Sequence[Mapping[str, Any]], objective: str) -> str | None:
    """Each trial's objective when it ended (minutes since the search started); best so far as a step line."""
    done = [r for r in rows if r.get("objective") is not None and r.get("finished_at") is not None]
    if not done:
        return None
    t0 = min(r["finished_at"] - (r.get("seconds") or 0) for r in done)
    fig, (ax,) = figure(11.5, 3.6, 1)
    for status, filled in (("completed", True), ("pruned", False), ("interrupted", False)):
        for model, color in MODEL_COLORS.items():
            pts = [r for r in done if r["status"] == status and r.get("model") == model]
            if pts:
                ax.scatter(
                    [(r["finished_at"] - t0) / 60 for r in pts],
                    [r["objective"] for r in pts],
                    s=46,
                    facecolors=color if filled else "none",
                    edgecolors=color,
                    linewidths=1.5,
                    zorder=3,
                    label=f"{model} ({status})",
                )
    completed = sorted((r for r in done if r["status"] == "completed"), key=lambda r: r["finished_at"])
    if completed:
        xs, best = [], []
        for r in completed:
            xs.append((r["finished_at"] - t0) / 60)
            best.append(max(r["objective"], best[-1]) if best else r["objective"])
        ax.step(xs, best, where="post", color="#212529", linewidth=1.4, label="best so far", zorder=2)
    ax.set_xlabel("minutes since the search started", fontsize=10)
    ax.set_ylabel(objective, fontsize=10)
    ax.legend(fontsize=8.5, frameon=False, loc="lower right")
    return fig_img(fig, f"{objective} of each trial over time")


# One figure's drawing calls in order, top to bottom: splitting them would scatter one picture's code.
def _parallel_figure(rows: Sequence[Mapping[str, Any]], objective: str) -> str | None:
    """Parallel coordinates: one line per trial through its parameters to its objective (colour = objective).

    Categorical axes space their values evenly; numeric ones are min-max scaled (log for a range over 10x). A
    parameter a trial did not have (e.g. n_features of an STFPM trial) breaks its line there.
    """
    done = [r for r in rows if r.get("objective") is not None]
    if not done:
        return None
    params = [p for p in R.PARAM_COLUMNS if any(r.get(p) is not None for r in done)]
    params = [p for p in params if len({r.get(p) for r in done if r.get(p) is not None}) > 1] or params
    axes_names = [*params, objective]
    positions: list[dict] = []
    for name in axes_names:
        key = "objective" if name == objective else name
        vals = [r.get(key) for r in done if r.get(key) is not None]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        if (numeric and len(set(vals)) > 2) or name == objective:
            lo, hi = min(vals), max(vals)
            log = lo > 0 and hi / lo > 10 and name != objective
            f = lambda v, lo=lo, hi=hi, log=log: (
                0.5
                if hi == lo
                else ((math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo)) if log else (v - lo) / (hi - lo))
            )
            ticks = [(0.0 if hi != lo else 0.5, lo), (1.0, hi)] if hi != lo else [(0.5, lo)]
        else:
            cats = sorted(set(vals), key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0, str(v)))
            pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
            f = pos.__getitem__
            ticks = [(pos[c], c) for c in cats]
        positions.append({"key": key, "f": f, "ticks": ticks})
    from matplotlib import colormaps  # plotting only: see htmlpage on matplotlib's import cost
    from matplotlib.collections import LineCollection

    objs = np.array([r["objective"] for r in done], dtype=float)
    lo, hi = float(objs.min()), float(objs.max())
    cmap = colormaps["viridis"]
    fig, (ax,) = figure(11.5, 4.4, 1)
    ax.grid(False)
    segments, colors, widths = [], [], []
    for r, o in zip(done, objs):
        pts = [(i, p["f"](r.get(p["key"]))) if r.get(p["key"]) is not None else None for i, p in enumerate(positions)]
        c = cmap(0.5 if hi == lo else (o - lo) / (hi - lo))
        for a, b in itertools.pairwise(pts):
            if a is not None and b is not None:
                segments.append([a, b])
                colors.append(c)
                widths.append(2.6 if r.get("rank") == 1 else 1.4)
    ax.add_collection(LineCollection(segments, colors=colors, linewidths=widths, alpha=0.85))
    for i, p in enumerate(positions):
        ax.axvline(i, color="#adb5bd", linewidth=1)
        for y, label in p["ticks"]:
            text = f"{label:.3g}" if isinstance(label, float) else str(label)
            ax.text(
                i + 0.04,
                y,
                text.replace(",", ",\n") if len(text) > 18 else text,
                fontsize=7.5,
                va="center",
                ha="left",
                color="#495057",
            )
    ax.set_xlim(-0.2, len(positions) - 1 + 0.7)
    ax.set_ylim(-0.08, 1.08)
    ax.set_xticks(range(len(positions)), list(axes_names), fontsize=9)
    ax.set_yticks([])
    ax.spines[["left"]].set_visible(False)
    return fig_img(fig, "parallel coordinates of the trials' parameters and objective")


def _importance_figure(importances: Mapping[str, float]) -> str:
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig, (ax,) = figure(11.5, 0.45 * len(items) + 1.0, 1)
    ax.barh([k for k, _ in items], [v for _, v in items], color="#3b6fd1")
    ax.set_xlabel("importance (sums to 1)", fontsize=10)
    return fig_img(fig, "parameter importance")


def _trials_table(rows: Sequence[Mapping[str, Any]], objective: str) -> str:
    cols = R.display_columns(objective)
    cols = [c for c in cols if c in ("rank", "trial", "status") or any(r.get(c) not in (None, "") for r in rows)]
    head = "".join(
        f'<th class="{"num" if c not in ("trial", "status", "model", "backbone", "layers") else ""}">'
        f"{esc(objective if c == 'objective' else c.replace('_', ' '))}</th>"
        for c in cols
    )
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if c == "status":
                cells.append(
                    f'<td><span class="status" style="background:{STATUS_COLORS.get(v, "#868e96")}">'
                    f"{esc(v)}</span></td>"
                )
            elif c in ("trial", "model", "backbone", "layers"):
                cells.append(f"<td>{esc(v) if v is not None else '—'}</td>")
            else:
                cells.append(f'<td class="num">{_num(v)}</td>')
        cls = ' class="best"' if r.get("rank") == 1 and r.get("status") == "completed" else ""
        body.append(f'<tr{cls} data-trial="{esc(r.get("trial"))}">{"".join(cells)}</tr>')
        if r.get("error"):
            body.append(f'<tr><td></td><td class="err" colspan="{len(cols) - 1}">{esc(r["error"])}</td></tr>')
    return (
        f'<div class="scroll"><table class="trials"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


# The summary's three cases (a best trial, an interrupted search, none) read best side by side.
def _summary_html(out: Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """The summary cards and what to read next: the best trial, why there is none, the failure reasons."""
    objective = summary["objective"]
    n = R.counts(rows)
    best = summary.get("best")
    held = summary.get("heldout_metrics") or {}
    cards = [
        card(
            "trials",
            f"{n['completed']}/{len(rows)}",
            f"completed; {n['pruned']} pruned, {n['failed']} failed"
            + (f", {n['interrupted']} interrupted" if n["interrupted"] else ""),
            raw_value=True,
        ),
        card(
            f"best {objective}",
            _num(best.get("objective")) if best else "—",
            f"trial {best['trial']}" if best else "no completed trial",
            "good" if best else "bad",
            raw_value=True,
        ),
    ]
    if held:
        cards += [
            card(
                "held-out image AUROC",
                _num(held.get("image_auroc")),
                f"{held.get('num_test_images')} images",
                raw_value=True,
            ),
            card("held-out pixel AUROC", _num(held.get("pixel_auroc")), raw_value=True),
            card("held-out AUPRO", _num(held.get("aupro")), raw_value=True),
        ]
    lines = []
    if best:
        params = ", ".join(f"{k}={v}" for k, v in best.items() if k not in ("trial", "optuna_trial", "objective"))
        lines.append(
            f"<p>Best trial <b>{esc(best['trial'])}</b> (Optuna trial {esc(best.get('optuna_trial'))}): "
            f"{esc(params)}. Its run directory is <code>best/</code>"
            + (", scored once on the held-out part of the test split." if held else ".")
            + "</p>"
        )
        if (out / BEST_REPORT).is_file():
            lines.append(
                f'<a class="button" id="best-report" href="{BEST_REPORT}">Evaluation report of the best trial</a>'
            )
        else:
            lines.append(
                '<p class="missing">No evaluation report for the best trial: the dataset has no test '
                "images to score it on.</p>"
            )
    elif summary.get("interrupted"):
        lines.append(
            '<p class="missing">The search was interrupted: continue it with <code>tune --out '
            f"{esc(out)} --resume</code>; the best trial is chosen when it ends.</p>"
        )
    else:
        lines.append('<p class="missing">No trial completed, so there is no best model.</p>')
    reasons = R.failure_reasons(rows)
    if reasons:
        items = "".join(f"<li>{k} failed: {esc(why)}</li>" for why, k in reasons)
        lines.append(f'<ul class="notes">{items}</ul>')
    return f'<div class="cards">{"".join(cards)}</div>{"".join(lines)}'


def _meta_html(request: Any, space: Any, summary: Mapping[str, Any]) -> str:
    space_text = request.space_file + (f" — {space.description}" if space.description else "")
    meta = [
        ("data", f"{request.data} ({request.data_layout.format} layout)"),
        ("space", space_text),
        ("objective", summary["objective"]),
        ("trials", request.samples),
        ("fixed by --fix", ", ".join(request.fixes) or "—"),
        ("workers per trial", request.workers),
        ("seed", request.seed),
        ("search time", f"{summary.get('seconds', 0) / 60:.1f} min"),
    ]
    return "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in meta)


def write_tune_report(
    out: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    *,
    request: Any,
    space: Any,
    summary: Mapping[str, Any],
    importances: Mapping[str, float] | None = None,
    importance_note: str = "",
) -> Path:
    """Write TUNE_DIR/report.html from the results rows (tuning.results) and the search summary."""
    out = Path(out)
    objective = summary["objective"]
    progress = _objective_figure(rows, objective) or '<p class="missing">No trial reported an objective yet.</p>'
    parallel = _parallel_figure(rows, objective) or '<p class="missing">No trial reported an objective yet.</p>'
    importance = (
        _importance_figure(importances)
        if importances
        else f'<p class="missing">{esc(importance_note or "not computed")}.</p>'
    )
    space_items = "".join(f"<li><code>{esc(k)}</code>: fixed {esc(v)}</li>" for k, v in space.fixed.items())
    space_items += "".join(f"<li><code>{esc(d.name)}</code>: {esc(d.describe())}</li>" for d in space.dimensions)
    nav = "".join(f'<a href="#{s}">{esc(s.capitalize())}</a>' for s in SECTIONS)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Search report: {esc(out.name)}</title>
<style>{CSS}{EXTRA_CSS}</style></head>
<body><main>
<header><h1>Hyperparameter search: {esc(out.name)}</h1>
<p class="sub">Ray Tune trials sampled by Optuna's TPE; {esc(objective)} maximised. The study is also in
<code>study.db</code> (optuna-dashboard), per-trial TensorBoard logs in <code>search/</code>.</p>
<dl class="meta">{_meta_html(request, space, summary)}</dl></header>
<nav>{nav}</nav>
<section id="summary"><h2>Summary</h2>{_summary_html(out, rows, summary)}</section>
<section id="trials"><h2>Trials <small>best first</small></h2><p class="lead">Completed trials by {esc(objective)};
pruned ones (stopped early by ASHA) by their last value; failed ones with their error.</p>
{_trials_table(rows, objective)}</section>
<section id="progress"><h2>Objective over time</h2><p class="lead">Each trial's {esc(objective)} when it ended (hollow:
stopped early); the line is the best so far.</p>{progress}</section>
<section id="parameters"><h2>Parallel coordinates</h2><p class="lead">One line per trial through its parameter values to
its {esc(objective)}; colour from low (purple) to high (yellow), the best trial thicker.</p>{parallel}</section>
<section id="importance"><h2>Parameter importance</h2>{
        f'<p class="lead">{esc(importance_note)}.</p>' if importances else ""
    }{importance}</section>
<section id="space"><h2>Search space</h2><ul class="space">{space_items}</ul></section>
<footer>distributed_anomaly {esc(__version__)} · generated {esc(generated)} · self-contained file, no network needed
</footer>
</main></body></html>
"""
    return write_bytes(out / REPORT, text.encode("utf-8"))
