"""Delta Lake tables under a dataset root: where they live, how engines reach them, and the one
atomic commit of a run.

    <output>/<table>/_delta_log/...        the transaction log (source of truth)
    <output>/<table>/part-<run>-<n>.parquet data files, written by the Ray workers

A run's workers write data files next to the log; the driver only sees file records (path,
size, rows) and makes one commit per table per run. Files of a killed run are never named by a
commit, so no reader sees them; `vacuum` removes them after its retention window.

One row per key: the commit replaces every earlier row of a key that the run wrote again (a
retried face, or a face that an overlapping run committed first), by rewriting the files that
held those rows and removing the originals in the same commit. Concurrent commits are detected
by delta-rs (put-if-absent of the next log entry; conditional put on S3) and the replacement is
recomputed on top of the winner, so overlapping runs end with every key exactly once.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline import storage
from pipeline.errors import JobError
from pipeline.redact import redact_table

log = logging.getLogger("stbatch.delta")

COMMIT_ATTEMPTS = 8


class CommitConflict(RuntimeError):
    """Another run kept committing to the same table; a rerun completes the work."""


# ---------------------------------------------------------------------------------------------
# Where a table is, for delta-rs


def table_root(output: str, table: str) -> str:
    return storage.join(output, table)


def _delta_uri(uri: str) -> str:
    fs, path = storage.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return str(Path(path).resolve())
    return uri.replace("s3a://", "s3://", 1)


def storage_options(uri: str) -> dict[str, str] | None:
    """delta-rs options from the same environment s3fs uses (endpoint, region, credentials of the
    standard AWS config); never written anywhere."""
    if not uri.startswith(("s3://", "s3a://")):
        return None
    opts = {"AWS_REGION": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            # Concurrent writers are safe only with an atomic put-if-absent of the next log entry.
            "conditional_put": "etag"}
    opts.update(storage.DELTA_RETRY_OPTIONS)  # backoff on 503 SlowDown and dropped connections
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    if not os.environ.get("AWS_ACCESS_KEY_ID"):
        try:  # profiles / SSO / instance roles of the standard AWS config, resolved by botocore
            import botocore.session

            creds = botocore.session.Session().get_credentials()
            if creds is not None:
                frozen = creds.get_frozen_credentials()
                opts.update(AWS_ACCESS_KEY_ID=frozen.access_key, AWS_SECRET_ACCESS_KEY=frozen.secret_key)
                if frozen.token:
                    opts["AWS_SESSION_TOKEN"] = frozen.token
        except Exception:  # noqa: BLE001 - no botocore or no config: delta-rs reads the environment
            pass
    return opts


def list_tables(output: str) -> list[str]:
    """Names of the Delta tables directly under a dataset root (folders with a `_delta_log`)."""
    fs, root = storage.url_to_fs(output)
    fs.invalidate_cache(root)  # delta-rs writes around fsspec: never trust a cached listing
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        path = str(e["name"]).rstrip("/")
        name = path.rsplit("/", 1)[-1]
        if e.get("type") == "directory" and not name.startswith(("_", ".")) and fs.exists(f"{path}/_delta_log"):
            out.append(name)
    return sorted(out)


def open_table(output: str, table: str, version: int | None = None):
    """The committed table (optionally at a version), or None when it does not exist yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    uri = table_root(output, table)
    # Not `DeltaTable.is_deltatable`: it keeps Python's GIL during its S3 request (delta-rs 1.6),
    # which stalls every other thread of this process (an in-process S3 server waits forever).
    try:
        return DeltaTable(_delta_uri(uri), version=version, storage_options=storage_options(uri))
    except TableNotFoundError:
        return None


def delta_schema(schema: pa.Schema) -> pa.Schema:
    """The Arrow schema as Delta stores it: fixed-size lists become lists (Delta has no
    fixed-size list), table metadata dropped."""
    def plain(t: pa.DataType) -> pa.DataType:
        if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
            return pa.list_(plain(t.value_type))
        return t

    return pa.schema([pa.field(f.name, plain(f.type), nullable=True) for f in schema])


def _snapshot(output: str, table: str, version: int | None = None) -> tuple:
    """The committed table and the URIs of its snapshot's data files ((None, []) when there is
    no table)."""
    dt = open_table(output, table, version)
    if dt is None:
        return None, []
    root = table_root(output, table)
    return dt, [storage.join(root, p) for p in _relative_paths(dt)]


@dataclass(frozen=True)
class Snapshot:
    """A committed version of a table as its log names it: O(files), never rows."""

    version: int
    paths: list[str]        # data files, relative to the table root
    rows: int               # from the log's per-file statistics
    schema: pa.Schema
    all_ok: list[bool]      # per file: its name says every row is ok (is_all_ok)


def snapshot(output: str, table: str, version: int | None = None) -> Snapshot | None:
    """The committed snapshot (at `version`, or the newest); None when there is no table."""
    dt = open_table(output, table, version)
    if dt is None:
        return None
    adds = dt.get_add_actions(flatten=True)
    names = adds.column_names
    rows = adds.column("num_records").to_pylist() if "num_records" in names else []
    paths = [str(p) for p in adds.column("path").to_pylist()]
    return Snapshot(dt.version(), paths, int(sum(r or 0 for r in rows)), pa.schema(dt.schema().to_arrow()),
                    [is_all_ok(p) for p in paths])


def snapshot_files(output: str, table: str, version: int | None = None) -> tuple[int | None, list[str]]:
    """(version, data file paths relative to the table root); (None, []) when there is no table."""
    snap = snapshot(output, table, version)
    return (None, []) if snap is None else (snap.version, snap.paths)


def app_version(output: str, table: str, app_id: str) -> int | None:
    """The version that the app transaction `app_id` recorded in `table` (None when none did)."""
    dt = open_table(output, table)
    if dt is None:
        return None
    v = dt.transaction_version(app_id)
    return None if v is None else int(v)


def snapshot_uris(output: str, table: str, version: int | None = None) -> list[str]:
    """URIs of the data files of the committed snapshot ([] when there is no table)."""
    return _snapshot(output, table, version)[1]


def _relative_paths(dt) -> list[str]:
    adds = dt.get_add_actions(flatten=True)
    return [str(p) for p in adds.column("path").to_pylist()]


def read_snapshot(output: str, table: str, columns: list[str] | None = None, version: int | None = None):
    """The committed snapshot as a Ray Dataset (None when the table is missing or empty)."""
    dt, uris = _snapshot(output, table, version)
    if not uris:
        return None
    schema = pa.schema(dt.schema().to_arrow())
    return read_files(uris, [schema.field(c) for c in columns] if columns else list(schema))


READ_BLOCK_BYTES = 64 << 20


def read_files(uris: list[str], fields: list[pa.Field], path_column: str | None = None):
    """A Ray Dataset over Parquet data files of ours (`fields`: the columns to read; a file
    written before its table gained a nullable column gets nulls in it). `path_column`: also
    a column of that name holding each row's file path (the path of `storage.url_to_fs`).

    Plain read tasks over a known file list (from_items + map_batches) rather than
    ray.data.read_parquet, whose file listing and footer sampling cost seconds per call on a
    small cluster: jobs read a snapshot several times a run. Blocks are cut at about
    READ_BLOCK_BYTES, so a file of wide rows never becomes one huge block."""
    import ray

    items = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=max(1, min(len(uris), 200)))
    return items.map_batches(_read_parquet_files, batch_format="numpy", batch_size=1,
                             fn_kwargs={"fields": list(fields), "path_column": path_column},
                             **storage.task_retry_args())


def _read_parquet_files(batch: dict, fields: list[pa.Field], path_column: str | None = None):
    names = [f.name for f in fields]
    for uri in batch["uri"]:
        fs, path = storage.url_to_fs(str(uri))
        with storage.open_for_columns(fs, path) as f:
            pf = pq.ParquetFile(f)
            have = set(pf.schema_arrow.names)
            parts, size = [], 0
            for rb in pf.iter_batches(batch_size=4096, columns=[n for n in names if n in have]):
                t = pa.Table.from_batches([rb])
                for fld in fields:
                    if fld.name not in have:
                        t = t.append_column(fld, pa.nulls(t.num_rows, fld.type))
                t = t.select(names)
                if path_column:  # one dictionary entry, not a string per row
                    t = t.append_column(path_column, pa.DictionaryArray.from_arrays(
                        pa.array(np.zeros(t.num_rows, np.int32)), pa.array([path], pa.string())))
                parts.append(t)
                size += t.nbytes
                if size >= READ_BLOCK_BYTES:
                    yield pa.concat_tables(parts)
                    parts, size = [], 0
            if parts:
                yield pa.concat_tables(parts)


def read_snapshot_arrow(output: str, table: str, columns: list[str] | None = None,
                        filter_expr=None) -> pa.Table | None:
    """A small committed table (or a projection / filter of one) into this process: for tables
    whose size does not grow with the dataset (model runs, classifier_eval) and for tests."""
    dt = open_table(output, table)
    if dt is None:
        return None
    return dt.to_pyarrow_dataset().to_table(columns=columns, filter=filter_expr)


def read_committed_arrow(output: str, table: str, columns: list[str] | None = None, filter_expr=None) -> pa.Table:
    """`read_snapshot_arrow` of a table an earlier step must have committed: JobError without it."""
    t = read_snapshot_arrow(output, table, columns, filter_expr)
    if t is None:
        raise JobError(f"no committed {table} table under {output}")
    return t


# ---------------------------------------------------------------------------------------------
# Data files, written by the workers


@dataclass(frozen=True)
class FileRecord:
    path: str        # relative to the table root
    size: int
    rows: int


FILE_RECORD_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("rows", pa.int64())])


def write_data_file(t: pa.Table, output: str, table: str, run_id: str, tag: str = "") -> FileRecord:
    """Write one Parquet data file of `table` (a fresh name: a retried task never overwrites a
    file that a commit may name). `tag`: OK_TAG for a file of ok rows only, "r" for a rewrite."""
    name = f"part-{run_id}-{tag}{uuid.uuid4().hex[:12]}.parquet"
    uri = storage.join(table_root(output, table), name)
    fs, path = storage.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # every table row passes here: no URI secret (userinfo, signed query) is ever stored
    t = redact_table(t.replace_schema_metadata(None).cast(delta_schema(t.schema)))
    pq.write_table(t, path, filesystem=fs, compression="zstd")
    return FileRecord(name, int(fs.size(path)), t.num_rows)


# ---------------------------------------------------------------------------------------------
# Replacement of earlier rows of the keys a run wrote


def key_strings(t: pa.Table, key: list[str]) -> pa.Array:
    """One string per row for a (possibly composite) key, for set membership in Arrow."""
    cols = [pc.cast(t.column(k), pa.string()) for k in key]
    if len(cols) == 1:
        return cols[0]
    return pc.binary_join_element_wise(*[pc.fill_null(c, "") for c in cols], "\x1f")


def broadcast_refs(ds) -> list:
    """A small-per-row dataset materialised in the object store: the driver keeps only refs."""
    return list(ds.materialize().to_arrow_refs())


def gather(refs: list) -> pa.Table | None:
    import ray

    parts = [t for t in ray.get(list(refs)) if t.num_rows]
    return pa.concat_tables(parts) if parts else None


REWRITE_SCHEMA = pa.schema([("old_path", pa.string()), ("old_size", pa.int64()), ("path", pa.string()),
                            ("size", pa.int64()), ("rows", pa.int64())])


def _replace_in_file(batch: dict, key: list[str], replace_key: list[str], ours_refs: list, output: str,
                     table: str, run_id: str, root_path: str, own_prefix: str) -> pa.Table:
    """One data file: the rows that a newer row supersedes are dropped, by writing the file
    again without them. In an earlier run's file a row loses to this run's rows of the same
    `replace_key` (a retried image replaces all its rows); in this run's own files a row loses to
    a twin of the same `key` in a greater file name or earlier in the same file. Returns the
    rewrite record (nothing when the file is untouched)."""
    fs, _ = storage.url_to_fs(output)
    out: dict[str, list] = {"old_path": [], "old_size": [], "path": [], "size": [], "rows": []}
    ours = gather(ours_refs)
    if ours is None:
        return pa.table(out, schema=REWRITE_SCHEMA)
    ours = ours.set_column(ours.schema.get_field_index("path"), "path", ours.column("path").cast(pa.string()))
    our_keys = key_strings(ours, key)
    our_replace = pc.unique(key_strings(ours, replace_key))
    cols = sorted(set(key) | set(replace_key))
    for path in batch["path"]:
        path = str(path)
        name = path.rsplit("/", 1)[-1]
        file_keys = pq.read_table(path, filesystem=storage.columns_filesystem(fs), columns=cols)
        if name.startswith(own_prefix):
            keys = key_strings(file_keys, key)
            # Our own file: a key loses to the same key in a greater file of ours, or to an
            # earlier row of this file.
            newer = pc.filter(our_keys, pc.greater(ours.column("path"), pa.scalar(path)))
            lose = pc.is_in(keys, value_set=pc.unique(newer)).to_numpy(zero_copy_only=False).copy()
            seen: set = set()
            for i, k in enumerate(keys.to_pylist()):
                lose[i] |= k in seen
                seen.add(k)
        else:
            lose = pc.is_in(key_strings(file_keys, replace_key), value_set=our_replace).to_numpy(zero_copy_only=False)
        if not lose.any():
            continue
        data = pq.read_table(path, filesystem=storage.columns_filesystem(fs))
        kept = data.filter(pa.array(~lose))
        rec = write_data_file(kept, output, table, run_id, tag="r") if kept.num_rows else None
        out["old_path"].append(path[len(root_path):].lstrip("/"))
        out["old_size"].append(int(fs.size(path)))
        out["path"].append(rec.path if rec else None)
        out["size"].append(rec.size if rec else 0)
        out["rows"].append(rec.rows if rec else 0)
    return pa.table(out, schema=REWRITE_SCHEMA)


def plan_replacements(output: str, table: str, schema: pa.Schema, key: list[str], snapshot: list[str],
                      ours: list[str], run_id: str, replace_key: list[str] | None = None) -> pa.Table:
    """Ray Data, one task per data file: drop every row that a newer row of the same key
    supersedes (in the snapshot, or among this run's files), rewriting the files that held them.
    The run's own keys are broadcast through the object store; no shuffle, nothing in the
    driver but one record per rewritten file: old_path, old_size, path (None when nothing is
    left), size, rows."""
    import ray

    empty = pa.table({"old_path": pa.array([], pa.string())})
    root = table_root(output, table)
    _, root_path = storage.url_to_fs(root)
    if not ours:
        return empty
    replace_key = list(replace_key or key)
    cols = sorted(set(key) | set(replace_key))
    refs = broadcast_refs(read_files([storage.join(root, p) for p in ours], [schema.field(c) for c in cols],
                                     path_column="path"))
    all_paths, _ = storage.ray_paths(root, [storage.join(root, p) for p in snapshot + ours])
    files = ray.data.from_items([{"path": p} for p in all_paths], override_num_blocks=max(1, min(len(all_paths), 64)))
    res = files.map_batches(_replace_in_file, batch_format="numpy", batch_size=4, fn_kwargs={
        "key": key, "replace_key": replace_key, "ours_refs": refs, "output": output, "table": table, "run_id": run_id,
        "root_path": root_path, "own_prefix": f"part-{run_id}-"}, **storage.task_retry_args())
    parts = [b for b in res.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    return pa.concat_tables(parts) if parts else empty


# ---------------------------------------------------------------------------------------------
# The commit


def _add(path: str, size: int, rows: int):
    from deltalake.transaction import AddAction

    # Only numRecords: partial column statistics would make delta-rs's pyarrow dataset prune
    # files on the columns they leave out.
    return AddAction(path, int(size), {}, int(time.time() * 1000), True, json.dumps({"numRecords": int(rows)}))


OK_TAG = "k"  # data files holding ok rows only are named part-<run>-k<hex>.parquet


def is_all_ok(path: str) -> bool:
    """Whether a data file holds ok rows only, by its name (write_data_file's `tag`), so that an
    incremental reader finds the files of failures without opening any file."""
    return path.rsplit("/", 1)[-1].rsplit("-", 1)[-1].startswith(OK_TAG)


def _ensure_table(output: str, table: str, schema: pa.Schema):
    from deltalake import DeltaTable, Schema

    dt = open_table(output, table)
    if dt is not None:
        return _add_missing_columns(output, table, dt, schema)
    uri = table_root(output, table)
    try:
        DeltaTable.create(_delta_uri(uri), schema=Schema.from_arrow(delta_schema(schema)), mode="ignore",
                          storage_options=storage_options(uri), name=table)
    except Exception as e:  # noqa: BLE001 - a concurrent creator won: use its table
        log.info("table %s was created concurrently (%s)", uri, type(e).__name__)
    return open_table(output, table)


def _add_missing_columns(output: str, table: str, dt, schema: pa.Schema):
    """A table made before `schema` gained nullable columns gets them (a metadata-only commit):
    Delta reads by the table's own schema, so a data file's extra columns would stay invisible."""
    from deltalake import Schema

    have = {f.name for f in dt.schema().fields}
    missing = [f for f in delta_schema(schema) if f.name not in have]
    if not missing:
        return dt
    log.info("adding columns %s to the table %s", [f.name for f in missing], table)
    try:
        dt.alter.add_columns(list(Schema.from_arrow(pa.schema(missing)).fields))
    except Exception:  # noqa: BLE001 - a concurrent run may have added them first
        have = {f.name for f in open_table(output, table).schema().fields}
        if any(f.name not in have for f in missing):
            raise
    return open_table(output, table)


def commit_history(root: str, table: str) -> list[dict]:
    """The `commitInfo` of every commit still in the table's log (custom metadata at the top
    level, plus `version`), read as JSON through fsspec. (Not `DeltaTable.history`: delta-rs 1.6
    keeps Python's GIL during its requests, stalling every other thread of this process.)"""
    fs, base = storage.url_to_fs(storage.join(table_root(root, table), "_delta_log"))
    fs.invalidate_cache(base)
    out = []
    for p in sorted(fs.glob(f"{base}/*.json")):
        name = p.rsplit("/", 1)[-1][:-5]
        if not name.isdigit():
            continue
        with fs.open(p, "rb") as f:
            for line in f.read().decode("utf-8").splitlines():
                if '"commitInfo"' not in line:
                    continue
                info = json.loads(line).get("commitInfo")
                if isinstance(info, dict):
                    out.append({**info, "version": int(name)})
                break
    return out


def last_commit_run(output: str, table: str) -> str | None:
    try:
        hist = commit_history(output, table)
        return hist[-1].get("run_id") if hist else None
    except Exception:  # noqa: BLE001 - naming the other run is best effort
        return None


@dataclass(frozen=True)
class ReplaceHint:
    """What a run's done check learned of a table: the version it read, and the data files of
    that version holding rows of the keys the run attempts again. The commit then opens only
    those files and the files committed since that version (an overlapping run's), never the
    rest of the table. `read_version` None: the table did not exist then (every file is newer)."""

    read_version: int | None
    paths: frozenset[str]


def _files_to_check(output: str, table: str, snapshot: list[str], hint: ReplaceHint | None,
                    seen: dict) -> list[str]:
    """The snapshot's files that can hold a row this run replaces (all of them without a hint).
    `seen` caches the file set of the hint's version across commit attempts."""
    if hint is None:
        return snapshot
    if hint.read_version is not None and "then" not in seen:
        try:
            seen["then"] = set(snapshot_files(output, table, hint.read_version)[1])
        except Exception as e:  # noqa: BLE001 - that version's log is gone: check every file
            log.info("%s: version %d cannot be loaded (%s): checking every file", table, hint.read_version,
                     type(e).__name__)
            seen["then"] = None
    then = seen.get("then", set())
    if hint.read_version is not None and then is None:
        return snapshot
    return [p for p in snapshot if p in hint.paths or p not in then]


def commit(output: str, table: str, schema: pa.Schema, key: list[str] | None, files: list[FileRecord],
           run_id: str, metadata: dict, replace: bool = True, replace_key: list[str] | None = None,
           hint: ReplaceHint | None = None, app_txn: tuple[str, int] | None = None) -> int | None:
    """Publish this run's data files in one commit, replacing earlier rows of the same keys.

    `hint`: only these files can hold a replaced row (see ReplaceHint); without it every file of
    the snapshot is checked. `app_txn` (app id, version): a Delta app transaction recorded in the
    same commit (e.g. the version of the source table this run consumed); with it, a run with no
    files still commits, so the next run knows what was consumed.

    Returns the committed version (None when there was nothing to commit). Raises
    `CommitConflict` naming the other run when concurrent commits kept winning."""
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import CommitProperties, RemoveAction, Transaction

    if not files and app_txn is None:
        return None
    meta = {k: v for k, v in metadata.items() if v is not None}
    txns = [Transaction(app_txn[0], int(app_txn[1]), int(time.time() * 1000))] if app_txn else None
    ours = [f.path for f in files]
    other = None
    seen: dict = {}
    for attempt in range(COMMIT_ATTEMPTS):
        dt = _ensure_table(output, table, schema)
        actions = [_add(f.path, f.size, f.rows) for f in files]
        if replace and key and files:
            check = _files_to_check(output, table, _relative_paths(dt), hint, seen)
            plan = plan_replacements(output, table, schema, key, check, ours, run_id, replace_key)
            if plan.num_rows:
                log.info("%s: %d files rewritten to replace earlier rows of the same keys", table, plan.num_rows)
            own = set(ours)
            for r in plan.to_pylist():
                if r["old_path"] in own:  # our own file lost rows to a twin: never publish it
                    actions = [a for a in actions if a.path != r["old_path"]]
                else:
                    actions.append(RemoveAction(r["old_path"], True, int(time.time() * 1000), r["old_size"]))
                if r["path"]:
                    actions.append(_add(r["path"], r["size"], r["rows"]))
        try:
            dt.create_write_transaction(actions, "append", delta_schema(schema),
                                        commit_properties=CommitProperties(custom_metadata=meta, max_commit_retries=0,
                                                                           app_transactions=txns))
            version = open_table(output, table).version()
            log.info("committed %s version %d (run %s, %d files)", table, version, run_id, len(files))
            return version
        except CommitFailedError as e:
            other = last_commit_run(output, table)
            log.warning("commit of %s by run %s lost a race with run %s (%s); recomputing on top of it",
                        table, run_id, other or "?", e)
            time.sleep(min(8.0, 0.25 * 2 ** attempt) * (0.5 + random.random()))
    raise CommitConflict(f"{table}: run {run_id} could not commit after {COMMIT_ATTEMPTS} attempts; "
                         f"run {other or '(unknown)'} kept committing to the same table. Rerun to finish.")
