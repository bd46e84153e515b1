"""The settings of jobs.train_encoder (see its module doc), declared once; importing this needs neither
torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import setting
from pipeline.sections import JobSettings, MetricWeights
from pipeline.train_sections import EncoderModelSection, TrainEncoderSection

__all__ = ["EncoderModelSection", "Settings", "TrainEncoderSection"]


@dataclass
class Settings(JobSettings):
    input: str | None = setting(None, "folder of aligned training images")
    output: str | None = setting(None, "checkpoints/ and train/ go here")
    val_input: str | None = setting(None, "folder of validation images (default: the first images of input)")
    val_codes: str | None = setting(None, "optional Parquet (file, w_plus): true codes of the validation images")
    model: EncoderModelSection = setting(EncoderModelSection, "what the encoder is trained for")
    metric_weights: MetricWeights = setting(MetricWeights, "backbones of the LPIPS and ID losses")
    train_encoder: TrainEncoderSection = setting(TrainEncoderSection, "Ray Train settings and loss weights")
