"""The settings of jobs.align (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import setting
from pipeline.decode import DEFAULT_FORMATS
from pipeline.sections import ActorSection, JobSettings


@dataclass
class AlignSection(ActorSection):
    size: int = setting(1024, "output side (256 for the encoder)")
    supersample: int = setting(4, "FFHQ: transform at this many times the size, then Lanczos down")
    face_policy: Literal["largest", "all"] = setting("largest", "align the largest face, or all of them")
    min_score: float = setting(0.9, "detector score a face must reach")
    min_face_px: float = setting(32, "shorter box side a face must reach (else too_small)")
    max_faces: int = setting(16, "cap per image with face_policy=all")
    max_pixels: int = setting(64_000_000, "refuse images declaring more pixels (checked on the header)")
    max_bytes: int = setting(100_000_000, "refuse files bigger than this, from the listing, unread (too_large; "
                                          "0: no cap)")
    formats: list[str] = setting(list(DEFAULT_FORMATS), "image formats decoded (Pillow names); others: "
                                                         "unsupported_format")
    multi_frame: Literal["refuse", "first"] = setting("refuse", "animated / multi-page files: refuse (status "
                                                                "multi_frame) | first (first frame)")
    min_image_side: int = setting(32, "refuse images smaller than this")
    detect_max_side: int | None = setting(1024, "detection runs on a copy downscaled to this longer side "
                                                "(null: full size)")
    mtcnn_min_face: int = setting(20, "MTCNN's pyramid floor (pixels of the detection copy)")
    mtcnn_thresholds: tuple[float, float, float] = setting([0.6, 0.7, 0.7], "MTCNN's P-, R- and O-net score "
                                                                            "thresholds")
    refine_passes: int = setting(1, "re-detect landmarks on the first upright crop (3x steadier quads)")
    png_compress_level: int = setting(1, "crop PNG zlib level 0-9: 1 is ~5x faster than 6 for ~15% larger files")
    decode_batch_size: int = setting(8, "files per hash / decode task batch")
    rows_per_part: int = setting(100_000, "faces rows per Parquet data file (the write stage's batch)")


@dataclass
class Settings(JobSettings):
    input: str | None = setting(None, "URI of the raw photos (folder / prefix)")
    output: str | None = setting(None, "URI of the dataset root (aligned/, faces/, _runs/)")
    retry_failed: bool = setting(False, "also retry permanent failures (decode_error ...); transient ones "
                                        "always are")
    verify: Literal["listing", "hash"] = setting("listing", "how a committed photo is known: listing = by its URI, "
                                                            "size and ETag / mtime, never read; hash = read and "
                                                            "hashed every run (content checks)")
    align: AlignSection = setting(AlignSection, "detection and alignment (AlignFaces actors: batch_size images "
                                                "per call, num_cpus also its torch threads)")
