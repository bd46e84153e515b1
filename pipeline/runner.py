"""The one job runner: a run's identity, the skip of finished keys, the write stage, counting,
lost-row accounting, the Delta commits and the run record. Every job uses it.

    run = JobRun(output, "invert", cfg)
    todo = run.mark_done(inputs, LATENTS, retry_failed=False)     # finished keys -> status "skipped"
    ds = todo.map_batches(...).map_batches(Model, ...)             # the job's own stages
    res = run.write(ds, LATENTS, expected=n_in, inputs=inputs, lost_rows=fn)
    run.commit({LATENTS: res}, summary)

Rows flow worker to storage: the write stage (Ray tasks) writes each batch as a Parquet data
file of the table and returns a file record with per-status counts, so the driver holds one
small record per file, never rows. Counts: in = ok + failed + skipped, where `skipped` rows
(already done, or duplicates) are counted and never written.
"""
from __future__ import annotations

import datetime as _dt
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


def write_batch(batch: pa.Table, output: str, table: str, run_id: str, schema: pa.Schema) -> pa.Table:
    """Ray task: count a batch's rows and write those that are not skipped as one data file."""
    status = batch.column("status")
    unit = batch.column(UNIT_COLUMN) if UNIT_COLUMN in batch.column_names else None
    counted = unit if unit is not None else status
    vals = [v for v in counted.to_pylist() if v is not None and v != ""]
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
              lost_key: tuple[str, ...] | None = None) -> WriteResult:
        """Drain `ds` through the write stage; rows that never came back become `lost` rows.

        `lost_key`: the columns that match an input row with the rows written for it (default:
        the table's key; align matches input files by `source_uri`)."""
        res = WriteResult()
        last = time.time()
        out = ds.map_batches(write_batch, batch_format="pyarrow", batch_size=self.rows_per_file,
                             fn_kwargs={"output": self.output, "table": table.name, "run_id": self.run_id,
                                        "schema": table.schema})
        for rec in out.iter_rows():
            res.add(rec)
            if time.time() - last >= self.log_every_s:
                last = time.time()
                log.info("%s progress: %d%s rows (ok %d, failed %d, skipped %d), %.2f rows/s", self.job, res.done,
                         f"/{expected}" if expected else "", res.counts["ok"], res.counts["failed"],
                         res.counts["skipped"], res.done / max(time.time() - self.t0, 1e-9))
        if expected is not None and res.done < expected and inputs is not None and lost_rows is not None:
            self._write_lost(res, table, inputs, lost_rows, expected, lost_key)
        return res

    def write_small(self, table: TableSpec, t: pa.Table) -> WriteResult:
        """Write rows built in the driver, for tables whose size does not grow with the dataset
        (one row per model or attribute): the same file format and accounting as `write`."""
        res = WriteResult()
        if t.num_rows:
            res.add(write_batch(t, self.output, table.name, self.run_id, table.schema).to_pylist()[0])
        return res

    def _write_lost(self, res: WriteResult, table: TableSpec, inputs, lost_rows, expected: int,
                    lost_key: tuple[str, ...] | None = None) -> None:
        import ray

        n_lost = expected - res.done
        log.error("%d rows did not come back from the pipeline: writing them as '%s'", n_lost, STATUS_LOST)
        key = list(lost_key or table.key)
        refs = []
        if res.files:
            root = delta.table_root(self.output, table.name)
            paths, fs = storage.ray_paths(root, [storage.join(root, f.path) for f in res.files])
            refs = delta.broadcast_refs(ray.data.read_parquet(paths, filesystem=fs).select_columns(key))
        missing = inputs.map_batches(_missing, batch_format="pyarrow", fn_kwargs={"key": key, "back_refs": refs})
        before = res.done
        rows = missing.map_batches(lost_rows, batch_format="pyarrow")
        for rec in rows.map_batches(write_batch, batch_format="pyarrow", batch_size=self.rows_per_file,
                                    fn_kwargs={"output": self.output, "table": table.name, "run_id": self.run_id,
                                               "schema": table.schema}).iter_rows():
            res.add(rec)
        if res.done != expected:
            log.error("accounting: %d rows expected, %d counted (%d recovered as lost)", expected, res.done,
                      res.done - before)

    # -- publishing --------------------------------------------------------------------------

    def commit(self, results: dict[TableSpec, WriteResult], summary: dict, extra: dict | None = None,
               replace: bool = True) -> dict:
        """One Delta commit per table (metadata: run id, job, code version, counts), then the
        human-readable run record `_runs/<run_id>.json`."""
        meta = {"run_id": self.run_id, "job": self.job, "code_version": storage.code_version(),
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
