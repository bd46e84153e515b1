"""The settings of jobs.edit (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import Section, setting
from pipeline.sections import (
    JobSettings,
    MetricWeights,
    ModelActorSection,
    NamedModelSection,
    PasteBackSection,
)


@dataclass
class SweepSection(Section):
    image_ids: str | list[str] = setting("all", "all ok faces of the latents table, or a list of image ids (face 0)")
    kinds: list[Literal["label", "reference", "direction"]] = setting(["label"], "edit kinds")
    attributes: list[str] = setting([], "attributes (label and reference edits)")
    strengths: list[float] = setting([1.0], "edit strengths")
    targets: list[int] = setting([1], "label edits: 1 add, 0 remove")
    order: Literal[1, 2] = setting(1, "label edits: gradient order")
    reference_image_ids: list[str] = setting([], "reference edits (face 0)")
    direction_uris: list[str] = setting([], "direction edits (.npy/.pt files)")


@dataclass
class EditSection(ModelActorSection):
    join_partitions: int | Literal["auto"] | None = setting("auto", "hash partitions of the request/code joins "
                                                                    "(auto: ~2000 requests each)")


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
    direction_max_bytes: int = setting(1 << 20, "a larger direction file is a bad_request (size checked "
                                                            "before reading)")
    direction: str | None = setting(None, "a published direction by name (pca_0, Smiling: jobs.fit_directions): a "
                                          "sweep of it over sweep.image_ids at sweep.strengths (requests=null)")
    directions: str | None = setting(None, "dataset root whose committed directions `direction` names (default: "
                                           "latents)")
    directions_run: str | None = setting(None, "that root's direction of this run (default: the newest committed)")
    edit: EditSection = setting(EditSection, "the edit actors (batch_size: requests per model call)")
