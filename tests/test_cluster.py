"""A two-node Ray cluster (ray.cluster_utils.Cluster) with the output on S3 (moto's server): the
driver and the workers share no disk, so every row, file and commit goes through storage. The
worker node can be removed in the middle of a run (Cluster.remove_node): the run completes on
the node that remains, every key exactly once."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import write_crops

SCRIPT = r"""
import json, logging, sys
import ray
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=2, resources={"worker_node": 1})
ray.init(address=cluster.address, log_to_driver=False)
from ray.data import DataContext
DataContext.get_current().enable_progress_bars = False
assert len([n for n in ray.nodes() if n["Alive"]]) == 2
from jobs import invert
from jobs.cli import load_config
inp, out, ckpt = sys.argv[1:4]
sets = [f"input={inp}", f"output={out}", f"model.checkpoint={ckpt}", "invert.batch_size=2",
        "invert.load_batch_size=2", "progress=false"]
r1 = invert.run(load_config(invert.SETTINGS, None, sets))
r2 = invert.run(load_config(invert.SETTINGS, None, sets))
print("RESULT " + json.dumps({"first": r1["counts"], "second": r2["counts"]}))
ray.shutdown()
cluster.shutdown()
"""


def _on_cluster(script: str, s3_bucket: str, tmp_path, ckpt: str, n_crops: int, seed: int) -> dict:
    """`script` in its own process (its own cluster) over `n_crops` crops on S3, output on S3;
    returns its RESULT line. The script's arguments: the crops, the output, the checkpoint (URIs)."""
    import s3fs

    fs = s3fs.S3FileSystem()
    for f in write_crops(tmp_path / "c", n_crops, seed=seed):
        fs.put(f, f"{s3_bucket[5:]}/crops/{os.path.basename(f)}")
    fs.put(ckpt, f"{s3_bucket[5:]}/models/tiny.pt")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    try:
        p = subprocess.run([sys.executable, "-c", script, f"{s3_bucket}/crops", f"{s3_bucket}/ds",
                            f"{s3_bucket}/models/tiny.pt"], capture_output=True, text=True, env=env, timeout=900,
                           cwd=str(tmp_path))
    except subprocess.TimeoutExpired as e:  # the script's own diagnostics say where it waits
        tail = (e.stderr or b"").decode(errors="replace")[-6000:]
        raise AssertionError(f"the script did not finish: {tail}") from None
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


@pytest.mark.slow
def test_two_node_cluster_with_output_on_s3(s3_bucket, tmp_path, tiny_checkpoint):
    from pipeline import delta

    out = f"{s3_bucket}/ds"
    res = _on_cluster(SCRIPT, s3_bucket, tmp_path, tiny_checkpoint[0], 5, 21)
    assert res["first"] == {"in": 5, "ok": 5, "failed": 0, "skipped": 0}
    assert res["second"] == {"in": 5, "ok": 0, "failed": 0, "skipped": 5}
    t = delta.read_snapshot_arrow(out, "latents")
    assert t.num_rows == 5 and set(t["status"].to_pylist()) == {"ok"}
    assert not os.path.exists(tmp_path / "ds")  # nothing landed on a local disk


NODE_REMOVED_SCRIPT = r"""
import json, os, sys, threading, time
import ray, s3fs
from ray.cluster_utils import Cluster
from ray.util import state
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# The head keeps 2 CPUs: once the worker node is gone it alone holds the inversion actor (1 CPU)
# and still has a CPU for the read and write tasks that feed it. With one CPU (the other test's
# head) the actor would hold it and the reads would wait for ever (ray-project/ray#44687): the
# job refuses such a cluster up front (pipeline.compute.NoRoomForTasks), checked below.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
worker = cluster.add_node(num_cpus=2, resources={"worker_node": 1})
ray.init(address=cluster.address, log_to_driver=False)
from ray.data import DataContext
DataContext.get_current().enable_progress_bars = False
from jobs import invert
from jobs.cli import load_config
from pipeline import delta
from pipeline.compute import NoRoomForTasks
from pipeline.invert_stage import InvertBatch

inp, out, ckpt = sys.argv[1:4]
marker = inp.rsplit("/", 1)[0] + "/node_removed"   # outside the input and the output
actor_nodes = inp.rsplit("/", 1)[0] + "/actor_nodes"
latents = out + "/latents"
sets = [f"input={inp}", f"output={out}", f"model.checkpoint={ckpt}", "invert.batch_size=2",
        "invert.load_batch_size=2", "invert.rows_per_part=2", "progress=false"]
seen = {}


def say(*a):
    print(*a, file=sys.stderr, flush=True)


class GatedInvert(InvertBatch):
    # An actor inverts one batch, then waits for the node removal: the run cannot get past its
    # first batches before the node is gone, whichever node the actor is on (an actor on the
    # removed node dies, and its restart on the head passes the gate once the marker is there).
    # Each actor process records its node, for the test to see where the actor ran.
    def __call__(self, batch):
        fs = s3fs.S3FileSystem()
        if getattr(self, "_passed", False):
            while True:
                fs.invalidate_cache()
                if fs.exists(marker):
                    break
                time.sleep(0.2)
        else:
            fs.pipe(f"{actor_nodes}/{os.getpid()}", ray.get_runtime_context().get_node_id().encode())
        self._passed = True
        return super().__call__(batch)


def remove_worker_when_writing():
    # (no state API here: under load it can time out, and the run would wait on the gate for ever)
    fs = s3fs.S3FileSystem()
    try:
        while True:  # the run's first data file: reads, inversions and writes are in flight
            fs.invalidate_cache()
            parts = [p for p in fs.find(latents) if p.rsplit("/", 1)[-1].startswith("part-")]
            if parts:
                break
            time.sleep(0.2)
        seen["files_before_removal"] = len(parts)
        ray.kill(hold)
        cluster.remove_node(worker)
        seen["removed"] = True
    except Exception as e:  # the gate opens anyway: the run ends and the test says why
        seen["error"] = repr(e)
    finally:
        fs.pipe(marker, b"removed")
    say("worker node removed", seen)


def diagnostics(after_s=240):
    # a run still going after this long is waiting for something: say what
    time.sleep(after_s)
    try:
        say("still running; available", ray.available_resources())
        for t in state.list_tasks(filters=[("state", "!=", "FINISHED")], limit=200):
            say("  task", t.name, t.state, t.node_id, t.required_resources)
        for a in state.list_actors(filters=[("state", "!=", "DEAD")], limit=200):
            say("  actor", a.class_name, a.state, a.node_id)
    except Exception as e:
        say("no diagnostics:", repr(e))


# The head's CPUs are held until the node goes: the run starts with its actor, reads and writes on
# the worker node, and loses them all with it (the actor restarts on the head).
@ray.remote(num_cpus=2)
class HoldHead:
    def ready(self):
        return True


hold = HoldHead.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
    ray.get_runtime_context().get_node_id(), soft=False)).remote()
ray.get(hold.ready.remote())
threading.Thread(target=remove_worker_when_writing, daemon=True).start()
threading.Thread(target=diagnostics, daemon=True).start()
r1 = invert.run(load_config(invert.SETTINGS, None, sets), actor=GatedInvert)
fs = s3fs.S3FileSystem()
ran_on = {fs.cat(p).decode() for p in fs.find(actor_nodes)}
seen["actor_on"] = sorted({worker.node_id: "removed node", ray.get_runtime_context().get_node_id(): "head"}.get(
    n, n) for n in ran_on)
alive = [n for n in ray.nodes() if n["Alive"]]
version = delta.open_table(out, "latents").version()
try:  # the cluster that remains cannot feed an actor holding both of its CPUs: refused, not hung
    invert.run(load_config(invert.SETTINGS, None, sets + ["invert.num_cpus=2"]))
    refused = None
except NoRoomForTasks as e:
    refused = str(e)
r2 = invert.run(load_config(invert.SETTINGS, None, sets))
print("RESULT " + json.dumps({"first": r1["counts"], "second": r2["counts"], "seen": seen, "alive": len(alive),
                              "refused": refused, "version_after_first": version,
                              "version_after_refused": delta.open_table(out, "latents").version()}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_worker_node_removed_mid_run(s3_bucket, tmp_path, tiny_checkpoint):
    """The worker node goes away while crops are read, inverted and written (its tasks, the
    blocks in its object store and the inversion actor with it): Ray runs the lost tasks again
    and restarts the actor on the head, the runner runs again the rows of a task that failed
    for good, and the run commits every face exactly once. A rerun on the cluster that remains
    skips them all; a pool that would hold every CPU left is refused with a clear error."""
    import pyarrow.compute as pc

    from pipeline import delta

    n = 16
    res = _on_cluster(NODE_REMOVED_SCRIPT, s3_bucket, tmp_path, tiny_checkpoint[0], n, 23)
    print(res["seen"])
    assert res["seen"].get("removed") and res["alive"] == 1, res["seen"]
    assert res["seen"]["actor_on"] == ["head", "removed node"]  # the actor died with the node, restarted on the head
    assert res["first"] == {"in": n, "ok": n, "failed": 0, "skipped": 0}
    assert res["second"] == {"in": n, "ok": 0, "failed": 0, "skipped": n}
    assert res["refused"] and "invert.num_cpus=2 would hold 2 of the cluster's 2 CPU(s)" in res["refused"]
    assert res["version_after_refused"] == res["version_after_first"]  # the refused run committed nothing
    t = delta.read_snapshot_arrow(f"{s3_bucket}/ds", "latents")
    keys = pc.binary_join_element_wise(t["image_id"], pc.cast(t["face_index"], "string"), "/")
    assert t.num_rows == n and len(pc.unique(keys)) == n and set(t["status"].to_pylist()) == {"ok"}
