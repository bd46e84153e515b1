"""What a nightly invert costs: N finished faces plus n new ones, against a fresh run over the n.

    python -m bench.nightly                          # N = 10k, 100k, 1M; n = 16; ffhq-1024 shapes
    python -m bench.nightly --sizes 20000 --new 16 --repeats 2

For each N a dataset root is written directly in the project's schemas: a `faces` table of N
finished faces (their crops do not exist: an incremental run never opens them) whose `latents`
rows are committed ok, in data files of 20,000 rows as the jobs write them, then one more align
commit naming n real 256x256 crops. The old rows' `w_plus` are left null (the done check reads the
key and status columns only; Parquet stores columns apart, so their size does not change what is
read). The nightly run is `jobs.invert.run` on that root, as cron runs it; the fresh run is the
same job over a root holding only the n new faces (run first; a warm-up run precedes both).
Both use a random `ffhq-1024` model (its inversion of n faces is the same work either way), one
local Ray started as the jobs start it.

Printed per N: seconds of each run (the nightly over the fresh: the issue's bound is 1.2x + 5 s at
20k, + 10 s at 200k, + 30 s at 1M), the bytes read by each run (what the operating system counts
as read, rchar, by the driver and the Ray processes alive at the end of the run, imports and
model set-up included: a lower bound, taken the same way for both runs), and the growth of Ray's
temp folder (its object store spills there).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

ROWS_PER_FILE = 20_000


def write_finished(root: str, n: int, seed: int = 0) -> None:
    """`faces` and `latents` tables of n finished faces, committed as two runs would leave them."""
    import pyarrow as pa

    from pipeline import delta
    from pipeline.runner import TableSpec
    from pipeline.schemas import FACES_SCHEMA, latents_schema, utc_now

    lat_schema = latents_schema(18, 512)
    now = utc_now()
    for name, schema, key in (("faces", FACES_SCHEMA, ("image_id", "face_index")),
                              ("latents", lat_schema, ("image_id", "face_index"))):
        spec = TableSpec(name, schema, key)
        files = []
        rng = np.random.default_rng(seed)  # the same ids in both tables
        for start in range(0, n, ROWS_PER_FILE):
            m = min(ROWS_PER_FILE, n - start)
            ids = [rng.bytes(32).hex() for _ in range(m)]
            cols = {"image_id": ids, "face_index": np.zeros(m, np.int32), "status": ["ok"] * m,
                    "source_uri": [f"s3://raw/{i}.jpg" for i in ids],
                    "aligned_uri": [f"{root.rstrip('/')}/aligned/{i}_0.png" for i in ids],
                    "run_id": ["bench"] * m, "created_at": pa.array([now] * m, pa.timestamp("us", tz="UTC"))}
            arrays = [pa.array(cols[f.name], f.type) if f.name in cols else pa.nulls(m, f.type) for f in schema]
            t = pa.Table.from_arrays(arrays, schema=schema)
            files.append(delta.write_data_file(t, root, name, "bench-finished", tag=delta.OK_TAG))
        delta.commit(root, name, spec.schema, list(spec.key), files, "bench-finished", {"job": "bench"},
                     replace=False)


def commit_new_faces(root: str, crops: list[str]) -> None:
    from pipeline import storage
    from pipeline.decode import image_id
    from pipeline.runner import JobRun, TableSpec
    from pipeline.schemas import FACES_SCHEMA, faces_table

    rows = [{"image_id": image_id(storage.read_bytes(c)), "source_uri": f"s3://raw/new_{i}.jpg", "status": "ok",
             "n_faces": 1, "face_index": 0, "aligned_uri": c} for i, c in enumerate(crops)]
    spec = TableSpec("faces", FACES_SCHEMA, ("image_id", "face_index"), ("image_id",))
    run = JobRun(root, "align")
    run.commit({spec: run.write_small(spec, faces_table(rows, run.run_id))}, {"in": len(rows)})


def consumed_by_a_run(root: str) -> None:
    """Record, as a committed invert run would have, that the finished faces were consumed."""
    from pipeline import delta, incremental
    from pipeline.schemas import latents_schema

    snap = delta.snapshot(root, "faces")
    if snap is None:
        raise RuntimeError(f"bench: no faces table under {root}")
    version = snap.version
    delta.commit(root, "latents", latents_schema(18, 512), ["image_id", "face_index"], [], "bench-finished",
                 {"job": "invert"}, app_txn=(incremental.consumed_app_id("invert", root), version))


def write_crops(folder: str, n: int, seed: int) -> list[str]:
    import io

    from PIL import Image

    from pipeline import storage

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, format="PNG")
        p = storage.join(folder, f"new_{seed}_{i}.png")
        storage.write_bytes(p, buf.getvalue())
        out.append(p)
    return out


class S3Counting:
    """moto's S3 server behind a counting proxy (tests/fault_proxy.py, no faults) on 127.0.0.1:
    every byte the runs fetch from storage is counted."""

    def __enter__(self):
        import socket
        import subprocess
        import sys
        import urllib.request

        import boto3

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        upstream = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{upstream}/moto-api/", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        self.proxy = subprocess.Popen([sys.executable, "-m", "tests.fault_proxy", "--upstream", upstream,
                                       "--lifetime", "7200"], stdout=subprocess.PIPE, text=True)
        self.endpoint = f"http://127.0.0.1:{self.proxy.stdout.readline().split()[1]}"
        os.environ.update({"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        boto3.client("s3", endpoint_url=upstream).create_bucket(Bucket="bench-nightly")
        return self

    def fetched(self) -> int:
        """Response bytes of every GET so far."""
        import urllib.request

        with urllib.request.urlopen(f"{self.endpoint}/__proxy_stats__", timeout=10) as r:
            stats = json.loads(r.read())
        return sum(n for what, n in stats["bytes_out"].items() if what.startswith("GET "))

    def __exit__(self, *exc):
        self.proxy.terminate()
        self.moto.terminate()


def _read_chars() -> dict[int, int]:
    """Bytes read so far (rchar) by this process and every Ray process, per pid."""
    import psutil

    out = {}
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid == os.getpid() or "ray" in cmd or "raylet" in (p.info["name"] or ""):
                out[p.pid] = p.io_counters().read_chars
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _read_since(before: dict[int, int]) -> int:
    """Bytes read since `before` by the processes alive now (a process that ended in between is
    not counted: a lower bound)."""
    return sum(max(0, n - before.get(pid, 0)) for pid, n in _read_chars().items())


def _du(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                pass
    return total


def run_job(root: str, s3: S3Counting | None = None) -> dict:
    from jobs import invert
    from jobs.cli import load_config

    cfg = load_config(invert.SETTINGS, None, [f"input={root}", f"output={root}", "model.preset=ffhq-1024",
                                              "invert.batch_size=8", "progress=false"])
    before, fetched = _read_chars(), s3.fetched() if s3 else 0
    t0 = time.time()
    res = invert.run(cfg)
    out = {"seconds": round(time.time() - t0, 2), "counts": res["counts"], "read_bytes": _read_since(before),
           "scan": res["extra"].get("scan")}
    if s3:
        out["fetched_from_s3_bytes"] = s3.fetched() - fetched
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--work", default=None, help="folder for the datasets (default: a temp folder)")
    p.add_argument("--s3", action="store_true", help="datasets on moto's S3 server behind a counting proxy "
                                                     "(127.0.0.1): prints the bytes each run fetched")
    args = p.parse_args(argv)
    local = args.work or tempfile.mkdtemp(prefix="bench_nightly_")
    spill = os.path.join(local, "ray_tmp")
    os.makedirs(spill, exist_ok=True)
    os.environ.setdefault("RAY_TMPDIR", spill)  # what Ray spills lands here, measured and removed
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(S3Counting()) if args.s3 else None  # before Ray: workers inherit the endpoint
        return _measure(args, "s3://bench-nightly" if s3 else local, spill, s3)


def _measure(args, work: str, spill: str, s3: S3Counting | None) -> list[dict]:
    """The runs, each size: a fresh run over the new faces, then the nightly run."""
    from jobs.cli import init_ray
    from pipeline.sections import JobSettings

    init_ray(JobSettings(progress=False))
    import logging

    logging.basicConfig(level=logging.WARNING)
    # warm-up: Ray's worker processes and the first plan, so that neither measured run pays them
    from pipeline import storage

    warm = storage.join(work, "warmup")
    commit_new_faces(warm, write_crops(storage.join(work, "warm_crops"), 2, seed=999))
    run_job(warm)
    out = []
    for n_old in args.sizes:
        root = storage.join(work, f"n{n_old}")
        fresh_root = storage.join(work, f"fresh{n_old}")
        t0 = time.time()
        write_finished(root, n_old, seed=n_old)
        consumed_by_a_run(root)
        build_s = time.time() - t0
        for rep in range(args.repeats):
            crops = write_crops(storage.join(work, f"crops{n_old}_{rep}"), args.new, seed=1000 + rep)
            commit_new_faces(root, crops)
            fresh_crops = write_crops(storage.join(work, f"fcrops{n_old}_{rep}"), args.new, seed=2000 + rep)
            commit_new_faces(fresh_root, fresh_crops)
            spill0 = _du(spill)
            fresh = run_job(fresh_root, s3)
            nightly = run_job(root, s3)
            row = {"finished": n_old, "new": args.new, "repeat": rep, "tables_written_s": round(build_s, 1),
                   "nightly": nightly, "fresh": fresh,
                   "ratio": round(nightly["seconds"] / max(fresh["seconds"], 1e-9), 3),
                   "extra_s": round(nightly["seconds"] - fresh["seconds"], 2),
                   "ray_tmp_growth_bytes": _du(spill) - spill0}
            print(json.dumps(row), flush=True)
            out.append(row)
        if not s3:
            shutil.rmtree(root, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
