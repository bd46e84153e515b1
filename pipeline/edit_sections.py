"""The settings sections that the edit job's pipeline stages read (pipeline.edit_requests expands
`SweepSection`, pipeline.edit_stage's actor runs on `EditSection`), declared once here so that
a stage can name its section without importing jobs; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import Section, setting
from pipeline.sections import ModelActorSection


@dataclass
class SweepSection(Section):
    image_ids: str | list[str] = setting("all", "all ok faces of the latents table, or a list of image ids (face 0)")
    kinds: list[Literal["label", "reference", "direction"]] = setting(["label"], "edit kinds")
    attributes: list[str] = setting([], "attributes (label and reference edits)")
    strengths: list[float] = setting([1.0], "edit strengths")
    targets: list[int] = setting([1], "label edits: 1 add, 0 remove", ge=0, le=1)
    order: Literal[1, 2] = setting(1, "label edits: gradient order")
    reference_image_ids: list[str] = setting([], "reference edits (face 0)")
    direction_uris: list[str] = setting([], "direction edits (.npy/.pt files)")


@dataclass
class EditSection(ModelActorSection):
    join_partitions: int | Literal["auto"] | None = setting("auto", "hash partitions of the request/code joins "
                                                                    "(auto: ~2000 requests each)", ge=1)
