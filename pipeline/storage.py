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

# object_store's helpers, used as storage.*
from pipeline.object_store import DELTA_RETRY_OPTIONS, columns_filesystem, open_for_columns, task_retry_args  # noqa: F401
from stmodel.uri import write_bytes  # noqa: F401 - the one implementation, also used as storage.write_bytes

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
    if isinstance(fs, LocalFileSystem):
        return "file"
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path returned by `fs.find` turned back into a URI another process can open."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


# What an input listing leaves out: only the project's own bookkeeping, never a user's file
# (camera names such as `_DSC0001.JPG` are listed). Left out:
#   - `_delta_log/` and `_runs/` folders, and every folder holding a `_delta_log` (a Delta table's
#     data files);
#   - under one of our dataset roots (a folder with `_runs/` directly under it), the folders the
#     jobs write there (OUTPUT_FOLDERS);
#   - the temporary names of an unfinished local write (`<name>.tmp-<8 hex>`, stmodel.uri);
#   - hidden dot-names (`.DS_Store`, `._IMG_0001.JPG` AppleDouble files, `.git/`): operating
#     system and tool metadata, not photos.
BOOKKEEPING_DIRS = frozenset({"_delta_log", RUNS_DIR})
OUTPUT_FOLDERS = frozenset({"aligned", "reconstructions", "edit_sources", "edit_images", "composites",
                            "model_files", "checkpoints", "train", "report"})
_TEMP_NAME = re.compile(r"\.tmp-[0-9a-f]{8}$")


def list_sized(uri: str) -> list[tuple[str, int | None]]:
    """(URI, size in bytes from the listing) of every input file under a prefix: recursive,
    sorted, the project's bookkeeping left out (see BOOKKEEPING_DIRS above). A size the store
    does not report is None."""
    return [(u, size) for u, size, _ in list_stat(uri)]


def list_stat(uri: str) -> list[tuple[str, int | None, str | None]]:
    """(URI, size, version tag) of every input file under a prefix, as `list_sized`. The tag
    changes whenever the object does: the ETag on S3 (and stores that report one), else the
    modification time; None when the store reports neither (such a file is always read)."""
    fs, root = url_to_fs(uri)
    if not fs.exists(root):
        return []
    if fs.isfile(root):
        info = fs.info(root)
        return [(full_uri(fs, root), _size(info), version_tag(info))]
    found = fs.find(root, detail=True, withdirs=True)
    rels = {p: p[len(root):].lstrip("/") for p in found}
    tables = {"/".join(rel.split("/")[:rel.split("/").index("_delta_log")]) for rel in rels.values()
              if "_delta_log" in rel.split("/")}
    dataset_root = any(rel == RUNS_DIR or rel.startswith(RUNS_DIR + "/") for rel in rels.values())
    out = []
    for p in sorted(found):
        info, rel = found[p], rels[p]
        if info.get("type") == "directory" or not rel:
            continue
        parts = rel.split("/")
        dirs = ["/".join(parts[:i]) for i in range(len(parts))]
        if (any(part in BOOKKEEPING_DIRS or part.startswith(".") for part in parts)
                or any(d in tables for d in dirs) or _TEMP_NAME.search(parts[-1])
                or (dataset_root and len(parts) > 1 and parts[0] in OUTPUT_FOLDERS)):
            continue
        out.append((full_uri(fs, p), _size(info), version_tag(info)))
    return out


def version_tag(info: dict) -> str | None:
    """What identifies this version of an object in a listing entry (see `list_stat`)."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return "etag:" + str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if mtime is None:
        return None
    return "mtime:" + (mtime.isoformat() if hasattr(mtime, "isoformat") else repr(float(mtime)))


def _size(info: dict) -> int | None:
    size = info.get("size")
    return None if size is None else int(size)


def list_files(uri: str) -> list[str]:
    """Every input file under a prefix, as URIs (see `list_sized`)."""
    return [u for u, _ in list_sized(uri)]


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
