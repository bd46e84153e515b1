"""Invert job: aligned face crops -> the `latents` table (one W+ code per face).

    python -m jobs.invert --set input=URI --set output=URI --set model.checkpoint=URI [--set metrics=true]

`input` is either the output of `jobs.align` (its committed `faces` Delta table is read: every
face with status ok) or a plain folder of aligned crops (each file one face, read once; image_id
= sha256 of its bytes). Faces whose (image_id, face_index) has a committed `latents` row that is
ok or a permanent failure are skipped; transient failures (read errors, lost rows, inversion
errors) are tried again, and `retry_failed=true` retries every failure. A retried face's new
row replaces the old one in the same commit, so a nightly rerun over a growing prefix inverts
only what is new, and a killed run (nothing committed) is simply done again. Over an align
output a run reads only the `faces` files committed since the faces version that the last run
consumed (recorded in the latents commit), plus the faces of keys to retry; `full_scan=true`
reads everything (pipeline.incremental). Finished faces never reach a decode or model stage.

The encoder runs alone unless `metrics=true`: then the generator reconstructs each face, the
reconstruction is written to `<output>/reconstructions/`, and PSNR / MSE / LPIPS / ID
similarity go into the table and the summary (mean / p50 / p95).

With `metrics=true` and `paste_back=true` (or the `paste_back` section), each reconstruction is
also warped back into its whole photo (pipeline.paste_stage, the quads of the input's `faces`
table): `<output>/composites/reconstructions/<image_id>_<face>.jpg|png` (group=photo: all
faces of a photo in one file), the photo's upright orientation, size and RGB ICC profile kept;
`composite_uri`, `psnr_outside` and `psnr_box` go into the latents row. It needs an align
output as input (a plain folder of crops has no photos to paste into).

A plain folder is listed with sizes: a file over `invert.max_bytes` is never read (status
`too_large`, keyed by its URI); the others are decoded with the allowed `invert.formats`
(`unsupported_format`) and the `invert.multi_frame` policy (`multi_frame`), see pipeline.decode.

A batch that kills its actor (native crash, out of memory) is retried `invert.max_task_retries`
times, then its faces run again in halved batches until the face that does it is alone: that
face gets a `worker_crash` row, the others their results (pipeline.runner).

Counts (one per face): in = ok + failed + skipped.
"""
from __future__ import annotations

import dataclasses
import logging
from functools import partial

import pyarrow as pa

from jobs.cli import input_errors, main, model_errors
from jobs.settings.invert import InvertSection, Settings
from pipeline import incremental, paste_stage, storage
from pipeline.compute import actor_stage, join_partitions
from pipeline.errors import JobError
from pipeline.images import load_crops, read_crops
from pipeline.inputs import refused_rows, split_by_size
from pipeline.invert_stage import InvertBatch, failed_rows, lost_rows
from pipeline.models import model_shapes
from pipeline.runner import JobRun, TableSpec, WriteResult, run_summary
from pipeline.schemas import METRIC_COLUMNS, latents_schema

log = logging.getLogger("stbatch.invert")

JOB = "invert"
TABLE = "latents"


SETTINGS = Settings


LATENT_KEY = ("image_id", "face_index")
WORK_COLUMNS = ["image_id", "face_index", "source_uri", "aligned_uri", "status"]
MAX_READ_BLOCKS = 1024  # a huge folder: blocks of more files each, not more blocks


def _with_error(batch: pa.Table) -> pa.Table:
    return batch.append_column("error", pa.nulls(batch.num_rows, pa.string()))


def folder_rows(src: str, section: InvertSection):
    """(work rows, how many files, work rows refused before reading) of a plain folder of aligned
    crops: every file is read once (image_id = sha256 of the bytes) but those over
    `section.max_bytes`, which are never read (pipeline.inputs; None when there are none)."""
    import ray

    sized = storage.list_sized(src)
    files, big = split_by_size(sized, section.max_bytes)
    refused = refused_rows(big, section.max_bytes) if big else None
    log.info("input %s: plain folder of %d crops (%d over max_bytes)", src, len(sized), len(big))
    if not files:
        return None, len(sized), refused
    # Plain tasks over the listing (not read_binary_files, whose planning and one task per few
    # files delay the first batch by seconds): blocks of `load_batch_size` files, so the
    # inversion actor gets its first batch as soon as one block is read and decoded.
    lbs = section.load_batch_size
    blocks = max(1, min(-(-len(files) // lbs), MAX_READ_BLOCKS))
    ds = ray.data.from_items([{"uri": u} for u in files], override_num_blocks=blocks)
    return ds.map_batches(read_crops, batch_format="numpy", batch_size=lbs), len(sized), refused


def build_dataset(work, cfg: Settings, run_id: str, shapes: dict, n_rows: int,
                  batch_size: int | None = None, actor: type[InvertBatch] = InvertBatch):
    """Decode (tasks) -> invert (actors) over `work`; `shapes`: the model's (pipeline.models.
    model_shapes); `batch_size` overrides invert.batch_size (the runner's isolation passes);
    `actor`: the stage's class (a test may pass a subclass)."""
    c = cfg.invert
    load_bs = min(c.load_batch_size, batch_size) if batch_size else c.load_batch_size
    ds = work.map_batches(load_crops, batch_size=load_bs, batch_format="numpy",
                          fn_kwargs={"input_size": shapes["input_size"],
                                     "target_size": shapes["pool_size"] if cfg.metrics else None,
                                     "max_pixels": c.max_pixels, "formats": c.formats,
                                     "multi_frame": c.multi_frame})
    stage, device = actor_stage(c, n_rows, isolating=batch_size is not None, stage=JOB)
    return ds.map_batches(
        actor, batch_size=batch_size or c.batch_size, batch_format="numpy", **stage,
        fn_constructor_kwargs={"model": cfg.model, "section": c, "run_id": run_id, "output": cfg.output,
                               "device": device, "metrics": cfg.metric_weights if cfg.metrics else None})


def latents_table(shapes: dict) -> TableSpec:
    return TableSpec(TABLE, latents_schema(shapes["n_latent"], shapes["style_dim"]), LATENT_KEY)


def faces_root(cfg: Settings) -> str | None:
    """Where paste_back finds the photos' faces table."""
    return cfg.paste_back.faces or cfg.input


def paste_errors(cfg: Settings) -> list[str]:
    """paste_back needs the photos' committed faces table (a plain folder of crops has none)."""
    root = faces_root(cfg)
    if not cfg.paste_back.enabled or not root or paste_stage.faces_table_exists(root):
        return []
    return [(f"paste_back: needs photos to paste into, and {root} has no committed faces table (a plain folder "
             f"of crops has no quads): invert a jobs.align output, set paste_back.faces=ROOT, or set "
             f"paste_back=false")]


def run(cfg: Settings, before_commit=None, actor: type[InvertBatch] = InvertBatch) -> dict:
    """The job body (also callable from Python; `before_commit(run)` and `actor`, the inversion
    stage's class, are for tests)."""
    import ray

    if not cfg.input or not cfg.output:
        raise JobError("invert: set input=URI and output=URI")
    if errors := paste_errors(cfg):
        raise JobError("invert: " + "; ".join(errors))
    faces = cfg.paste_back.faces or cfg.input
    paste = paste_stage.settings_from(cfg.paste_back, output=cfg.output, folder="reconstructions",
                                      member_columns=LATENT_KEY, group_columns=(),
                                      crop_uri_column="reconstruction_uri")
    c = cfg.invert
    shapes = model_shapes(cfg.model)
    r = JobRun(cfg.output, JOB, cfg, rows_per_file=c.rows_per_part, log_every_s=c.log_every_s)
    spec = latents_table(shapes)
    res = WriteResult()
    shape_kw = {"n_latent": shapes["n_latent"], "style_dim": shapes["style_dim"], "run_id": r.run_id}

    def stages(rows, batch_size=None):
        ds = build_dataset(rows, cfg, r.run_id, shapes, n_in, batch_size, actor)
        if paste is not None:
            ds = paste_stage.paste(paste_stage.attach_faces(ds, faces, join_partitions(n_in)),
                                   dataclasses.replace(paste, schema=spec.schema))
        return ds

    retry_failed = cfg.retry_failed
    src = incremental.read_source(r, cfg.input, "faces", WORK_COLUMNS, spec, retry_failed=retry_failed,
                                  full_scan=cfg.full_scan)
    refused = None
    if src is not None:  # an align output: only the faces to do ever enter the pipeline
        n_in, skipped = src.n_in, src.skipped
        work = src.rows.map_batches(_with_error, batch_format="pyarrow") if src.rows is not None else None
        expected = src.todo
    else:  # a plain folder: every crop is read and hashed; done ones pass on as empty rows
        work, n_in, refused = folder_rows(cfg.input, c)
        skipped = 0
        work = r.mark_done(work, spec, retry_failed=retry_failed) if work is not None else None
        expected = n_in - (refused.num_rows if refused is not None else 0)
    log.info("invert %s -> %s: %d faces, run %s", cfg.input, cfg.output, n_in, r.run_id)
    if work is not None:
        res = r.write(None, spec, expected=expected, inputs=work, lost_rows=partial(lost_rows, **shape_kw),
                      rerun=stages, batch_size=c.batch_size)
    res.add_skipped(skipped)
    if refused is not None:  # files over max_bytes: a row each, never read
        rows = r.mark_done(ray.data.from_arrow(refused), spec, retry_failed=retry_failed)
        res.merge(r.write(rows.map_batches(failed_rows, batch_format="pyarrow", fn_kwargs=shape_kw), spec))
    counts = {"in": n_in, **res.counts}
    seconds = r.seconds()
    extra = {"faces_per_s": round((counts["ok"] + counts["failed"]) / max(seconds, 1e-9), 3),
             "model": shapes["name"], "statuses": res.statuses,
             "scan": src.summary() if src is not None else {"mode": "folder"}}
    if cfg.metrics:
        extra["metrics"] = run_summary(cfg.output, TABLE, res.files, METRIC_COLUMNS)
    if before_commit is not None:
        before_commit(r)
    r.commit({spec: res}, {**counts, "seconds": seconds, **extra},
             extra={"inputs": {"input": cfg.input}, "checkpoint_sha256": shapes["sha256"],
                    "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


DESCRIPTION = __doc__


def check(cfg: Settings) -> list[str]:
    """Before Ray starts: the input root exists, a model is named, and paste_back has its photos."""
    return [*input_errors("input", cfg.input), *([] if cfg.output else ["output: set output=URI"]),
            *model_errors("model", cfg.model), *paste_errors(cfg)]


if __name__ == "__main__":
    main(JOB, DESCRIPTION, SETTINGS, run, check=check)
