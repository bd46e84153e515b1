"""The settings of jobs.demo (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Section, setting
from pipeline.sections import JobSettings


@dataclass
class DemoTrainSection(Section):
    """Given to jobs.train_encoder, whose settings state the ranges (checked before the demo starts)."""
    steps: int = setting(1500, "train_encoder steps")
    batch_size: int = setting(8, "train_encoder batch size")
    lr: float = setting(1e-3, "train_encoder learning rate")
    log_every: int = setting(25, "steps between log lines")
    val_every: int = setting(250, "steps between validation grids")
    checkpoint_every: int = setting(250, "steps between checkpoints")


@dataclass
class DemoFitSection(Section):
    """Given to jobs.fit_classifier and jobs.fit_editor, whose settings state the ranges."""
    classifier_epochs: int = setting(30, "fit_classifier epochs")
    editor_steps: int = setting(300, "fit_editor steps")


@dataclass
class Settings(JobSettings):
    output: str = setting("demo_out", "local folder used as the object store")
    progress: bool = setting(False, "Ray Data progress bars on stderr")
    preset: str = setting("tiny-32", "the seeded generator's preset")
    seed: int = setting(0, "seed of the generator and the sampled images")
    n_train: int = setting(384, "training images sampled from the generator", ge=1)
    n_val: int = setting(64, "validation images", ge=1)
    truncation: float = setting(0.7, "psi of the sampled codes", ge=0)
    train_encoder: DemoTrainSection = setting(DemoTrainSection, "the encoder training run")
    fit: DemoFitSection = setting(DemoFitSection, "the classifier and editor fits")
    align_size: int = setting(256, "aligned crop side")
