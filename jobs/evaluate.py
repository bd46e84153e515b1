"""Evaluate job: reconstruction metrics for an existing `latents` table.

    python -m jobs.evaluate --set input=URI --set model.checkpoint=URI [--set output=URI]

Reads the committed `latents` snapshot under `input` (rows with status ok) through Ray Data,
regenerates each face from its W+ code with the same checkpoint (its sha256 must match the
table's, else the row is `model_mismatch`), compares it with the aligned crop, writes the
reconstruction to `<output>/reconstructions/` and the per-face rows to the `metrics` Delta table
(one commit per run); mean / p50 / p95 of PSNR, MSE, LPIPS and ID similarity, read back from the
run's own data files, go to the summary and the run record.

Only the latents files committed since the latents version that the last run consumed are read
(plus the codes of faces to retry), and only their codes that need metrics: pipeline.incremental.
Faces whose (image_id, face_index) has a committed `metrics` row that is ok or a permanent
failure (`model_mismatch`, `decode_error`) are skipped; transient failures (`read_error`,
`lost`, `evaluate_error`) are tried again, and `retry_failed=true` retries every failure. A
retried face's new row replaces the old one, and a killed run (nothing committed) is simply done
again.

Counts (one per face): in = ok + failed + skipped.
"""
from __future__ import annotations

import logging
from functools import partial

from jobs.cli import input_errors, main, model_errors
from jobs.settings.evaluate import Settings
from pipeline import incremental
from pipeline.compute import actor_stage
from pipeline.errors import JobError
from pipeline.evaluate_stage import (
    LATENT_COLUMNS,
    EvaluateBatch,
    load_targets,
    lost_rows,
    ok_latents,
)
from pipeline.models import model_shapes
from pipeline.runner import JobRun, TableSpec, WriteResult, run_summary
from pipeline.schemas import METRIC_COLUMNS, metrics_schema

log = logging.getLogger("stbatch.evaluate")

JOB = "evaluate"
TABLE = "metrics"
METRICS = TableSpec(TABLE, metrics_schema(), ("image_id", "face_index"))


SETTINGS = Settings


def build_dataset(work, cfg: Settings, output: str, run_id: str, target_size: int, n_rows: int,
                  batch_size: int | None = None):
    """`batch_size` overrides evaluate.batch_size (the runner's isolation passes)."""
    c = cfg.evaluate
    load_bs = min(c.load_batch_size, batch_size) if batch_size else c.load_batch_size
    ds = work.map_batches(load_targets, batch_size=load_bs, batch_format="pyarrow",
                          fn_kwargs={"target_size": target_size, "max_pixels": c.max_pixels})
    stage, device = actor_stage(c, n_rows, isolating=batch_size is not None, stage=JOB)
    return ds.map_batches(EvaluateBatch, batch_size=batch_size or c.batch_size, batch_format="numpy", **stage,
                          fn_constructor_kwargs={"model": cfg.model, "section": c, "run_id": run_id, "output": output,
                                                 "metrics": cfg.metric_weights, "device": device})


def run(cfg: Settings, before_commit=None) -> dict:
    """The job body (also callable from Python; `before_commit(run)` is a test hook)."""
    import ray

    if not cfg.input:
        raise JobError("evaluate: set input=URI (a dataset root with a latents table)")
    output = cfg.output or cfg.input
    c = cfg.evaluate
    shapes = model_shapes(cfg.model)
    r = JobRun(output, JOB, cfg, rows_per_file=c.rows_per_part, log_every_s=c.log_every_s)
    src = incremental.read_source(r, cfg.input, "latents", LATENT_COLUMNS, METRICS,
                                  retry_failed=cfg.retry_failed, full_scan=cfg.full_scan)
    if src is None:
        raise JobError(f"evaluate: no committed latents table under {cfg.input}")
    log.info("evaluate %s -> %s: %d faces (%d already evaluated), run %s", cfg.input, output, src.n_in,
             src.skipped, r.run_id)
    res = WriteResult()
    if src.rows is not None:
        def stages(rows, batch_size=None):
            return build_dataset(rows, cfg, output, r.run_id, shapes["pool_size"], src.todo, batch_size)

        res = r.write(None, METRICS, expected=src.todo, inputs=src.rows.map_batches(ok_latents, batch_format="pyarrow"),
                      lost_rows=partial(lost_rows, run_id=r.run_id), rerun=stages, batch_size=c.batch_size)
    res.add_skipped(src.skipped)
    n_in = src.n_in
    counts = {"in": n_in, **res.counts}
    seconds = r.seconds()
    extra = {"metrics": run_summary(output, TABLE, res.files, METRIC_COLUMNS), "model": shapes["name"],
             "scan": src.summary(),
             "faces_per_s": round((counts["ok"] + counts["failed"]) / max(seconds, 1e-9), 3),
             "statuses": res.statuses}
    if before_commit is not None:
        before_commit(r)
    r.commit({METRICS: res}, {**counts, "seconds": seconds, **extra},
             extra={"inputs": {"input": cfg.input}, "checkpoint_sha256": shapes["sha256"],
                    "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


def check(cfg: Settings) -> list[str]:
    """Before Ray starts: the input root exists, and a model is named."""
    return [*input_errors("input", cfg.input), *model_errors("model", cfg.model)]


if __name__ == "__main__":
    main(JOB, __doc__, SETTINGS, run, check=check)
