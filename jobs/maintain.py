"""Maintenance job: compact the small files of many runs and vacuum what no commit names.

    python -m jobs.maintain --set output=URI [--set tables=[latents,faces]] [--set retention_hours=168]
        [--set compact=true] [--set vacuum=true] [--set dry_run=false]

For every Delta table under `output` (each folder with a `_delta_log`; `tables` restricts the
list), in this order:

1. **compact** (`DeltaTable.optimize.compact`): a nightly run adds a few small data files to each
   table; compaction rewrites them into files of about `target_size` bytes in one commit. The
   rows do not change (same count, same keys); readers at older versions still find the old
   files until they are vacuumed.
2. **vacuum** (`DeltaTable.vacuum`, `full=true`): deletes the data files that the current
   snapshot does not name and that are older than `retention_hours`: files removed by earlier
   commits (replaced rows, compacted files) and orphans of killed runs (written, never
   committed). Keep `retention_hours` longer than the longest job run: a running job's files are
   not committed yet, and a shorter window would delete them. delta-rs refuses a window below
   the table's `delta.deletedFileRetentionDuration` (default 168 hours) unless
   `enforce_retention_duration=false`. Time travel to versions older than the window stops
   working for the vacuumed files.

`dry_run=true` changes nothing: it reports how many data files each table has and the files
vacuum would delete. Both commits carry `run_id` and `job: maintain` in their metadata (the
report's job table shows them), and a run record goes to `_runs/<run_id>.json`. Needs no Ray.

Counts (one per table): in = ok + failed + skipped; ok = maintained (or checked, on a dry
run), failed = an error (named in the summary), skipped = a named table that is not a Delta
table.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from jobs.cli import input_errors, main
from jobs.settings.maintain import Settings
from pipeline import delta, storage
from pipeline.errors import JobError
from pipeline.runner import JobRun

log = logging.getLogger("stbatch.maintain")

JOB = "maintain"


SETTINGS = Settings


def _files(dt) -> int:
    return pa.table(dt.get_add_actions(flatten=True)).num_rows


def maintain_table(output: str, table: str, cfg: Settings, run_id: str) -> dict:
    """Compact then vacuum one table; returns what was done (or would be, on a dry run)."""
    from deltalake.transaction import CommitProperties

    dry = cfg.dry_run
    meta = {"run_id": run_id, "job": JOB, "code_version": storage.code_version()}
    dt = delta.open_table(output, table)
    if dt is None:
        return {"status": "skipped", "reason": "not a Delta table"}
    info: dict = {"version_before": dt.version(), "files_before": _files(dt)}
    if cfg.compact and not dry and info["files_before"] > 1:
        kw = {"target_size": cfg.target_size} if cfg.target_size else {}
        m = dt.optimize.compact(commit_properties=CommitProperties(custom_metadata=meta), **kw)
        info["compacted"] = {"files_removed": int(m.get("numFilesRemoved", 0)),
                             "files_added": int(m.get("numFilesAdded", 0))}
        dt = delta.open_table(output, table)
    if cfg.vacuum:
        removed = dt.vacuum(retention_hours=cfg.retention_hours, dry_run=dry,
                            enforce_retention_duration=cfg.enforce_retention_duration, full=cfg.full,
                            commit_properties=None if dry else CommitProperties(custom_metadata=meta))
        info["would_vacuum" if dry else "vacuumed"] = len(removed)
        info["vacuum_files"] = sorted(removed)[:20]
        dt = delta.open_table(output, table)
    info.update(version_after=dt.version(), files_after=_files(dt), status="ok")
    return info


def check(cfg: Settings) -> list[str]:
    """Before anything runs: the dataset root exists (a typo in a scheduled line is an error)."""
    return input_errors("output", cfg.output)


def run(cfg: Settings) -> dict:
    if not cfg.output:
        raise JobError("output: set output=URI (a dataset root with Delta tables)")
    output = cfg.output.rstrip("/") or cfg.output
    wanted = [cfg.tables] if isinstance(cfg.tables, str) else cfg.tables
    present = delta.list_tables(output)
    tables = list(wanted) if wanted else present
    r = JobRun(output, JOB, cfg)
    log.info("maintain %s: %d table(s)%s, run %s", output, len(tables), " (dry run)" if cfg.dry_run else "",
             r.run_id)
    results, counts = {}, {"in": len(tables), "ok": 0, "failed": 0, "skipped": 0}
    for table in tables:
        t0 = time.time()
        info: dict[str, Any]
        try:
            info = maintain_table(output, table, cfg, r.run_id) if table in present else \
                {"status": "skipped", "reason": "not a Delta table"}
        except Exception as e:  # noqa: BLE001 - one table's failure must not stop the others
            log.exception("maintain %s failed", table)
            info = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        info["seconds"] = round(time.time() - t0, 2)
        counts[{"ok": "ok", "skipped": "skipped"}.get(info["status"], "failed")] += 1
        results[table] = info
        if info.get("version_after", -1) > info.get("version_before", -1):  # committed by this run
            r.versions[table] = info["version_after"]
        log.info("%s: %s", table, {k: v for k, v in info.items() if k != "vacuum_files"})
    extra = {"dry_run": cfg.dry_run, "tables": results}
    if not cfg.dry_run:
        r.commit({}, {**counts, "seconds": r.seconds()}, extra={"maintain": results})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


if __name__ == "__main__":
    main(JOB, __doc__, SETTINGS, run, use_ray=False, check=check)
