"""What a report section is made of, as data: paragraphs, tables, banners, image rows, charts.

A section's builder (`pipeline.report_sections`) returns a list of these; the templates in
`pipeline/report_templates/` own every tag and class of the page. Text here is plain text
(the page escapes it and redacts the secrets of any URI in it); images are `Thumb`s, charts are
`pipeline.report_charts` charts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

from pipeline.report_charts import Chart
from pipeline.report_images import Thumb


@dataclass
class Para:
    text: str
    kind: str = "para"


@dataclass
class Heading:
    text: str
    kind: str = "heading"


@dataclass
class Note:
    """A muted line: something absent, or how a figure was made."""
    text: str
    kind: str = "note"


@dataclass
class Banner:
    text: str
    level: Literal["warn", "error", "info"] = "warn"
    kind: str = "banner"


@dataclass
class Labels:
    title: str
    labels: Sequence[str]
    kind: str = "labels"


@dataclass
class Flag:
    """Table cell text shown as an alert (a broken rule, a run not committed)."""
    text: str
    kind: str = "flag"


@dataclass
class Pre:
    """Table cell text whose line breaks matter (error messages)."""
    text: str
    kind: str = "pre"


@dataclass
class Table:
    """Rows of cells: a value (numeric columns are formatted as numbers), a `Flag`, a `Pre`, or a
    list of those pieces shown one after the other."""
    headers: Sequence[str]
    rows: Sequence[Sequence]
    numeric: Sequence[bool] = ()
    row_classes: Sequence[str] = ()
    kind: str = "table"

    def is_numeric(self, j: int) -> bool:
        return j < len(self.numeric) and bool(self.numeric[j])

    def row_class(self, i: int) -> str:
        return self.row_classes[i] if i < len(self.row_classes) and self.row_classes[i] else ""


@dataclass
class Grid:
    """Images side by side, wrapping."""
    thumbs: Sequence[Thumb]
    kind: str = "grid"


@dataclass
class ImageRow:
    """A labelled row of images (input | reconstruction, before | after); `more` says how many
    were left out."""
    label: str
    thumbs: Sequence[Thumb]
    title: str = ""
    more: str = ""
    kind: str = "imagerow"


@dataclass
class Charts:
    charts: Sequence[Chart]
    kind: str = "charts"


@dataclass
class Items:
    """A titled bullet list."""
    title: str
    items: Sequence[str]
    kind: str = "items"


Block = Para | Heading | Note | Banner | Labels | Table | Grid | ImageRow | Charts | Items


@dataclass
class Section:
    anchor: str
    title: str
    blocks: list = field(default_factory=list)
