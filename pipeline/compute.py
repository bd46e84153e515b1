"""How a job's stage asks Ray for resources: actor pools and GPUs per actor from the config."""
from __future__ import annotations


def gpus_per_actor(value) -> float:
    """`auto`: one GPU per actor when the cluster has GPUs, none otherwise."""
    if value in (None, "auto"):
        import ray

        return 1.0 if float(ray.cluster_resources().get("GPU", 0)) >= 1 else 0.0
    return float(value)


def actor_pool(concurrency):
    """An int is a fixed pool; `[min, max]` autoscales between the two."""
    import ray

    if isinstance(concurrency, (list, tuple)):
        return ray.data.ActorPoolStrategy(min_size=int(concurrency[0]), max_size=int(concurrency[1]))
    return ray.data.ActorPoolStrategy(size=int(concurrency))


def device_for(device: str, num_gpus: float) -> str:
    return device if device not in (None, "auto") else ("cuda" if num_gpus > 0 else "cpu")
