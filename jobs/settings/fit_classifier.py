"""The settings of jobs.fit_classifier (see its module doc), declared once; importing this needs neither
torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import setting
from pipeline.sections import JobSettings
from pipeline.train_sections import ClassifierSection, FitClassifierSection

__all__ = ["ClassifierSection", "FitClassifierSection", "Settings"]


@dataclass
class Settings(JobSettings):
    latents: str | None = setting(None, "dataset root with a committed latents table")
    attributes: str | None = setting(None, "Parquet/CSV: image_id (or file) + one 0/1 (or -1/1) column per attribute")
    attributes_list: list[str] | None = setting(None, "choose / order the attributes (default: the table's numeric "
                                                      "columns)")
    output: str | None = setting(None, "model_files/classifier/<run>/classifier.pt, models/ + classifier_eval/ "
                                       "tables, _runs/")
    val_fraction: float = setting(0.1, "held-out share of image ids (hash of image_id)", gt=0, lt=1)
    split_seed: int = setting(0, "seed of that hash")
    classifier: ClassifierSection = setting(ClassifierSection, "the classifier's shape")
    fit_classifier: FitClassifierSection = setting(FitClassifierSection, "Ray Train settings")
