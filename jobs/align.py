"""Align job: raw photos -> FFHQ-aligned crops + the `faces` table.

    python -m jobs.align --config FILE --set input=URI --set output=URI [--set align.size=256]

A nightly run reads only what is new or changed: a listed file whose URI, size and version tag
(S3 ETag, else mtime) match committed `faces` rows that are all ok or permanent failures is
skipped unread (`verify=hash` reads and hashes every file instead). The rest are read once and
hashed (image_id = sha256 of the bytes); only the
project's own bookkeeping is left out of the listing (`_delta_log/`, `_runs/`, Delta table
folders, the jobs' output folders under a dataset root, unfinished temporary writes) and hidden
dot-names (`.DS_Store`, `._*` AppleDouble files): a camera's `_DSC0001.JPG` is processed
(pipeline.storage.list_sized). A file over `align.max_bytes` (its size from the listing) is
never read: one `too_large` row keyed by its URI. The others are decoded with the allowed
`align.formats` (else `unsupported_format`, naming the format) and the `align.multi_frame`
policy (an animated GIF / WebP or multi-page TIFF: `multi_frame`, or its first frame), see
pipeline.decode. An image whose committed `faces` rows are all ok or permanent failures is
skipped before decoding. The rest are decoded, detected and aligned as Ray Data stages; the
workers write the crops to `<output>/aligned/` and the rows as data files of the `faces` Delta
table, which the run publishes in one commit (nothing is visible before it; a killed run is
simply done again).

Retries: `align_error`, `read_error` and `lost` are transient, so the next run tries the image
again; `decode_error`, `too_large`, `too_small`, `unsupported_format`, `multi_frame` and `no_face`
are permanent and tried again only with `retry_failed=true`. A batch that kills its actor
(native crash, out of memory) is retried `align.max_task_retries` times, then its files run
again in halved batches until the file that does it is alone: it gets a `worker_crash` row
(transient), the others their results (pipeline.runner). A retried image's new rows replace all of its earlier rows (key
image_id, face_index; replaced per image_id), so the snapshot holds each image once. A listed
file whose bytes could not be read has no content hash: its `read_error` row is keyed by its URI
(`unread:<sha256 of the URI>`), replaced when the same URI fails again, and left in place when the
file later reads fine (its new rows carry the content image_id).

Counts (one per input file, however many faces it has):
  in      files listed under `input`
  ok      files that produced at least one aligned face (status ok)
  failed  files with a failure status (decode_error, too_large, too_small, unsupported_format,
          multi_frame, no_face, align_error, read_error for a listed file that could not be read,
          lost, worker_crash)
  skipped files whose image is already done in the committed table
in = ok + failed + skipped. Files with the same bytes under two names in one run are both
processed and each counted by its own outcome (so the counts still add up to `in`), while the
table keeps one row per (image_id, face_index): the commit keeps one of the twins' rows.
"""
from __future__ import annotations

import logging
from functools import partial

import pyarrow as pa

from jobs.cli import input_errors, main
from jobs.settings.align import Settings
from pipeline import delta, storage
from pipeline.align_stage import (
    AlignFaces,
    decode_batch,
    failed_file_rows,
    hash_files,
    lost_file_rows,
    read_listed,
)
from pipeline.compute import actor_stage
from pipeline.errors import JobError
from pipeline.inputs import refused_rows, split_by_size
from pipeline.runner import JobRun, TableSpec, WriteResult
from pipeline.schemas import FACES_SCHEMA, SOURCE_LISTING_COLUMNS
from pipeline.status import STATUS_OK

log = logging.getLogger("stbatch.align")

JOB = "align"
TABLE = "faces"
FACES = TableSpec(TABLE, FACES_SCHEMA, key=("image_id", "face_index"), replace_key=("image_id",))


SETTINGS = Settings


MAX_READ_BLOCKS = 1024  # a huge listing: blocks of more files each, not more blocks


def build_dataset(files: list[dict], cfg: Settings, run: JobRun, batch_size: int | None = None,
                  n_rows: int | None = None):
    """The Ray Data plan: read bytes -> hash (tasks) -> mark images done under another name ->
    decode (tasks) -> detect + align (actors). `files`: listing rows (source_uri, source_size,
    source_etag). `batch_size` overrides align.batch_size (the runner's isolation passes);
    `n_rows`: the run's files (the actors' restart budget)."""
    import ray

    a = cfg.align
    # an isolation pass (batch_size given): a block per file, no task batch above batch_size
    dbs = min(a.decode_batch_size, batch_size) if batch_size else a.decode_batch_size
    blocks = len(files) if batch_size else max(1, min(-(-len(files) // dbs), MAX_READ_BLOCKS))
    ds = ray.data.from_items([{"source_uri": f["source_uri"], "source_size": -1 if f["source_size"] is None
                               else f["source_size"], "source_etag": f["source_etag"] or ""} for f in files],
                             override_num_blocks=blocks)
    ds = ds.map_batches(read_listed, batch_size=dbs, batch_format="numpy")
    ds = ds.map_batches(hash_files, batch_size=dbs, batch_format="numpy")
    # the same bytes under a new name (or every file, with verify=hash): done by content
    ds = run.mark_done(ds, FACES, retry_failed=cfg.retry_failed, key=("image_id",))
    ds = ds.map_batches(decode_batch, batch_size=dbs, batch_format="numpy", fn_kwargs={"section": a})
    bs = batch_size or a.batch_size
    stage, device = actor_stage(a, n_rows or len(files), isolating=batch_size is not None, stage="align")
    return ds.map_batches(AlignFaces, batch_size=bs, batch_format="numpy", **stage,
                          fn_constructor_kwargs={"section": a, "output": cfg.output, "run_id": run.run_id,
                                                 "device": device, "detect_batch": bs})


LISTING_KEY = ("source_uri", *SOURCE_LISTING_COLUMNS)


def unchanged_skipped(run: JobRun, files: list[dict], retry_failed: bool) -> tuple[list[dict], int]:
    """(the listed files to read, how many are skipped unread): a file is skipped when the
    committed `faces` table has rows for the same URI, size and version tag (ETag / mtime), all
    ok or permanent failures. A file whose store reports no tag is always read."""
    import ray

    snap = delta.snapshot(run.output, TABLE)
    known = [f for f in files if f["source_etag"] is not None and f["source_size"] is not None]
    if snap is None or not known or any(c not in snap.schema.names for c in SOURCE_LISTING_COLUMNS):
        return files, 0
    rows = ray.data.from_items([{**f, "status": STATUS_OK} for f in known],
                               override_num_blocks=max(1, min(len(known) // 5000, 200)))
    todo, skipped = run.skip_done(rows, FACES, n_in=len(known), retry_failed=retry_failed, key=LISTING_KEY)
    again = {r["source_uri"] for r in todo.select_columns(["source_uri"]).iter_rows()}
    checked = {f["source_uri"] for f in known}
    return [f for f in files if f["source_uri"] in again or f["source_uri"] not in checked], skipped


def _exists(uri: str) -> bool:
    fs, path = storage.url_to_fs(uri)
    return fs.exists(path)


def run(cfg: Settings, before_commit=None) -> dict:
    """The job body (also callable from Python; `before_commit(run)` is a test hook)."""
    import ray

    if not cfg.input or not cfg.output:
        raise JobError("align: set input=URI and output=URI (--set input=... --set output=...)")
    a = cfg.align
    r = JobRun(cfg.output, JOB, cfg, rows_per_file=a.rows_per_part, log_every_s=a.log_every_s)
    listing = storage.list_stat(cfg.input)
    sized = [(u, size) for u, size, _ in listing]
    tags = {u: tag for u, _, tag in listing}
    files, big = split_by_size(sized, a.max_bytes)
    log.info("align %s -> %s: %d files (%d over max_bytes), run %s", cfg.input, cfg.output, len(sized),
             len(big), r.run_id)
    res = WriteResult()
    retry_failed = cfg.retry_failed
    readable = set(files)
    todo = [{"source_uri": u, "source_size": size, "source_etag": tags[u]} for u, size in sized if u in readable]
    if cfg.verify == "listing":
        todo, skipped = unchanged_skipped(r, todo, retry_failed)
        res.add_skipped(skipped)
    if todo:
        def rerun(rows, bs: int | None):
            if bs is None:
                return build_dataset(todo, cfg, r, None, len(todo))
            # a file that vanished since the listing is left to lost_file_rows (read_error)
            wanted = {str(u) for u in rows.to_pandas()["source_uri"]}
            again = [f for f in todo if f["source_uri"] in wanted and _exists(f["source_uri"])]
            return build_dataset(again, cfg, r, bs, len(todo)) if again else ray.data.from_items([])

        inputs = ray.data.from_items([{"source_uri": f["source_uri"], "status": STATUS_OK} for f in todo])
        res.merge(r.write(None, FACES, expected=len(todo), inputs=inputs,
                          lost_rows=partial(lost_file_rows, output=cfg.output, run_id=r.run_id,
                                            retry_failed=retry_failed),
                          lost_key=("source_uri",), rerun=rerun, batch_size=a.batch_size))
    if big:  # files over max_bytes: a row each, never read
        refused = refused_rows(big, a.max_bytes)
        refused = refused.append_column("source_size", pa.array([size for _, size in big], pa.int64()))
        refused = refused.append_column("source_etag", pa.array([tags[u] for u, _ in big], pa.string()))
        rows = r.mark_done(ray.data.from_arrow(refused), FACES, retry_failed=retry_failed, key=("image_id",))
        res.merge(r.write(rows.map_batches(failed_file_rows, batch_format="pyarrow", fn_kwargs={"run_id": r.run_id}),
                          FACES))
    files = [u for u, _ in sized]
    counts = {"in": len(files), **res.counts}
    seconds = r.seconds()
    faces = res.statuses.get("ok", 0)
    extra = {"faces": faces, "files_per_s": round((counts["ok"] + counts["failed"]) / max(seconds, 1e-9), 3),
             "statuses": res.statuses}
    if before_commit is not None:
        before_commit(r)
    r.commit({FACES: res}, {**counts, "seconds": seconds, **extra},
             extra={"inputs": {"input": cfg.input, "files": len(files)}, "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


def check(cfg: Settings) -> list[str]:
    """Before Ray starts: the input root exists."""
    return [*input_errors("input", cfg.input), *([] if cfg.output else ["output: set output=URI"])]


def cli(argv: list[str] | None = None) -> dict:
    return main(JOB, "Detect and FFHQ-align faces: raw photos -> aligned crops + faces table.", SETTINGS, run,
                argv=argv, check=check)


if __name__ == "__main__":
    cli()
