"""Object-storage helpers: URIs, safe object keys, listings, whole-object reads and writes.

Layout under a job's output URI:

    <output>/<table>/                 Delta Lake tables (pipeline.delta)
    <output>/<objects...>             images, keys built from image ids only
    <output>/_runs/<run_id>.json      human-readable run records (pipeline.runner)

Nothing here needs a shared local disk: every path is an fsspec URI (plain path, file://,
s3://...). S3 endpoints and credentials come from the environment / standard AWS config
(AWS_ENDPOINT_URL, ...).
"""
from __future__ import annotations

import datetime as _dt
import re
import subprocess
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from stmodel.uri import write_bytes  # the one implementation, also used as storage.write_bytes

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
