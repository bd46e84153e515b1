"""The settings of jobs.evaluate (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import setting
from pipeline.sections import (
    CropActorSection,
    JobSettings,
    MetricWeights,
    NamedModelSection,
)


@dataclass
class Settings(JobSettings):
    input: str | None = setting(None, "dataset root holding a committed latents table")
    output: str | None = setting(None, "where metrics/ and reconstructions/ go (default: input)")
    model: NamedModelSection = setting(NamedModelSection, "the inversion model that made the codes")
    metric_weights: MetricWeights = setting(MetricWeights, "backbones of LPIPS and ID similarity")
    retry_failed: bool = setting(False, "also retry permanent failures (model_mismatch ...); transient ones "
                                        "always are (implies full_scan)")
    full_scan: bool = setting(False, "read the whole latents table, not only what changed since the latents "
                                     "version the last run consumed (recorded in the metrics table's log)")
    evaluate: CropActorSection = setting(CropActorSection, "the evaluation actors (batch_size: faces per model call)")
