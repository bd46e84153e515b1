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


@dataclass
class JobSettings:
    ray: RaySection = setting(RaySection, "where the job runs")
    progress: bool = setting(True, "Ray Data progress bars on stderr (--quiet sets false)")


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


@dataclass
class ModelActorSection(ActorSection):
    """An actor stage that runs the Style Transformer."""
    amp: Amp = setting("auto", "autocast: auto (bf16 on CUDA, fp32 on CPU) | none | bf16 | fp16")


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
