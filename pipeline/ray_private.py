"""Every use of Ray's private internals, in one place (tests/test_ray_private.py fails on an
installed Ray whose names changed). Ray offers no public way to do either of these:

- end the map-worker actors that a failed execution leaves alive (`release_leftover_actors`):
  Ray Data drops its handles when an execution ends, and an actor lives as long as a handle to
  it does; after a task of the pool failed, a handle stays referenced from the driver (the
  recorded error's traceback), so the actor - restarted after its crash, idle - keeps its CPUs
  / GPUs, and the next pass, on a small cluster, waits for them forever. The state API
  (`ray.util.state.list_actors`) would find them by class name, but it needs the dashboard,
  which a local run leaves off;
- give a dataset its own DataContext (`with_own_context`): derived datasets share their
  parent's context object, so a setting made for one write (tolerating failed blocks) would
  reach every other plan built on the same read.
"""
from __future__ import annotations

import gc
import logging

log = logging.getLogger("stbatch.runner")

MAP_WORKER_PREFIX = "MapWorker("  # the class name Ray Data gives its map actors


def _handle_class_name(handle) -> str:
    return handle._ray_actor_creation_function_descriptor.class_name


def _handle_id(handle):
    return handle._ray_actor_id


def pooled_actor_ids(objects: list) -> set[object]:
    """Ids of the actors that a live Ray Data actor pool (a running execution) holds."""
    from ray.data._internal.execution.operators.actor_pool_map_operator import _ActorPool

    ids: set[object] = set()
    for o in objects:
        if isinstance(o, _ActorPool):
            ids.update(_handle_id(h) for h in list(o._running_actors))
            ids.update(_handle_id(h) for h in list(o._pending_actors.values()))
    return ids


def release_leftover_actors() -> int:
    """End the map-worker actors no live actor pool holds (called between two executions of
    one job); another run in this driver (two jobs at once) has its actors in its pool, and they
    are never touched. Returns how many were ended."""
    import ray
    from ray.actor import ActorHandle

    gc.collect()
    objects = gc.get_objects()
    left = [o for o in objects if issubclass(type(o), ActorHandle)  # (type(): no __class__ lookups)
            and _handle_class_name(o).startswith(MAP_WORKER_PREFIX)]
    if not left:
        return 0
    in_use = pooled_actor_ids(objects)
    ended = 0
    for h in left:
        if _handle_id(h) not in in_use:
            ray.kill(h, no_restart=True)
            ended += 1
    if ended:
        log.info("ended %d actor(s) left by the finished pass", ended)
    return ended


def with_own_context(ds):
    """`ds` with a copy of its DataContext, so settings made on `.context` stay with it."""
    from ray.data import Dataset

    return Dataset.copy(ds, _deep_copy=True)
