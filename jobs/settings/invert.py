"""The settings of jobs.invert (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import setting
from pipeline.decode import DEFAULT_FORMATS
from pipeline.sections import (
    CropActorSection,
    JobSettings,
    MetricWeights,
    NamedModelSection,
    PasteBackSection,
)


@dataclass
class InvertSection(CropActorSection):
    torch_threads: int = setting(0, "intra-op threads per actor on the CPU (0: num_cpus)")
    max_bytes: int = setting(20_000_000, "plain folder: refuse files bigger than this, unread (too_large; 0: no cap)")
    formats: list[str] = setting(list(DEFAULT_FORMATS), "image formats decoded (Pillow names); others: "
                                                         "unsupported_format")
    multi_frame: Literal["refuse", "first"] = setting("refuse", "animated / multi-page files: refuse "
                                                                   "(status multi_frame) | first (first frame)")


@dataclass
class Settings(JobSettings):
    input: str | None = setting(None, "dataset root written by jobs.align, or a folder of aligned crops")
    output: str | None = setting(None, "dataset root for latents/, reconstructions/, _runs/")
    model: NamedModelSection = setting(NamedModelSection, "the inversion model")
    metrics: bool = setting(False, "reconstruct and score every face")
    retry_failed: bool = setting(False, "also retry permanent failures (decode_error ...); transient ones "
                                        "always are (implies full_scan)")
    full_scan: bool = setting(False, "read the whole faces table, not only what changed since the faces version "
                                     "the last run consumed (recorded in the latents table's log)")
    metric_weights: MetricWeights = setting(MetricWeights, "backbones of LPIPS and ID similarity (metrics=true)")
    invert: InvertSection = setting(InvertSection, "the inversion actors (batch_size: faces per model call; "
                                                   "num_cpus: leave CPUs for the read stage)")
    paste_back: PasteBackSection = setting(PasteBackSection, "metrics=true: reconstructions pasted back into their "
                                                         "photos (true, or a section: format, quality, group, ...)", switch=True)
