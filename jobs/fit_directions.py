"""Fit job: latent directions of a dataset, published for `jobs.edit --set direction=NAME`.

    python -m jobs.fit_directions --set latents=URI [--set output=URI] [--set components=10] \\
        [--set attributes=URI [--set attributes_list=[Smiling,Eyeglasses]]]

`latents` is a dataset root with a committed `latents` table. Directions (pipeline.directions):

  pca_0 ... pca_<components-1>   principal axes of the codes averaged over their layers
                                 (GANSpace), pca_0 the axis of most variance
  <attribute>                    with `attributes` (the label table of jobs.fit_classifier:
                                 image_id or file + one 0/1, -1/1 or bool column per attribute):
                                 the normal of the linear boundary between the attribute's two
                                 classes (InterFaceGAN; Fisher's discriminant under the
                                 Ledoit-Wolf shrunk covariance), pointing to its presence

Each is a [D] float32 `.npy` scaled to one standard deviation of the codes along it (an edit's
`strength` is then in standard deviations), written to
`<output>/model_files/direction/<run_id>/<name>.npy` and published by a `models` row (kind
`direction`, attribute = the name) in this run's commit: `jobs.edit --set direction=pca_0` or
`--set direction=Smiling` uses the newest committed one (`directions=ROOT`, default: `latents`).
An attribute with fewer than `min_class` labelled codes in one of its classes gets no direction
(the summary says why).

The statistics are summed by Ray tasks and reduced in one task, which also writes the files;
the driver holds references and the rows it commits.

Counts: one per committed latents row: in = ok + failed + skipped (skipped: rows whose
inversion had failed).
"""
from __future__ import annotations

import logging

from jobs.cli import input_errors, main
from jobs.settings.fit_directions import Settings
from pipeline import directions
from pipeline.code_stats import (
    COLUMNS,
    first_moments,
    reduce_first,
    reduce_second,
    second_moments,
)
from pipeline.errors import JobError
from pipeline.fit_data import code_shape, latent_counts, read_latents
from pipeline.labels import load_labels
from pipeline.model_registry import MODELS, model_rows
from pipeline.runner import JobRun

log = logging.getLogger("stbatch.fit_directions")

JOB = "fit_directions"


SETTINGS = Settings


def check(cfg: Settings) -> list[str]:
    """What main checks before Ray starts: the latents root (and the labels table) exist."""
    return [*input_errors("latents", cfg.latents),
            *(input_errors("attributes", cfg.attributes) if cfg.attributes else [])]


def run(cfg: Settings, before_commit=None) -> dict:
    """The job body (also callable from Python, after `check`; `before_commit(run)` is a test hook)."""
    import ray

    latents = cfg.latents
    if not latents:
        raise JobError("fit_directions: set latents=URI (a dataset root with a latents table)")
    output = cfg.output or latents
    r = JobRun(output, JOB, cfg)
    c = latent_counts(latents, 0.0, 0)
    if not c["ok"]:
        raise JobError(f"no ok codes under {latents}")
    shape = code_shape(latents)
    labels = load_labels(cfg.attributes, cfg.attributes_list) if cfg.attributes else None
    codes = read_latents(latents, COLUMNS + (["source_uri"] if labels else [])).materialize()
    first = ray.remote(reduce_first).remote(list(codes.map_batches(first_moments, batch_format="pyarrow")
                                                  .materialize().to_arrow_refs()))
    second = codes.map_batches(second_moments, batch_format="pyarrow", fn_kwargs={"first": [first]})
    stats = ray.remote(reduce_second).remote(list(second.materialize().to_arrow_refs()), first)
    sums = None
    if labels is not None:
        sums = list(codes.map_batches(directions.class_sums, batch_format="pyarrow", fn_kwargs={
            "labels_refs": labels.broadcast(), "join_on": labels.join_on, "shape": shape})
                    .materialize().to_arrow_refs())
    log.info("fit_directions %s -> %s: %d ok codes of shape %s, %d PCA directions, %s, run %s", latents, output,
             c["ok"], list(shape), cfg.components,
             f"boundaries for {len(labels.names)} attributes" if labels else "no labels", r.run_id)
    out = ray.get(ray.remote(directions.publish).remote(stats, sums, labels.names if labels else [],
                                                        cfg.components, cfg.min_class, output, r.run_id))
    for name, why in out["skipped"].items():
        log.warning("no direction for %s: %s", name, why)
    counts = {"in": c["in"], "ok": c["ok"], "failed": 0, "skipped": c["in"] - c["ok"]}
    extra = {"directions": [row["attribute"] for row in out["rows"]],
             "explained_variance_ratio": out["explained_variance_ratio"], "attributes_skipped": out["skipped"]}
    if before_commit is not None:
        before_commit(r)
    r.commit({MODELS: r.write_small(MODELS, model_rows(out["rows"], r.run_id))},
             {**counts, "seconds": r.seconds(), **extra},
             extra={"inputs": {"latents": latents, "attributes": cfg.attributes},
                    "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


if __name__ == "__main__":
    main(JOB, __doc__, SETTINGS, run, check=check)
