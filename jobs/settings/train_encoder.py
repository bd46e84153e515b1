"""The settings of jobs.train_encoder (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import setting
from pipeline.sections import JobSettings, MetricWeights, ModelSection, TrainSection


@dataclass
class EncoderModelSection(ModelSection):
    preset: str | None = setting(None, "the generator's shape (ffhq-1024, cars-512, tiny-*)")
    generator: str | None = setting(None, "plain StyleGAN2 file (g_ema) to train an encoder for (or: checkpoint, "
                                          "an inversion checkpoint to fine-tune)")
    generator_sha256: str | None = setting(None, "verify the generator file against this sha256 when set")


@dataclass
class TrainEncoderSection(TrainSection):
    steps: int = setting(1000, "training steps (a rerun resumes and stops at the same count)")
    l2: float = setting(1.0, "loss weight of the pixel MSE")
    lpips: float = setting(0.8, "loss weight of LPIPS (needs metric_weights.lpips_alexnet, or 0)")
    id: float = setting(0.1, "loss weight of ID similarity (needs metric_weights.facenet, or 0)")
    w_norm: float = setting(0.0, "loss weight of the W+ distance to the mean latent")
    val_every: int = setting(100, "steps between validation grids")
    checkpoint_every: int = setting(100, "steps between checkpoints")
    val_images: int = setting(8, "validation images in the grids and the final evaluation")
    resume: bool = setting(True, "resume from the newest complete checkpoint under output")


@dataclass
class Settings(JobSettings):
    input: str | None = setting(None, "folder of aligned training images")
    output: str | None = setting(None, "checkpoints/ and train/ go here")
    val_input: str | None = setting(None, "folder of validation images (default: the first images of input)")
    val_codes: str | None = setting(None, "optional Parquet (file, w_plus): true codes of the validation images")
    model: EncoderModelSection = setting(EncoderModelSection, "what the encoder is trained for")
    metric_weights: MetricWeights = setting(MetricWeights, "backbones of the LPIPS and ID losses")
    train_encoder: TrainEncoderSection = setting(TrainEncoderSection, "Ray Train settings and loss weights")
