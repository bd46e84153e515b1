"""The dataset report as one self-contained HTML page: the sections' data gathered
(`pipeline.report_sections`), then rendered with the templates (`pipeline.report_render`).

    html, info = build_report(root, ReportSection())   # the section of jobs.report's settings

Images are embedded as data: URIs, charts are inline SVG and the CSS is one `<style>` block:
no script and no external reference, so the page opens offline. A section that fails, while
its data is gathered or while it is rendered, becomes an error banner in its place; the others
are still built.
"""
from __future__ import annotations

import datetime as _dt
import logging
from typing import Callable

from markupsafe import Markup

from pipeline import delta
from pipeline.redact import redact_uri
from pipeline.report_blocks import Banner
from pipeline.report_data import job_runs, open_snapshot, read_records, uncommitted_runs
from pipeline.report_images import Images
from pipeline.report_render import render
from pipeline.report_sections import SECTIONS, Context, section_overview
from pipeline.sections import ReportSection

log = logging.getLogger("stbatch.report")

ROW_TABLES = ("faces", "latents", "metrics", "edits")


def _context(root: str, section: ReportSection, start_ray: Callable[[], None] | None) -> Context:
    notes: list[str] = []
    try:
        tables = delta.list_tables(root)
    except Exception as e:  # noqa: BLE001
        notes.append(f"tables under the root could not be listed: {e}")
        tables = []
    records = read_records(root, notes)
    runs = job_runs(root, tables, records, notes)
    snaps = {t: s for t in tables if (s := open_snapshot(root, t, notes)) is not None}
    old_roots = [o for m in records if isinstance(o := m.get("output"), str)]
    ctx = Context(root, section, runs, snaps, Images(root, old_roots, section.thumb_px, section.thumb_format), notes,
                  start_ray=start_ray)
    for t in ROW_TABLES:
        if t not in snaps:
            continue
        try:
            ctx.labels[t] = snaps[t].distinct("metric_backbones")
        except Exception as e:  # noqa: BLE001
            notes.append(f"{t}: metric_backbones unreadable: {e}")
        committed = {r.run_id for r in runs if t in r.commits}
        stale = uncommitted_runs(root, t, committed)
        if stale:
            notes.append(f"{t}: ignored the data files of {len(stale)} uncommitted run(s) (no Delta commit names "
                         "them: killed, or still writing; python -m jobs.maintain vacuums them): "
                         + ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else ""))
    return ctx


def _section_html(anchor: str, title: str, items: list) -> Markup:
    return Markup(render("section.html.j2", anchor=anchor, title=title, items=items))


def _failed(anchor: str, title: str, e: Exception) -> Markup:
    log.error("report section %s failed", anchor, exc_info=e)
    return _section_html(anchor, title, [Banner(f"this section could not be built: {type(e).__name__}: {e}",
                                                "error")])


def build_report(root: str, section: ReportSection, start_ray: Callable[[], None] | None = None) -> tuple[str, dict]:
    """The HTML of the report for dataset `root`, showing what `section` asks (the `report`
    settings of jobs.report), and counts {runs, sections, failed, missing, images, missing_images}.
    `start_ray` is called before the W+ norms are computed over every code in Ray Data
    (report.max_wplus_rows null); without it Ray Data starts a default Ray."""
    ctx = _context(root, section, start_ray)
    done, absent, failed = [], [], 0
    for anchor, title, fn, why in SECTIONS:
        try:
            items = fn(ctx)
            html = None if items is None else _section_html(anchor, title, items)
        except Exception as e:  # noqa: BLE001  (one broken part must not hide the others)
            html, failed = _failed(anchor, title, e), failed + 1
        if html is None:
            absent.append((title, why))
        else:
            done.append({"anchor": anchor, "title": title, "html": html})
    shown_root = redact_uri(root)
    overview = _section_html("overview", "Overview", section_overview(ctx, len(done), absent, shown_root))
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    title = section.title or f"Dataset report: {shown_root}"
    page = render("page.html.j2", title=title, subtitle=f"generated {now}",
                  sections=[{"anchor": "overview", "title": "Overview", "html": overview}] + done)
    counted = sum(1 for r in ctx.runs if r.counted)
    return page, {"runs": counted, "sections": len(done) - failed, "failed": failed, "missing": len(absent),
                  "images": ctx.images.embedded, "missing_images": ctx.images.missing}
