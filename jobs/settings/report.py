"""The settings of jobs.report (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import setting
from pipeline.sections import JobSettings, ReportSection

__all__ = ["ReportSection", "Settings"]


@dataclass
class Settings(JobSettings):
    input: str | None = setting(None, "dataset root written by the project's jobs")
    output: str | None = setting(None, "where report/index.html goes (default: input)")
    report: ReportSection = setting(ReportSection, "what the page shows")
