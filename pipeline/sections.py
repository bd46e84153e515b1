"""Settings sections that several jobs share, declared once (see pipeline.config).

A job's settings class derives from `JobSettings` (ray + progress); a job whose section needs
other defaults or more keys subclasses one of these in its own module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pipeline.config import Section, setting
from pipeline.decode import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, format_problems

Amp = Literal["auto", "none", "bf16", "fp16"]


def concurrency_problems(concurrency: int | tuple[int, int]) -> list[str]:
    """The rule of every pool size setting: `[min, max]` with min <= max."""
    if isinstance(concurrency, tuple) and concurrency[0] > concurrency[1]:
        return [f"concurrency: [min, max] needs min <= max, got {list(concurrency)}"]
    return []


@dataclass
class RaySection(Section):
    address: str | None = setting(None, "null: a new local Ray; auto: the running cluster "
                                        "(ray job submit sets RAY_ADDRESS)")
    num_cpus: int | None = setting(None, "CPUs of a local Ray (null: all cores)", ge=1)
    num_gpus: int | None = setting(None, "GPUs of a local Ray (null: all it finds)", ge=0)
    object_store_memory: int | None = setting(None, "bytes of a local Ray's object store (null: Ray's default, "
                                                    "30% of memory)", ge=1)
    spill_disk_limit: float = setting(0.8, "a local Ray spills its object store to disk only while the disk is "
                                           "less full than this fraction; past it the run stops with a clear "
                                           "error, nothing committed, instead of filling the disk", gt=0, le=1)
    dashboard: bool | Literal["auto"] = setting("auto", "a local Ray's dashboard (127.0.0.1:8265): auto = only for "
                                                        "the jobs that train (Ray Train watches its runs through "
                                                        "it); without it the model gets the CPU it would use")


@dataclass
class JobSettings(Section):
    ray: RaySection = setting(RaySection, "where the job runs")
    progress: bool = setting(True, "Ray Data progress bars on stderr (--quiet sets false)")
    verbose: bool = setting(False, "Ray's own logs on the console too (default: a log file whose path is printed; "
                                   "--verbose sets true)")


@dataclass
class ModelSection(Section):
    checkpoint: str | None = setting(None, "URI of the Style Transformer checkpoint (official layout)")
    sha256: str | None = setting(None, "verify the checkpoint file against this sha256 when set")
    preset: str | None = setting(None, "without checkpoint: a seeded random model of this preset (tests)")
    seed: int = setting(0, "seed of that random model")


@dataclass
class NamedModelSection(ModelSection):
    name: str | None = setting(None, "model name written to the table (default: the file name)")


@dataclass
class MetricWeights(Section):
    lpips_alexnet: str | None = setting(None, "torchvision AlexNet state_dict URI (LPIPS backbone)")
    lpips_alexnet_sha256: str | None = setting(None, "verify that file against this sha256 when set")
    facenet: str | None = setting(None, "facenet-pytorch VGGFace2 InceptionResnetV1 state_dict URI (ID similarity)")
    facenet_sha256: str | None = setting(None, "verify that file against this sha256 when set")
    allow_random_init: bool = setting(False, "tests only: seeded random backbones, labelled in every row")
    skip_missing: bool = setting(False, "leave a metric without weights uncomputed (null, labelled)")


@dataclass
class ActorSection(Section):
    """The Ray Data actor stage of a job: resources, pool size and the write stage's batching."""
    batch_size: int = setting(8, "items per actor call", ge=1)
    concurrency: int | tuple[int, int] = setting(1, "actors: a fixed number, or [min, max] to autoscale", ge=1)
    num_gpus: float | Literal["auto"] = setting("auto", "GPUs per actor: auto = 1 when the cluster has GPUs, else 0",
                                                 ge=0)
    num_cpus: float = setting(1, "CPUs per actor (Ray's accounting)", ge=0)
    device: str = setting("auto", "auto | cpu | cuda (auto: cuda when the actor has a GPU)")
    rows_per_part: int = setting(20_000, "table rows per Parquet data file (the write stage's batch)", ge=1)
    log_every_s: float = setting(30, "seconds between progress lines", gt=0)
    max_task_retries: int = setting(1, "times an actor task (one or more batches) is run again after its actor "
                                       "died (crash, OOM); then its rows run again in passes of halved batch "
                                       "size, and a row that still crashes alone is a worker_crash row", ge=0)
    max_restarts: int | Literal["auto"] = setting("auto", "restarts per actor and pass; auto: rows x "
                                                          "(max_task_retries + 1), enough for every crash a pass "
                                                          "can meet; a smaller number can leave the pool with no "
                                                          "live actor, and the job then waits forever", ge=1)

    def problems(self) -> list[str]:
        return concurrency_problems(self.concurrency)

    @property
    def threads(self) -> int:
        """Torch intra-op threads of one actor: the CPUs Ray reserved for it (at least one)."""
        return max(1, math.floor(self.num_cpus))


@dataclass
class ModelActorSection(ActorSection):
    """An actor stage that runs the Style Transformer."""
    amp: Amp = setting("auto", "autocast: auto (bf16 on CUDA, fp32 on CPU) | none | bf16 | fp16")


@dataclass
class CropActorSection(ModelActorSection):
    """A model actor fed aligned crops by read / preprocess tasks (invert, evaluate)."""
    load_batch_size: int = setting(16, "crops per read / preprocess task", ge=1)
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "refuse crops declaring more pixels", ge=1)


@dataclass
class AlignSection(ActorSection):
    """The align job's decode tasks and AlignFaces actors (pipeline.align_stage)."""
    size: int = setting(1024, "output side (256 for the encoder)", ge=1)
    supersample: int = setting(4, "FFHQ: transform at this many times the size, then Lanczos down", ge=1)
    face_policy: Literal["largest", "all"] = setting("largest", "align the largest face, or all of them")
    min_score: float = setting(0.9, "detector score a face must reach", ge=0, le=1)
    min_face_px: float = setting(32, "shorter box side a face must reach (else too_small)", ge=0)
    max_faces: int = setting(16, "cap per image with face_policy=all", ge=1)
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "refuse images declaring more pixels (checked on the header)", ge=1)
    max_bytes: int = setting(100_000_000, "refuse files bigger than this, from the listing, unread (too_large; "
                                          "0: no cap)", ge=0)
    formats: list[str] = setting(list(DEFAULT_FORMATS), "image formats decoded (Pillow names); others: "
                                                         "unsupported_format")
    multi_frame: Literal["refuse", "first"] = setting("refuse", "animated / multi-page files: refuse (status "
                                                                "multi_frame) | first (first frame)")
    min_image_side: int = setting(DEFAULT_MIN_SIDE, "refuse images smaller than this", ge=1)
    detect_max_side: int | None = setting(1024, "detection runs on a copy downscaled to this longer side "
                                                "(null: full size)", ge=1)
    mtcnn_min_face: int = setting(20, "MTCNN's pyramid floor (pixels of the detection copy)", ge=1)
    mtcnn_thresholds: tuple[float, float, float] = setting([0.6, 0.7, 0.7], "MTCNN's P-, R- and O-net score "
                                                                            "thresholds", ge=0, le=1)
    refine_passes: int = setting(1, "re-detect landmarks on the first upright crop (3x steadier quads)", ge=0)
    png_compress_level: int = setting(1, "crop PNG zlib level: 1 is ~5x faster than 6 for ~15% larger files",
                                      ge=0, le=9)
    decode_batch_size: int = setting(8, "files per hash / decode task batch", ge=1)
    rows_per_part: int = setting(100_000, "faces rows per Parquet data file (the write stage's batch)", ge=1)

    def problems(self) -> list[str]:
        return super().problems() + format_problems(self.formats)


@dataclass
class InvertSection(CropActorSection):
    """The invert job's read / decode tasks and InvertBatch actors (pipeline.invert_stage)."""
    torch_threads: int = setting(0, "intra-op threads per actor on the CPU (0: num_cpus)", ge=0)
    max_bytes: int = setting(20_000_000, "plain folder: refuse files bigger than this, unread (too_large; 0: no cap)",
                             ge=0)
    formats: list[str] = setting(list(DEFAULT_FORMATS), "image formats decoded (Pillow names); others: "
                                                         "unsupported_format")
    multi_frame: Literal["refuse", "first"] = setting("refuse", "animated / multi-page files: refuse "
                                                                   "(status multi_frame) | first (first frame)")

    def problems(self) -> list[str]:
        return super().problems() + format_problems(self.formats)

    @property
    def threads(self) -> int:
        return self.torch_threads or super().threads


@dataclass
class TrainSection(Section):
    """Ray Train settings every training job has (each job sets its own defaults and adds keys)."""
    batch_size: int = setting(8, "codes or images per step and worker", ge=1)
    lr: float = setting(1e-4, "Adam learning rate", gt=0)
    seed: int = setting(0, "seed of the initial weights and the shuffles")
    num_workers: int = setting(1, "Ray Train workers (data parallel)", ge=1)
    use_gpu: bool | Literal["auto"] = setting("auto", "train on GPUs: auto = when the cluster has GPUs")
    torch_threads: int = setting(0, "intra-op threads per worker (0: torch's default)", ge=0)
    log_every: int = setting(10, "steps (epochs for the classifier) between log lines", ge=1)
    ray_storage: str | None = setting(None, "Ray Train's run folder (shared storage on a multi-node cluster)")


@dataclass
class CodeTrainSection(TrainSection):
    """Training on W+ codes read through Ray Data (jobs.fit_classifier, jobs.fit_editor)."""
    weight_decay: float = setting(0.0, "Adam weight decay", ge=0)
    shuffle_buffer: int = setting(4096, "rows in the local shuffle buffer of each worker (0: no shuffle)", ge=0)
    materialize: bool = setting(True, "keep the prepared codes in the object store across epochs")


@dataclass
class PasteBackSection(Section):
    """The paste-back stage (pipeline.paste_stage) of jobs.edit and jobs.invert: given as a
    section, it is on unless `enabled: false`; `paste_back=true` is this with every default."""
    enabled: bool = setting(True, "paste the crops back into their photos (a section given turns it on)")
    format: Literal["jpeg", "png"] = setting("jpeg", "composite file format (png: lossless, outside pixels "
                                                     "bit-identical to the upright photo)")
    quality: int = setting(95, "JPEG quality", ge=1, le=100)
    group: Literal["face", "photo"] = setting("face", "one composite per face, or per photo (its faces edited "
                                                      "with the same request pasted together)")
    faces: str | None = setting(None, "dataset root with the photos' committed faces table (null: the job's own "
                                      "input root)")
    feather: float = setting(0.25, "mask feather, fraction of the face ellipse's radius", gt=0, le=1)
    radii: tuple[float, float] = setting([0.8, 0.9], "face ellipse radii, fractions of the quad's half side",
                                                gt=0, le=1)
    batch_size: int = setting(16, "rows per paste task (group=face; rows of one photo in a task share one read)",
                                 ge=1)
    num_cpus: float = setting(1, "CPUs per paste task", ge=0)
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "refuse photos declaring more pixels", ge=1)


@dataclass
class ScoreSection(ModelActorSection):
    """The scoring actors of jobs.score (pipeline.score_stage.ScoreBatch)."""
    batch_size: int = setting(1024, "codes per classifier call", ge=1)


@dataclass
class ReportSection(Section):
    """What the dataset report shows (jobs.report; pipeline.report_page builds the page from it)."""
    title: str | None = setting(None, "page title (default: \"Dataset report: <input>\")")
    max_images: int = setting(16, "crops / input|reconstruction pairs / edited faces shown", ge=0)
    max_edits_per_image: int = setting(8, "edits shown per source face", ge=0)
    thumb_px: int = setting(128, "longer side of embedded thumbnails", ge=1)
    thumb_format: Literal["png", "jpeg"] = setting("png", "thumbnail format (jpeg: smaller)")
    max_failed: int = setting(50, "failed inputs listed with their error text", ge=0)
    max_wplus_rows: int | None = setting(2000, "ok W+ codes streamed for the per-layer norm plot; null or 0: every "
                                               "committed code, in Ray Data", ge=0)
    bins: int = setting(20, "histogram bins", ge=1)
    max_train_grids: int = setting(3, "newest train/grids/*.png embedded", ge=0)
    grid_px: int = setting(768, "longer side of an embedded training grid", ge=1)
