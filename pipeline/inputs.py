"""The input files of a job as the listing gives them: the files to read, and the work rows of
the files refused before a byte of them is read (bigger than `max_bytes`).

    sized = storage.list_sized(input)                        # (URI, size from the listing)
    readable, refused = split_by_size(sized, max_bytes)
    ds = ray.data.read_binary_files(readable ...)            # only these are ever read
    rows = refused_rows(refused, max_bytes)                  # one work row each: status too_large

A refused file has no content hash, so its row is keyed by its URI (`unread_id`), the same key
the next run gives it: a permanent failure is skipped there unless `retry_failed`, and a
retried file (after raising `max_bytes`) gets its content image_id and new rows.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa

from pipeline.status import STATUS_TOO_LARGE

UNREAD_PREFIX = "unread:"
WORK_SCHEMA = pa.schema([("image_id", pa.string()), ("face_index", pa.int32()), ("source_uri", pa.string()),
                         ("aligned_uri", pa.string()), ("status", pa.string()), ("error", pa.string())])


def unread_id(source_uri: str) -> str:
    """The `image_id` of a row for a file whose bytes were never read: derived from its URI (not
    a content hash), so that the same unreadable file keeps one row across runs."""
    return UNREAD_PREFIX + hashlib.sha256(source_uri.encode()).hexdigest()


def split_by_size(sized: list[tuple[str, int | None]], max_bytes: int) -> tuple[list[str], list[tuple[str, int]]]:
    """(URIs to read, (URI, size) of the files over `max_bytes`). No cap when max_bytes is 0; a file
    whose size the store did not report is read (the pixel cap still applies)."""
    if not max_bytes:
        return [u for u, _ in sized], []
    readable, refused = [], []
    for uri, size in sized:
        if size is not None and size > max_bytes:
            refused.append((uri, int(size)))
        else:
            readable.append(uri)
    return readable, refused


def refused_rows(refused: list[tuple[str, int]], max_bytes: int) -> pa.Table:
    """Work rows (WORK_SCHEMA) of the files refused by size: status too_large, never read."""
    uris = [u for u, _ in refused]
    n = len(uris)
    return pa.table({"image_id": [unread_id(u) for u in uris], "face_index": [0] * n, "source_uri": uris,
                     "aligned_uri": uris, "status": [STATUS_TOO_LARGE] * n,
                     "error": [f"file is {size} bytes > max_bytes {max_bytes}; refused before reading"
                               for _, size in refused]}, schema=WORK_SCHEMA)
