"""The one job runner: a run's identity, the skip of finished keys, the write stage, counting,
lost-row accounting, the Delta commits and the run record. Every job uses it.

    run = JobRun(output, "invert", cfg)
    todo = run.mark_done(inputs, LATENTS, retry_failed=False)     # finished keys -> status "skipped"
    ds = todo.map_batches(...).map_batches(Model, ...)             # the job's own stages
    res = run.write(None, LATENTS, expected=n_in, inputs=inputs, lost_rows=fn,
                    rerun=lambda rows, bs: build(rows, bs), batch_size=B)  # poison isolation
    run.commit({LATENTS: res}, summary)

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
import gc
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import delta, storage
from pipeline.redact import redact_config

log = logging.getLogger("stbatch.runner")

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"   # counted, never written
STATUS_LOST = "lost"         # went into the pipeline and never came back (worker crash)
STATUS_WORKER_CRASH = "worker_crash"  # crashed its worker on every attempt, alone in its batch
# Failures a later run retries by default; every other failure status is permanent (the same
# input would fail the same way) and is retried only with `retry_failed=true`.
TRANSIENT_STATUSES = frozenset({
    "read_error", "write_error", "lost", "worker_crash", "invert_error", "align_error", "evaluate_error",
    "edit_error", "model_mismatch",
})
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

    @property
    def done(self) -> int:
        return sum(self.counts.values())


def is_done(status: pa.Array, retry_failed: bool) -> pa.Array:
    """Rows whose key needs no new attempt: ok, or (unless `retry_failed`) a permanent failure."""
    ok = pc.equal(status, STATUS_OK)
    if retry_failed:
        return ok
    return pc.or_(ok, pc.invert(pc.is_in(status, pa.array(sorted(TRANSIENT_STATUSES)))))


def _done_keys(batch: pa.Table, key: list[str], retry_failed: bool) -> pa.Table:
    """The key of every row and whether that row needs no new attempt (`_done`)."""
    return batch.select(key).append_column("_done", is_done(batch.column("status"), retry_failed))


def _mark(batch: pa.Table, key: list[str], done_refs: list) -> pa.Table:
    done = delta.gather(done_refs)
    if done is None or not batch.num_rows:
        return batch
    # A key is done when every committed row of it is (a key with several rows, such as an
    # image's faces, is attempted again when any of its rows still needs it).
    keys, flag = delta.key_strings(done, key), done.column("_done")
    mine = delta.key_strings(batch, key)
    hit = pc.and_(pc.is_in(mine, value_set=pc.unique(pc.filter(keys, flag))),
                  pc.invert(pc.is_in(mine, value_set=pc.unique(pc.filter(keys, pc.invert(flag))))))
    status = pc.if_else(hit, pa.scalar(STATUS_SKIPPED), batch.column("status"))
    return batch.set_column(batch.schema.get_field_index("status"), "status", status)


def _missing(batch: pa.Table, key: list[str], back_refs: list) -> pa.Table:
    batch = batch.filter(pc.not_equal(batch.column("status"), STATUS_SKIPPED))
    back = delta.gather(back_refs)
    if back is None or not batch.num_rows:
        return batch
    return batch.filter(pc.invert(pc.is_in(delta.key_strings(batch, key),
                                           value_set=pc.unique(delta.key_strings(back, key)))))


def _release_actors() -> None:
    """End the actors a finished execution left behind (called between two executions of one job).

    Ray Data drops its handles when an execution ends, and an actor lives as long as a handle
    to it does; after a task of the pool failed, a handle stays referenced from the driver (the
    recorded error's traceback), so the actor - restarted after its crash, idle - keeps its
    CPUs / GPUs, and the next pass, on a small cluster, waits for them forever. Those leftovers
    are the map-worker handles no live actor pool holds: another run in this driver (two jobs
    at once) has its actors in its pool, and they are never touched."""
    import ray
    from ray.actor import ActorHandle

    gc.collect()
    objects = gc.get_objects()
    left = [o for o in objects if issubclass(type(o), ActorHandle)  # (type(): no __class__ lookups)
            and o._ray_actor_creation_function_descriptor.class_name.startswith("MapWorker(")]
    if not left:
        return
    in_use = _pooled_actor_ids(objects)
    ended = 0
    for h in left:
        if h._ray_actor_id not in in_use:
            ray.kill(h, no_restart=True)
            ended += 1
    if ended:
        log.info("ended %d actor(s) left by the finished pass", ended)


def _pooled_actor_ids(objects: list) -> set:
    """Ids of the actors that a live Ray Data actor pool (a running execution) holds."""
    from ray.data._internal.execution.operators.actor_pool_map_operator import _ActorPool

    ids = set()
    for o in objects:
        if isinstance(o, _ActorPool):
            ids.update(h._ray_actor_id for h in list(o._running_actors))
            ids.update(h._ray_actor_id for h in list(o._pending_actors.values()))
    return ids


def _as_worker_crash(batch: pa.Table, batch_size: int) -> pa.Table:
    """`lost` rows -> `worker_crash` rows with the reason (other statuses kept)."""
    lost = pc.equal(batch.column("status"), STATUS_LOST)
    error = (f"the worker died on this row in every attempt, alone in its batch (isolated from a batch of "
             f"{batch_size} in passes of halved batch size): a native crash or out of memory on this input")
    batch = batch.set_column(batch.schema.get_field_index("status"), "status",
                             pc.if_else(lost, pa.scalar(STATUS_WORKER_CRASH), batch.column("status")))
    err = batch.column("error").cast(pa.string())
    return batch.set_column(batch.schema.get_field_index("error"), "error", pc.if_else(lost, pa.scalar(error), err))


def write_batch(batch: pa.Table, output: str, table: str, run_id: str, schema: pa.Schema,
                count_skipped: bool = True) -> pa.Table:
    """Ray task: count a batch's rows and write those that are not skipped as one data file.
    `count_skipped=False` (an isolation pass): skipped rows were counted by the first pass."""
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
    rec = {"path": None, "size": 0, "rows": 0}
    if keep.num_rows:
        keep = keep.select([f.name for f in schema]).cast(schema)
        f = delta.write_data_file(keep, output, table, run_id)
        rec = {"path": f.path, "size": f.size, "rows": f.rows}
    return pa.table({"path": [rec["path"]], "size": [rec["size"]], "rows": [rec["rows"]], "n_ok": [n_ok],
                     "n_failed": [n_failed], "n_skipped": [n_skip], "statuses": [json.dumps(stat_counts)]})


class JobRun:
    """One run of a job writing under `output`; nothing is visible until `commit`."""

    def __init__(self, output: str, job: str, config: dict, rows_per_file: int = 20_000, log_every_s: float = 30):
        self.output, self.job = output, job
        self.config = redact_config(config)
        self.run_id = storage.new_run_id(job)
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.t0 = time.time()
        self.rows_per_file = int(rows_per_file)
        self.log_every_s = float(log_every_s)
        self.versions: dict[str, int | None] = {}

    # -- before the work ---------------------------------------------------------------------

    def mark_done(self, inputs, table: TableSpec, retry_failed: bool = False, key: tuple[str, ...] | None = None,
                  output: str | None = None):
        """`inputs` with `status` set to "skipped" where the committed table already has a row of
        the same key that needs no new attempt. The finished keys are broadcast to the tasks
        through the object store (a map-side join): the driver holds references, not keys."""
        key = tuple(key or table.key)
        snap = delta.read_snapshot(output or self.output, table.name, columns=[*key, "status"])
        if snap is None:
            return inputs
        done = snap.map_batches(_done_keys, batch_format="pyarrow",
                                fn_kwargs={"key": list(key), "retry_failed": retry_failed})
        return inputs.map_batches(_mark, batch_format="pyarrow",
                                  fn_kwargs={"key": list(key), "done_refs": delta.broadcast_refs(done)})

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
        caller holds it, so its actors end when it is drained (see `_release_actors`)."""
        res = WriteResult()
        if ds is None:
            ds = rerun(inputs, None)
        self._drain(ds, table, res, expected, tolerate_crashes=rerun is not None)
        del ds
        _release_actors()
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
                    _release_actors()
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
        from ray.data import Dataset

        last = time.time()
        out = ds.map_batches(write_batch, batch_format="pyarrow", batch_size=self.rows_per_file,
                             fn_kwargs={"output": self.output, "table": table.name, "run_id": self.run_id,
                                        "schema": table.schema, "count_skipped": count_skipped})
        if tolerate_crashes:
            out = Dataset.copy(out, _deep_copy=True)  # its own DataContext: the setting stays with this run
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
            res.add(write_batch(t, self.output, table.name, self.run_id, table.schema).to_pylist()[0])
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
                                               "schema": table.schema}).iter_rows():
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
                                                    replace_key=list(spec.replace_key or spec.key))
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


def run_summary(output: str, table: str, files: list[delta.FileRecord], columns: tuple[str, ...]) -> dict:
    """mean / p50 / p95 of metric columns over this run's committed rows (read column-wise from
    the run's own files; one float per face per metric)."""
    import pyarrow.dataset as pads

    from stmodel.metrics import summarize

    if not files:
        return {}
    root = delta.table_root(output, table)
    paths, fs = storage.ray_paths(root, [storage.join(root, f.path) for f in files])
    d = pads.dataset(paths, filesystem=fs or _local_fs(), format="parquet")
    present = [c for c in columns if c in d.schema.names]
    t = d.to_table(columns=present + (["metric_backbones"] if "metric_backbones" in d.schema.names else []),
                   filter=pc.equal(pc.field("status"), STATUS_OK))
    out = {}
    for col in present:
        v = t[col].to_numpy(zero_copy_only=False).astype(np.float64)
        out[col] = {k: (round(x, 4) if isinstance(x, float) else x) for k, x in summarize(v).items()}
    if "metric_backbones" in t.column_names:
        out["backbones"] = [x for x in t["metric_backbones"].unique().to_pylist() if x]
    return out


def _local_fs():
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem()
