"""The settings of jobs.embed (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import setting
from pipeline.sections import CropActorSection, JobSettings, MetricWeights


@dataclass
class EmbedSection(CropActorSection):
    batch_size: int = setting(32, "crops per backbone call", ge=1)


@dataclass
class Settings(JobSettings):
    input: str | None = setting(None, "dataset root with a committed latents table")
    output: str | None = setting(None, "where the embeddings/ table and _runs/ go (default: input)")
    metric_weights: MetricWeights = setting(MetricWeights, "facenet: the identity backbone's weights (lpips unused)")
    crop_size: int = setting(256, "crops are resized to this before the backbone takes its face region", ge=1)
    retry_failed: bool = setting(False, "also retry permanent failures (decode_error ...); transient ones always are")
    embed: EmbedSection = setting(EmbedSection, "the embedding actors")

