"""The settings of jobs.report (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline import report_sections
from pipeline.config import Section, setting
from pipeline.sections import JobSettings

_D = report_sections.DEFAULTS  # the page builder's defaults, also used when it is called directly


@dataclass
class ReportSection(Section):
    title: str | None = setting(_D["title"], "page title (default: \"Dataset report: <input>\")")
    max_images: int = setting(_D["max_images"], "crops / input|reconstruction pairs / edited faces shown")
    max_edits_per_image: int = setting(_D["max_edits_per_image"], "edits shown per source face")
    thumb_px: int = setting(_D["thumb_px"], "longer side of embedded thumbnails")
    thumb_format: Literal["png", "jpeg"] = setting(_D["thumb_format"], "thumbnail format (jpeg: smaller)")
    max_failed: int = setting(_D["max_failed"], "failed inputs listed with their error text")
    max_wplus_rows: int | None = setting(_D["max_wplus_rows"], "ok W+ codes streamed for the per-layer norm plot; "
                                                               "null or 0: every committed code, in Ray Data")
    bins: int = setting(_D["bins"], "histogram bins")
    max_train_grids: int = setting(_D["max_train_grids"], "newest train/grids/*.png embedded")
    grid_px: int = setting(_D["grid_px"], "longer side of an embedded training grid")


@dataclass
class Settings(JobSettings):
    input: str | None = setting(None, "dataset root written by the project's jobs")
    output: str | None = setting(None, "where report/index.html goes (default: input)")
    report: ReportSection = setting(ReportSection, "what the page shows")
