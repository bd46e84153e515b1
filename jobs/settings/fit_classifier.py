"""The settings of jobs.fit_classifier (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Section, setting
from pipeline.sections import CodeTrainSection, JobSettings


@dataclass
class ClassifierSection(Section):
    hidden: list[int] = setting([2048, 512], "hidden layer widths (the official LCNet_40 sizes)")
    emb_dim: int = setting(32, "per-attribute embedding size")


@dataclass
class FitClassifierSection(CodeTrainSection):
    epochs: int = setting(20, "passes over the training codes")
    batch_size: int = setting(256, "codes per step and worker")
    log_every: int = setting(1, "epochs between log lines")


@dataclass
class Settings(JobSettings):
    latents: str | None = setting(None, "dataset root with a committed latents table")
    attributes: str | None = setting(None, "Parquet/CSV: image_id (or file) + one 0/1 (or -1/1) column per attribute")
    attributes_list: list[str] | None = setting(None, "choose / order the attributes (default: the table's numeric "
                                                      "columns)")
    output: str | None = setting(None, "model_files/classifier/<run>/classifier.pt, models/ + classifier_eval/ "
                                       "tables, _runs/")
    val_fraction: float = setting(0.1, "held-out share of image ids (hash of image_id)")
    split_seed: int = setting(0, "seed of that hash")
    classifier: ClassifierSection = setting(ClassifierSection, "the classifier's shape")
    fit_classifier: FitClassifierSection = setting(FitClassifierSection, "Ray Train settings")
