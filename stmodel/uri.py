"""Whole-file writes to any fsspec URI, shared by checkpoint I/O and the pipeline's storage."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; local files go through a temporary name and a rename so a reader
    never sees half a file (an S3 PUT is atomic already)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)
