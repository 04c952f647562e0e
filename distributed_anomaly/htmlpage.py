"""Shared pieces of our self-contained HTML pages (the evaluation report and the search report).

Pages are single files: images are base64 PNG data URIs, the stylesheet is inline, there is no JavaScript.
Plots use matplotlib's Agg canvas directly (never pyplot's global state, which is not thread-safe). Its figure
machinery is imported only when a page draws a plot: about a second of start-up that scoring never needs.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image


def esc(x) -> str:
    """HTML-escaped text of any value (attribute-safe)."""
    return html.escape(str(x), quote=True)


def card(label: str, value, hint: str = "", cls: str = "", *, raw_value: bool = False) -> str:
    """A summary card: label, big value, hint; `raw_value` when the value is already HTML."""
    shown = value if raw_value else esc(value)
    return (
        f'<div class="card {cls}"><div class="label">{esc(label)}</div>'
        f'<div class="value">{shown}</div><div class="hint">{esc(hint)}</div></div>'
    )


def dash(v) -> str:
    return "—" if v is None else esc(v)


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}"
    return str(v)


def png_uri(img: Image.Image) -> str:
    """PNG data URI of an RGB image reduced to a 256-colour palette (octree: no visible banding on
    photos or heatmaps, a quarter of the bytes)."""
    buf = io.BytesIO()
    img.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def fig_img(fig, alt: str) -> str:
    """A matplotlib figure as an <img> tag (Agg canvas, no pyplot; no metadata naming a website)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None}, facecolor="white")
    img = Image.open(buf)
    return f'<img class="plot" src="{png_uri(img)}" alt="{esc(alt)}" width="{img.size[0]}" height="{img.size[1]}">'


def figure(width: float, height: float, ncols: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(True, color="#e9ecef", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.tick_params(labelsize=9, colors="#495057")
    return fig, axes


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
