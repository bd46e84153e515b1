"""The settings of jobs.quality (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import setting
from pipeline.sections import JobSettings


@dataclass
class Settings(JobSettings):
    input: str | None = setting(None, "dataset root with a committed latents table")
    output: str | None = setting(None, "where the quality/ table and _runs/ go (default: input)")
    rows_per_part: int = setting(200_000, "table rows per Parquet data file", ge=1)
