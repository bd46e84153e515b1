"""Fit job: the latent attribute classifier (official LCNet layout) on inverted W+ codes.

    python -m jobs.fit_classifier --set latents=URI --set attributes=URI --set output=URI \\
        [--set attributes_list=[Smiling,Male]] [--set val_fraction=0.1] [--set train.epochs=20]

`latents` is a dataset root with a committed `latents` table (jobs.invert). `attributes` is a
Parquet or CSV table: `image_id` (optionally `face_index`; or `file`/`filename`, matched to the
base name of the latents' `source_uri`) and one column per attribute holding 1/0, CelebA's
1/-1, or booleans (an empty cell = missing, left out of the loss). The numeric columns define
the attributes (in CelebA's order when they are all CelebA names), or `attributes_list`
chooses them. A deterministic share `val_fraction` of image ids (hash of image_id and
`split_seed`) is held out.

Training runs on Ray Train (TorchTrainer, data parallel; one worker locally, GPU when the
cluster has one): BCE-with-logits, Adam. Writes

    <output>/models/classifier.pt          official layout (`classifier.module.*` + opts)
    <output>/classifier_eval/run=<id>/     per attribute: n_val, accuracy, auc, positive_rate
    <output>/_runs/<id>.json               manifest (published last)

Counts, one per committed latents row: in = ok + failed + skipped, where ok = rows joined
with labels and used (train or held out), failed = ok codes without usable labels (`no
labels`, or an invalid label value), skipped = latents rows whose inversion had failed.
"""
from __future__ import annotations

import logging
import sys
import time

import numpy as np
import pyarrow as pa

from jobs.cli import main
from pipeline import storage
from pipeline.compute import fit
from pipeline.fit_loops import (attribute_key, classifier_loop, committed_latent_files, labelled_codes_batch,
                                latent_key, latents_index, load_attributes, split_of)
from pipeline.schemas import classifier_eval_schema, make_table

log = logging.getLogger("stbatch.fit_classifier")

JOB = "fit_classifier"
TABLE = "classifier_eval"

DEFAULTS = {
    "latents": None,          # dataset root with a committed latents table
    "attributes": None,       # Parquet/CSV: image_id (or file) + one 0/1 (or -1/1) column per attribute
    "attributes_list": None,  # choose / order the attributes (default: the table's numeric columns)
    "output": None,           # models/classifier.pt, classifier_eval/, _runs/
    "val_fraction": 0.1,      # held-out share of image ids (hash of image_id)
    "split_seed": 0,
    "progress": True,
    "classifier": {"hidden": [2048, 512], "emb_dim": 32},  # the official LCNet_40 sizes
    "train": {
        "epochs": 20, "batch_size": 256, "lr": 1e-4, "weight_decay": 0.0, "seed": 0,
        "num_workers": 1, "use_gpu": "auto", "torch_threads": 0,
        "shuffle_buffer": 4096,   # rows in the local shuffle buffer of each worker
        "materialize": True,      # keep the prepared codes in the object store across epochs
        "log_every": 1,
        "ray_storage": None,      # Ray Train's run folder (shared storage on a multi-node cluster)
    },
}


def join_labels(index: pa.Table, attrs: dict, val_fraction: float, seed: int) -> tuple[dict, dict, dict]:
    """(labels {image_id:face -> (split, float32 [K])}, counts, errors {reason: n})."""
    labels, errors = {}, {}
    counts = {"in": index.num_rows, "ok": 0, "failed": 0, "skipped": 0}
    used_keys = set()
    rows = zip(index["image_id"].to_pylist(), index["face_index"].to_pylist(), index["status"].to_pylist(),
               index["source_uri"].to_pylist())
    for iid, fi, st, src in rows:
        if st != "ok":
            counts["skipped"] += 1
            continue
        ak = attribute_key(attrs["join_on"], iid, fi, src)
        lab = attrs["labels"].get(ak)
        reason = None
        if lab is None:
            reason = attrs["invalid"].get(ak, "no labels")
        elif np.isnan(lab).all():
            reason = "no labels"
        if reason:
            counts["failed"] += 1
            errors[reason] = errors.get(reason, 0) + 1
            continue
        used_keys.add(ak)
        labels[latent_key(iid, fi)] = (split_of(iid, val_fraction, seed), lab)
        counts["ok"] += 1
    unused = len(set(attrs["labels"]) - used_keys)
    return labels, counts, {"errors": errors, "labels_without_latents": unused}


def format_eval(rows: list[dict]) -> str:
    lines = [f"{'attribute':<22} {'n_val':>6} {'accuracy':>9} {'auc':>7} {'pos_rate':>9}"]
    for r in rows:
        lines.append(f"{r['attribute']:<22} {r['n_val']:>6d} {r['accuracy']:>9.4f} {r['auc']:>7.4f} "
                     f"{r['positive_rate']:>9.4f}")
    return "\n".join(lines)


def run(cfg: dict) -> dict:
    import ray

    for k in ("latents", "attributes", "output"):
        if not cfg.get(k):
            raise SystemExit(f"fit_classifier: set {k}=URI")
    t0 = time.time()
    t = cfg["train"]
    r = storage.Run(cfg["output"], JOB, cfg)
    r.sweep_uncommitted([TABLE])
    index = latents_index(cfg["latents"])
    attrs = load_attributes(cfg["attributes"], cfg.get("attributes_list"))
    names = attrs["names"]
    labels, counts, notes = join_labels(index, attrs, float(cfg["val_fraction"]), int(cfg["split_seed"]))
    for reason, n in notes["errors"].items():
        log.warning("%d latents rows not used: %s", n, reason)
    splits = [v[0] for v in labels.values()]
    n_train, n_val = splits.count("train"), splits.count("val")
    if n_train == 0:
        raise SystemExit(f"fit_classifier: no labelled codes to train on ({counts}, {notes})")
    if n_val == 0:
        raise SystemExit("fit_classifier: the held-out split is empty; raise val_fraction or add data")
    lab_train = np.stack([v[1] for v in labels.values() if v[0] == "train"])
    per_attr_train = (~np.isnan(lab_train)).sum(0)
    paths, fs = committed_latent_files(cfg["latents"])
    base = ray.data.read_parquet(paths, filesystem=fs).select_columns(
        ["image_id", "face_index", "status", "w_plus"])
    datasets = {}
    for split in ("train", "val"):
        ds = base.map_batches(labelled_codes_batch, batch_format="pyarrow", batch_size=1024,
                              fn_kwargs={"labels": labels, "keep": split})
        datasets[split] = ds.materialize() if t.get("materialize", True) else ds
    w_shape = datasets["val"].take_batch(1, batch_format="numpy")["w_plus"].shape[1:]
    uri = storage.join(cfg["output"], "models", "classifier.pt")
    log.info("fit_classifier: %d attributes, %d train / %d held-out codes of shape %s, %d epochs -> %s",
             len(names), n_train, n_val, list(w_shape), int(t["epochs"]), uri)
    out = fit(classifier_loop, {"attributes": names, "n_latent": int(w_shape[0]), "style_dim": int(w_shape[1]),
                                "classifier": cfg["classifier"], "train": t, "classifier_uri": uri,
                                "run_id": r.run_id},
              datasets, t, f"{JOB}-{r.run_id}")
    ev = out["eval"]
    for row in ev:
        row.update(n_train=int(per_attr_train[row["attribute_index"]]), classifier_uri=uri,
                   classifier_sha256=out["sha256"])
    cols = {k: [row[k] for row in ev] for k in classifier_eval_schema().names if k in ev[0]}
    r.write_table(TABLE, make_table(cols, classifier_eval_schema(), r.run_id))
    print(format_eval(ev), file=sys.stderr, flush=True)
    acc = [row["accuracy"] for row in ev]
    aucs = [row["auc"] for row in ev if row["auc"] == row["auc"]]
    extra = {"classifier": uri, "classifier_sha256": out["sha256"], "attributes": names,
             "n_train": n_train, "n_val": n_val,
             "mean_accuracy": round(float(np.mean(acc)), 4),
             "mean_auc": round(float(np.mean(aucs)), 4) if aucs else None,
             "final_epoch": out["history"][-1] if out["history"] else None, **notes}
    r.commit({**counts, "seconds": round(time.time() - t0, 2), **extra},
             extra={"inputs": {"latents": cfg["latents"], "attributes": cfg["attributes"]},
                    "history": out["history"], "eval": ev, "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


DESCRIPTION = __doc__


if __name__ == "__main__":
    main(JOB, DESCRIPTION, DEFAULTS, run)
