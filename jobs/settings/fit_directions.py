"""The settings of jobs.fit_directions (see its module doc), declared once; importing this needs neither
torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import setting
from pipeline.sections import JobSettings


@dataclass
class Settings(JobSettings):
    latents: str | None = setting(None, "dataset root with a committed latents table")
    output: str | None = setting(None, "model_files/direction/<run>/, the models/ table, _runs/ (default: latents)")
    components: int = setting(10, "PCA directions pca_0 ... (most variance first)", ge=0)
    attributes: str | None = setting(None, "Parquet/CSV of labels (as jobs.fit_classifier's): one boundary per "
                                           "attribute; null: PCA only")
    attributes_list: list[str] | None = setting(None, "choose the attributes (default: the table's numeric columns)")
    min_class: int = setting(10, "an attribute needs this many labelled codes in each class", ge=1)
