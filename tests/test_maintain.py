"""jobs.maintain: compaction of many small commits (same rows, fewer files) and vacuum of the
files no commit names (orphans of killed runs, files removed by earlier commits), on a local
folder and on S3 (moto's server); a dry run changes nothing."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pytest

from jobs import maintain
from jobs.cli import load_config
from pipeline import delta, storage
from pipeline.report_data import job_runs, read_records
from pipeline.runner import JobRun, TableSpec

# the settings a run record holds, for the runs these tests make by hand

SPEC = TableSpec("latents", pa.schema([
    pa.field("image_id", pa.string(), nullable=False), pa.field("face_index", pa.int32(), nullable=False),
    pa.field("status", pa.string(), nullable=False), pa.field("psnr", pa.float32()),
    pa.field("w_plus", pa.list_(pa.list_(pa.float32(), 3), 2)), pa.field("run_id", pa.string())]),
    ("image_id", "face_index"))
N_COMMITS, ROWS = 5, 3


def _rows(run: int, run_id: str) -> pa.Table:
    ids = [f"{run:02d}{i:062x}" for i in range(ROWS)]
    return pa.table({"image_id": ids, "face_index": [0] * ROWS, "status": ["ok"] * ROWS,
                     "psnr": [20.0 + run + i for i in range(ROWS)],
                     "w_plus": [[[run, i, 1.0], [2.0, 3.0, 4.0]] for i in range(ROWS)],
                     "run_id": [run_id] * ROWS}, schema=SPEC.schema)


def _table_with_orphan(root: str) -> str:
    """N_COMMITS small commits of ROWS rows each, and the data file of a killed run."""
    for k in range(N_COMMITS):
        r = JobRun(root, "invert")
        r.commit({SPEC: r.write_small(SPEC, _rows(k, r.run_id))}, {"in": ROWS, "ok": ROWS, "failed": 0, "skipped": 0},
                 replace=False)
    killed = JobRun(root, "invert")
    rec = killed.write_small(SPEC, _rows(99, killed.run_id)).files[0]
    return rec.path


def _files(root: str) -> list[str]:
    fs, base = storage.url_to_fs(delta.table_root(root, "latents"))
    fs.invalidate_cache(base)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False) if p.endswith(".parquet"))


def _snapshot(root: str) -> pa.Table:
    t = delta.read_snapshot_arrow(root, "latents")
    return t.sort_by([("image_id", "ascending"), ("face_index", "ascending")])


def _run(root: str, **sets):
    sets = [f"output={root}"] + [f"{k}={v}" for k, v in sets.items()]
    return maintain.run(load_config(maintain.SETTINGS, None, sets))


def _check_maintain(root: str) -> None:
    orphan = _table_with_orphan(root)
    before = _snapshot(root)
    assert before.num_rows == N_COMMITS * ROWS
    files0, version0 = _files(root), delta.open_table(root, "latents").version()
    assert orphan in files0 and len(delta.snapshot_uris(root, "latents")) == N_COMMITS

    # dry run: reports what vacuum would delete, changes nothing (no file, no commit, no record)
    records0 = len(read_records(root, []))
    res = _run(root, dry_run="true", retention_hours=0, enforce_retention_duration="false")
    info = res["extra"]["tables"]["latents"]
    assert res["counts"] == {"in": 1, "ok": 1, "failed": 0, "skipped": 0}
    assert orphan in info["vacuum_files"] and info["would_vacuum"] == 1
    assert _files(root) == files0 and delta.open_table(root, "latents").version() == version0
    assert len(read_records(root, [])) == records0

    # the default window (a week) keeps every young file: a running job's files are safe
    res = _run(root, compact="false")
    assert res["extra"]["tables"]["latents"]["vacuumed"] == 0 and _files(root) == files0

    # compact, then vacuum with no window: fewer files, the same rows, the orphan gone
    res = _run(root, retention_hours=0, enforce_retention_duration="false")
    info = res["extra"]["tables"]["latents"]
    assert res["counts"] == {"in": 1, "ok": 1, "failed": 0, "skipped": 0}
    assert info["compacted"] == {"files_removed": N_COMMITS, "files_added": 1}
    after = _snapshot(root)
    assert after.num_rows == before.num_rows
    assert after.select(["image_id", "face_index"]).equals(before.select(["image_id", "face_index"]))
    assert after.equals(before.cast(after.schema))  # every committed row still reads, unchanged
    files = _files(root)
    assert orphan not in files and len(files) == 1 == len(delta.snapshot_uris(root, "latents"))
    assert info["vacuumed"] == N_COMMITS + 1  # the compacted-away files and the orphan
    # the maintenance commits carry the run id: the report's job table shows the run as committed
    runs = {r.run_id: r for r in job_runs(root, ["latents"], read_records(root, []), [])}
    assert runs[res["run_id"]].state == "committed" and runs[res["run_id"]].job == "maintain"


def test_compact_and_vacuum_local(tmp_path):
    _check_maintain(str(tmp_path / "ds"))


def test_compact_and_vacuum_s3(s3_bucket):
    _check_maintain(f"{s3_bucket}/ds")


def test_cli_dry_run_and_unknown_table(tmp_path):
    root = str(tmp_path / "ds")
    _table_with_orphan(root)
    files = _files(root)
    p = subprocess.run([sys.executable, "-m", "jobs.maintain", "--set", f"output={root}", "--set", "dry_run=true",
                        "--set", "tables=[latents,nothing]", "--quiet"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["job"] == "maintain" and summary["dry_run"] is True
    assert (summary["in"], summary["ok"], summary["skipped"], summary["failed"]) == (2, 1, 1, 0)
    assert summary["tables"]["latents"]["files_before"] == N_COMMITS
    assert _files(root) == files


def test_a_short_window_is_refused_unless_asked(tmp_path):
    root = str(tmp_path / "ds")
    _table_with_orphan(root)
    files = _files(root)
    res = _run(root, compact="false", retention_hours=0)
    assert res["counts"]["failed"] == 1 and "retention" in res["extra"]["tables"]["latents"]["error"].lower()
    assert _files(root) == files


def test_settings_ranges_and_check(tmp_path):
    from pipeline.config import SettingsError, parse

    cfg = parse(maintain.SETTINGS, {"output": str(tmp_path), "tables": "latents", "target_size": 1024})
    assert cfg.tables == "latents" and cfg.target_size == 1024 and cfg.retention_hours == 168
    assert maintain.check(cfg) == []
    with pytest.raises(SettingsError) as e:
        parse(maintain.SETTINGS, {"retention_hours": -1, "target_size": 0})
    assert sorted(m.split(":")[0] for m in e.value.errors) == ["retention_hours", "target_size"]
    assert "does not exist" in maintain.check(parse(maintain.SETTINGS, {"output": str(tmp_path / "typo")}))[0]
    assert maintain.check(parse(maintain.SETTINGS, {})) == ["output: set output=URI"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
