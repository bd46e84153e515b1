"""The `models` table: classifier and editor files published by the run that trained them.

A fit job writes its model files under run-scoped keys (`model_files/<kind>/<run_id>/<file>.pt`:
beside the `models` Delta table, never inside it, where a vacuum would remove every file the
log does not name) and one `models` row per file; the row is committed together with the run's
other table rows, so a model of a failed run is never named by the table. `edit` resolves
models from committed rows only: the latest of a kind (and attribute) by default, or the one of
a given run id / sha256.
"""
from __future__ import annotations

import datetime as _dt

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import delta, storage
from pipeline.runner import TableSpec
from pipeline.status import STATUS_OK

KINDS = ("classifier", "editor", "direction")
FILES_PREFIX = "model_files"

MODELS = TableSpec("models", pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),        # classifier | editor | direction
    pa.field("attribute", pa.string()),                    # editors: the attribute it edits; directions: the name
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),       # ok (the runner's accounting column)
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
], metadata={b"table": b"models", b"version": b"1"}), ("uri",))


def model_key(kind: str, run_id: str, filename: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {KINDS}, got {kind!r}")
    return storage.safe_key(f"{FILES_PREFIX}/{kind}/{run_id}/{filename}")


def model_rows(rows: list[dict], run_id: str) -> pa.Table:
    now = _dt.datetime.now(_dt.timezone.utc)
    cols = {f.name: [r.get(f.name) for r in rows] for f in MODELS.schema}
    cols.update(status=[STATUS_OK] * len(rows), run_id=[run_id] * len(rows), created_at=[now] * len(rows))
    return pa.table(cols, schema=MODELS.schema)


def committed_models(root: str, kind: str, attribute: str | None = None) -> list[dict]:
    """Committed models of a kind (and attribute) under a dataset root, newest first."""
    flt = pc.field("kind") == kind
    if attribute is not None:
        flt = flt & (pc.field("attribute") == attribute)
    t = delta.read_snapshot_arrow(root, MODELS.name, filter_expr=flt)
    if t is None or not t.num_rows:
        return []
    return sorted(t.to_pylist(), key=lambda r: (r["created_at"], r["run_id"]), reverse=True)


def resolve(root: str, kind: str, attribute: str | None = None, run_id: str | None = None,
            sha256: str | None = None) -> dict:
    """One committed model: the newest, or the one of `run_id` / with `sha256`. Raises
    LookupError naming what exists when nothing matches."""
    found = committed_models(root, kind, attribute)
    pick = [m for m in found if (run_id is None or m["run_id"] == run_id) and (sha256 is None or m["sha256"] == sha256)]
    if not pick:
        what = f"{kind}" + (f" for {attribute}" if attribute else "")
        have = ", ".join(f"{m['run_id']} ({m['sha256'][:12]})" for m in found[:5]) or "none"
        raise LookupError(f"no committed {what} under {root}"
                          + (f" from run {run_id}" if run_id else "") + (f" with sha256 {sha256}" if sha256 else "")
                          + f"; committed: {have}")
    return pick[0]


def pick(spec: str, kind: str, attribute: str | None = None, run_id: str | None = None,
         sha256: str | None = None) -> dict:
    """The model a job setting names: a dataset root -> its committed model (`resolve`: the
    newest, or of `run_id` / with `sha256`); an existing file -> that file, accepted only with
    its `sha256` (verified again where it is loaded), for models made elsewhere (the official
    classifier). Returns a `models`-like row: uri, kind, attribute, sha256, run_id (None for a
    file)."""
    fs, path = storage.url_to_fs(str(spec))
    if fs.isfile(path):
        if not sha256:
            raise LookupError(f"{spec} is a file: give its sha256 too, or name the dataset root whose "
                              f"committed {kind} to use")
        if run_id:
            raise LookupError(f"{spec} is a file, not a dataset root: a run id cannot select it")
        return {"uri": str(spec), "kind": kind, "attribute": attribute, "sha256": sha256, "run_id": None}
    return resolve(str(spec), kind, attribute, run_id, sha256)
