"""What a run reads of its source table: only what changed since the source version that the
last run consumed, plus the rows of keys to attempt again; or, on request, everything.

    src = read_source(run, input, "faces", WORK_COLUMNS, target=LATENTS, full_scan=False)
    res = run.write(None, LATENTS, expected=src.todo_count, inputs=src.rows, ...)
    res.add_skipped(src.skipped)

The version read is recorded with the run's commit of the target (a Delta app transaction, id
`consumed_app_id(job, input)`), so the next run opens only the source files added since then
(the current snapshot's files that were not in that version's). It also reads the source rows of
keys whose target rows are failures to attempt again: the target's files that hold failures are
known from their names (pipeline.delta.is_all_ok), so finding them opens no file of good rows.
It reads everything (`full`) when no run recorded a version, when that version is no longer in
the log (vacuumed / cleaned up), with `retry_failed`, or when asked (`full_scan`).

Two phases, so that skipped rows never carry their payload: the key columns (and the source
`status`) of the selected files are read and checked against the target's done set
(JobRun.skip_done); then the wanted columns are read only from the files that hold rows to do,
and only those rows are kept.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import delta, storage
from pipeline.runner import JobRun, TableSpec, is_done
from pipeline.schemas import unsliced
from pipeline.status import STATUS_OK

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger("stbatch.incremental")

PATH = "_source_file"


def consumed_app_id(job: str, source_root: str) -> str:
    """The app transaction id under which a job records the source version it consumed: one per
    (job, source), never the URI itself (it may carry a secret)."""
    digest = hashlib.sha256(source_root.rstrip("/").encode()).hexdigest()[:16]
    return f"stbatch.{job}.{digest}"


@dataclass
class SourceRead:
    rows: Dataset | None      # the rows to do (the wanted columns), or None
    n_in: int                 # source rows considered (ok rows of the files read)
    skipped: int              # of those, keys the target has done
    todo: int                 # rows to do
    mode: str                 # "incremental" | "full"
    since: int | None         # the source version the last run consumed (incremental)
    version: int | None       # the source version read

    def summary(self) -> dict:
        return {"mode": self.mode, "since_version": self.since, "source_version": self.version}


def _keep_rows(batch: pa.Table, key: list[str], new_files: list[str] | None, retry_refs: list) -> pa.Table:
    """Ok source rows in a new file, or of a key to attempt again."""
    batch = batch.filter(pc.equal(batch.column("status"), STATUS_OK))
    if new_files is None or not batch.num_rows:
        return batch
    keep = pc.is_in(batch.column(PATH).cast(pa.string()), value_set=pa.array(new_files, pa.string()))
    retry = delta.gather(retry_refs)
    if retry is not None:
        keep = pc.or_(keep, pc.is_in(delta.key_strings(batch, key), value_set=delta.key_strings(retry, key)))
    return batch.filter(keep)


def _not_done(batch: pa.Table, key: list[str], retry_failed: bool) -> pa.Table:
    return batch.filter(pc.invert(is_done(batch.column("status"), retry_failed))).select(key)


def _rows_of(batch: pa.Table, key: list[str], columns: list[str], todo_refs: list) -> pa.Table:
    todo = delta.gather(todo_refs)
    batch = unsliced(batch)
    mine = pc.is_in(delta.key_strings(batch, key), value_set=delta.key_strings(todo, key))
    return batch.filter(mine).select(columns)


def _paths(batch: pa.Table) -> pa.Table:
    return pa.table({"path": pc.unique(batch.column(PATH))})


def _distinct_paths(ds) -> list[str]:
    """The distinct file paths of a dataset's PATH column (O(files) into the driver)."""
    return sorted({r["path"] for r in ds.map_batches(_paths, batch_format="pyarrow").iter_rows()})


def read_source(run: JobRun, source_root: str, source_table: str, columns: list[str], target: TableSpec,
                retry_failed: bool = False, full_scan: bool = False) -> SourceRead | None:
    """The ok rows of `source_table` under `source_root` that `run` must process into `target`
    (see the module docstring); None when the source table does not exist."""
    snap = delta.snapshot(source_root, source_table)
    if snap is None:
        return None
    key = list(target.key)
    app = consumed_app_id(run.job, source_root)
    recorded = delta.app_version(run.output, target.name, app)
    since = None if (full_scan or retry_failed) else recorded
    if recorded != snap.version:  # (a run that consumed nothing new commits nothing)
        run.consumed[target.name] = (app, snap.version)
    new = None
    if since is not None:
        if since > snap.version:
            log.warning("%s: the last run consumed version %d, newer than the current %d (the table was "
                        "replaced?): reading everything", source_table, since, snap.version)
        else:
            then = delta.snapshot_files(source_root, source_table, since)[1] if since != snap.version else snap.paths
            seen = set(then)
            new = [p for p in snap.paths if p not in seen]
    root = delta.table_root(source_root, source_table)
    fields = [snap.schema.field(c) for c in dict.fromkeys([*key, "status"])]
    if new is None:
        files, retry_refs = list(snap.paths), []
    else:
        retry_refs = _retry_keys(run, target, key, retry_failed)
        files = list(new) if not retry_refs else list(snap.paths)
    mode = "full" if new is None else "incremental"
    if not files:
        log.info("%s: nothing new since version %s", source_table, since)
        return SourceRead(None, 0, 0, 0, mode, since, snap.version)
    uris = [storage.join(root, p) for p in files]
    new_uris = None if new is None else storage.ray_paths(root, [storage.join(root, p) for p in new])[0]
    keys = delta.read_files(uris, fields, path_column=PATH).map_batches(
        _keep_rows, batch_format="pyarrow", fn_kwargs={"key": key, "new_files": new_uris, "retry_refs": retry_refs})
    keys = keys.materialize()
    n_in = keys.count()
    todo, skipped = run.skip_done(keys, target, n_in=n_in, retry_failed=retry_failed)
    n_todo = todo.count()
    log.info("%s -> %s: %s read (source version %d%s): %d rows, %d already done, %d to do", source_table,
             target.name, mode, snap.version, f", since {since}" if since is not None else "", n_in, skipped, n_todo)
    if not n_todo:
        return SourceRead(None, n_in, skipped, 0, mode, since, snap.version)
    fs, _ = storage.url_to_fs(root)
    todo_paths = [storage.full_uri(fs, p) for p in _distinct_paths(todo)]
    refs = delta.broadcast_refs(todo.select_columns(key))
    wanted = [snap.schema.field(c) for c in columns]
    rows = delta.read_files(todo_paths, wanted + [f for f in fields if f.name not in columns],
                            path_column=None).map_batches(
        _rows_of, batch_format="pyarrow", fn_kwargs={"key": key, "columns": columns, "todo_refs": refs})
    return SourceRead(rows, n_in, skipped, n_todo, mode, since, snap.version)


def _retry_keys(run: JobRun, target: TableSpec, key: list[str], retry_failed: bool) -> list:
    """Object refs of the target's keys to attempt again, read from its files that hold failures
    only (the log's statistics name them); [] when there are none."""
    snap = delta.snapshot(run.output, target.name)
    if snap is None:
        return []
    failing = [p for p, ok in zip(snap.paths, snap.all_ok) if not ok]
    if not failing:
        return []
    root = delta.table_root(run.output, target.name)
    ds = delta.read_files([storage.join(root, p) for p in failing], [snap.schema.field(c) for c in (*key, "status")])
    ds = ds.map_batches(_not_done, batch_format="pyarrow", fn_kwargs={"key": key, "retry_failed": retry_failed})
    ds = ds.materialize()
    return delta.broadcast_refs(ds) if ds.count() else []
