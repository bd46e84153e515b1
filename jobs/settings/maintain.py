"""The settings of jobs.maintain (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import setting
from pipeline.sections import JobSettings


@dataclass
class Settings(JobSettings):
    output: str | None = setting(None, "dataset root whose Delta tables are maintained")
    tables: list[str] | str | None = setting(None, "table names (default: every Delta table under output)")
    progress: bool = setting(False, "progress bars (maintain runs no Ray Data stage)")
    compact: bool = setting(True, "rewrite small data files into files of about target_size")
    target_size: int | None = setting(None, "bytes per compacted file (null: delta-rs's 100 MiB)", ge=1)
    vacuum: bool = setting(True, "delete data files no commit of the window names")
    retention_hours: int = setting(168, "files younger than this are never vacuumed (longer than any run)", ge=0)
    enforce_retention_duration: bool = setting(True, "refuse a window below the table's configured minimum")
    full: bool = setting(True, "also orphans that no log entry names (killed runs), not only removed files")
    dry_run: bool = setting(False, "change nothing: report what compact and vacuum would do")
