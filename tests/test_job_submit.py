"""`ray job submit` as the README shows it: a head node started with `ray start --head` on
loopback, `python -m jobs.invert` submitted with `--working-dir .` from the repository root,
its JSON summary read back from `ray job logs`.

The cluster is this test's own (not the session's `ray_local`): its own temp dir (so no other
process on the machine finds it through /tmp/ray/ray_current_cluster), its own ports, its own
process group. It is stopped by signalling that group, not by `ray stop`, which stops every Ray
process on the machine."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest

from tests.conftest import kill_tagged, write_crops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, tag: str) -> None:
    """SIGTERM to the cluster's process group (a graceful stop), SIGKILL to what is left of it
    after 30 s, and to any process of the cluster that left the group (found by the tag in its
    environment)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
    kill_tagged(tag)
    proc.wait(60)


@pytest.mark.slow
def test_ray_job_submit_invert_on_a_local_head(tmp_path, tiny_checkpoint):
    from pipeline import delta

    ckpt, _ = tiny_checkpoint
    write_crops(tmp_path / "crops", 3, seed=31)
    out = str(tmp_path / "ds")
    port = _free_port()
    address = f"http://127.0.0.1:{port}"
    tag = uuid.uuid4().hex
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")]), "STBATCH_TEST_TREE": tag}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths live under it
    log = open(tmp_path / "ray_start.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--port=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}",
         f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            assert head.poll() is None, (tmp_path / "ray_start.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the head's dashboard did not come up in 300 s"
            time.sleep(1)

        # From the repository root, as in the README. Ray leaves out what .gitignore lists (.venv/,
        # demo_out/ ...); .git is left out here.
        job_id = f"stbatch-invert-{tag[:8]}"
        sub = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--working-dir", ".",
             "--runtime-env-json", json.dumps({"excludes": [".git"]}), "--submission-id", job_id,
             "--no-wait", "--", "python", "-m", "jobs.invert", "--quiet", "--set", f"input={tmp_path / 'crops'}",
             "--set", f"output={out}", "--set", f"model.checkpoint={ckpt}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        follow = subprocess.run([RAY, "job", "logs", job_id, "--address", address, "--follow"],
                                env=env, capture_output=True, text=True, timeout=900)
        status = subprocess.run([RAY, "job", "status", job_id, "--address", address],
                                env=env, capture_output=True, text=True, timeout=120)
        said = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)  # the CLI's colours
        assert f"Job '{job_id}' succeeded" in said, (said[-2000:], follow.stdout[-4000:], follow.stderr[-2000:])
        logs = subprocess.run([RAY, "job", "logs", job_id, "--address", address],
                              env=env, capture_output=True, text=True, timeout=120)
        assert logs.returncode == 0, logs.stderr[-2000:]
        summaries = []
        for line in logs.stdout.splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("job") == "invert":
                summaries.append(obj)
        assert len(summaries) == 1, logs.stdout[-4000:]
        s = summaries[0]
        assert (s["in"], s["ok"], s["failed"], s["skipped"]) == (3, 3, 0, 0) and s["run_id"]
    finally:
        _stop(head, tag)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    t = delta.read_snapshot_arrow(out, "latents")
    assert t.num_rows == 3 and set(t["status"].to_pylist()) == {"ok"}
    run = json.loads((tmp_path / "ds" / "_runs" / f"{s['run_id']}.json").read_text())
    assert run["job"] == "invert" and run["summary"]["ok"] == 3
