"""Object storage at scale: how the project talks to S3 when the dataset is large and the store
pushes back.

- Column reads without read-ahead. s3fs opens a file with a 50 MiB read-ahead block by default:
  reading two key columns of a large latents file fetched 50 MB for 0.07 MB of keys. Every
  Parquet read of ours opens its file through `open_for_columns` / `columns_filesystem`, which
  fetch exactly the byte ranges pyarrow asks for (the footer, then the chunks of the columns read).
- Adaptive retries. Every s3fs filesystem of this process gets botocore's `adaptive` retry mode
  (exponential backoff with jitter, plus a client-side rate limiter that slows down on
  `503 SlowDown`), through fsspec's configuration, set when this module is imported: the
  driver and every Ray worker import it (with the `pipeline` package) before they open a
  filesystem.
  `AWS_RETRY_MODE` / `AWS_MAX_ATTEMPTS`, botocore's own variables, still choose the mode and the
  attempts. delta-rs gets object_store's retry options (`DELTA_RETRY_OPTIONS`).
- Storage errors retried as tasks. `task_retry_args()` are the `map_batches` keywords of a task
  stage that reads or writes storage: a task that fails on storage after the client's own
  retries runs again (a bounded number of times), instead of being dropped and its rows run
  through the model again. Only transient storage errors are retried (`is_transient`): a missing
  object or a refused credential fails at once.
"""
from __future__ import annotations

import functools
import os
from typing import BinaryIO

import fsspec
import fsspec.config
import pyarrow as pa
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

# botocore counts attempts, the first included; adaptive mode backs off up to 20 s per attempt.
S3_MAX_ATTEMPTS = 10
S3_RETRY_MODE = "adaptive"

# object_store's RetryConfig through delta-rs's storage options (names as delta-rs 1.6 parses
# them; durations in humantime form). Server errors (5xx, 503 SlowDown included) and
# connection errors are retried with exponential backoff, for at most `retry_timeout` per request.
DELTA_RETRY_OPTIONS = {
    "max_retries": "10",
    "retry_timeout": "180s",
    "backoff_config.init_backoff": "100ms",
    "backoff_config.max_backoff": "15s",
    "backoff_config.base": "2",
}

# Runs of one task after its first failure on storage: each run already went through the
# client's retries, so a store that still fails after these is down, not busy.
TASK_MAX_RETRIES = 4


def botocore_retries() -> dict:
    """botocore's `retries` config: adaptive with S3_MAX_ATTEMPTS unless the standard AWS
    variables say otherwise (a botocore Config overrides them, so they are read here; a
    profile's `retry_mode` / `max_attempts` in the AWS config file is overridden too)."""
    # `total_max_attempts` (the first attempt included, as AWS_MAX_ATTEMPTS counts): botocore
    # rewrites a `max_attempts` key in place, and this dict is shared by every filesystem.
    return {"mode": os.environ.get("AWS_RETRY_MODE") or S3_RETRY_MODE,
            "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS)}


def configure_fsspec() -> None:
    """Make the retry policy the default of every s3fs filesystem created in this process
    (fsspec applies `conf["s3"]` to each new instance; explicit arguments and a user's own
    `config_kwargs.retries` win)."""
    s3 = fsspec.config.conf.setdefault("s3", {})
    config_kwargs = dict(s3.get("config_kwargs") or {})
    config_kwargs.setdefault("retries", botocore_retries())
    s3["config_kwargs"] = config_kwargs


configure_fsspec()


def open_for_columns(fs: fsspec.AbstractFileSystem, path: str) -> BinaryIO:
    """A Parquet file opened for reading some of its columns: no read-ahead, so each read that
    pyarrow makes (footer, column chunks) fetches only its own bytes."""
    if isinstance(fs, LocalFileSystem):
        return fs.open(path, "rb")
    return fs.open(path, "rb", cache_type="none")


def columns_filesystem(fs: fsspec.AbstractFileSystem | None) -> pafs.FileSystem:
    """A pyarrow filesystem over `fs` whose files open as `open_for_columns` does, for
    `pyarrow.dataset` / `pq.read_table` (None or a local filesystem: pyarrow's own local one)."""
    if fs is None or isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(_ColumnReads(fs))


class _ColumnReads(pafs.FSSpecHandler):
    def open_input_file(self, path: str) -> pa.PythonFile:
        # (fs.open raises FileNotFoundError itself: no isfile request before it)
        return pa.PythonFile(open_for_columns(self.fs, path), mode="r")


# ---------------------------------------------------------------------------------------------
# Which failures a task retries

@functools.cache
def _error_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(permanent, transient) exception types; a permanent one is checked first (most are
    subclasses of a transient one)."""
    permanent: list[type] = [FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                             FileExistsError]
    transient: list[type] = [OSError]
    try:
        from botocore import exceptions as be

        permanent += [be.NoCredentialsError, be.ParamValidationError]
        transient.append(be.BotoCoreError)  # connection, read-timeout and response-parsing errors
    except ImportError:
        pass
    try:
        from aiohttp import ClientError

        transient.append(ClientError)
    except ImportError:
        pass
    return tuple(permanent), tuple(transient)


def is_transient(e: BaseException) -> bool:
    """A storage failure that the same request may not meet again: an I/O error of s3fs,
    pyarrow or delta-rs (all raise OSError), a botocore / aiohttp transport error; not a
    missing object, a refused permission, an existing object or missing credentials, which
    would fail again."""
    permanent, transient = _error_types()
    cur: BaseException | None = e
    seen = 0
    while cur is not None and seen < 8:
        if isinstance(cur, permanent):
            return False
        if isinstance(cur, transient):
            return True
        cur, seen = cur.__cause__, seen + 1
    return False


class _TransientCheck(type):
    def __instancecheck__(cls, e) -> bool:
        return is_transient(e)


class TransientStorageError(Exception, metaclass=_TransientCheck):
    """Never raised: `isinstance(e, TransientStorageError)` is `is_transient(e)`, which is how
    Ray's `retry_exceptions` list selects the failures a task is run again for."""


def task_retry_args() -> dict:
    """`map_batches` keywords for a task stage that reads or writes storage (Ray remote args)."""
    # a fresh list each call: Ray Data appends to the list it is given
    return {"max_retries": TASK_MAX_RETRIES, "retry_exceptions": [TransientStorageError]}
