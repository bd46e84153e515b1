"""Fit job: the latent attribute classifier (official LCNet layout) on inverted W+ codes.

    python -m jobs.fit_classifier --set latents=URI --set attributes=URI --set output=URI \\
        [--set attributes_list=[Smiling,Male]] [--set val_fraction=0.1] [--set fit_classifier.epochs=20]

`latents` is a dataset root with a committed `latents` table (jobs.invert). `attributes` is a
Parquet or CSV table: `image_id` (optionally `face_index`; or `file`/`filename`, matched to the
base name of the latents' `source_uri`) and one column per attribute holding 1/0, CelebA's
1/-1, or booleans (an empty cell = missing, left out of the loss). The numeric columns define
the attributes (in CelebA's order when they are all CelebA names), or `attributes_list`
chooses them. A deterministic share `val_fraction` of image ids (hash of image_id and
`split_seed`) is held out.

The latents rows are read through Ray Data from the committed Delta snapshot of `latents`;
the user's attribute table (one small row per labelled image) is read once, normalised into an
Arrow table and broadcast to the tasks, which join it with the codes (no code ever reaches the
driver, nor a per-code dict). Training runs on Ray Train (TorchTrainer, data parallel; one
worker locally, GPU when the cluster has one): BCE-with-logits, Adam; the held-out split is
evaluated streaming on rank 0. Writes

    <output>/model_files/classifier/<run_id>/classifier.pt  official layout (`classifier.module.*`
                                                          + opts)
    <output>/classifier_eval/   Delta table, per run and attribute: n_train, n_val, accuracy, auc,
                                positive_rate, classifier_uri / sha256
    <output>/models/            Delta table: one `models` row (uri, kind, sha256, run_id)
    <output>/_runs/<id>.json    run record

The model file is published by the same run's commit of its `models` row: a run that fails
before its commit leaves a file that no committed row names, so `jobs.edit` and
`jobs.fit_editor` (which resolve models from committed rows only) never use it.

Counts, one per committed latents row: in = ok + failed + skipped, where ok = rows joined
with labels and used (train or held out), failed = ok codes without usable labels (`no
labels`, or an invalid label value), skipped = latents rows whose inversion had failed.
"""
from __future__ import annotations

import logging
import sys

import numpy as np
import pyarrow as pa

from jobs.cli import input_errors, main
from jobs.settings.fit_classifier import Settings
from pipeline import model_registry, storage
from pipeline.compute import fit
from pipeline.errors import JobError
from pipeline.fit_data import code_shape, read_latents
from pipeline.fit_loops import classifier_loop
from pipeline.labels import label_counts, labelled_codes_batch, load_labels
from pipeline.model_registry import MODELS
from pipeline.runner import JobRun, TableSpec
from pipeline.schemas import classifier_eval_schema, make_table

log = logging.getLogger("stbatch.fit_classifier")

JOB = "fit_classifier"
TABLE = "classifier_eval"
# one row per run and attribute: every committed classifier keeps its held-out figures
EVAL = TableSpec(TABLE, classifier_eval_schema(), ("run_id", "attribute"))
MODEL_FILE = "classifier.pt"


SETTINGS = Settings


def format_eval(rows: list[dict]) -> str:
    lines = [f"{'attribute':<22} {'n_val':>6} {'accuracy':>9} {'auc':>7} {'pos_rate':>9}"]
    for r in rows:
        lines.append(f"{r['attribute']:<22} {r['n_val']:>6d} {r['accuracy']:>9.4f} {r['auc']:>7.4f} "
                     f"{r['positive_rate']:>9.4f}")
    return "\n".join(lines)


def check(cfg: Settings) -> list[str]:
    """What main checks before Ray starts: the latents root and the attributes table exist, and
    an output."""
    return [*input_errors("latents", cfg.latents), *input_errors("attributes", cfg.attributes),
            *([] if cfg.output else ["output: set output=URI"])]


def run(cfg: Settings, before_commit=None) -> dict:
    """The job body (also callable from Python, after `check`; `before_commit(run)` is a test hook)."""
    import ray

    if not cfg.latents or not cfg.attributes or not cfg.output:
        raise JobError("fit_classifier: set latents=URI, attributes=URI and output=URI")
    root, output = cfg.latents, cfg.output
    t = cfg.fit_classifier
    r = JobRun(output, JOB, cfg)
    vf, seed = cfg.val_fraction, cfg.split_seed
    labels = load_labels(cfg.attributes, cfg.attributes_list)
    names = labels.names
    refs = labels.broadcast()
    latents = read_latents(root, ["image_id", "face_index", "status", "source_uri", "w_plus"])
    keys = read_latents(root, ["image_id", "face_index", "status", "source_uri"])
    c = label_counts(keys, labels, refs, vf, seed)
    counts = {k: c[k] for k in ("in", "ok", "failed", "skipped")}
    notes = {"errors": c["errors"], "labels_without_latents": c["labels_without_latents"]}
    for reason, n in notes["errors"].items():
        log.warning("%d latents rows not used: %s", n, reason)
    if c["train"] == 0:
        raise JobError(f"no labelled codes to train on ({counts}, {notes})")
    if c["val"] == 0:
        raise JobError("the held-out split is empty; raise val_fraction or add data")
    shape = code_shape(root)
    datasets = {}
    for split in ("train", "val"):
        ds = latents.map_batches(labelled_codes_batch, batch_format="pyarrow", batch_size=1024, fn_kwargs={
            "labels_refs": refs, "join_on": labels.join_on, "val_fraction": vf, "seed": seed, "keep": split,
            "shape": shape})
        datasets[split] = ds.materialize() if t.materialize else ds
    uri = storage.join(output, model_registry.model_key("classifier", r.run_id, MODEL_FILE))
    log.info("fit_classifier: %d attributes, %d train / %d held-out codes of shape %s, %d epochs -> %s (run %s)",
             len(names), c["train"], c["val"], list(shape), t.epochs, uri, r.run_id)
    out = fit(classifier_loop, {"attributes": names, "n_latent": shape[0], "style_dim": shape[1],
                                "classifier": cfg.classifier, "train": t, "classifier_uri": uri,
                                "run_id": r.run_id},
              datasets, t, f"{JOB}-{r.run_id}")
    ev = out["eval"]
    for row in ev:
        row.update(n_train=int(c["per_attr_train"][row["attribute_index"]]), classifier_uri=uri,
                   classifier_sha256=out["sha256"])
    cols = {k: [row[k] for row in ev] for k in EVAL.schema.names if k in ev[0]}
    eval_rows = make_table(cols, EVAL.schema, r.run_id)
    eval_rows = eval_rows.append_column("status", pa.array(["ok"] * eval_rows.num_rows, pa.string()))
    model_rows = model_registry.model_rows([{"uri": uri, "kind": "classifier", "attribute": None,
                                             "sha256": out["sha256"]}], r.run_id)
    results = {EVAL: r.write_small(EVAL, eval_rows), MODELS: r.write_small(MODELS, model_rows)}
    print(format_eval(ev), file=sys.stderr, flush=True)
    acc = [row["accuracy"] for row in ev]
    aucs = [row["auc"] for row in ev if row["auc"] == row["auc"]]
    extra = {"classifier": uri, "classifier_sha256": out["sha256"], "attributes": names,
             "n_train": c["train"], "n_val": c["val"],
             "mean_accuracy": round(float(np.mean(acc)), 4),
             "mean_auc": round(float(np.mean(aucs)), 4) if aucs else None,
             "final_epoch": out["history"][-1] if out["history"] else None, **notes}
    if before_commit is not None:
        before_commit(r)
    # `models` last: the row that publishes the file is committed after its figures
    r.commit(results, {**counts, "seconds": r.seconds(), **extra},
             extra={"inputs": {"latents": cfg.latents, "attributes": cfg.attributes},
                    "history": out["history"], "eval": ev, "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


DESCRIPTION = __doc__


if __name__ == "__main__":
    main(JOB, DESCRIPTION, SETTINGS, run, trains=True, check=check)
