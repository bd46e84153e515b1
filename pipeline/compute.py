"""How a job asks Ray for resources: actor pools, GPUs per actor, and Ray Train trainers."""
from __future__ import annotations

import math
from typing import Any

from pipeline.sections import ActorSection, TrainSection


def cluster_has_gpu() -> bool:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) >= 1


def gpus_per_actor(value: float | str) -> float:
    """`auto`: one GPU per actor when the cluster has GPUs, none otherwise."""
    if value == "auto":
        return 1.0 if cluster_has_gpu() else 0.0
    return float(value)


def use_gpu(value: bool | str) -> bool:
    """A `use_gpu` setting of a training job: `auto` = whether the cluster has GPUs."""
    return cluster_has_gpu() if value == "auto" else bool(value)


def fit(loop, loop_config: dict, datasets: dict, t: TrainSection, name: str):
    """Run `loop` on a TorchTrainer (data parallel: `train` split across `t.num_workers`
    workers, other datasets whole to each); returns rank 0's return value, raising the
    training error if there is one. `t.ray_storage`: Ray Train's run folder (shared storage
    on a multi-node cluster)."""
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rc: dict[str, Any] = {"name": name}
    if t.ray_storage:
        rc["storage_path"] = t.ray_storage
    trainer = TorchTrainer(loop, train_loop_config=loop_config,
                           scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu(t.use_gpu)),
                           datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]),
                           run_config=RunConfig(**rc))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result.return_value


class NoRoomForTasks(RuntimeError):
    """An actor pool would hold the CPUs its stage's read, preprocess and write tasks need: they
    could never be scheduled, and the run would wait forever."""


def check_room_for_tasks(concurrency: int | tuple[int, int], num_cpus: float, stage: str) -> None:
    """Refuse an actor pool whose smallest size leaves less than one CPU of the cluster free.

    Ray Data starts a pool's `min_size` actors before its tasks run, and an actor keeps its CPUs
    while it waits for input: when the actors leave no whole CPU, the one-CPU read tasks that
    would feed them can never be scheduled (ray-project/ray#44687) and the run hangs without a
    word. Seen on a two-node cluster whose worker node was removed: the next run's actor took
    the head's only CPU and its first read task waited for ever. A cluster with no CPU at all is
    left alone (an autoscaler is about to add nodes; Ray waits for them)."""
    import ray

    size = concurrency[0] if isinstance(concurrency, tuple) else concurrency
    held = size * num_cpus
    total = float(ray.cluster_resources().get("CPU", 0))
    if total > 0 and total - held < 1:
        raise NoRoomForTasks(
            f"{stage}: {size} actor(s) x {stage}.num_cpus={num_cpus:g} would hold {held:g} of the cluster's "
            f"{total:g} CPU(s), leaving no CPU for the read and write tasks that feed them: the run would wait "
            f"forever. Lower {stage}.num_cpus or {stage}.concurrency, or add CPUs (a node) to the cluster. "
            f"Nothing was committed.")


def actor_pool(concurrency: int | tuple[int, int], isolating: bool = False):
    """An int is a fixed pool; `[min, max]` autoscales between the two. `isolating` (a poison
    isolation pass of the runner): one task at a time per actor, so an actor that dies takes
    only the batch it was running with it, never the batches queued behind it; otherwise a
    good row queued behind a poison one would fail with it on every attempt and end as a
    `worker_crash` it did not cause."""
    import ray

    kw = {"max_tasks_in_flight_per_actor": 1} if isolating else {}
    if isinstance(concurrency, tuple):
        return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1], **kw)
    return ray.data.ActorPoolStrategy(size=concurrency, **kw)


def actor_stage(section: ActorSection, n_rows: int, isolating: bool = False, stage: str = "actor") -> tuple[dict, str]:
    """(the `map_batches` keywords of an actor stage: pool, CPUs, GPUs, retry bounds; the device
    its actors run on). Every job's model stage asks for resources this one way. `stage`: the
    settings section's name, for the refusal when the pool would starve its own feeding tasks
    (check_room_for_tasks)."""
    check_room_for_tasks(section.concurrency, section.num_cpus, stage)
    num_gpus = gpus_per_actor(section.num_gpus)
    kw: dict[str, Any] = {"compute": actor_pool(section.concurrency, isolating=isolating),
                          "num_cpus": section.num_cpus, **retry_args(section, n_rows)}
    if num_gpus > 0:
        kw["num_gpus"] = num_gpus
    return kw, device_for(section.device, num_gpus)


def retry_args(section: ActorSection, n_rows: int) -> dict:
    """`map_batches` keywords that bound an actor stage's fault tolerance (Ray Data's default is
    unbounded: max_restarts=-1, max_task_retries=-1, so a face that kills its worker every time
    hangs the job). `max_task_retries`: times a task is run again after its actor died; then the
    task fails and the runner isolates its rows (pipeline.runner, `write(rerun=...)`).
    `max_restarts`: restarts per actor; `auto` = one per attempt of every task of the pass
    (n_rows x (max_task_retries + 1)), finite and never fewer than the crashes the pass can meet:
    an actor past its restarts stays dead in Ray Data's pool, which then waits forever."""
    retries = section.max_task_retries
    restarts = section.max_restarts
    if restarts == "auto":
        restarts = max(1, n_rows) * (retries + 1)
    return {"max_restarts": restarts, "max_task_retries": retries}


def join_partitions(n_rows: int) -> int:
    """Hash partitions of a join over `n_rows` rows: one per 2,000 rows, from 1 to 64 (enough
    blocks to spread the join without many tiny ones)."""
    return max(1, min(64, math.ceil(n_rows / 2000)))


def device_for(device: str, num_gpus: float) -> str:
    return device if device != "auto" else ("cuda" if num_gpus > 0 else "cpu")
