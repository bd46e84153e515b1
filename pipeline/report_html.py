"""Pure building blocks of the dataset report: escaped HTML, inline-SVG charts, embedded
thumbnails. No I/O here (the job in `jobs/report.py` reads the dataset and calls these).

Everything produced is self-contained: images are `data:` URIs, charts are inline `<svg>`,
the CSS is one `<style>` block; there is no script and no external reference, so the page
opens offline from a local file, a mail attachment or an object-store link.
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Iterable, Sequence

import numpy as np

from pipeline.redact import redact_text

PALETTE = ("#3b6ea5", "#d9822b", "#3a9a5b", "#c0392b", "#8e6bbf", "#7f8c8d")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#23344d;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px} header p{margin:4px 0 0;font-size:13px;opacity:.85}
nav{padding:8px 24px;background:#e8edf3;font-size:14px} nav a{margin-right:14px;color:#23344d}
main{padding:8px 24px 40px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;margin:16px 0;padding:12px 18px}
h2{font-size:18px;margin:4px 0 10px} h3{font-size:15px;margin:14px 0 6px}
table.data{border-collapse:collapse;font-size:13px;margin:6px 0}
table.data th,table.data td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
table.data th{background:#f0f3f7} table.data td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.mismatch td{background:#fde2e1}
.flag{color:#b00020;font-weight:600}
.banner{border-radius:4px;padding:10px 14px;margin:8px 0;font-size:14px}
.banner.warn{background:#fff3cd;border:1px solid #e0b400;color:#5c4400}
.banner.error{background:#fde2e1;border:1px solid #c0392b;color:#6b0f0a}
.banner.info{background:#e8f1fb;border:1px solid #7aa7d6;color:#1d3c5e}
.labels{font-size:14px;margin:6px 0} .labels code{background:#eef;padding:1px 5px;border-radius:3px}
.missing{color:#777;font-style:italic;font-size:14px}
.grid{display:flex;flex-wrap:wrap;gap:8px}
.cell{display:inline-flex;flex-direction:column;align-items:center;font-size:11px;color:#444;max-width:160px}
.cell img{border:1px solid #ccc;image-rendering:auto}
.cell .cap{max-width:150px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.ph{display:flex;align-items:center;justify-content:center;background:#eee;border:1px dashed #aaa;
    color:#888;font-size:11px;text-align:center;overflow:hidden}
.pairrow{display:flex;gap:8px;align-items:flex-start;margin:6px 0;padding:4px 0;border-bottom:1px solid #eee}
.rowlabel{font-size:11px;color:#555;width:90px;word-break:break-all}
.charts{display:flex;flex-wrap:wrap;gap:12px}
svg.chart{background:#fff;border:1px solid #e3e3e3}
svg.chart text{font-family:system-ui,sans-serif}
pre.err{white-space:pre-wrap;margin:0;font-size:12px;max-width:700px}
"""


def esc(x) -> str:
    """Escaped text, with any URI's secrets redacted (every value a page shows passes here)."""
    return html.escape(redact_text("" if x is None else str(x)), quote=True)


def fmt(x, digits: int = 4) -> str:
    """A number for a table cell: ints as ints, floats with `digits` significant digits."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    try:
        f = float(x)
    except (TypeError, ValueError):
        return esc(x)
    if math.isnan(f):
        return "—"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    if f == 0:
        return "0"
    if abs(f) >= 1e5 or abs(f) < 1e-3:
        return f"{f:.{digits - 1}e}"
    return f"{f:.{digits}g}" if abs(f) < 10 ** digits else f"{f:.1f}"


def to_float(x) -> float | None:
    """A scalar as float, or None (None, NaN, lists, text)."""
    if x is None or isinstance(x, (list, tuple, dict, str, bytes)):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def finite(values: Iterable) -> np.ndarray:
    out = np.array([f for f in (to_float(v) for v in values) if f is not None], dtype=np.float64)
    return out[np.isfinite(out)]


# ---------------------------------------------------------------------------------------------
# HTML pieces


def table(headers: Sequence[str], rows: Sequence[Sequence], row_classes: Sequence[str] | None = None,
          numeric: Sequence[bool] | None = None, raw: bool = False) -> str:
    """A `<table class="data">`. Cells are escaped unless `raw` (then they must be HTML already)."""
    numeric = numeric or [False] * len(headers)
    out = ['<table class="data"><thead><tr>']
    out += [f"<th>{esc(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    for i, r in enumerate(rows):
        cls = row_classes[i] if row_classes and row_classes[i] else ""
        out.append(f'<tr class="{esc(cls)}">' if cls else "<tr>")
        for j, v in enumerate(r):
            is_num = j < len(numeric) and numeric[j]
            if raw:
                cell = "" if v is None else str(v)
            elif is_num:
                cell = fmt(v)
            else:
                cell = esc(v)
            out.append(f'<td class="num">{cell}</td>' if is_num else f"<td>{cell}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def banner(text: str, kind: str = "warn") -> str:
    return f'<div class="banner {esc(kind)}">{esc(text)}</div>'


def missing(text: str) -> str:
    return f'<p class="missing">{esc(text)}</p>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def labels_line(title: str, labels: Sequence[str]) -> str:
    if not labels:
        return ""
    items = " ".join(f"<code>{esc(x)}</code>" for x in labels)
    return f'<div class="labels"><b>{esc(title)}:</b> {items}</div>'


def random_init_warning(labels: Sequence[str]) -> str:
    """The banner shown when any metric-backbone label says RANDOM-INIT ("" otherwise)."""
    bad = [x for x in labels if x and "RANDOM-INIT" in str(x).upper()]
    if not bad:
        return ""
    return banner("Warning: LPIPS / ID similarity numbers here come from RANDOM-INIT metric backbones "
                  "(test mode). They are not real LPIPS or identity metrics; do not compare them with "
                  "published numbers. Backbones: " + "; ".join(sorted(set(map(str, bad)))), "error")


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document; `sections` are (anchor, title, body_html)."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in sections)
    body = "".join(section(a, t, b) for a, t, b in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main></body></html>\n")


# ---------------------------------------------------------------------------------------------
# Images


def thumbnail_data_uri(data: bytes, max_px: int = 128, fmt_: str = "png") -> str:
    """Decode image bytes, downscale so the longer side is <= max_px, return a data: URI."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGBA").convert("RGB") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB")
        im.thumbnail((max_px, max_px), Image.LANCZOS)
        buf = io.BytesIO()
        if fmt_.lower() in ("jpg", "jpeg"):
            im.convert("RGB").save(buf, format="JPEG", quality=85)
            mime = "jpeg"
        else:
            im.save(buf, format="PNG", optimize=True)
            mime = "png"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img_cell(src: str | None, caption: str = "", size: int = 128, title: str = "",
             reason: str = "missing") -> str:
    """One image with a caption; a grey placeholder box when `src` is None."""
    cap = f'<span class="cap" title="{esc(title or caption)}">{esc(caption)}</span>' if caption else ""
    if src:
        return (f'<div class="cell"><img src="{esc(src)}" style="max-width:{size}px;max-height:{size}px" '
                f'alt="{esc(caption)}" title="{esc(title or caption)}">{cap}</div>')
    return (f'<div class="cell"><div class="ph" style="width:{size}px;height:{size}px" '
            f'title="{esc(title)}">{esc(reason)}</div>{cap}</div>')


def grid(cells: Sequence[str]) -> str:
    return f'<div class="grid">{"".join(cells)}</div>'


def pair_row(label: str, cells: Sequence[str], title: str = "") -> str:
    return (f'<div class="pairrow"><div class="rowlabel" title="{esc(title or label)}">{esc(label)}</div>'
            f'{"".join(cells)}</div>')


# ---------------------------------------------------------------------------------------------
# SVG charts


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out, t = [], start
    while t <= hi + step * 1e-9 and len(out) < 20:
        out.append(round(t, 12))
        t += step
    return out


def _tick_labels(ticks: Sequence[float], digits: int = 3) -> list[str]:
    """`fmt` labels with the fewest significant digits (>= `digits`) that tell the ticks apart:
    at 3 digits a range like 0.9997-1.0 would label every tick "1"."""
    for d in range(digits, 16):
        labels = [fmt(t, d) for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def _svg_open(w: int, h: int, cls: str, title: str) -> str:
    return (f'<svg class="chart {esc(cls)}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>'
            f'<text x="{w / 2:.1f}" y="16" text-anchor="middle" font-size="13" font-weight="600">{esc(title)}</text>')


def svg_histogram(values: Iterable, title: str, bins: int = 20, width: int = 360, height: int = 220,
                  color: str = PALETTE[0]) -> str:
    """Histogram of the finite values, with n / mean / p50 / p95 under the title."""
    v = finite(values)
    out = [_svg_open(width, height, "hist", title)]
    if v.size == 0:
        return "".join(out) + _no_values(width, height)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    counts, edges = np.histogram(v, bins=max(1, int(bins)), range=(lo, hi))
    ml, mr, mt, mb = 40, 12, 40, 34
    pw, ph = width - ml - mr, height - mt - mb
    cmax = max(1, int(counts.max()))
    sx = lambda x: ml + (x - lo) / (hi - lo) * pw  # noqa: E731
    sy = lambda c: mt + ph - c / cmax * ph  # noqa: E731
    stats = f"n={v.size}  mean={fmt(v.mean())}  p50={fmt(np.percentile(v, 50))}  p95={fmt(np.percentile(v, 95))}"
    out.append(f'<text x="{width / 2:.1f}" y="31" text-anchor="middle" font-size="11" fill="#555">{esc(stats)}</text>')
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if c <= 0:
            continue
        x0, x1 = sx(a), sx(b)
        out.append(f'<rect x="{x0:.2f}" y="{sy(c):.2f}" width="{max(0.5, x1 - x0 - 1):.2f}" '
                   f'height="{mt + ph - sy(c):.2f}" fill="{color}">'
                   f'<title>[{fmt(a)}, {fmt(b)}): {int(c)}</title></rect>')
    out.append(_axes(ml, mt, pw, ph))
    ticks = _ticks(lo, hi, 4)
    for t, label in zip(ticks, _tick_labels(ticks)):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{mt + ph}" x2="{x:.1f}" y2="{mt + ph + 4}" stroke="#444"/>'
                   f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle" font-size="10">{esc(label)}</text>')
    for t in _ticks(0, cmax, 3):
        y = sy(t)
        out.append(f'<text x="{ml - 4}" y="{y + 3:.1f}" text-anchor="end" font-size="10">{int(t)}</text>')
    out.append("</svg>")
    return "".join(out)


def _no_values(width: int, height: int) -> str:
    return (f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="12" fill="#888">'
            "no values</text></svg>")


def _y_gridline(ml, pw, y: float, label: str) -> str:
    return (f'<line x1="{ml - 4}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{ml - 6}" y="{y + 3:.1f}" text-anchor="end" font-size="10">{esc(label)}</text>')


def _axis_titles(ml, mt, pw, ph, height: int, xlabel: str, ylabel: str) -> str:
    out = ""
    if xlabel:
        out += (f'<text x="{ml + pw / 2:.1f}" y="{height - 4}" text-anchor="middle" '
                f'font-size="11">{esc(xlabel)}</text>')
    if ylabel:
        out += (f'<text x="12" y="{mt + ph / 2:.1f}" text-anchor="middle" font-size="11" '
                f'transform="rotate(-90 12 {mt + ph / 2:.1f})">{esc(ylabel)}</text>')
    return out


def _axes(ml, mt, pw, ph) -> str:
    return (f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" stroke="#444"/>'
            f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + ph}" stroke="#444"/>')


def svg_line_chart(series: dict[str, tuple[Sequence, Sequence]], title: str, xlabel: str = "",
                   ylabel: str = "", width: int = 420, height: int = 240, log_y: bool = False) -> str:
    """Lines y(x) for each named series (points with non-finite values dropped), with a legend."""
    clean = {}
    for name, (xs, ys) in series.items():
        pts = [(to_float(x), to_float(y)) for x, y in zip(xs, ys)]
        pts = [(x, y) for x, y in pts if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
               and (not log_y or y > 0)]
        if pts:
            clean[name] = sorted(pts)
    out = [_svg_open(width, height, "line", title)]
    if not clean:
        return "".join(out) + _no_values(width, height)
    tr = (lambda y: math.log10(y)) if log_y else (lambda y: y)  # noqa: E731
    xs = [p[0] for pts in clean.values() for p in pts]
    ys = [tr(p[1]) for pts in clean.values() for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 <= x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 <= y0:
        pad = abs(y0) * 0.05 or 0.5
        y0, y1 = y0 - pad, y1 + pad
    ml, mr, mt, mb = 52, 12, 28 + 12 * ((len(clean) + 2) // 3), 36
    pw, ph = width - ml - mr, height - mt - mb
    sx = lambda x: ml + (x - x0) / (x1 - x0) * pw  # noqa: E731
    sy = lambda y: mt + ph - (y - y0) / (y1 - y0) * ph  # noqa: E731
    for i, name in enumerate(clean):
        col = PALETTE[i % len(PALETTE)]
        lx, ly = 10 + (i % 3) * (width - 20) / 3, 30 + 12 * (i // 3)
        out.append(f'<rect x="{lx:.1f}" y="{ly - 8}" width="10" height="3" fill="{col}"/>'
                   f'<text x="{lx + 14:.1f}" y="{ly - 4}" font-size="10">{esc(name)}</text>')
    out.append(_axes(ml, mt, pw, ph))
    for i, (name, pts) in enumerate(clean.items()):
        col = PALETTE[i % len(PALETTE)]
        d = " ".join(f"{sx(x):.1f},{sy(tr(y)):.1f}" for x, y in pts)
        if len(pts) == 1:
            x, y = pts[0]
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(tr(y)):.1f}" r="3" fill="{col}"/>')
        else:
            out.append(f'<polyline fill="none" stroke="{col}" stroke-width="1.5" points="{d}">'
                       f"<title>{esc(name)}</title></polyline>")
    ticks = _ticks(x0, x1, 5)
    for t, label in zip(ticks, _tick_labels(ticks)):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{mt + ph}" x2="{x:.1f}" y2="{mt + ph + 4}" stroke="#444"/>'
                   f'<text x="{x:.1f}" y="{mt + ph + 15}" text-anchor="middle" font-size="10">{esc(label)}</text>')
    ticks = _ticks(y0, y1, 4)
    for t, label in zip(ticks, _tick_labels([10 ** t for t in ticks] if log_y else ticks)):
        out.append(_y_gridline(ml, pw, sy(t), label))
    out.append(_axis_titles(ml, mt, pw, ph, height, xlabel, ylabel))
    out.append("</svg>")
    return "".join(out)


def svg_bar_chart(values: Sequence, labels: Sequence[str], title: str, ylabel: str = "", xlabel: str = "",
                  errors: Sequence | None = None, width: int = 520, height: int = 240,
                  color: str = PALETTE[0]) -> str:
    """Vertical bars (e.g. mean ||w_l|| per W+ layer), optional +-error whiskers."""
    vals = [to_float(v) for v in values]
    errs = [to_float(e) for e in errors] if errors is not None else [None] * len(vals)
    out = [_svg_open(width, height, "bars", title)]
    good = [v for v in vals if v is not None and math.isfinite(v)]
    if not good:
        return "".join(out) + _no_values(width, height)
    tops = [v + (e or 0) for v, e in zip(vals, errs) if v is not None]
    y0, y1 = min(0.0, min(good)), max(max(tops), 1e-12)
    ml, mr, mt, mb = 52, 12, 28, 36
    pw, ph = width - ml - mr, height - mt - mb
    n = len(vals)
    bw = pw / max(1, n)
    sy = lambda y: mt + ph - (y - y0) / (y1 - y0) * ph  # noqa: E731
    for i, (v, e, lab) in enumerate(zip(vals, errs, labels)):
        if v is None:
            continue
        x = ml + i * bw
        top, bot = sy(max(v, 0)), sy(min(v, 0))
        out.append(f'<rect x="{x + 1:.2f}" y="{top:.2f}" width="{max(0.5, bw - 2):.2f}" height="{bot - top:.2f}" '
                   f'fill="{color}"><title>{esc(lab)}: {fmt(v)}{" ± " + fmt(e) if e else ""}</title></rect>')
        if e:
            cx = x + bw / 2
            out.append(f'<line x1="{cx:.2f}" y1="{sy(v + e):.2f}" x2="{cx:.2f}" y2="{sy(v - e):.2f}" stroke="#333"/>')
        if n <= 32 or i % max(1, n // 16) == 0:
            out.append(f'<text x="{x + bw / 2:.1f}" y="{mt + ph + 13}" text-anchor="middle" '
                       f'font-size="9">{esc(lab)}</text>')
    out.append(_axes(ml, mt, pw, ph))
    ticks = _ticks(y0, y1, 4)
    for t, label in zip(ticks, _tick_labels(ticks)):
        out.append(_y_gridline(ml, pw, sy(t), label))
    out.append(_axis_titles(ml, mt, pw, ph, height, xlabel, ylabel))
    out.append("</svg>")
    return "".join(out)


def charts(items: Sequence[str]) -> str:
    return f'<div class="charts">{"".join(items)}</div>'
