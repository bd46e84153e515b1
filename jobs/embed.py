"""Embed job: the identity embedding of every inverted face, for neighbours and near-duplicates.

    python -m jobs.embed --set input=URI [--set output=URI] --set metric_weights.facenet=URI

`input` is a dataset root with a committed `latents` table (jobs.invert): each ok face's aligned
crop (`aligned_uri`) is read, resized to `crop_size` and embedded by FaceNet (facenet-pytorch's
InceptionResnetV1, VGGFace2 weights from `metric_weights.facenet`, never downloaded; in tests
`metric_weights.allow_random_init=true`, a seeded random network labelled `RANDOM-INIT` in every
row) on the face region of the crop, as the ID similarity metric does. Rows go to the
`embeddings` Delta table under `output` (default: input): image_id, face_index, aligned_uri,
`embedding` (512 float32, L2-normalised) and `backbone` (the label).

A face with a committed row from the same backbone label is skipped; another backbone embeds it
again and replaces the row. Failures: the crop's read / decode statuses (read_error is
transient, decode_error permanent), `lost` / `worker_crash` (transient).

Counts (one per ok face of the latents table): in = ok + failed + skipped.
"""
from __future__ import annotations

import logging
from functools import partial

from jobs.cli import input_errors, main
from jobs.settings.embed import Settings
from pipeline.compute import actor_stage
from pipeline.embed_stage import (
    EMBED_DONE_KEY,
    EMBED_KEY,
    WORK_COLUMNS,
    EmbedBatch,
    backbone_label,
    load_targets,
    lost_rows,
    work_batch,
)
from pipeline.errors import JobError
from pipeline.fit_data import latent_counts, read_latents
from pipeline.runner import JobRun, TableSpec, WriteResult
from pipeline.schemas import embeddings_schema

log = logging.getLogger("stbatch.embed")

JOB = "embed"
TABLE = "embeddings"
EMBEDDINGS = TableSpec(TABLE, embeddings_schema(), EMBED_KEY)


SETTINGS = Settings


def run(cfg: Settings, before_commit=None) -> dict:
    """The job body (also callable from Python; `before_commit(run)` is a test hook)."""
    import ray

    if errors := settings_errors(cfg):
        raise JobError("embed: " + "; ".join(errors))
    assert cfg.input is not None  # settings_errors stops a run without one
    output = cfg.output or cfg.input
    backbone = backbone_label(cfg.metric_weights)
    c = cfg.embed
    r = JobRun(output, JOB, cfg, rows_per_file=c.rows_per_part, log_every_s=c.log_every_s)
    n_in = latent_counts(cfg.input, 0.0, 0)["ok"]
    log.info("embed %s -> %s: %d ok faces, backbone %s, run %s", cfg.input, output, n_in, backbone, r.run_id)
    work = read_latents(cfg.input, WORK_COLUMNS).map_batches(work_batch, batch_format="pyarrow",
                                                             fn_kwargs={"backbone": backbone})
    work = r.mark_done(work, EMBEDDINGS, retry_failed=cfg.retry_failed, key=EMBED_DONE_KEY)

    def stages(rows, batch_size: int | None = None):
        load_bs = min(c.load_batch_size, batch_size) if batch_size else c.load_batch_size
        ds = rows.map_batches(load_targets, batch_size=load_bs, batch_format="pyarrow",
                              fn_kwargs={"size": cfg.crop_size, "max_pixels": c.max_pixels})
        stage, device = actor_stage(c, n_in, isolating=batch_size is not None, stage="embed")
        return ds.map_batches(EmbedBatch, batch_size=batch_size or c.batch_size, batch_format="numpy", **stage,
                              fn_constructor_kwargs={"weights": cfg.metric_weights, "section": c,
                                                     "backbone": backbone, "run_id": r.run_id, "device": device})

    res = WriteResult()
    if n_in:
        res = r.write(None, EMBEDDINGS, expected=n_in, inputs=work, lost_rows=partial(lost_rows, run_id=r.run_id),
                      rerun=stages, batch_size=c.batch_size)
    counts = {"in": n_in, **res.counts}
    seconds = r.seconds()
    extra = {"backbone": backbone, "statuses": res.statuses,
             "faces_per_s": round((counts["ok"] + counts["failed"]) / max(seconds, 1e-9), 3)}
    if before_commit is not None:
        before_commit(r)
    r.commit({EMBEDDINGS: res}, {**counts, "seconds": seconds, **extra},
             extra={"inputs": {"input": cfg.input}, "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


def settings_errors(cfg: Settings) -> list[str]:
    """What the settings must name: a latents root, and a backbone (a seeded random one only in tests)."""
    out = [] if cfg.input else ["input: set input=URI (a dataset root with a latents table)"]
    try:
        backbone_label(cfg.metric_weights)
    except ValueError as e:
        out.append(f"metric_weights.facenet: {e}")
    return out


def check(cfg: Settings) -> list[str]:
    """Before Ray starts: a backbone is named and the input root exists."""
    return [*settings_errors(cfg), *(input_errors("input", cfg.input) if cfg.input else [])]


if __name__ == "__main__":
    main(JOB, __doc__, SETTINGS, run, check=check)
