"""Settings sections that several jobs share, declared once (see jobs.settings).

A job's settings class derives from `JobSettings` (ray + progress); a job whose section needs
other defaults or more keys subclasses one of these in its own module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jobs.settings import setting

Amp = Literal["auto", "none", "bf16", "fp16"]


@dataclass
class RaySection:
    address: str | None = setting(None, "null: a new local Ray; auto: the running cluster "
                                        "(ray job submit sets RAY_ADDRESS)")
    num_cpus: int | None = setting(None, "CPUs of a local Ray (null: all cores)")
    num_gpus: int | None = setting(None, "GPUs of a local Ray (null: all it finds)")
    dashboard: bool | Literal["auto"] = setting("auto", "a local Ray's dashboard (127.0.0.1:8265): auto = only for "
                                                        "the jobs that train (Ray Train watches its runs through "
                                                        "it); without it the model gets the CPU it would use")


@dataclass
class JobSettings:
    ray: RaySection = setting(RaySection, "where the job runs")
    progress: bool = setting(True, "Ray Data progress bars on stderr (--quiet sets false)")
    verbose: bool = setting(False, "Ray's own logs on the console too (default: a log file whose path is printed; "
                                   "--verbose sets true)")


@dataclass
class ModelSection:
    checkpoint: str | None = setting(None, "URI of the Style Transformer checkpoint (official layout)")
    sha256: str | None = setting(None, "verify the checkpoint file against this sha256 when set")
    preset: str | None = setting(None, "without checkpoint: a seeded random model of this preset (tests)")
    seed: int = setting(0, "seed of that random model")


@dataclass
class NamedModelSection(ModelSection):
    name: str | None = setting(None, "model name written to the table (default: the file name)")


@dataclass
class MetricWeights:
    lpips_alexnet: str | None = setting(None, "torchvision AlexNet state_dict URI (LPIPS backbone)")
    facenet: str | None = setting(None, "facenet-pytorch VGGFace2 InceptionResnetV1 state_dict URI (ID similarity)")
    allow_random_init: bool = setting(False, "tests only: seeded random backbones, labelled in every row")
    skip_missing: bool = setting(False, "leave a metric without weights uncomputed (null, labelled)")


@dataclass
class ActorSection:
    """The Ray Data actor stage of a job: resources, pool size and the write stage's batching."""
    batch_size: int = setting(8, "items per actor call")
    concurrency: int | tuple[int, int] = setting(1, "actors: a fixed number, or [min, max] to autoscale")
    num_gpus: float | Literal["auto"] = setting("auto", "GPUs per actor: auto = 1 when the cluster has GPUs, else 0")
    num_cpus: float = setting(1, "CPUs per actor (Ray's accounting)")
    device: str = setting("auto", "auto | cpu | cuda (auto: cuda when the actor has a GPU)")
    rows_per_part: int = setting(20_000, "table rows per Parquet data file (the write stage's batch)")
    log_every_s: float = setting(30, "seconds between progress lines")
    max_task_retries: int = setting(1, "times an actor task (one or more batches) is run again after its actor "
                                       "died (crash, OOM); then its rows run again in passes of halved batch "
                                       "size, and a row that still crashes alone is a worker_crash row")
    max_restarts: int | Literal["auto"] = setting("auto", "restarts per actor and pass; auto: rows x "
                                                          "(max_task_retries + 1), enough for every crash a pass "
                                                          "can meet; a smaller number can leave the pool with no "
                                                          "live actor, and the job then waits forever")


@dataclass
class ModelActorSection(ActorSection):
    """An actor stage that runs the Style Transformer."""
    amp: Amp = setting("auto", "autocast: auto (bf16 on CUDA, fp32 on CPU) | none | bf16 | fp16")


@dataclass
class CropActorSection(ModelActorSection):
    """A model actor fed aligned crops by read / preprocess tasks (invert, evaluate)."""
    load_batch_size: int = setting(16, "crops per read / preprocess task")
    max_pixels: int = setting(64_000_000, "refuse crops declaring more pixels")


@dataclass
class TrainSection:
    """Ray Train settings every training job has (each job sets its own defaults and adds keys)."""
    batch_size: int = setting(8, "codes or images per step and worker")
    lr: float = setting(1e-4, "Adam learning rate")
    seed: int = setting(0, "seed of the initial weights and the shuffles")
    num_workers: int = setting(1, "Ray Train workers (data parallel)")
    use_gpu: bool | Literal["auto"] = setting("auto", "train on GPUs: auto = when the cluster has GPUs")
    torch_threads: int = setting(0, "intra-op threads per worker (0: torch's default)")
    log_every: int = setting(10, "steps (epochs for the classifier) between log lines")
    ray_storage: str | None = setting(None, "Ray Train's run folder (shared storage on a multi-node cluster)")


@dataclass
class CodeTrainSection(TrainSection):
    """Training on W+ codes read through Ray Data (jobs.fit_classifier, jobs.fit_editor)."""
    weight_decay: float = setting(0.0, "Adam weight decay")
    shuffle_buffer: int = setting(4096, "rows in the local shuffle buffer of each worker (0: no shuffle)")
    materialize: bool = setting(True, "keep the prepared codes in the object store across epochs")


@dataclass
class PasteBackSection:
    """The paste-back stage (pipeline.paste_stage) of jobs.edit and jobs.invert: given as a
    section, it is on unless `enabled: false`; `paste_back=true` is this with every default."""
    enabled: bool = setting(True, "paste the crops back into their photos (a section given turns it on)")
    format: Literal["jpeg", "png"] = setting("jpeg", "composite file format (png: lossless, outside pixels "
                                                     "bit-identical to the upright photo)")
    quality: int = setting(95, "JPEG quality, 1-100")
    group: Literal["face", "photo"] = setting("face", "one composite per face, or per photo (its faces edited "
                                                      "with the same request pasted together)")
    faces: str | None = setting(None, "dataset root with the photos' committed faces table (null: the job's own "
                                      "input root)")
    feather: float = setting(0.25, "mask feather, fraction of the face ellipse's radius (0-1]")
    radii: tuple[float, float] = setting([0.8, 0.9], "face ellipse radii, fractions of the quad's half side (0-1]")
    batch_size: int = setting(16, "rows per paste task (group=face; rows of one photo in a task share one read)")
    num_cpus: float = setting(1, "CPUs per paste task")
    max_pixels: int = setting(64_000_000, "refuse photos declaring more pixels")
