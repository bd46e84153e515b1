"""Bounded retries and poison isolation: a face (or an edit request) that kills its worker is
found and failed alone.

The fault is injected from here: a subclass of the job's actor stage (inversion, edit), defined
in this test and handed to `jobs.invert.run(actor=...)` / `jobs.edit.run(actor=...)`, that kills
its own process (os._exit, as a native crash or the OOM killer would) on a batch holding a
chosen input.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs import edit, invert
from jobs.cli import load_config
from pipeline import delta
from pipeline.compute import NoRoomForTasks, actor_stage, retry_args
from pipeline.decode import image_id
from pipeline.edit_stage import EditBatch
from pipeline.invert_stage import InvertBatch
from pipeline.sections import ActorSection
from tests.conftest import write_crops
from tests.editing_data import D, write_latents


def crashing_stage(poison: str, once: str, marker: str):
    """An InvertBatch that dies on every batch holding `poison`, and on the first batch holding
    `once` (a marker file remembers it across actor restarts). Defined in a function, so Ray
    ships the class by value."""

    class CrashingInvert(InvertBatch):
        def __call__(self, batch):
            ids = {str(i) for i in batch["image_id"]}
            if poison in ids:
                os._exit(1)
            if once in ids and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                os._exit(1)
            return super().__call__(batch)

    return CrashingInvert


def crashing_edit(victim: str, log_path: str):
    """An EditBatch that dies on every batch holding a request for image `victim`, appending its
    pid to `log_path` first (one line per crash)."""

    class CrashingEdit(EditBatch):
        def __call__(self, batch):
            if victim in batch["image_id"].to_pylist():
                with open(log_path, "a") as f:
                    f.write(f"{os.getpid()}\n")
                os._exit(1)
            return super().__call__(batch)

    return CrashingEdit


def test_retry_args_are_finite():
    assert retry_args(ActorSection(), 10) == {"max_restarts": 20, "max_task_retries": 1}
    assert retry_args(ActorSection(max_task_retries=0, max_restarts="auto"), 0) == {"max_restarts": 1,
                                                                             "max_task_retries": 0}
    assert retry_args(ActorSection(max_task_retries=2, max_restarts=5), 100) == {"max_restarts": 5,
                                                                                  "max_task_retries": 2}


def test_a_pool_holding_every_cpu_is_refused(ray_local):
    """Its read and write tasks could never run (the run would hang): refused with the settings
    to change. A pool that leaves a CPU free, or an autoscaling pool whose minimum does, is built."""
    assert ray_local.cluster_resources()["CPU"] == 2
    for concurrency, cpus in ((2, 1.0), (1, 2.0), ((2, 4), 1.0), (1, 1.5)):
        with pytest.raises(NoRoomForTasks, match=r"Lower invert.num_cpus or invert.concurrency"):
            actor_stage(ActorSection(concurrency=concurrency, num_cpus=cpus), 1, stage="invert")
    for concurrency, cpus in ((1, 1.0), ((1, 4), 1.0), (2, 0.5)):
        kw, device = actor_stage(ActorSection(concurrency=concurrency, num_cpus=cpus, num_gpus=0.0), 1,
                                 stage="invert")
        assert kw["compute"] is not None and kw["num_cpus"] == cpus and device == "cpu"


def test_poison_face_ends_as_one_worker_crash_row_and_the_run_completes(ray_local, tmp_path, tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    files = write_crops(tmp_path / "c", 8, seed=11)
    poison = image_id(open(files[5], "rb").read())
    once = image_id(open(files[1], "rb").read())
    marker = str(tmp_path / "crashed_once")
    out = str(tmp_path / "ds")
    cfg = load_config(invert.SETTINGS, None, [f"input={tmp_path / 'c'}", f"output={out}",
                                               f"model.checkpoint={ckpt}", "invert.batch_size=4",
                                               "invert.load_batch_size=4", "progress=false"])
    result = {}
    job = threading.Thread(target=lambda: result.update(invert.run(cfg, actor=crashing_stage(poison, once, marker))),
                           daemon=True)
    job.start()
    job.join(timeout=900)  # bounded: an unbounded retry would hang here
    assert not job.is_alive(), "the run did not finish: retries are not bounded"
    assert os.path.exists(marker)  # the crash-once face really killed its worker once
    assert result["counts"] == {"in": 8, "ok": 7, "failed": 1, "skipped": 0}
    assert result["extra"]["statuses"] == {"ok": 7, "worker_crash": 1}
    t = delta.read_snapshot_arrow(out, "latents")
    assert t.num_rows == 8 and len(set(t["image_id"].to_pylist())) == 8
    bad = t.filter(pc.equal(t["status"], "worker_crash")).to_pylist()
    assert [r["image_id"] for r in bad] == [poison]
    assert "every attempt" in bad[0]["error"] and bad[0]["w_plus"] is None
    ok = t.filter(pc.equal(t["status"], "ok"))
    assert once in ok["image_id"].to_pylist()  # crashed once, retried, inverted


def test_poison_request_ends_as_one_worker_crash_row_and_the_edit_run_completes(ray_local, tmp_path, tiny_checkpoint):
    ckpt, digest = tiny_checkpoint
    root = str(tmp_path / "ds")
    ids = write_latents(root, digest, n=8)["ids"]
    direction = str(tmp_path / "dir.npy")
    np.save(direction, np.random.default_rng(3).standard_normal(D).astype(np.float32))
    req = str(tmp_path / "requests.parquet")
    pq.write_table(pa.table({"image_id": ids, "kind": ["direction"] * len(ids), "direction_uri": [direction] * len(ids),
                             "strength": [1.0] * len(ids)}), req)
    victim, crashes = ids[5], str(tmp_path / "crashes")
    out = str(tmp_path / "edited")
    cfg = load_config(edit.SETTINGS, None, [f"latents={root}", f"output={out}", f"model.checkpoint={ckpt}",
                                             f"requests={req}", f"direction_prefixes=[{tmp_path}]", "metrics=false",
                                             "edit.batch_size=4", "progress=false"])
    result = {}
    job = threading.Thread(target=lambda: result.update(edit.run(cfg, actor=crashing_edit(victim, crashes))),
                           daemon=True)
    job.start()
    job.join(timeout=900)  # bounded: an unbounded retry would hang here
    assert not job.is_alive(), "the edit run did not finish: retries are not bounded"
    # the victim crashed its worker in each pass (batch size 4, 2, 1), at most 1 + max_task_retries times each
    n_crashes = len(open(crashes).read().split())
    assert 3 <= n_crashes <= 6, n_crashes
    c = result["counts"]
    assert c == {"in": 8, "ok": 7, "failed": 1, "skipped": 0} and c["in"] == c["ok"] + c["failed"] + c["skipped"]
    assert result["extra"]["statuses"] == {"ok": 7, "worker_crash": 1}
    t = delta.read_snapshot_arrow(out, "edits")
    assert t.num_rows == 8 and len(set(t["edit_id"].to_pylist())) == 8
    assert sorted(t["image_id"].to_pylist()) == sorted(ids)
    bad = t.filter(pc.equal(t["status"], "worker_crash")).to_pylist()
    assert [r["image_id"] for r in bad] == [victim]
    assert "every attempt" in bad[0]["error"] and bad[0]["output_uri"] is None
    ok = t.filter(pc.equal(t["status"], "ok")).to_pylist()
    assert sorted(r["image_id"] for r in ok) == sorted(i for i in ids if i != victim)
    assert all(os.path.exists(r["output_uri"]) for r in ok)
