"""Object-storage helpers and the run-scoped, manifest-last publication every job uses.

Layout under a job's output URI:

    <output>/<table>/run=<run_id>/part-*.parquet   table files, written by one run only
    <output>/<objects...>                          images, keys built from image ids only
    <output>/_runs/<run_id>.json                   manifest: written last, publishes the run

A reader lists `_runs/` and reads only the partitions of runs with a manifest, so a crashed
run is invisible and its files are swept by the next run of the same job. Nothing here needs a
shared local disk: every path is an fsspec URI (plain path, file://, s3://...). S3 endpoints
and credentials come from the environment / standard AWS config (AWS_ENDPOINT_URL, ...).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from stmodel.uri import write_bytes  # the one implementation, also used as storage.write_bytes

log = logging.getLogger("stbatch.storage")

RUNS_DIR = "_runs"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*(/[A-Za-z0-9][A-Za-z0-9._=-]*)*$")


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def safe_key(key: str) -> str:
    """Refuse object keys that could escape the output prefix (`..`, absolute, odd characters).

    Keys are built from hashes and integers only; this is the last line of defence."""
    if not _SAFE_KEY.match(key) or any(part in ("..", ".") for part in key.split("/")):
        raise ValueError(f"unsafe object key {key!r}")
    return key


def image_key(folder: str, image_id: str, face_index: int, suffix: str = "") -> str:
    """`<folder>/<image_id>_<face><suffix>.png`, from a hex sha256 and an integer only."""
    if not (len(image_id) == 64 and all(c in "0123456789abcdef" for c in image_id)):
        raise ValueError(f"image_id must be a hex sha256, got {image_id!r}")
    return safe_key(f"{folder}/{image_id}_{int(face_index)}{suffix}.png")


def protocol_of(uri: str) -> str:
    fs, _ = url_to_fs(uri)
    return "file" if isinstance(fs, LocalFileSystem) else (fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0])


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path returned by `fs.find` turned back into a URI another process can open."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def list_files(uri: str) -> list[str]:
    """Every file under a prefix (recursive, sorted, hidden `_`/`.` names skipped), as URIs."""
    fs, root = url_to_fs(uri)
    if not fs.exists(root):
        return []
    if fs.isfile(root):
        return [full_uri(fs, root)]
    out = []
    for p in sorted(fs.find(root)):
        rel = p[len(root):].lstrip("/")
        if any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        out.append(full_uri(fs, p))
    return out


def ray_paths(root: str, uris: list[str]) -> tuple[list[str], fsspec.AbstractFileSystem | None]:
    """Paths and filesystem for Ray Data's readers: local paths with Ray's own local reader,
    else protocol-less keys with this fsspec filesystem (endpoint and credentials from the
    environment)."""
    fs, _ = url_to_fs(root)
    return [url_to_fs(u)[1] for u in uris], (None if isinstance(fs, LocalFileSystem) else fs)


def read_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def new_run_id(job: str) -> str:
    ts = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{ts}-{job}-{uuid.uuid4().hex[:8]}"


def committed_manifests(output: str, job: str | None = None) -> list[dict]:
    """Manifests of the published runs under `output`, oldest first (optionally of one job)."""
    fs, root = url_to_fs(join(output, RUNS_DIR))
    if not fs.exists(root):
        return []
    out = []
    for p in sorted(fs.glob(f"{root}/*.json")):
        with fs.open(p, "rb") as f:
            m = json.loads(f.read())
        if job is None or m.get("job") == job:
            out.append(m)
    return out


def committed_table_files(output: str, table: str) -> list[str]:
    """Parquet files of `table` that belong to published runs only."""
    files = []
    for m in committed_manifests(output):
        for rel in m.get("tables", {}).get(table, []):
            files.append(join(output, rel))
    return files


def read_committed(output: str, table: str, columns: list[str] | None = None) -> pa.Table | None:
    """The published rows of `table` under `output` (None when there are none)."""
    files = committed_table_files(output, table)
    if not files:
        return None
    fs, _ = url_to_fs(output)
    parts = []
    for uri in files:
        _, p = url_to_fs(uri)
        parts.append(pq.read_table(p, filesystem=fs, columns=columns))
    return pa.concat_tables(parts, promote_options="default")


def committed_values(output: str, table: str, column: str = "image_id",
                     where_status: str | None = None) -> set:
    cols = [column] + (["status"] if where_status else [])
    t = read_committed(output, table, columns=cols)
    if t is None:
        return set()
    if where_status:
        t = t.filter(pa.compute.equal(t["status"], where_status))
    return set(t[column].to_pylist())


@dataclass
class Run:
    """One run of a job writing under `output`; nothing is visible until `commit`."""

    output: str
    job: str
    config: dict
    run_id: str = ""
    tables: dict[str, list[str]] = field(default_factory=dict)
    objects: int = 0

    def __post_init__(self):
        if not self.run_id:
            self.run_id = new_run_id(self.job)
        self.started = _dt.datetime.now(_dt.timezone.utc)

    def table_prefix(self, table: str) -> str:
        """Run-scoped folder for a table's files (a Ray `write_parquet` target)."""
        return join(self.output, table, f"run={self.run_id}")

    def write_table(self, table: str, data: pa.Table, part: int = 0) -> str:
        """Write one Parquet part of `table` for this run (deterministic name, no duplicates)."""
        rel = f"{table}/run={self.run_id}/part-{part:05d}.parquet"
        uri = join(self.output, rel)
        fs, path = url_to_fs(uri)
        if isinstance(fs, LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(data, path, filesystem=fs, compression="zstd")
        self.tables.setdefault(table, []).append(rel)
        return uri

    def register_prefix(self, table: str) -> list[str]:
        """Record the files a distributed writer put under `table_prefix(table)`."""
        fs, root = url_to_fs(self.table_prefix(table))
        out_fs, out_root = url_to_fs(self.output)
        rels = []
        if fs.exists(root):
            for p in sorted(fs.find(root)):
                if p.endswith(".parquet"):
                    rels.append(p[len(out_root):].lstrip("/"))
        self.tables.setdefault(table, []).extend(rels)
        return rels

    def object_uri(self, key: str) -> str:
        return join(self.output, safe_key(key))

    def commit(self, summary: dict, extra: dict | None = None) -> str:
        """Publish the run: the manifest is the last object written."""
        finished = _dt.datetime.now(_dt.timezone.utc)
        manifest = {
            "run_id": self.run_id, "job": self.job, "output": self.output,
            "started_at": self.started.isoformat(), "finished_at": finished.isoformat(),
            "code_version": code_version(), "config": self.config, "tables": self.tables,
            "summary": summary, **(extra or {}),
        }
        uri = join(self.output, RUNS_DIR, f"{self.run_id}.json")
        write_bytes(uri, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
        return uri

    def sweep_uncommitted(self, tables: list[str]) -> list[str]:
        """Delete table partitions of crashed runs (no manifest) of these tables."""
        done = {m["run_id"] for m in committed_manifests(self.output)}
        removed = []
        for table in tables:
            fs, root = url_to_fs(join(self.output, table))
            if not fs.exists(root):
                continue
            for p in fs.ls(root, detail=False):
                name = p.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith("run=") and name[4:] not in done and name[4:] != self.run_id:
                    fs.rm(p, recursive=True)
                    removed.append(name[4:])
        if removed:
            log.info("removed the files of unpublished runs: %s", ", ".join(removed))
        return removed
