"""The report's charts as inline SVG: no script, no external reference, so the page stays one
offline file.

A section describes a chart as data (`Histogram`, `LineChart`, `BarChart`); the page's template
turns it into markup with `chart.svg()`, the one thing every chart does. Text inside a chart
(titles, series names, labels) is escaped and has its URIs' secrets redacted here, since the SVG
reaches the page as finished markup.

Tick labels never repeat: value axes use the fewest significant digits that tell the ticks apart,
and count axes (histogram bars) use distinct integer ticks only.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from markupsafe import Markup

from pipeline.redact import redact_text
from pipeline.report_format import finite, fmt, to_float

PALETTE = ("#3b6ea5", "#d9822b", "#3a9a5b", "#c0392b", "#8e6bbf", "#7f8c8d")


def _esc(x) -> str:
    return html.escape(redact_text("" if x is None else str(x)), quote=True)


# ---------------------------------------------------------------------------------------------
# The interface: a chart is data until the page asks for its SVG


@dataclass
class Histogram:
    """Histogram of the finite values, with n / mean / p50 / p95 under the title."""
    values: Iterable
    title: str
    bins: int = 20
    color: str = PALETTE[0]

    def svg(self) -> Markup:
        return svg_histogram(self.values, self.title, bins=self.bins, color=self.color)


@dataclass
class LineChart:
    """Lines y(x) for each named series."""
    series: dict[str, tuple[Sequence, Sequence]]
    title: str
    xlabel: str = ""
    ylabel: str = ""
    log_y: bool = False

    def svg(self) -> Markup:
        return svg_line_chart(self.series, self.title, xlabel=self.xlabel, ylabel=self.ylabel, log_y=self.log_y)


@dataclass
class BarChart:
    """Vertical bars with optional +- error whiskers."""
    values: Sequence
    labels: Sequence[str]
    title: str
    ylabel: str = ""
    xlabel: str = ""
    errors: Sequence | None = None
    width: int = 520

    def svg(self) -> Markup:
        return svg_bar_chart(self.values, self.labels, self.title, ylabel=self.ylabel, xlabel=self.xlabel,
                             errors=self.errors, width=self.width)


Chart = Histogram | LineChart | BarChart


# ---------------------------------------------------------------------------------------------
# Ticks


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out: list[float] = []
    t = start
    while t <= hi + step * 1e-9 and len(out) < 20:
        out.append(round(t, 12))
        t += step
    return out


def _tick_labels(ticks: Sequence[float], digits: int = 3) -> list[str]:
    """`fmt` labels with the fewest significant digits (>= `digits`) that tell the ticks apart:
    at 3 digits a range like 0.9997-1.0 would label every tick "1"."""
    labels = [fmt(t, digits) for t in ticks]
    for d in range(digits, 16):
        labels = [fmt(t, d) for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def count_ticks(cmax: int, n: int = 3) -> list[int]:
    """Distinct integer ticks from 0 covering `cmax` (a count axis): a step of 1, 2, 5, 10...
    never a fraction, which would round to a repeated label. The last tick is the axis top."""
    cmax = max(1, int(cmax))
    raw = cmax / max(1, n)
    mag = 1
    while 10 * mag < raw:
        mag *= 10
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    top = -(-cmax // step) * step
    return list(range(0, top + 1, step))


# ---------------------------------------------------------------------------------------------
# The SVG builders


def _svg_open(w: int, h: int, cls: str, title: str) -> str:
    return (f'<svg class="chart {_esc(cls)}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" role="img" aria-label="{_esc(title)}"><title>{_esc(title)}</title>'
            f'<text x="{w / 2:.1f}" y="16" text-anchor="middle" font-size="13" font-weight="600">{_esc(title)}</text>')


def _no_values(width: int, height: int) -> str:
    return (f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="12" fill="#888">'
            "no values</text></svg>")


def _y_gridline(ml, pw, y: float, label: str) -> str:
    return (f'<line x1="{ml - 4}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{ml - 6}" y="{y + 3:.1f}" text-anchor="end" font-size="10">{_esc(label)}</text>')


def _axis_titles(ml, mt, pw, ph, height: int, xlabel: str, ylabel: str) -> str:
    out = ""
    if xlabel:
        out += (f'<text x="{ml + pw / 2:.1f}" y="{height - 4}" text-anchor="middle" '
                f'font-size="11">{_esc(xlabel)}</text>')
    if ylabel:
        out += (f'<text x="12" y="{mt + ph / 2:.1f}" text-anchor="middle" font-size="11" '
                f'transform="rotate(-90 12 {mt + ph / 2:.1f})">{_esc(ylabel)}</text>')
    return out


def _axes(ml, mt, pw, ph) -> str:
    return (f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" stroke="#444"/>'
            f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + ph}" stroke="#444"/>')


def svg_histogram(values: Iterable, title: str, bins: int = 20, width: int = 360, height: int = 220,
                  color: str = PALETTE[0]) -> Markup:
    """Histogram of the finite values, with n / mean / p50 / p95 under the title."""
    v = finite(values)
    out = [_svg_open(width, height, "hist", title)]
    if v.size == 0:
        return Markup("".join(out) + _no_values(width, height))
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    counts, edges = np.histogram(v, bins=max(1, int(bins)), range=(lo, hi))
    ml, mr, mt, mb = 40, 12, 40, 34
    pw, ph = width - ml - mr, height - mt - mb
    yticks = count_ticks(int(counts.max()))
    ctop = yticks[-1]
    sx = lambda x: ml + (x - lo) / (hi - lo) * pw  # noqa: E731
    sy = lambda c: mt + ph - c / ctop * ph  # noqa: E731
    stats = f"n={v.size}  mean={fmt(v.mean())}  p50={fmt(np.percentile(v, 50))}  p95={fmt(np.percentile(v, 95))}"
    out.append(f'<text x="{width / 2:.1f}" y="31" text-anchor="middle" font-size="11" fill="#555">{_esc(stats)}</text>')
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if c <= 0:
            continue
        x0, x1 = sx(a), sx(b)
        out.append(f'<rect x="{x0:.2f}" y="{sy(c):.2f}" width="{max(0.5, x1 - x0 - 1):.2f}" '
                   f'height="{mt + ph - sy(c):.2f}" fill="{_esc(color)}">'
                   f'<title>[{_esc(fmt(a))}, {_esc(fmt(b))}): {int(c)}</title></rect>')
    out.append(_axes(ml, mt, pw, ph))
    ticks = _ticks(lo, hi, 4)
    for t, label in zip(ticks, _tick_labels(ticks)):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{mt + ph}" x2="{x:.1f}" y2="{mt + ph + 4}" stroke="#444"/>'
                   f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle" font-size="10">{_esc(label)}</text>')
    for t in yticks:
        out.append(f'<text x="{ml - 4}" y="{sy(t) + 3:.1f}" text-anchor="end" font-size="10">{t}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def svg_line_chart(series: dict[str, tuple[Sequence, Sequence]], title: str, xlabel: str = "",
                   ylabel: str = "", width: int = 420, height: int = 240, log_y: bool = False) -> Markup:
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
        return Markup("".join(out) + _no_values(width, height))
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
                   f'<text x="{lx + 14:.1f}" y="{ly - 4}" font-size="10">{_esc(name)}</text>')
    out.append(_axes(ml, mt, pw, ph))
    for i, (name, pts) in enumerate(clean.items()):
        col = PALETTE[i % len(PALETTE)]
        d = " ".join(f"{sx(x):.1f},{sy(tr(y)):.1f}" for x, y in pts)
        if len(pts) == 1:
            x, y = pts[0]
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(tr(y)):.1f}" r="3" fill="{col}"/>')
        else:
            out.append(f'<polyline fill="none" stroke="{col}" stroke-width="1.5" points="{d}">'
                       f"<title>{_esc(name)}</title></polyline>")
    ticks = _ticks(x0, x1, 5)
    for t, label in zip(ticks, _tick_labels(ticks)):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{mt + ph}" x2="{x:.1f}" y2="{mt + ph + 4}" stroke="#444"/>'
                   f'<text x="{x:.1f}" y="{mt + ph + 15}" text-anchor="middle" font-size="10">{_esc(label)}</text>')
    ticks = _ticks(y0, y1, 4)
    for t, label in zip(ticks, _tick_labels([10 ** t for t in ticks] if log_y else ticks)):
        out.append(_y_gridline(ml, pw, sy(t), label))
    out.append(_axis_titles(ml, mt, pw, ph, height, xlabel, ylabel))
    out.append("</svg>")
    return Markup("".join(out))


def svg_bar_chart(values: Sequence, labels: Sequence[str], title: str, ylabel: str = "", xlabel: str = "",
                  errors: Sequence | None = None, width: int = 520, height: int = 240,
                  color: str = PALETTE[0]) -> Markup:
    """Vertical bars (e.g. mean ||w_l|| per W+ layer), optional +-error whiskers."""
    vals = [to_float(v) for v in values]
    errs = [to_float(e) for e in errors] if errors is not None else [None] * len(vals)
    out = [_svg_open(width, height, "bars", title)]
    good = [v for v in vals if v is not None and math.isfinite(v)]
    if not good:
        return Markup("".join(out) + _no_values(width, height))
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
        tip = f"{lab}: {fmt(v)}" + (f" ± {fmt(e)}" if e else "")
        out.append(f'<rect x="{x + 1:.2f}" y="{top:.2f}" width="{max(0.5, bw - 2):.2f}" height="{bot - top:.2f}" '
                   f'fill="{_esc(color)}"><title>{_esc(tip)}</title></rect>')
        if e:
            cx = x + bw / 2
            out.append(f'<line x1="{cx:.2f}" y1="{sy(v + e):.2f}" x2="{cx:.2f}" y2="{sy(v - e):.2f}" stroke="#333"/>')
        if n <= 32 or i % max(1, n // 16) == 0:
            out.append(f'<text x="{x + bw / 2:.1f}" y="{mt + ph + 13}" text-anchor="middle" '
                       f'font-size="9">{_esc(lab)}</text>')
    out.append(_axes(ml, mt, pw, ph))
    ticks = _ticks(y0, y1, 4)
    for t, label in zip(ticks, _tick_labels(ticks)):
        out.append(_y_gridline(ml, pw, sy(t), label))
    out.append(_axis_titles(ml, mt, pw, ph, height, xlabel, ylabel))
    out.append("</svg>")
    return Markup("".join(out))
