"""The settings of jobs.score (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import setting
from pipeline.sections import JobSettings, ScoreSection

__all__ = ["ScoreSection", "Settings"]


@dataclass
class Settings(JobSettings):
    latents: str | None = setting(None, "dataset root with a committed latents table")
    output: str | None = setting(None, "where the scores/ table and _runs/ go (default: latents)")
    classifier: str | None = setting(None, "dataset root with committed models (default: latents), or a classifier "
                                           "file + classifier_sha256")
    classifier_run: str | None = setting(None, "that root's classifier of this run (default: the newest committed)")
    classifier_sha256: str | None = setting(None, "... or with this sha256 (required for a file)")
    retry_failed: bool = setting(False, "also retry permanent failures (bad_code); transient ones always are")
    score: ScoreSection = setting(ScoreSection, "the scoring actors")
