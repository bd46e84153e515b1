"""The settings of jobs.fit_editor (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import setting
from pipeline.sections import JobSettings, ModelSection
from pipeline.train_sections import (
    EditorSection,
    EvalSection,
    FitEditorSection,
    LossSection,
    SampleSection,
)

__all__ = ["EditorSection", "EvalSection", "FitEditorSection", "LossSection", "SampleSection", "Settings"]


@dataclass
class Settings(JobSettings):
    classifier: str | None = setting(None, "dataset root of jobs.fit_classifier (or a classifier file + its sha256)")
    classifier_run: str | None = setting(None, "that root's classifier of this run (default: the newest committed)")
    classifier_sha256: str | None = setting(None, "... or with this sha256 (required for a file)")
    output: str | None = setting(None, "model_files/editor/<run>/editor_<attribute>.pt, models/ table, _runs/")
    attributes: list[str] | str | None = setting(None, "[Smiling, ...]: one editor each (names known to the "
                                                       "classifier)")
    latents: str | None = setting(None, "dataset root with a committed latents table ...")
    val_fraction: float = setting(0.05, "... held-out share of its image ids (for the figures)", ge=0, lt=1)
    split_seed: int = setting(0, "seed of that split")
    model: ModelSection = setting(ModelSection, "... or the inversion model whose mapping net samples codes")
    sample: SampleSection = setting(SampleSection, "sampled codes (without latents)")
    editor: EditorSection = setting(EditorSection, "the edit transformer's shape")
    loss: LossSection = setting(LossSection, "loss weights")
    fit_editor: FitEditorSection = setting(FitEditorSection, "Ray Train settings")
    eval: EvalSection = setting(EvalSection, "the before / after figures")

    def problems(self) -> list[str]:
        out = super().problems()
        if not self.latents and self.sample.n and not (self.model.checkpoint or self.model.preset):
            out.append("model.checkpoint: sampling codes (sample.n, without latents) needs the inversion model: "
                       "set model.checkpoint=URI")
        return out

    def attribute_names(self) -> list[str]:
        """`attributes` as a list (one name may be given alone)."""
        return [self.attributes] if isinstance(self.attributes, str) else list(self.attributes or [])
