"""The one job runner: a run's identity, the skip of finished keys, the write stage, counting,
lost-row accounting, the Delta commits and the run record. Every job uses it.

    run = JobRun(output, "invert", cfg)
    todo, skipped = run.skip_done(inputs, LATENTS)                 # finished keys removed, counted
    res = run.write(None, LATENTS, expected=n_todo, inputs=todo, lost_rows=fn,
                    rerun=lambda rows, bs: build(rows, bs), batch_size=B)  # poison isolation
    res.add_skipped(skipped)
    run.commit({LATENTS: res}, summary)

The done check (`skip_done`; `mark_done` for a stream that must count every row at its write
stage) builds the committed table's done set once (in each task below DONE_SET_ACTOR_ROWS
committed rows, else in one actor; restricted to the work's own keys when the work is small),
so finished keys never reach a stage that reads bytes or runs a model. It also records, for the
commit, the version it read and the data files holding keys the run attempts again: the commit
opens only those and the files committed since (`delta.ReplaceHint`). Failure rows go to their
own data files, whose log statistics say they are not all ok (pipeline.incremental finds the
keys to retry without opening the files of good rows).

Rows flow worker to storage: the write stage (Ray tasks) writes each batch as a Parquet data
file of the table and returns a file record with per-status counts, so the driver holds one
small record per file, never rows. Counts: in = ok + failed + skipped, where `skipped` rows
(already done, or duplicates) are counted and never written.

Poison isolation (`write(..., rerun=, batch_size=)`): actor stages retry a crashed task a finite
number of times (pipeline.compute.retry_args); a task that still crashes is dropped
(`max_errored_blocks=-1` on the run's execution) and its rows do not come back. Those rows are
run again in the same run, in passes with half the batch size each (B/2, B/4, ... 1), each
pass only over the rows still missing; a row still missing after the pass at batch size 1
crashed its worker alone, every attempt: it is written as `worker_crash` (transient: the next
run tries it again), and every other row of its batches has come back from a later pass. At
most log2(B) + 1 passes, each over fewer rows, each crash bounded by the retries: bounded time.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import delta, storage
from pipeline.config import Section, as_dict
from pipeline.ray_private import release_leftover_actors, with_own_context
from pipeline.redact import redact_config
from pipeline.schemas import unsliced
from pipeline.status import STATUS_LOST, STATUS_OK, STATUS_SKIPPED, STATUS_WORKER_CRASH, TRANSIENT_STATUSES

log = logging.getLogger("stbatch.runner")

UNIT_COLUMN = "_unit"   # optional: the outcome that counts for an input unit (align counts files, not faces)


@dataclass(frozen=True)
class TableSpec:
    """A table: its Arrow schema, the key that is unique per row, and the key whose earlier rows
    a new attempt replaces (default: `key`; the faces table replaces all rows of an image)."""

    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    replace_key: tuple[str, ...] | None = None


@dataclass
class WriteResult:
    files: list[delta.FileRecord] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0, "skipped": 0})
    statuses: dict[str, int] = field(default_factory=dict)

    def add(self, rec: dict) -> None:
        if rec["path"]:
            self.files.append(delta.FileRecord(rec["path"], int(rec["size"]), int(rec["rows"])))
        for k in ("ok", "failed", "skipped"):
            self.counts[k] += int(rec[f"n_{k}"])
        for s, n in json.loads(rec["statuses"]).items():
            self.statuses[s] = self.statuses.get(s, 0) + int(n)

    def merge(self, other: "WriteResult") -> None:
        self.files += other.files
        for k, n in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + n
        for s, n in other.statuses.items():
            self.statuses[s] = self.statuses.get(s, 0) + n

    def add_skipped(self, n: int) -> None:
        """Rows skipped before the pipeline (JobRun.skip_done): counted, never written."""
        self.counts["skipped"] += int(n)

    @property
    def done(self) -> int:
        return sum(self.counts.values())


def is_done(status: pa.Array, retry_failed: bool) -> pa.Array:
    """Rows whose key needs no new attempt: ok, or (unless `retry_failed`) a permanent failure."""
    ok = pc.equal(status, STATUS_OK)
    if retry_failed:
        return ok
    return pc.or_(ok, pc.invert(pc.is_in(status, pa.array(sorted(TRANSIENT_STATUSES)))))


def _done_keys(batch: pa.Table, key: list[str], retry_failed: bool, only_refs: list | None = None) -> pa.Table:
    """The key of every row, whether that row needs no new attempt (`_done`), and its file;
    with `only_refs`, only the rows of those keys (the work's, when it is small)."""
    if only_refs:
        only = delta.gather(only_refs)
        keep = pc.is_in(delta.key_strings(batch, key),
                        value_set=delta.key_strings(only, key) if only is not None else pa.array([], pa.string()))
        batch = batch.filter(keep)
    return batch.select([*key, DONE_PATH]).append_column("_done", is_done(batch.column("status"), retry_failed))


DONE_PATH = "_path"          # the data file (relative to the table root) of a committed row
# Below this many committed rows the done set is rebuilt in each task (milliseconds); above it,
# one actor builds it once and every block of the input passes through it.
DONE_SET_ACTOR_ROWS = 200_000
# A work list of at most this many keys (a nightly's new faces) is broadcast to the tasks that
# read the committed keys, which keep only the rows of those keys: the done set stays small
# however large the table is.
RESTRICT_TO_WORK_ROWS = 200_000


def _key_bytes(t: pa.Table, key: list[str]) -> np.ndarray:
    """Fixed-width bytes per row of a (possibly composite) key: sortable, searchable in numpy."""
    ks = pc.cast(delta.key_strings(t, key), pa.binary())
    return ks.to_numpy(zero_copy_only=False).astype(np.bytes_) if len(ks) else np.array([], dtype="S1")


class DoneSet:
    """The keys of a committed table that need no new attempt, built once from the snapshot's
    key columns (broadcast through the object store), and a filter of work rows against it.

    A key is done when every committed row of it is: an image with one ok face row and one
    transient failure row is attempted again. `mark`: done rows are kept with status `skipped`
    (see _mark_skipped) instead of removed."""

    def __init__(self, refs: list, key: list[str], mark: bool = False):
        self.key, self.mark = list(key), mark
        self.done = np.array([], dtype="S1")
        self.keys, self.again = np.array([], dtype="S1"), np.array([], dtype=bool)
        done = delta.gather(refs)
        if done is None:
            return
        self.table = done
        self.keys = _key_bytes(done, self.key)
        flag = done.column("_done").to_numpy(zero_copy_only=False).astype(bool)
        self.done = np.setdiff1d(np.unique(self.keys[flag]), np.unique(self.keys[~flag]), assume_unique=True)

    def retried_paths(self, table_root_path: str) -> list[str]:
        """The data files (relative to the table root) holding rows of keys attempted again."""
        if not len(self.keys):
            return []
        again = pa.array(~_member(self.done, self.keys))
        paths = pc.unique(self.table.column(DONE_PATH).filter(again)).to_pylist()
        return sorted(p[len(table_root_path):].lstrip("/") for p in paths)

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = unsliced(batch)
        hit = _member(self.done, _key_bytes(batch, self.key))
        if self.mark:
            return _mark_skipped(batch, hit)
        return batch.filter(pa.array(~hit))


def _mark_skipped(batch: pa.Table, hit: np.ndarray) -> pa.Table:
    """Rows of done keys get status `skipped` and lose their bytes (a stream whose rows must all
    reach the write stage to be counted: they pass the later stages as empty rows)."""
    flag = pa.array(hit)
    batch = batch.set_column(batch.schema.get_field_index("status"), "status",
                             pc.if_else(flag, pa.scalar(STATUS_SKIPPED), batch.column("status")))
    if "bytes" in batch.column_names:
        col = batch.column("bytes")
        batch = batch.set_column(batch.schema.get_field_index("bytes"), "bytes",
                                 pc.if_else(flag, pa.scalar(b"", col.type), col))
    return batch


def _member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if not len(sorted_keys) or not len(keys):
        return np.zeros(len(keys), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def _skip_in_task(batch: pa.Table, refs: list, key: list[str], mark: bool) -> pa.Table:
    return DoneSet(refs, key, mark)(batch)


def _retried_paths(refs: list, key: list[str], table_root_path: str) -> list[str]:
    return DoneSet(refs, key).retried_paths(table_root_path)


def _missing(batch: pa.Table, key: list[str], back_refs: list) -> pa.Table:
    batch = unsliced(batch).filter(pc.not_equal(batch.column("status"), STATUS_SKIPPED))
    back = delta.gather(back_refs)
    if back is None or not batch.num_rows:
        return batch
    return batch.filter(pc.invert(pc.is_in(delta.key_strings(batch, key),
                                           value_set=pc.unique(delta.key_strings(back, key)))))


def _as_worker_crash(batch: pa.Table, batch_size: int) -> pa.Table:
    """`lost` rows -> `worker_crash` rows with the reason (other statuses kept)."""
    lost = pc.equal(batch.column("status"), STATUS_LOST)
    error = (f"the worker died on this row in every attempt, alone in its batch (isolated from a batch of "
             f"{batch_size} in passes of halved batch size): a native crash or out of memory on this input")
    batch = batch.set_column(batch.schema.get_field_index("status"), "status",
                             pc.if_else(lost, pa.scalar(STATUS_WORKER_CRASH), batch.column("status")))
    err = batch.column("error").cast(pa.string())
    return batch.set_column(batch.schema.get_field_index("error"), "error", pc.if_else(lost, pa.scalar(error), err))


WRITE_RECORD_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("rows", pa.int64()),
                                 ("n_ok", pa.int64()), ("n_failed", pa.int64()), ("n_skipped", pa.int64()),
                                 ("statuses", pa.string())])


def write_batch(batch: pa.Table, output: str, table: str, run_id: str, schema: pa.Schema,
                count_skipped: bool = True) -> pa.Table:
    """Ray task: count a batch's rows and write those that are not skipped as one data file.
    `count_skipped=False` (an isolation pass): skipped rows were counted by the first pass."""
    batch = unsliced(batch)
    status = batch.column("status")
    unit = batch.column(UNIT_COLUMN) if UNIT_COLUMN in batch.column_names else None
    counted = unit if unit is not None else status
    vals = [v for v in counted.to_pylist() if v is not None and v != "" and (count_skipped or v != STATUS_SKIPPED)]
    if unit is not None:
        n_ok, n_skip = vals.count("ok"), vals.count("skipped")
        n_failed = len(vals) - n_ok - n_skip
    else:
        n_ok, n_skip = vals.count(STATUS_OK), vals.count(STATUS_SKIPPED)
        n_failed = len(vals) - n_ok - n_skip
    keep = batch.filter(pc.not_equal(status, STATUS_SKIPPED))
    stat_counts: dict[str, int] = {}
    for s in keep.column("status").to_pylist():
        stat_counts[s] = stat_counts.get(s, 0) + 1
    # Failure rows go to a file of their own: a later retry rewrites that small file, never a
    # file of good rows (the commit opens only files holding keys it replaces).
    files = []
    if keep.num_rows:
        ok = pc.equal(keep.column("status"), STATUS_OK)
        keep = keep.select([f.name for f in schema]).cast(schema)
        for part, tag in ((keep.filter(ok), delta.OK_TAG), (keep.filter(pc.invert(ok)), "")):
            if part.num_rows:
                files.append(delta.write_data_file(part, output, table, run_id, tag=tag))
    n = max(1, len(files))
    paths: list[str | None] = [f.path for f in files] or [None]
    return pa.table({"path": paths, "size": [f.size for f in files] or [0],
                     "rows": [f.rows for f in files] or [0], "n_ok": [n_ok] + [0] * (n - 1),
                     "n_failed": [n_failed] + [0] * (n - 1), "n_skipped": [n_skip] + [0] * (n - 1),
                     "statuses": [json.dumps(stat_counts)] + ["{}"] * (n - 1)},
                    schema=WRITE_RECORD_SCHEMA)


class JobRun:
    """One run of a job writing under `output`; nothing is visible until `commit`."""

    def __init__(self, output: str, job: str, config: Section | None = None, rows_per_file: int = 20_000,
                 log_every_s: float = 30):
        self.output, self.job = output, job
        self.config = redact_config(as_dict(config)) if config is not None else {}  # None: tables written by hand
        self.run_id = storage.new_run_id(job)
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.t0 = time.time()
        self.rows_per_file = int(rows_per_file)
        self.log_every_s = float(log_every_s)
        self.versions: dict[str, int | None] = {}
        self.hints: dict[str, delta.ReplaceHint] = {}     # per table: what its commit must check
        self.consumed: dict[str, tuple[str, int]] = {}    # per table: (app id, source version) to record

    # -- before the work ---------------------------------------------------------------------

    def _done_check(self, inputs, table: TableSpec, retry_failed: bool, key: tuple[str, ...] | None,
                    mark: bool, n_in: int | None = None):
        """`inputs` through the done set of the committed `table` (see DoneSet); records what the
        commit needs to know (the version read, the files of keys attempted again). `n_in`: the
        number of (materialized) `inputs` rows, when known; a small work list restricts the
        done set to its keys."""
        import ray

        key = tuple(key or table.key)
        snap = delta.snapshot(self.output, table.name)
        replace_key = tuple(table.replace_key or table.key)
        if snap is None or not snap.paths:
            self._hint(table, snap.version if snap else None, [])
            return inputs
        root = delta.table_root(self.output, table.name)
        _, root_path = storage.url_to_fs(root)
        done = delta.read_files([storage.join(root, p) for p in snap.paths],
                                [snap.schema.field(c) for c in (*key, "status")], path_column=DONE_PATH)
        small = n_in is not None and n_in <= RESTRICT_TO_WORK_ROWS
        only = delta.broadcast_refs(inputs.select_columns(list(key))) if small and n_in else None
        refs = delta.broadcast_refs(done.map_batches(_done_keys, batch_format="pyarrow", fn_kwargs={
            "key": list(key), "retry_failed": retry_failed, "only_refs": only}))
        if key == replace_key:  # the files it finds are those of the commit's own key
            retried: list[str] = []
            if not all(snap.all_ok):  # a key to attempt again has a failure row, in a file that is not all ok
                retried = ray.get(ray.remote(_retried_paths).options(num_cpus=0).remote(refs, list(key), root_path))
            self._hint(table, snap.version, retried)
        args = {"refs": refs, "key": list(key), "mark": mark}
        # (no CPU reserved for the done check: it filters in memory, and a CPU held by it could
        # be the one the read tasks of the same plan wait for, beside the model's actors)
        if small or snap.rows < DONE_SET_ACTOR_ROWS:
            return inputs.map_batches(_skip_in_task, batch_format="pyarrow", fn_kwargs=args)
        return inputs.map_batches(DoneSet, batch_format="pyarrow", fn_constructor_kwargs=args,
                                  compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)

    def _hint(self, table: TableSpec, version: int | None, paths: list[str]) -> None:
        """Record what the commit of `table` must check; a second done check of the same table in
        this run widens it (the older version, both sets of files)."""
        old = self.hints.get(table.name)
        if old is not None:
            version = None if old.read_version is None or version is None else min(old.read_version, version)
            paths = [*old.paths, *paths]
        self.hints[table.name] = delta.ReplaceHint(version, frozenset(paths))

    def skip_done(self, inputs, table: TableSpec, n_in: int | None = None, retry_failed: bool = False,
                  key: tuple[str, ...] | None = None):
        """(the rows of `inputs` whose key needs a new attempt, materialized; how many were
        skipped). Rows of keys whose committed rows are all ok, or (unless `retry_failed`)
        permanent failures, are removed here, before any stage reads bytes or runs a model.
        `n_in`: the number of `inputs` rows when the caller knows it (else counted)."""
        inputs = inputs.materialize()
        n_in = inputs.count() if n_in is None else int(n_in)
        if not n_in:
            return inputs, 0
        todo = self._done_check(inputs, table, retry_failed, key, mark=False, n_in=n_in)
        if todo is inputs:
            return inputs, 0
        todo = todo.materialize()
        return todo, n_in - todo.count()

    def mark_done(self, inputs, table: TableSpec, retry_failed: bool = False, key: tuple[str, ...] | None = None):
        """`inputs` with status `skipped` (and no bytes) where the key needs no new attempt, for a
        stream that counts every row at its write stage (align's content check after hashing)."""
        return self._done_check(inputs, table, retry_failed, key, mark=True)

    # -- the work ----------------------------------------------------------------------------

    def write(self, ds, table: TableSpec, expected: int | None = None, inputs=None,
              lost_rows: Callable[[pa.Table], pa.Table] | None = None,
              lost_key: tuple[str, ...] | None = None, rerun: Callable | None = None,
              batch_size: int | None = None) -> WriteResult:
        """Drain `ds` through the write stage; rows that never came back become `lost` rows.

        `lost_key`: the columns that match an input row with the rows written for it (default:
        the table's key; align matches input files by `source_uri`).
        `rerun(rows, batch_size)`: the job's stages over some of `inputs` rows at another batch
        size (`batch_size`: the first pass's); with it, a crashed task's rows are isolated in
        passes of halved batch size and a row that crashes alone becomes `worker_crash` (see the
        module docstring). A crash loses the actor's whole task, which is a bundle of blocks,
        not one batch: `rows` come in blocks of at most `batch_size` rows, and `rerun` must not
        batch them above it before the actor stage (its task stages take `batch_size` too).
        With `rerun`, `ds` is None and the first pass is `rerun(inputs, None)`, built here: no
        caller holds it, so its actors end when it is drained (see `ray_private.release_leftover_actors`)."""
        res = WriteResult()
        if ds is None:
            if rerun is None:
                raise ValueError("JobRun.write: give the dataset, or rerun to build it")
            ds = rerun(inputs, None)
        self._drain(ds, table, res, expected, tolerate_crashes=rerun is not None)
        del ds
        release_leftover_actors()
        if expected is not None and res.done < expected and inputs is not None and lost_rows is not None:
            key = list(lost_key or table.key)
            missing = self._missing_rows(inputs, key, table, res.files)
            crashed = False
            if rerun is not None and batch_size:
                bs = int(batch_size)
                while bs > 1 and missing.count():
                    bs = max(1, bs // 2)
                    log.warning("%d rows did not come back (a worker crashed, or an input is gone): running them "
                                "again in batches of %d", missing.count(), bs)
                    before = len(res.files)
                    self._drain(rerun(missing.repartition(target_num_rows_per_block=bs), bs), table, res, expected,
                                tolerate_crashes=True, count_skipped=False)
                    release_leftover_actors()
                    missing = self._missing_rows(missing, key, table, res.files[before:])
                crashed = True
            if missing.count():
                self._write_lost(res, table, missing, lost_rows, expected, crashed, int(batch_size or 0))
        return res

    def _drain(self, ds, table: TableSpec, res: WriteResult, expected: int | None, tolerate_crashes: bool,
               count_skipped: bool = True) -> None:
        """Run `ds` through the write stage, adding each file record to `res`. With
        `tolerate_crashes`, a task that fails for good (its actor died beyond its retries) is
        dropped instead of failing the run: its rows are missing, for the isolation passes.
        `count_skipped=False`: an isolation pass, whose skipped rows (align marks done files
        again) the first pass counted already."""
        last = time.time()
        out = ds.map_batches(write_batch, batch_format="pyarrow", batch_size=self.rows_per_file,
                             fn_kwargs={"output": self.output, "table": table.name, "run_id": self.run_id,
                                        "schema": table.schema, "count_skipped": count_skipped},
                             **storage.task_retry_args())  # a write that fails on storage runs again
        if tolerate_crashes:
            out = with_own_context(out)  # the setting stays with this run
            out.context.max_errored_blocks = -1
        for rec in out.iter_rows():
            res.add(rec)
            if time.time() - last >= self.log_every_s:
                last = time.time()
                log.info("%s progress: %d%s rows (ok %d, failed %d, skipped %d), %.2f rows/s", self.job, res.done,
                         f"/{expected}" if expected else "", res.counts["ok"], res.counts["failed"],
                         res.counts["skipped"], res.done / max(time.time() - self.t0, 1e-9))

    def write_small(self, table: TableSpec, t: pa.Table) -> WriteResult:
        """Write rows built in the driver, for tables whose size does not grow with the dataset
        (one row per model or attribute): the same file format and accounting as `write`."""
        res = WriteResult()
        if t.num_rows:
            for rec in write_batch(t, self.output, table.name, self.run_id, table.schema).to_pylist():
                res.add(rec)
        return res

    def _missing_rows(self, rows, key: list[str], table: TableSpec, files: list[delta.FileRecord]):
        """The rows of `rows` (not skipped) with no row of the same key in `files`, materialized
        (a handful: the rows of crashed tasks)."""
        refs = []
        if files:
            root = delta.table_root(self.output, table.name)
            refs = delta.broadcast_refs(delta.read_files([storage.join(root, f.path) for f in files],
                                                         [table.schema.field(k) for k in key]))
        return rows.map_batches(_missing, batch_format="pyarrow",
                                fn_kwargs={"key": key, "back_refs": refs}).materialize()

    def _write_lost(self, res: WriteResult, table: TableSpec, missing, lost_rows, expected: int,
                    crashed: bool, batch_size: int) -> None:
        """Rows that never came back: `lost` rows (`lost_rows` builds them; it may give another
        status, such as align's read_error for a file that vanished), or, after the isolation
        passes (`crashed`), `worker_crash` rows in place of `lost`."""
        n_lost = expected - res.done
        status = STATUS_WORKER_CRASH if crashed else STATUS_LOST
        log.error("%d rows did not come back from the pipeline: writing them as '%s' (or the status the job "
                  "finds, such as read_error)", n_lost, status)
        before = res.done
        rows = missing.map_batches(lost_rows, batch_format="pyarrow")
        if crashed:
            rows = rows.map_batches(_as_worker_crash, batch_format="pyarrow", fn_kwargs={"batch_size": batch_size})
        for rec in rows.map_batches(write_batch, batch_format="pyarrow", batch_size=self.rows_per_file,
                                    fn_kwargs={"output": self.output, "table": table.name, "run_id": self.run_id,
                                               "schema": table.schema}, **storage.task_retry_args()).iter_rows():
            res.add(rec)
        if res.done != expected:
            log.error("accounting: %d rows expected, %d counted (%d recovered as lost)", expected, res.done,
                      res.done - before)

    # -- publishing --------------------------------------------------------------------------

    def commit(self, results: dict[TableSpec, WriteResult], summary: dict, extra: dict | None = None,
               replace: bool = True, metadata: dict[str, str] | None = None) -> dict:
        """One Delta commit per table (metadata: run id, job, code version, counts, and the job's
        own `metadata`), then the human-readable run record `_runs/<run_id>.json`."""
        meta = {**(metadata or {}), "run_id": self.run_id, "job": self.job, "code_version": storage.code_version(),
                "counts": json.dumps({k: summary.get(k) for k in ("in", "ok", "failed", "skipped")})}
        for spec, res in results.items():
            self.versions[spec.name] = delta.commit(self.output, spec.name, spec.schema, list(spec.key),
                                                    res.files, self.run_id, meta, replace=replace,
                                                    replace_key=list(spec.replace_key or spec.key),
                                                    hint=self.hints.get(spec.name),
                                                    app_txn=self.consumed.get(spec.name))
        # the summary and the extras carry URIs too (inputs, model names and files)
        record = redact_config({"run_id": self.run_id, "job": self.job, "output": self.output,
                                "started_at": self.started.isoformat(),
                                "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                                "code_version": meta["code_version"], "config": self.config,
                                "tables": {k: v for k, v in self.versions.items()}, "summary": summary,
                                **(extra or {})})
        storage.write_bytes(storage.join(self.output, storage.RUNS_DIR, f"{self.run_id}.json"),
                            json.dumps(record, indent=2, sort_keys=True, default=str).encode())
        return record

    def seconds(self) -> float:
        return round(time.time() - self.t0, 2)


SKETCH_POINTS = 512  # per data file and metric: exact below this many rows, quantile points above


def _metric_sketch(batch: pa.Table, columns: list[str]) -> pa.Table:
    """One row per metric of a block of ok rows: count, sum, and the block's values (all of them,
    or SKETCH_POINTS quantile points, each standing for count / SKETCH_POINTS rows)."""
    ok = batch.filter(pc.equal(batch.column("status"), STATUS_OK))
    rows: dict[str, list] = {"metric": [], "n": [], "sum": [], "points": [], "labels": []}
    labels = sorted({x for x in ok.column("metric_backbones").to_pylist() if x}) if "metric_backbones" in \
        ok.column_names else []
    at = (np.arange(SKETCH_POINTS) + 0.5) / SKETCH_POINTS
    for col in columns:
        v = ok.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
        v = v[~np.isnan(v)]
        pts = np.sort(v) if v.size <= SKETCH_POINTS else np.quantile(v, at)
        rows["metric"].append(col)
        rows["n"].append(int(v.size))
        rows["sum"].append(float(v.sum()))
        rows["points"].append(pts.tolist())
        rows["labels"].append(labels)
    return pa.table(rows, schema=pa.schema([("metric", pa.string()), ("n", pa.int64()), ("sum", pa.float64()),
                                            ("points", pa.list_(pa.float64())), ("labels", pa.list_(pa.string()))]))


def _weighted_quantile(points: np.ndarray, weights: np.ndarray, q: float) -> float:
    if np.all(weights == 1):  # every value is here: numpy's own (linear) percentile, exact
        return float(np.percentile(points, 100 * q))
    order = np.argsort(points)
    p, w = points[order], weights[order]
    cdf = (np.cumsum(w) - 0.5 * w) / w.sum()
    return float(np.interp(q, cdf, p))


def reduce_run_files(output: str, table: str, files: list[delta.FileRecord], fields: list[pa.Field],
                     fn: Callable[..., pa.Table], **fn_kwargs):
    """A Dataset of `fn(block, **fn_kwargs)` over the columns `fields` of a run's own data files:
    the end-of-run summaries are reduced in Ray tasks, so the driver handles one small record per
    block (O(files)), never the run's rows."""
    root = delta.table_root(output, table)
    return delta.read_files([storage.join(root, f.path) for f in files], fields).map_batches(
        fn, batch_format="pyarrow", fn_kwargs=fn_kwargs)


def run_summary(output: str, table: str, files: list[delta.FileRecord], columns: tuple[str, ...]) -> dict:
    """mean / p50 / p95 / n of metric columns over this run's committed ok rows. Ray tasks read
    the run's own files column-wise and reduce each block to a sketch (pipeline cost O(rows) in
    the workers, O(files) in the driver): mean and n are exact, p50 / p95 are exact while a
    block holds at most SKETCH_POINTS values and interpolated from its quantile points above."""
    if not files:
        return {}
    dt = delta.open_table(output, table)  # None before the run's first commit of the table
    schema = pa.schema(dt.schema().to_arrow()) if dt is not None else None
    present = [c for c in columns if schema is None or c in schema.names]
    extra = ["metric_backbones"] if schema is None or "metric_backbones" in schema.names else []
    fields = [pa.field(c, pa.float32()) for c in present] + [pa.field("status", pa.string())] + \
        [pa.field(c, pa.string()) for c in extra]
    sketches = reduce_run_files(output, table, files, fields, _metric_sketch, columns=present)
    merged: dict[str, dict] = {c: {"n": 0, "sum": 0.0, "points": [], "weights": []} for c in present}
    labels: set[str] = set()
    for r in sketches.iter_rows():
        m = merged[r["metric"]]
        pts = r["points"]
        m["n"] += r["n"]
        m["sum"] += r["sum"]
        m["points"] += pts
        m["weights"] += [r["n"] / len(pts)] * len(pts) if pts else []
        labels.update(r["labels"] or [])
    out: dict = {}
    for col, m in merged.items():
        if not m["n"]:
            out[col] = {"mean": math.nan, "p50": math.nan, "p95": math.nan, "n": 0}
            continue
        pts, w = np.asarray(m["points"]), np.asarray(m["weights"])
        out[col] = {"mean": round(m["sum"] / m["n"], 4), "p50": round(_weighted_quantile(pts, w, 0.5), 4),
                    "p95": round(_weighted_quantile(pts, w, 0.95), 4), "n": m["n"]}
    if extra:
        out["backbones"] = sorted(labels)
    return out
