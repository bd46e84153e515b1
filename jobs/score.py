"""Score job: the committed latent classifier's probability of every attribute, for every face.

    python -m jobs.score --set latents=URI [--set output=URI] [--set classifier=ROOT] \\
        [--set classifier_run=RUN | --set classifier_sha256=HEX]

`latents` is a dataset root with a committed `latents` table (jobs.invert). The classifier is
resolved as `jobs.edit` resolves it (pipeline.model_registry.pick): `classifier=ROOT` (default:
the `latents` root) is the newest classifier committed under that root, or the one of
`classifier_run` / with `classifier_sha256`; a classifier made elsewhere is named by its file
and must come with `classifier_sha256`. Its file is verified against that sha256 where it is
loaded.

Every ok code is scored on an actor pool (`score.num_gpus: auto` = a GPU per actor when the
cluster has one) and written to the `scores` Delta table under `output` (default: `latents`):
image_id, face_index, classifier_sha256, classifier_run_id, latents_run_id, and one float
probability column per attribute (sigmoid of its logit), named after the attribute
(pipeline.score_stage.safe_columns: `5_o_Clock_Shadow` -> `a_5_o_Clock_Shadow`). Readable
without this project:

    SELECT count(*) FROM scores WHERE Smiling > 0.5 AND Eyeglasses > 0.5

A face is skipped when its committed row was scored by the same classifier (sha256); a new
classifier scores every face again and its row replaces the earlier one (one row per face: the
scores of the classifier that scored it last). Failures: `bad_code` (NaN / inf in the code,
permanent), `lost` / `worker_crash` (transient, scored again next run).

Counts (one per ok code of the latents table): in = ok + failed + skipped.
"""
from __future__ import annotations

import logging
from functools import partial

from jobs.cli import input_errors, main
from jobs.settings.score import Settings
from pipeline import model_registry
from pipeline.compute import actor_stage
from pipeline.errors import JobError
from pipeline.fit_data import code_shape, latent_counts, read_latents
from pipeline.runner import JobRun, TableSpec, WriteResult, run_summary
from pipeline.schemas import scores_schema
from pipeline.score_stage import (
    SCORE_DONE_KEY,
    SCORE_KEY,
    WORK_COLUMNS,
    ScoreBatch,
    lost_rows,
    safe_columns,
    work_batch,
)

log = logging.getLogger("stbatch.score")

JOB = "score"
TABLE = "scores"


SETTINGS = Settings


def scores_table(columns: list[str]) -> TableSpec:
    return TableSpec(TABLE, scores_schema(columns), SCORE_KEY)


def check(cfg: Settings) -> list[str]:
    """Before Ray starts: the latents root exists."""
    return input_errors("latents", cfg.latents)


def run(cfg: Settings, before_commit=None) -> dict:
    """The job body (also callable from Python; `before_commit(run)` is a test hook)."""
    import ray

    from stmodel.classifier import load_classifier

    latents = cfg.latents
    if not latents:
        raise JobError("latents: set latents=URI (a dataset root with a latents table)")
    output = cfg.output or latents
    try:
        clf_row = model_registry.pick(cfg.classifier or latents, "classifier", run_id=cfg.classifier_run,
                                      sha256=cfg.classifier_sha256)
    except LookupError as e:
        raise JobError(str(e)) from None
    clf = load_classifier(clf_row["uri"], sha256=clf_row["sha256"])
    shape = code_shape(latents)
    if (clf.n_latent, clf.style_dim) != tuple(shape):
        raise JobError(f"the classifier takes [{clf.n_latent}, {clf.style_dim}] codes, the latents table holds "
                       f"{list(shape)}")
    try:
        names = safe_columns(list(clf.attributes))
    except ValueError as e:
        raise JobError(str(e)) from None
    del clf
    columns = list(names.values())
    spec = scores_table(columns)
    c = cfg.score
    r = JobRun(output, JOB, cfg, rows_per_file=c.rows_per_part, log_every_s=c.log_every_s)
    n_in = latent_counts(latents, 0.0, 0)["ok"]
    log.info("score %s -> %s: %d ok codes, classifier %s (run %s), run %s", latents, output, n_in,
             clf_row["sha256"][:12], clf_row.get("run_id"), r.run_id)
    work = read_latents(latents, WORK_COLUMNS).map_batches(
        work_batch, batch_format="pyarrow", fn_kwargs={"classifier_sha256": clf_row["sha256"]})
    work = r.mark_done(work, spec, retry_failed=cfg.retry_failed, key=SCORE_DONE_KEY)

    def stages(rows, batch_size: int | None = None):
        kw, device = actor_stage(c, n_in, isolating=batch_size is not None, stage="score")
        return rows.map_batches(ScoreBatch, batch_size=batch_size or c.batch_size, batch_format="pyarrow", **kw,
                                fn_constructor_kwargs={
                                    "section": c, "classifier": clf_row["uri"], "classifier_sha256": clf_row["sha256"],
                                    "classifier_run_id": clf_row.get("run_id"), "columns": columns,
                                    "run_id": r.run_id, "device": device})

    res = WriteResult()
    if n_in:
        res = r.write(None, spec, expected=n_in, inputs=work,
                      lost_rows=partial(lost_rows, columns=columns, classifier_run_id=clf_row.get("run_id"),
                                        run_id=r.run_id),
                      rerun=stages, batch_size=c.batch_size)
    counts = {"in": n_in, **res.counts}
    seconds = r.seconds()
    extra = {"classifier": {k: clf_row.get(k) for k in ("uri", "sha256", "run_id")}, "columns": names,
             "faces_per_s": round((counts["ok"] + counts["failed"]) / max(seconds, 1e-9), 3),
             "statuses": res.statuses,
             "probabilities": run_summary(output, TABLE, res.files, tuple(columns))}
    if before_commit is not None:
        before_commit(r)
    r.commit({spec: res}, {**counts, "seconds": seconds, **extra},
             extra={"inputs": {"latents": latents}, "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


if __name__ == "__main__":
    main(JOB, __doc__, SETTINGS, run, check=check)
