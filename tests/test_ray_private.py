"""pipeline.ray_private holds every use of Ray's private internals: these tests fail on an
installed Ray whose private names changed, before a poison-input run would hang on it (the
behaviour itself is covered by tests/test_poison.py: a pass after a crash gets its CPUs)."""
from __future__ import annotations

import inspect


def test_private_names_exist_on_the_installed_ray():
    from ray.actor import ActorHandle
    from ray.data import Dataset
    from ray.data._internal.execution.operators import actor_pool_map_operator as apm

    pool = apm._ActorPool
    src = inspect.getsource(pool)
    assert "self._running_actors" in src and "self._pending_actors" in src
    assert "_deep_copy" in inspect.signature(Dataset.copy).parameters
    handle_src = inspect.getsource(ActorHandle)
    assert "_ray_actor_creation_function_descriptor" in handle_src and "_ray_actor_id" in handle_src
