"""The settings of jobs.align (see its module doc), declared once; importing this needs neither torch nor Ray.
Its actor section (AlignSection) is in pipeline.sections, where the stage that reads it can name it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import setting
from pipeline.sections import AlignSection, JobSettings

__all__ = ["AlignSection", "Settings"]


@dataclass
class Settings(JobSettings):
    input: str | None = setting(None, "URI of the raw photos (folder / prefix)")
    output: str | None = setting(None, "URI of the dataset root (aligned/, faces/, _runs/)")
    retry_failed: bool = setting(False, "also retry permanent failures (decode_error ...); transient ones "
                                        "always are")
    verify: Literal["listing", "hash"] = setting("listing", "how a committed photo is known: listing = by its URI, "
                                                            "size and ETag / mtime, never read; hash = read and "
                                                            "hashed every run (content checks)")
    align: AlignSection = setting(AlignSection, "detection and alignment (AlignFaces actors: batch_size images "
                                                "per call, num_cpus also its torch threads)")
