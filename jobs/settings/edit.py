"""The settings of jobs.edit (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import setting
from pipeline.edit_sections import EditSection, SweepSection
from pipeline.sections import (
    JobSettings,
    MetricWeights,
    NamedModelSection,
    PasteBackSection,
)

__all__ = ["EditSection", "Settings", "SweepSection"]


@dataclass
class Settings(JobSettings):
    latents: str | None = setting(None, "dataset root with a committed latents table")
    requests: str | None = setting(None, "Parquet/CSV of edit requests; null: use `sweep`")
    output: str | None = setting(None, "edits/ table, edit_images/, edit_sources/, _runs/")
    model: NamedModelSection = setting(NamedModelSection, "the inversion model that made the codes (renders edits)")
    classifier: str | None = setting(None, "dataset root with committed models (or a classifier file + "
                                           "classifier_sha256)")
    classifier_run: str | None = setting(None, "that root's classifier of this run (default: the newest committed)")
    classifier_sha256: str | None = setting(None, "... or with this sha256 (required for a file)")
    editors: str | dict[str, str] | None = setting({}, "dataset root (each attribute's newest committed editor), "
                                                       "or {attribute: ROOT|FILE}")
    editors_run: str | None = setting(None, "the editors of this run of the root")
    editors_sha256: dict[str, str] = setting({}, "{attribute: sha256}: required for an editor given as a file")
    sweep: SweepSection = setting(SweepSection, "with requests=null: the cross product of these")
    metrics: bool = setting(True, "ID similarity + LPIPS of each edit against the source reconstruction")
    metric_weights: MetricWeights = setting(MetricWeights, "backbones of LPIPS and ID similarity")
    retry_failed: bool = setting(False, "also retry permanent failures (bad_request ...); transient ones always are")
    paste_back: PasteBackSection = setting(PasteBackSection, "paste each edit into its whole photo: true (the defaults "
                                                         "below) or the section", switch=True)
    direction_prefixes: list[str] = setting([], "where direction_uri may point besides `output` (URI prefixes, whole "
                                                "path components)")
    # a direction is [D] or [n_latent, D] floats: 36 KiB at 18 x 512
    direction_max_bytes: int = setting(1 << 20, "a larger direction file is a bad_request (size checked "
                                                "before reading)", ge=1)
    direction: str | None = setting(None, "a published direction by name (pca_0, Smiling: jobs.fit_directions): a "
                                          "sweep of it over sweep.image_ids at sweep.strengths (requests=null)")
    directions: str | None = setting(None, "dataset root whose committed directions `direction` names (default: "
                                           "latents)")
    directions_run: str | None = setting(None, "that root's direction of this run (default: the newest committed)")
    edit: EditSection = setting(EditSection, "the edit actors (batch_size: requests per model call)")

    def problems(self) -> list[str]:
        out = super().problems()
        if self.direction and self.requests:
            out.append("direction: direction=NAME makes a sweep over the faces: set requests=null (or give "
                       "direction_uri in the requests)")
        return out
