"""Object storage at scale, against moto's S3 server behind a fault-injecting proxy
(tests/fault_proxy.py): column reads fetch only their bytes; s3fs and delta-rs retry `503
SlowDown`; a write task that fails on storage runs again as a task, without its rows going
through the model a second time."""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import delta, storage
from pipeline.runner import _metric_sketch
from tests.conftest import write_crops

REPO = Path(__file__).resolve().parent.parent


class Proxy:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def stats(self) -> dict:
        host, port = self.endpoint.rsplit("/", 1)[-1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("GET", "/__proxy_stats__")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()


@contextmanager
def fault_proxy(upstream: str, *args: str):
    """tests/fault_proxy.py in its own process, in front of `upstream`."""
    p = subprocess.Popen([sys.executable, "-m", "tests.fault_proxy", "--upstream", upstream, "--lifetime", "900",
                          *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=str(REPO))
    try:
        line = p.stdout.readline()
        assert line.startswith("PORT "), f"the proxy did not start: {line!r}"
        yield Proxy(f"http://127.0.0.1:{int(line.split()[1])}")
    finally:
        p.terminate()
        p.wait(timeout=30)


@contextmanager
def endpoint(monkeypatch, url: str):
    """This process's S3 clients (s3fs, delta-rs) on `url` for the block."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a cached client keeps its endpoint
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", url)
        yield
    s3fs.S3FileSystem.clear_instance_cache()


def _gets(stats: dict, key_path: str) -> tuple[int, int]:
    """(GET requests forwarded, response bytes) for one object path (`/bucket/key`)."""
    return stats["forwarded"].get(f"GET {key_path}", 0), stats["bytes_out"].get(f"GET {key_path}", 0)


def test_column_reads_fetch_only_the_columns(s3_server, s3_bucket, monkeypatch):
    """Two key columns of a wide latents file: s3fs's default read-ahead fetches the whole file;
    our reads (the read tasks, the replacement planner's key read, the run summary) fetch a
    small fraction of it."""
    rng = np.random.default_rng(0)
    n, n_latent, dim = 256, 18, 512
    w = rng.standard_normal((n, n_latent, dim), dtype=np.float32)  # incompressible, like real codes
    t = pa.table({"image_id": [f"{i:064x}" for i in range(n)], "face_index": pa.array(np.zeros(n, np.int32)),
                  "status": ["ok"] * n, "psnr": rng.uniform(10, 30, n),
                  "w_plus": pa.array(list(w.reshape(n, -1)), pa.list_(pa.float32()))})
    out = f"{s3_bucket}/ds"
    rec = delta.write_data_file(t, out, "latents", "run1")
    uri = storage.join(delta.table_root(out, "latents"), rec.path)
    key_path = "/" + storage.url_to_fs(uri)[1]
    keys = [pa.field("image_id", pa.string()), pa.field("face_index", pa.int32())]
    fetched = {}
    with fault_proxy(s3_server) as proxy, endpoint(monkeypatch, proxy.endpoint):
        fs, path = storage.url_to_fs(uri)

        def measure(name, read):
            before = _gets(proxy.stats(), key_path)[1]
            got = read()
            fetched[name] = _gets(proxy.stats(), key_path)[1] - before
            return got

        def default_open():
            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).read(columns=["image_id", "face_index"])

        default = measure("s3fs default open", default_open)
        tasks = measure("delta read task", lambda: pa.concat_tables(
            delta._read_parquet_files({"uri": [uri]}, keys)))
        planner = measure("replacement planner", lambda: pq.read_table(
            path, filesystem=storage.columns_filesystem(fs), columns=["image_id", "face_index"]))
        # the run summary reduces the run's files in read tasks: the same read, then a sketch
        summary = measure("run summary", lambda: _metric_sketch(pa.concat_tables(list(delta._read_parquet_files(
            {"uri": [uri]}, [pa.field("psnr", pa.float32()), pa.field("status", pa.string())]))), ["psnr"]))
    for got in (default, tasks, planner):
        assert got.num_rows == n and got.column("image_id").to_pylist() == t.column("image_id").to_pylist()
    assert summary.column("n").to_pylist() == [n]
    figures = f"file {rec.size} bytes; fetched {fetched}"
    print(figures)
    # the measure itself: the default read-ahead takes (nearly) the whole file
    assert fetched["s3fs default open"] > 0.9 * rec.size, figures
    for name in ("delta read task", "replacement planner", "run summary"):
        assert 0 < fetched[name] < 0.02 * rec.size, figures


def test_delta_rs_reads_the_retry_options(s3_bucket):
    """The names in storage_options are object_store retry options that delta-rs 1.6 parses:
    accepted with our values, refused with a malformed one."""
    from deltalake import DeltaTable, Schema

    uri = f"{s3_bucket}/t"
    opts = delta.storage_options(uri)
    assert {k: opts[k] for k in storage.DELTA_RETRY_OPTIONS} == storage.DELTA_RETRY_OPTIONS
    DeltaTable.create(uri, schema=Schema.from_arrow(pa.schema([("a", pa.int64())])), storage_options=opts)
    assert DeltaTable(uri, storage_options=opts).version() == 0
    for key in storage.DELTA_RETRY_OPTIONS:
        with pytest.raises(Exception, match=key.replace(".", r"\.")):
            DeltaTable(uri, storage_options={**opts, key: "not-a-value"})


def test_botocore_and_task_retry_settings():
    import s3fs

    from pipeline import object_store

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert fs.config_kwargs["retries"] == {"mode": "adaptive", "total_max_attempts": object_store.S3_MAX_ATTEMPTS}
    assert fs.connect().meta.config.retries == fs.config_kwargs["retries"]  # what the client runs with
    args = storage.task_retry_args()
    assert args["max_retries"] == object_store.TASK_MAX_RETRIES
    retried = tuple(args["retry_exceptions"])
    assert isinstance(OSError(16, "Please reduce your request rate."), retried)
    import botocore.exceptions

    assert isinstance(botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), retried)
    wrapped = RuntimeError("UDF failed")
    wrapped.__cause__ = OSError(5, "SlowDown")
    assert isinstance(wrapped, retried)
    for permanent in (FileNotFoundError("gone"), PermissionError("AccessDenied"), ValueError("bad schema"),
                      botocore.exceptions.NoCredentialsError()):
        assert not isinstance(permanent, retried)


def test_any_pipeline_module_sets_the_retry_policy():
    """A Ray worker imports only the module of the function it runs (here the crop reader's):
    its S3 clients get the policy all the same, and AWS_MAX_ATTEMPTS still counts."""
    code = ("import pipeline.images, s3fs, json; "
            "print(json.dumps(s3fs.S3FileSystem(skip_instance_cache=True).config_kwargs['retries']))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for extra, want in (({}, {"mode": "adaptive", "total_max_attempts": 10}),
                        ({"AWS_MAX_ATTEMPTS": "3"}, {"mode": "adaptive", "total_max_attempts": 3})):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**env, **extra}, cwd=str(REPO))
        assert p.returncode == 0, p.stderr[-2000:]
        assert json.loads(p.stdout) == want


def test_delta_commits_through_503s(s3_server, s3_bucket, monkeypatch):
    """Data files written through s3fs and two runs' commits by delta-rs, every 5th request
    answered 503 SlowDown: both commits land, the table holds every row once."""
    schema = pa.schema([("k", pa.string()), ("status", pa.string())])
    out = f"{s3_bucket}/ds"
    with fault_proxy(s3_server, "--every", "5") as proxy, endpoint(monkeypatch, proxy.endpoint):
        versions = []
        for run in ("run-a", "run-b"):
            files = [delta.write_data_file(pa.table({"k": [f"{run}-{i}-{j}" for j in range(3)], "status": ["ok"] * 3},
                                                    schema=schema), out, "t", run) for i in range(3)]
            versions.append(delta.commit(out, "t", schema, None, files, run, {"run_id": run}))
        history = delta.commit_history(out, "t")
        stats = proxy.stats()
    print(f"delta commits: {stats['requests']} requests, {sum(stats['faulted'].values())} answered 503")
    t = delta.read_snapshot_arrow(out, "t")
    ks = t.column("k").to_pylist()
    assert sorted(ks) == sorted(f"{r}-{i}-{j}" for r in ("run-a", "run-b") for i in range(3) for j in range(3))
    assert versions == [1, 2] and [h.get("run_id") for h in history][-2:] == ["run-a", "run-b"]
    faulted = stats["faulted"]
    assert any("/_delta_log/" in k for k in faulted), faulted  # delta-rs met 503s and retried
    assert any("/t/part-" in k for k in faulted), faulted  # so did s3fs


def _invert_via_proxy(s3_bucket: str, tmp_path, ckpt: str, proxy: Proxy, n: int, seed: int,
                      env_extra: dict | None = None) -> tuple[dict, str, list[str]]:
    """`python -m jobs.invert` (its own local Ray) on crops in the bucket, every S3 request of
    the driver, the workers and delta-rs through `proxy`; returns (summary, stderr, crop paths)."""
    import s3fs

    fs = s3fs.S3FileSystem()
    crops = []
    for f in write_crops(tmp_path / "c", n, seed=seed):
        crops.append(f"{s3_bucket[5:]}/crops/{os.path.basename(f)}")
        fs.put(f, crops[-1])
    fs.put(ckpt, f"{s3_bucket[5:]}/models/tiny.pt")
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint, "RAY_AUTH_MODE": "disabled", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    p = subprocess.run([sys.executable, "-m", "jobs.invert", "--quiet", "--set", f"input={s3_bucket}/crops",
                        "--set", f"output={s3_bucket}/ds", "--set", f"model.checkpoint={s3_bucket}/models/tiny.pt",
                        "--set", "ray.num_cpus=2", "--set", "invert.batch_size=4", "--set", "invert.load_batch_size=4"],
                       capture_output=True, text=True, env=env, timeout=480, cwd=str(REPO))
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr, crops


def _latents_once(out: str, n: int) -> None:
    t = delta.read_snapshot_arrow(out, "latents")
    keys = list(zip(t.column("image_id").to_pylist(), t.column("face_index").to_pylist()))
    assert len(keys) == n and len(set(keys)) == n
    assert set(t.column("status").to_pylist()) == {"ok"}


@pytest.mark.slow  # its own local Ray in a subprocess: 40-60 s on 2 shared cores
def test_invert_completes_through_503s(s3_server, s3_bucket, tmp_path, tiny_checkpoint):
    """A whole invert run with every 6th S3 request answered 503 SlowDown (crop reads, the
    checkpoint, data-file writes, the replacement planner's reads, the Delta commit, the run
    record): it completes with every face once, and no crop is read twice (no task's rows went
    through the model again)."""
    n = 6
    with fault_proxy(s3_server, "--every", "6") as proxy:
        summary, stderr, crops = _invert_via_proxy(s3_bucket, tmp_path, tiny_checkpoint[0], proxy, n, seed=31)
        stats = proxy.stats()
    print(f"invert: {stats['requests']} requests, {sum(stats['faulted'].values())} answered 503, "
          f"{summary['seconds']} s")
    assert (summary["in"], summary["ok"], summary["failed"], summary["skipped"]) == (n, n, 0, 0)
    _latents_once(f"{s3_bucket}/ds", n)
    assert sum(stats["faulted"].values()) > 0
    assert any("/_delta_log/" in k for k in stats["faulted"]), stats["faulted"]
    assert [_gets(stats, "/" + c)[0] for c in crops] == [1] * n
    assert "did not come back" not in stderr


@pytest.mark.slow  # its own local Ray in a subprocess: 40-60 s on 2 shared cores
def test_a_write_task_failing_on_storage_runs_again_as_a_task(s3_server, s3_bucket, tmp_path, tiny_checkpoint):
    """The latents data file's PUT answered 503 more times than the S3 client retries (botocore
    held to one attempt, s3fs's own SlowDown retries used up): the write task fails on storage
    and Ray runs it again, which writes the file under a new name; the model does not see the
    rows again (each crop read once) and every face is committed once."""
    import s3fs

    n = 4
    burst = s3fs.S3FileSystem.retries + 2
    with fault_proxy(s3_server, "--burst", f"^PUT /{s3_bucket[5:]}/ds/latents/part-",
                     "--burst-count", str(burst)) as proxy:
        summary, stderr, crops = _invert_via_proxy(s3_bucket, tmp_path, tiny_checkpoint[0], proxy, n, seed=32,
                                                   env_extra={"AWS_MAX_ATTEMPTS": "1"})
        stats = proxy.stats()
    assert (summary["in"], summary["ok"], summary["failed"], summary["skipped"]) == (n, n, 0, 0)
    _latents_once(f"{s3_bucket}/ds", n)
    faulted_files = {k for k in stats["faulted"] if "/latents/part-" in k}
    written = [k for k, c in stats["forwarded"].items() if k.startswith("PUT ") and "/latents/part-" in k]
    assert sum(stats["faulted"].values()) == burst
    assert len(faulted_files) == 2 and len(written) == 1 and written[0] in faulted_files, stats
    assert [_gets(stats, "/" + c)[0] for c in crops] == [1] * n
    assert "did not come back" not in stderr
