"""The settings of jobs.invert (see its module doc), declared once; importing this needs neither torch nor Ray.
Its actor section (InvertSection) is in pipeline.sections, where the stage that reads it can name it."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import setting
from pipeline.sections import (
    InvertSection,
    JobSettings,
    MetricWeights,
    NamedModelSection,
    PasteBackSection,
)

__all__ = ["InvertSection", "Settings"]


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
                                                         "photos (true, or a section: format, quality, group, ...)",
                                           switch=True)

    def problems(self) -> list[str]:
        out = super().problems()
        if self.paste_back.enabled and not self.metrics:
            out.append("paste_back: pastes the reconstructions, which only metrics=true makes: set metrics=true, "
                       "or paste_back=false")
        return out
