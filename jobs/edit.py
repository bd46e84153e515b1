"""Edit job: inverted faces + edit requests -> edited images and the `edits` table.

    python -m jobs.edit --set latents=URI --set output=URI --set model.checkpoint=URI \\
        --set classifier=URI [--set editors.Smiling=URI ...] --set requests=URI
    python -m jobs.edit ... --set requests=null --set sweep.attributes=[Smiling] \\
        --set sweep.strengths=[0.5,1.0] [--set sweep.image_ids=all] [--set sweep.kinds=[label]]

`latents` is a dataset root with a committed `latents` table (jobs.invert); `model.checkpoint`
must be the inversion checkpoint that made those codes (its generator renders the edits).

Requests: a Parquet or CSV table with columns image_id, face_index (default 0), kind
(`label` | `reference` | `direction`), attribute, strength (default 1.0), target (label: 1 add,
0 remove; default 1), reference_image_id (+ reference_face_index, default 0), direction_uri
(.npy/.pt: [D] or [n_latent, D]), order (label: 1 or 2; default 1). Or, with requests=null,
the cross product of `sweep` (image_ids: all | [...], kinds, attributes, strengths, targets,
reference_image_ids, direction_uris).

  label      w_e = w - strength * normalised d BCE(logit_k, target)/dw   (the classifier)
  reference  w_e = w + strength * (T_k(w, w_ref) - w)                   (editors.<attribute>)
  direction  w_e = w + strength * n                                       (InterFaceGAN-style)

Each request's edit_id is the sha256 of its canonical fields: the edited image is written to
`<output>/edits/images/<edit_id>.png`, the source's reconstruction (once per face) to
`<output>/edit_sources/<image_id>_<face>.png`, and an `edits` row records ID similarity and
LPIPS of the edit against the source reconstruction and the classifier logits of the
attribute before / after. A request that cannot be carried out (unknown image, attribute or
reference, no editor for the attribute, unreadable direction, bad kind or value) is a failed
row with the reason. Requests whose edit_id is committed with status ok are skipped (failed
ones are retried unless retry_failed=false); the run is published by its manifest.

Counts, one per request: in = ok + failed + skipped (skipped = done before, or repeated).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from jobs.cli import main
from pipeline import storage
from pipeline.compute import actor_pool, device_for, gpus_per_actor
from pipeline.edit_stage import (REQUEST_FIELDS, STATUS_OK, EditBatch, EditContext, check_direction, edit_id,
                                 normalize_request, validate, work_table)
from pipeline.fit_loops import latents_index, read_latent_codes, read_table_uri
from pipeline.schemas import edits_schema, make_table

log = logging.getLogger("stbatch.edit")

JOB = "edit"
TABLE = "edits"

DEFAULTS = {
    "latents": None,     # dataset root with a committed latents table
    "requests": None,    # Parquet/CSV of edit requests; null: use `sweep`
    "output": None,      # edits/ (table parts run=<id>/, images/), edit_sources/, _runs/
    "progress": True,
    "model": {"checkpoint": None, "sha256": None, "preset": None, "seed": 0, "name": None},
    "classifier": None,  # latent classifier URI (label edits, logits)
    "classifier_sha256": None,
    "editors": {},       # {attribute: URI}, or the output root of jobs.fit_editor (models/editor_*.pt)
    "sweep": {
        "image_ids": "all",        # all ok faces of the latents table, or a list of image ids (face 0)
        "kinds": ["label"],
        "attributes": [],
        "strengths": [1.0],
        "targets": [1],            # label edits
        "order": 1,                # label edits
        "reference_image_ids": [], # reference edits (face 0)
        "direction_uris": [],      # direction edits
    },
    "metrics": True,               # ID similarity + LPIPS of each edit against the source reconstruction
    "metric_weights": {
        "lpips_alexnet": None, "facenet": None,
        "allow_random_init": False,  # tests only: random backbones, labelled in every row
        "skip_missing": False,       # leave a metric without weights uncomputed (null, labelled)
    },
    "retry_failed": True,          # rerun requests whose committed rows failed
    "direction_prefixes": [],      # when set, direction_uri must start with one of these
    "edit": {
        "batch_size": 8, "concurrency": 1, "num_gpus": "auto", "num_cpus": 1, "device": "auto",
        "amp": "auto", "rows_per_block": 256, "rows_per_part": 20_000, "log_every_s": 30,
    },
}


def expand_sweep(sw: dict, faces: list[tuple[str, int]]) -> list[dict]:
    ids = sw.get("image_ids", "all")
    keys = sorted(faces) if ids in (None, "all") else [(str(i), 0) for i in ([ids] if isinstance(ids, str) else ids)]
    attrs = list(sw.get("attributes") or []) or [None]
    out = []
    for iid, fi in keys:
        for kind in sw.get("kinds") or ["label"]:
            for attr in attrs:
                for s in sw.get("strengths") or [1.0]:
                    base = {"image_id": iid, "face_index": fi, "kind": kind, "attribute": attr, "strength": s}
                    if kind == "label":
                        out += [{**base, "target": t, "order": sw.get("order", 1)} for t in (sw.get("targets") or [1])]
                    elif kind == "reference":
                        out += [{**base, "reference_image_id": ref} for ref in sw.get("reference_image_ids") or []
                                if str(ref) != iid]
                    elif kind == "direction":
                        out += [{**base, "direction_uri": u} for u in sw.get("direction_uris") or []]
                    else:
                        out.append(base)  # becomes a failed row: bad kind
    return out


def resolve_editors(spec) -> dict[str, str]:
    """{attribute: URI} from the config: a mapping, or a fit_editor output root."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return {str(a): str(u) for a, u in spec.items() if u}
    found = {}
    for uri in storage.list_files(storage.join(str(spec), "models")):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("editor_") and name.endswith(".pt"):
            found[name[len("editor_"):-3]] = uri
    if not found:
        raise SystemExit(f"edit: no models/editor_<attribute>.pt under {spec}")
    return found


def check_editors(editors: dict[str, str], style_dim: int) -> tuple[dict, dict]:
    from stmodel.editor import load_editor

    good, bad = {}, {}
    for a, uri in editors.items():
        try:
            ed, _, _ = load_editor(uri)
            if ed.style_dim != style_dim:
                raise ValueError(f"editor works on {ed.style_dim}-d codes, the model's are {style_dim}-d")
            good[a] = uri
        except Exception as e:  # noqa: BLE001 - requests using it fail with this reason
            bad[a] = f"{uri}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            log.error("editor %s unusable: %s", a, bad[a])
    return good, bad


def run(cfg: dict, before_commit=None) -> dict:
    import ray

    from pipeline.models import describe_model
    from stmodel.classifier import load_classifier

    for k in ("latents", "output"):
        if not cfg.get(k):
            raise SystemExit(f"edit: set {k}=URI")
    if cfg["metrics"]:
        w = cfg["metric_weights"]
        if not (w.get("allow_random_init") or w.get("skip_missing")) and not (w.get("lpips_alexnet") and w.get("facenet")):
            raise SystemExit("edit: metrics need metric_weights.lpips_alexnet and metric_weights.facenet "
                             "(weights URIs), metric_weights.skip_missing=true, or metrics=false")
    c = cfg["edit"]
    t0 = time.time()
    r = storage.Run(cfg["output"], JOB, cfg)
    r.sweep_uncommitted([TABLE])
    mc, info = describe_model(cfg["model"])
    n_latent, style_dim = mc.n_latent, mc.style_dim
    attributes = None
    if cfg.get("classifier"):
        clf = load_classifier(cfg["classifier"], sha256=cfg.get("classifier_sha256"))
        if (clf.n_latent, clf.style_dim) != (n_latent, style_dim):
            raise SystemExit(f"edit: the classifier takes [{clf.n_latent}, {clf.style_dim}] codes, the model "
                             f"makes [{n_latent}, {style_dim}]")
        attributes = list(clf.attributes)
        del clf
    editors, editor_errors = check_editors(resolve_editors(cfg.get("editors")), style_dim)

    index = latents_index(cfg["latents"])
    latents = {(i, int(f)): sha for i, f, s, sha in zip(index["image_id"].to_pylist(), index["face_index"].to_pylist(),
                                                        index["status"].to_pylist(),
                                                        index["checkpoint_sha256"].to_pylist()) if s == "ok"}
    if cfg.get("requests"):
        raw = read_table_uri(cfg["requests"], string_columns=("image_id", "reference_image_id", "kind",
                                                               "attribute", "direction_uri")).to_pylist()
        unknown = sorted({k for row in raw[:1] for k in row} - set(REQUEST_FIELDS))
        if unknown:
            log.warning("requests: columns %s are not request fields, ignored", unknown)
    else:
        if not (cfg["sweep"].get("attributes") or cfg["sweep"].get("direction_uris")):
            raise SystemExit("edit: set requests=URI, or a sweep (sweep.attributes=[...] / sweep.direction_uris=[...])")
        raw = expand_sweep(cfg["sweep"], list(latents))
    n_in = len(raw)

    directions: dict[str, str | None] = {}

    def direction_error(uri: str) -> str | None:
        if uri not in directions:
            directions[uri] = check_direction(uri, n_latent, style_dim)[1]
        return directions[uri]

    ctx = EditContext(latents, info["sha256"], attributes, set(editors), editor_errors, direction_error,
                      cfg.get("direction_prefixes"))
    done = storage.committed_values(cfg["output"], TABLE, "edit_id",
                                    where_status=STATUS_OK if cfg.get("retry_failed", True) else None)
    seen: set = set()
    work, bad, skipped = [], [], 0
    for row in raw:
        req, err = normalize_request(row)
        eid = edit_id(req)
        if eid in done or eid in seen:
            skipped += 1
            continue
        seen.add(eid)
        status = "bad_request"
        if err is None:
            status, err = validate(req, ctx)
        if err:
            bad.append({**req, "edit_id": eid, "status": status, "error": err})
        else:
            work.append({**req, "edit_id": eid})
    log.info("edit %s -> %s: %d requests, %d skipped (done before or repeated), %d invalid, %d to do, run %s",
             cfg["latents"], cfg["output"], n_in, skipped, len(bad), len(work), r.run_id)
    counts = {"in": n_in, "ok": 0, "failed": len(bad), "skipped": skipped}
    schema = edits_schema()
    part = 0

    def rows_table(rows: list[dict]) -> pa.Table:
        cols = {k: [x.get(k) for x in rows] for k in schema.names if k not in ("run_id", "created_at")}
        cols["model"] = [info["name"]] * len(rows)
        cols["checkpoint_sha256"] = [info["sha256"]] * len(rows)
        for k in ("face_index", "reference_face_index", "target", "order"):  # unparsable -> null
            cols[k] = [v if isinstance(v, int) else None for v in cols[k]]
        cols["strength"] = [v if isinstance(v, float) else None for v in cols["strength"]]
        return make_table(cols, schema, r.run_id)

    if bad:
        for b in bad[:10]:
            log.warning("request %s... failed: %s", b["edit_id"][:12], b["error"])
        r.write_table(TABLE, rows_table(bad), part=part)
        part += 1
    returned: set = set()
    extra: dict = {"model": info["name"]}
    if work:
        work.sort(key=lambda x: (x["image_id"], x["face_index"], x["edit_id"]))
        keys = {(x["image_id"], x["face_index"]) for x in work}
        keys |= {(x["reference_image_id"], x["reference_face_index"]) for x in work if x["kind"] == "reference"}
        codes = read_latent_codes(cfg["latents"], keys)
        missing = [x for x in work if (x["image_id"], x["face_index"]) not in codes or
                   (x["kind"] == "reference" and (x["reference_image_id"], x["reference_face_index"]) not in codes)]
        if missing:  # listed in the index but not readable: failed rows, never dropped
            ids = {m["edit_id"] for m in missing}
            work = [x for x in work if x["edit_id"] not in ids]
            r.write_table(TABLE, rows_table([{**m, "status": "edit_error", "error": "code not found in the latents "
                                              "files"} for m in missing]), part=part)
            part += 1
            counts["failed"] += len(missing)
    if work:
        table = work_table(work, codes, n_latent, style_dim)
        step = max(1, int(c["rows_per_block"]))
        blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]
        num_gpus = gpus_per_actor(c["num_gpus"])
        kw = {"num_gpus": num_gpus} if num_gpus > 0 else {}
        ds = ray.data.from_arrow(blocks).map_batches(
            EditBatch, batch_size=int(c["batch_size"]), batch_format="pyarrow", compute=actor_pool(c["concurrency"]),
            num_cpus=float(c["num_cpus"]), **kw,
            fn_constructor_kwargs={
                "model": cfg["model"], "run_id": r.run_id, "output": cfg["output"],
                "classifier": cfg.get("classifier"), "classifier_sha256": cfg.get("classifier_sha256"),
                "editors": editors, "metrics": cfg["metric_weights"] if cfg["metrics"] else None,
                "device": device_for(c["device"], num_gpus), "amp": c["amp"],
                "torch_threads": max(1, int(float(c["num_cpus"]))),
            })
        pending, pending_rows, last = [], 0, time.time()
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if batch.num_rows == 0:
                continue
            st = batch["status"].to_pylist()
            counts["ok"] += st.count(STATUS_OK)
            counts["failed"] += len(st) - st.count(STATUS_OK)
            returned.update(batch["edit_id"].to_pylist())
            pending.append(batch)
            pending_rows += batch.num_rows
            if pending_rows >= int(c["rows_per_part"]):
                r.write_table(TABLE, pa.concat_tables(pending), part=part)
                part, pending, pending_rows = part + 1, [], 0
            if time.time() - last >= float(c["log_every_s"]):
                last = time.time()
                log.info("edit progress: %d/%d (ok %d, failed %d)", len(returned), len(work), counts["ok"],
                         counts["failed"])
        if pending:
            r.write_table(TABLE, pa.concat_tables(pending), part=part)
            part += 1
        lost = [x for x in work if x["edit_id"] not in returned]
        if lost:
            log.error("%d edits did not come back from the pipeline", len(lost))
            counts["failed"] += len(lost)
            r.write_table(TABLE, rows_table([{**x, "status": "edit_error", "error": "row lost by the pipeline"}
                                             for x in lost]), part=part)
    extra.update(_summary(cfg["output"], r))
    if before_commit is not None:
        before_commit(r)
    seconds = time.time() - t0
    extra["edits_per_s"] = round((counts["ok"] + counts["failed"]) / max(seconds, 1e-9), 3)
    r.commit({**counts, "seconds": round(seconds, 2), **extra},
             extra={"inputs": {"latents": cfg["latents"], "requests": cfg.get("requests"),
                               "classifier": cfg.get("classifier"), "editors": editors},
                    "checkpoint_sha256": info["sha256"], "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


def _summary(output: str, r: storage.Run) -> dict:
    """Per-kind counts and metric summaries of this run's rows (read back from its own parts)."""
    from stmodel.metrics import summarize

    files = [storage.join(output, rel) for rel in r.tables.get(TABLE, [])]
    if not files:
        return {}
    import pyarrow.parquet as pq

    fs, _ = storage.url_to_fs(output)
    t = pa.concat_tables([pq.read_table(storage.url_to_fs(f)[1], filesystem=fs,
                                        columns=["kind", "status", "error", "target", "id_similarity", "lpips",
                                                 "logit_before", "logit_after", "metric_backbones"]) for f in files])
    rows = t.to_pylist()
    out: dict = {"by_status": {}, "by_kind": {}}
    for x in rows:
        out["by_status"][x["status"]] = out["by_status"].get(x["status"], 0) + 1
        if x["status"] == STATUS_OK:
            out["by_kind"][x["kind"]] = out["by_kind"].get(x["kind"], 0) + 1
    ok = [x for x in rows if x["status"] == STATUS_OK]
    for col in ("id_similarity", "lpips"):
        sm = summarize(np.array([x[col] if x[col] is not None else np.nan for x in ok], np.float64))
        if sm["n"]:  # no NaN in the summary line
            out[col] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in sm.items()}
    lab = [x for x in ok if x["kind"] == "label" and x["logit_before"] is not None]
    if lab:
        moved = [(x["logit_after"] > x["logit_before"]) == (x["target"] == 1) for x in lab]
        out["label_moved_rate"] = round(float(np.mean(moved)), 4)
    out["backbones"] = sorted({x["metric_backbones"] for x in ok if x["metric_backbones"]})
    return out


DESCRIPTION = __doc__


if __name__ == "__main__":
    main(JOB, DESCRIPTION, DEFAULTS, run)
