"""What the dataset report reads, and how little of it: committed Delta snapshots column by
column, job runs from the Delta log (checked against the `_runs/` records) and the per-layer W+
norms (images: `pipeline.report_images`).

Nothing here holds a whole table. A section asks a `Snapshot` for the columns it needs (scalars
only: strings and floats per row), for a bounded `head` of filtered rows (thumbnails, failures)
or for a row count; the W+ codes are never read as a whole: their per-layer norms are summed
batch by batch, either over a bounded sample streamed through this process or over every code
in Ray Data (one row of sums per batch comes back). Every problem becomes a note in the page.

Job accounting: the Delta log is the truth. A run is committed when a table commit carries its
run id (commit metadata: `run_id`, `job`, `code_version`, `counts`); its `_runs/<run_id>.json`
record adds timings, configuration and metric summaries. A record whose tables have no commit
of its run is shown as not committed and counted nowhere; a commit without a record is shown
from the commit metadata alone. A run that writes no table (training) has only its record.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import delta, storage
from pipeline.schemas import unsliced
from pipeline.status import STATUS_OK

log = logging.getLogger("stbatch.report")

# `part-<run_id>-<hex>.parquet`, run ids as `storage.new_run_id` makes them
_RUN_FILE = re.compile(r"^part-(\d{8}T\d{6}Z-[A-Za-z0-9_]+-[0-9a-f]{8})-")


# ---------------------------------------------------------------------------------------------
# Filters (a missing column matches nothing)


class Nothing:
    """A filter that matches no row (it names a column the table lacks)."""


def where(names, status: str | None = None, not_status: tuple = (), nonnull: tuple = ()):
    """A dataset filter: status == `status` (or not in `not_status`, non-null), `nonnull` columns
    set. None = every row; `Nothing` when a named column is missing."""
    expr = None

    def both(a, b):
        return b if a is None else a & b

    for c in nonnull:
        if c not in names:
            return Nothing
        expr = both(expr, pc.field(c).is_valid())
    if status is not None or not_status:
        if "status" not in names:
            return Nothing
        expr = both(expr, pc.field("status").is_valid())
        if status is not None:
            expr = both(expr, pc.field("status") == status)
        if not_status:
            expr = both(expr, ~pc.field("status").isin(list(not_status)))
    return expr


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t)


# ---------------------------------------------------------------------------------------------
# One committed table


class Snapshot:
    """The committed snapshot of one Delta table, read lazily: only the columns and rows a
    section asks for come into this process."""

    def __init__(self, root: str, name: str, dt):
        self.root, self.name, self.dt = root, name, dt
        self.version = dt.version()
        self.ds = dt.to_pyarrow_dataset()
        self.schema = self.ds.schema
        self.names = set(self.schema.names)
        adds = pa.table(dt.get_add_actions(flatten=True))
        self.files = adds.num_rows
        recs = adds.column("num_records") if "num_records" in adds.column_names else None
        if recs is not None and recs.null_count == 0:
            self.rows = int(pc.sum(recs).as_py() or 0)
        else:
            self.rows = int(self.ds.count_rows())

    def scalar(self, columns) -> list[str]:
        """The requested columns this table has, leaving out list-typed ones (codes, logit
        vectors: the report shows scalars only)."""
        return [c for c in dict.fromkeys(columns) if c in self.names and not is_list(self.schema.field(c).type)]

    def has(self, c: str) -> bool:
        return c in self.names

    def read(self, columns, flt=None) -> pa.Table:
        """Scalar columns of every (filtered) row; absent columns are simply not there."""
        cols = self.scalar(columns)
        if flt is Nothing:
            return pa.table({c: pa.array([], self.schema.field(c).type) for c in cols})
        return self.ds.to_table(columns=cols, filter=flt)

    def head(self, n: int, columns, flt=None) -> pa.Table:
        """At most `n` (filtered) rows, in the table's file order."""
        cols = self.scalar(columns)
        if flt is Nothing or n <= 0:
            return pa.table({c: pa.array([], self.schema.field(c).type) for c in cols})
        return self.ds.head(n, columns=cols, filter=flt)

    def count(self, flt=None) -> int:
        if flt is Nothing:
            return 0
        return self.rows if flt is None else int(self.ds.count_rows(filter=flt))

    def value_counts(self, column: str) -> Counter:
        """Rows per value of one column, streamed batch by batch ("(null)" for nulls)."""
        out: Counter = Counter()
        if column not in self.names:
            return out
        for b in self.ds.to_batches(columns=[column]):
            for item in pc.value_counts(b.column(0)).to_pylist():
                out["(null)" if item["values"] is None else item["values"]] += int(item["counts"])
        return out

    def group_counts(self, columns: list[str]) -> Counter:
        """Rows per combination of values of `columns` (missing columns read as null)."""
        cols = self.scalar(columns)
        out: Counter = Counter()
        if not cols:
            return out
        for b in self.ds.to_batches(columns=cols):
            t = pa.Table.from_batches([b])
            for r in t.group_by(cols).aggregate([([], "count_all")]).to_pylist():
                out[tuple(r.get(c) for c in columns)] += int(r["count_all"])
        return out

    def distinct(self, column: str) -> list:
        """The distinct non-null values of a column (labels), streamed."""
        seen: set = set()
        if column in self.names:
            for b in self.ds.to_batches(columns=[column]):
                seen.update(x for x in pc.unique(b.column(0)).to_pylist() if x)
        return sorted(seen)


def open_snapshot(root: str, table: str, notes: list[str]) -> Snapshot | None:
    try:
        dt = delta.open_table(root, table)
        return None if dt is None else Snapshot(root, table, dt)
    except Exception as e:  # noqa: BLE001 - an unreadable table is a note, never a crash
        notes.append(f"{table}: the Delta table could not be opened: {type(e).__name__}: {e}")
        return None


def uncommitted_runs(root: str, table: str, committed: set) -> list[str]:
    """Run ids of data files under a table that no commit of that table names (killed runs,
    or runs still writing): invisible to every reader; `jobs.maintain` vacuums them."""
    try:
        fs, base = storage.url_to_fs(delta.table_root(root, table))
        fs.invalidate_cache(base)
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)]
    except Exception:  # noqa: BLE001
        return []
    runs = {m.group(1) for m in map(_RUN_FILE.match, names) if m}
    return sorted(runs - committed)


# ---------------------------------------------------------------------------------------------
# Job runs: the Delta log, checked against the `_runs/` records


@dataclass
class JobRunInfo:
    run_id: str
    job: str | None = None
    started: str | None = None
    finished: str | None = None
    summary: dict = field(default_factory=dict)
    record: dict | None = None
    commits: dict[str, int] = field(default_factory=dict)      # table -> version (Delta log)
    claimed: dict[str, int | None] = field(default_factory=dict)  # table -> version (record)
    unverifiable: list[str] = field(default_factory=list)     # record versions older than the log kept
    legacy: bool = False   # a record in the old manifest format (file lists, before Delta)

    @property
    def missing(self) -> list[str]:
        """Tables whose commit the record names but the Delta log does not hold."""
        return sorted(t for t, v in self.claimed.items()
                      if v is not None and t not in self.commits and t not in self.unverifiable)

    @property
    def state(self) -> str:
        if self.commits:
            return "partial" if self.missing else "committed"
        if self.missing:
            return "not committed"
        return "record only"   # wrote no table (training), or had nothing new to commit

    @property
    def counted(self) -> bool:
        return self.state != "not committed"


def read_records(root: str, notes: list[str]) -> list[dict]:
    """The run records `_runs/*.json` (informative); unreadable ones become notes."""
    try:
        fs, base = storage.url_to_fs(storage.join(root, storage.RUNS_DIR))
        fs.invalidate_cache(base)
        if not fs.exists(base):
            return []
        paths = sorted(fs.glob(f"{base}/*.json"))
    except Exception as e:  # noqa: BLE001
        notes.append(f"run records unreadable: {e}")
        return []
    out = []
    for p in paths:
        try:
            with fs.open(p, "rb") as f:
                m = json.loads(f.read())
            if not isinstance(m, dict) or not m.get("run_id"):
                raise ValueError("not a run record (a JSON object with a run_id)")
            out.append(m)
        except Exception as e:  # noqa: BLE001
            notes.append(f"unreadable run record {p.rsplit('/', 1)[-1]}: {e}")
    return out


def _iso_ms(ms) -> str | None:
    try:
        return _dt.datetime.fromtimestamp(int(ms) / 1000, _dt.timezone.utc).isoformat()
    except (TypeError, ValueError, OverflowError):
        return None


def job_runs(root: str, tables: list[str], records: list[dict], notes: list[str]) -> list[JobRunInfo]:
    """Every run under `root`: those with a Delta commit (the truth) and those with a record,
    oldest first. Commits without a run id (table creation, maintenance by other engines) are
    not runs."""
    runs: dict[str, JobRunInfo] = {}
    oldest: dict[str, int] = {}
    for table in tables:
        try:
            hist = delta.commit_history(root, table)
        except Exception as e:  # noqa: BLE001
            notes.append(f"{table}: Delta history unreadable: {e}")
            continue
        if hist:
            oldest[table] = min(int(h.get("version", 0)) for h in hist)
        for h in sorted(hist, key=lambda h: int(h.get("version", 0))):
            rid = h.get("run_id")
            if not rid:
                continue
            r = runs.setdefault(rid, JobRunInfo(rid))
            r.commits.setdefault(table, int(h.get("version", 0)))
            r.job = r.job or h.get("job")
            ts = _iso_ms(h.get("timestamp"))
            r.finished = max(filter(None, (r.finished, ts)), default=None)
            try:
                counts = json.loads(h.get("counts") or "{}")
            except ValueError:
                counts = {}
            if isinstance(counts, dict):
                for k, v in counts.items():
                    r.summary.setdefault(k, v)
    for m in records:
        rid = str(m["run_id"])
        r = runs.setdefault(rid, JobRunInfo(rid))
        r.record = m
        r.job = m.get("job") or r.job
        r.started = m.get("started_at") or r.started
        r.finished = m.get("finished_at") or r.finished
        if isinstance(m.get("summary"), dict):
            r.summary = m["summary"]
        claimed = m.get("tables")
        if isinstance(claimed, dict):
            for t, v in claimed.items():
                if isinstance(v, list) and v:  # a file list: the old manifest format
                    r.legacy, v = True, -1
                v = v if isinstance(v, int) and not isinstance(v, bool) else None
                r.claimed[str(t)] = v
                if v is not None and v >= 0 and t in oldest and v < oldest[t]:
                    r.unverifiable.append(str(t))  # the log entry expired: cannot be checked
    for r in runs.values():
        if r.commits and not r.record:
            notes.append(f"run {r.run_id} ({r.job}): committed to {', '.join(sorted(r.commits))} "
                         "but has no run record: shown from the Delta commit metadata")
    # run ids begin with their UTC start time: the order of a run known from its id alone
    return sorted(runs.values(), key=lambda r: (str(r.started or r.finished or r.run_id), r.run_id))


# ---------------------------------------------------------------------------------------------
# W+ norms: sums per layer, never the codes


NORM_SCHEMA = pa.schema([("layers", pa.int32()), ("dim", pa.int32()), ("n", pa.int64()),
                         ("s1", pa.list_(pa.float64())), ("s2", pa.list_(pa.float64()))])


def _codes_by_shape(col) -> dict[tuple[int, int], np.ndarray]:
    """Valid, finite codes of a `w_plus` column (fixed-size or variable lists, as Delta stores
    them) as float64 arrays [n, layers, dim], one per (layers, dim)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    col = col.filter(col.is_valid())
    out: dict[tuple[int, int], list[np.ndarray]] = {}
    if not len(col):
        return {}
    inner = col.flatten()
    outer_len = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    inner_len = pc.fill_null(pc.list_value_length(inner), -1).to_numpy(zero_copy_only=False)
    values = inner.flatten()
    if (len(set(outer_len.tolist())) == 1 and len(set(inner_len.tolist())) == 1 and inner_len[0] > 0
            and len(values) == len(col) * outer_len[0] * inner_len[0]):
        w = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64).reshape(
            len(col), int(outer_len[0]), int(inner_len[0]))
        groups = {(w.shape[1], w.shape[2]): [w]}
    else:  # several models' codes in one table (or broken rows): one row at a time
        groups = out
        for row in col.to_pylist():
            try:
                a = np.asarray(row, dtype=np.float64)
            except (TypeError, ValueError):
                continue
            if a.ndim == 2 and a.size:
                groups.setdefault(a.shape, []).append(a[None])
    res = {}
    for shape, parts in groups.items():
        w = np.concatenate(parts)
        w = w[np.isfinite(w).all(axis=(1, 2))]
        if len(w):
            res[shape] = w
    return res


def wplus_norm_sums(batch: pa.Table) -> pa.Table:
    """Ray Data batch (or a streamed batch): per-layer sums of ||w_l|| and ||w_l||^2 over the
    batch's ok codes, one row per code shape."""
    if "status" in batch.column_names:
        batch = unsliced(batch).filter(pc.fill_null(pc.equal(batch.column("status"), STATUS_OK), False))
    rows: dict[str, list] = {f.name: [] for f in NORM_SCHEMA}
    for (layers, dim), w in _codes_by_shape(batch.column("w_plus")).items():
        norms = np.linalg.norm(w, axis=-1)  # [n, layers]
        rows["layers"].append(layers)
        rows["dim"].append(dim)
        rows["n"].append(len(w))
        rows["s1"].append(norms.sum(0).tolist())
        rows["s2"].append((norms ** 2).sum(0).tolist())
    return pa.table(rows, schema=NORM_SCHEMA)


@dataclass
class NormSums:
    by_shape: dict[tuple[int, int], list] = field(default_factory=dict)  # shape -> [n, s1, s2]

    def add(self, t: pa.Table) -> None:
        for r in t.to_pylist():
            k = (int(r["layers"]), int(r["dim"]))
            acc = self.by_shape.setdefault(k, [0, np.zeros(k[0]), np.zeros(k[0])])
            acc[0] += int(r["n"])
            acc[1] += np.asarray(r["s1"])
            acc[2] += np.asarray(r["s2"])

    def total(self) -> int:
        return sum(a[0] for a in self.by_shape.values())


def wplus_norms_sample(snap: Snapshot, cap: int, batch_rows: int = 256) -> NormSums:
    """The first `cap` ok codes, streamed: one batch of codes in memory at a time."""
    sums = NormSums()
    cols = ["w_plus"] + (["status"] if snap.has("status") else [])
    flt = where(snap.names, status="ok") if snap.has("status") else None
    for b in snap.ds.to_batches(columns=cols, filter=flt, batch_size=batch_rows):
        left = cap - sums.total()
        if left <= 0:
            break
        t = pa.Table.from_batches([b]).slice(0, left)
        sums.add(wplus_norm_sums(t))
    return sums


def wplus_norms_ray(snap: Snapshot, batch_rows: int = 1024) -> NormSums:
    """Every committed code, in Ray Data: each task returns its batch's sums."""
    sums = NormSums()
    cols = ["w_plus"] + (["status"] if snap.has("status") else [])
    ds = delta.read_snapshot(snap.root, snap.name, columns=cols, version=snap.version)
    if ds is None:
        return sums
    for b in ds.map_batches(wplus_norm_sums, batch_format="pyarrow", batch_size=batch_rows).iter_batches(
            batch_format="pyarrow", batch_size=None):
        sums.add(b)
    return sums
