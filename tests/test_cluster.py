"""A two-node Ray cluster (ray.cluster_utils.Cluster) with the output on S3 (moto's server): the
driver and the workers share no disk, so every row, file and commit goes through storage."""
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
    returns its RESULT line."""
    import s3fs

    fs = s3fs.S3FileSystem()
    for f in write_crops(tmp_path / "c", n_crops, seed=seed):
        fs.put(f, f"{s3_bucket[5:]}/crops/{os.path.basename(f)}")
    fs.put(ckpt, f"{s3_bucket[5:]}/models/tiny.pt")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-c", script, f"{s3_bucket}/crops", f"{s3_bucket}/ds",
                        f"{s3_bucket}/models/tiny.pt"], capture_output=True, text=True, env=env, timeout=900,
                       cwd=str(tmp_path))
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
