"""Edit job: inverted faces + edit requests -> edited images and the `edits` table.

    python -m jobs.edit --set latents=URI --set output=URI --set model.checkpoint=URI \\
        --set classifier=ROOT [--set editors=ROOT] --set requests=URI
    python -m jobs.edit ... --set requests=null --set sweep.attributes=[Smiling] \\
        --set sweep.strengths=[0.5,1.0] [--set sweep.image_ids=all] [--set sweep.kinds=[label]]

`latents` is a dataset root with a committed `latents` table (jobs.invert); `model.checkpoint`
must be the inversion checkpoint that made those codes (its generator renders the edits).

Models come from committed `models` rows only (jobs.fit_classifier / jobs.fit_editor commit
them with the run that trained them; a run that failed never published its files):
`classifier=ROOT` is the newest committed classifier under that dataset root, or the one of
`classifier_run` / with `classifier_sha256`; `editors=ROOT` is, per attribute, the newest
committed editor (or those of `editors_run`); `editors.<attribute>=ROOT` picks one attribute's
from a root. A model made elsewhere (the official classifier or editors) is named by its file
URI and must come with its sha256: `classifier=FILE classifier_sha256=HEX`,
`editors.<attribute>=FILE editors_sha256.<attribute>=HEX`. Every file is verified against its
sha256 where it is loaded.

Requests: a Parquet or CSV table with columns image_id, face_index (default 0), kind
(`label` | `reference` | `direction`), attribute, strength (default 1.0), target (label: 1 add,
0 remove; default 1), reference_image_id (+ reference_face_index, default 0), direction_uri
(.npy/.pt: [D] or [n_latent, D], under `output` or `direction_prefixes`, at most
`direction_max_bytes`), order (label: 1 or 2; default 1). A default applies to an empty cell
only; NaN, "NA" or other text in a numeric field is a bad_request, and a column that is not
one of these stops the job before anything runs (pipeline.edit_requests). Or, with requests=null,
the cross product of `sweep` (image_ids: all | [...], kinds, attributes, strengths, targets,
reference_image_ids, direction_uris); a sweep over all faces is built in Ray tasks from the
latents snapshot.

  label      w_e = w - strength * normalised d BCE(logit_k, target)/dw   (the classifier)
  reference  w_e = w + strength * (T_k(w, w_ref) - w)                   (the attribute's editor)
  direction  w_e = w + strength * n                                       (InterFaceGAN-style)

`direction=NAME` (with requests=null) sweeps a direction published by jobs.fit_directions
(`pca_0`, ..., or an attribute's boundary such as `Smiling`, one standard deviation long): the
newest committed under `directions` (default: the latents root), or of `directions_run`, over
`sweep.image_ids` at `sweep.strengths` (pipeline.directions.named_direction_sweep).

The requests become a Ray Dataset and meet their codes in Ray Data joins on (image_id,
face_index), and for reference edits on (reference_image_id, reference_face_index): the codes
never reach the driver. Each request's edit_id is the sha256 of its canonical fields and of
the models that make it (inversion checkpoint; classifier for label edits, the attribute's
editor for reference edits), so an edit with a retrained model is a new edit. The edited image
is written to `<output>/edit_images/<edit_id>.png`, the source's reconstruction to
`<output>/edit_sources/<image_id>_<face>.png`, and an `edits` row (Delta table, key edit_id)
records ID similarity and LPIPS of the edit against the source reconstruction and the
classifier logits of the attribute before / after. A request that cannot be carried out
(unknown image, attribute or reference, no editor for the attribute, unreadable direction, bad
kind or value) is a failed row with the reason. A request whose edit_id has a committed row
that is ok, or a permanent failure (bad_request), is skipped; transient failures (edit_error,
lost, worker_crash: pipeline.runner.TRANSIENT_STATUSES) are tried again, and
`retry_failed=true` retries every failure.

Paste-back (`paste_back=true`, or the `paste_back` section): each edited face is warped back
into its whole photo (pipeline.paste_stage; the quad and photo URI come from the committed
`faces` table under `paste_back.faces`, default the `latents` root), written to
`<output>/composites/edits/<edit_id>.jpg|png` with the photo's upright orientation, size and
RGB ICC profile; `paste_back.group=photo` pastes the faces of one photo edited with the same
request into one composite (named by the sha256 of their edit_ids). The row gets
`composite_uri`, `psnr_outside` (inf: nothing outside the face masks changed) and `psnr_box`
(inside the quad's bounding box); a photo that cannot be read or pasted makes the row
`read_error` (transient) or `paste_error` with the reason.

A batch that kills its edit actor (native crash, out of memory) is retried
`edit.max_task_retries` times; then its requests run again, only those, in halved batches
until the request that does it is alone: that request gets a `worker_crash` row (transient),
the others their edits, and the run completes (pipeline.runner, `write(rerun=...)`).

Counts, one per request: in = ok + failed + skipped (skipped = done before, or repeated).
"""
from __future__ import annotations

import logging
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc

from jobs.cli import input_errors, main, model_errors
from jobs.settings.edit import EditSection, Settings, SweepSection
from pipeline import delta, model_registry, paste_stage
from pipeline.compute import actor_stage, join_partitions
from pipeline.directions import named_direction_sweep
from pipeline.edit_requests import (
    REQUEST_FIELDS,
    EditContext,
    expand_sweep,
    prepare_requests,
    read_requests,
    request_keys,
    sweep_batch,
)
from pipeline.edit_stage import (
    EditBatch,
    as_role,
    codes_for_join,
    request_rows,
    with_status,
)
from pipeline.errors import JobError
from pipeline.fit_data import read_latents
from pipeline.runner import JobRun, TableSpec, WriteResult, reduce_run_files, run_summary
from pipeline.schemas import edits_schema
from pipeline.status import STATUS_LOST, STATUS_OK

log = logging.getLogger("stbatch.edit")

JOB = "edit"
TABLE = "edits"
EDITS = TableSpec(TABLE, edits_schema(), ("edit_id",))


SETTINGS = Settings


def required(uri: str | None, key: str) -> str:
    """A root that `check` requires (checked again where it is read, for callers from Python)."""
    if not uri:
        raise JobError(f"edit: set {key}=URI")
    return uri


def check(cfg: Settings) -> list[str]:
    """What main checks before Ray starts: the latents root exists, an output, a model, weights
    for the metrics, and something to edit."""
    errors = [*input_errors("latents", cfg.latents), *([] if cfg.output else ["output: set output=URI"]),
              *model_errors("model", cfg.model)]
    w = cfg.metric_weights
    if cfg.metrics and not (w.allow_random_init or w.skip_missing or (w.lpips_alexnet and w.facenet)):
        errors.append("metrics: need metric_weights.lpips_alexnet and metric_weights.facenet (weights URIs), "
                      "metric_weights.skip_missing=true, or metrics=false")
    if not (cfg.requests or cfg.direction or cfg.sweep.attributes or cfg.sweep.direction_uris):
        errors.append("requests: set requests=URI, direction=NAME, or a sweep (sweep.attributes=[...] / "
                      "sweep.direction_uris=[...])")
    return errors


def resolve_models(cfg: Settings) -> tuple[dict | None, dict[str, dict]]:
    """(classifier row or None, {attribute: editor row}) from committed `models` rows, or from
    files given with their sha256."""
    try:
        clf = None
        if cfg.classifier:
            clf = model_registry.pick(cfg.classifier, "classifier", run_id=cfg.classifier_run,
                                      sha256=cfg.classifier_sha256)
        editors: dict[str, dict] = {}
        if isinstance(cfg.editors, dict):
            for a, src in cfg.editors.items():
                if src:
                    editors[a] = model_registry.pick(src, "editor", a, run_id=cfg.editors_run,
                                                     sha256=cfg.editors_sha256.get(a))
        elif cfg.editors:
            for m in model_registry.committed_models(cfg.editors, "editor"):
                if cfg.editors_run and m["run_id"] != cfg.editors_run:
                    continue
                editors.setdefault(m["attribute"], m)  # newest first
            if not editors:
                raise LookupError(f"no committed editor under {cfg.editors}"
                                  + (f" from run {cfg.editors_run}" if cfg.editors_run else ""))
    except LookupError as e:
        raise JobError(str(e)) from None
    return clf, editors


def check_editors(editors: dict[str, dict], style_dim: int) -> tuple[dict, dict]:
    """Load each editor once on the driver (verified against its sha256): usable ones, and the
    reason for the others (requests using them fail with it)."""
    from stmodel.editor import load_editor

    good, bad = {}, {}
    for a, m in editors.items():
        uri = m["uri"]
        try:
            ed, _, _ = load_editor(uri, sha256=m["sha256"])
            if ed.style_dim != style_dim:
                raise ValueError(f"editor works on {ed.style_dim}-d codes, the model's are {style_dim}-d")
            good[a] = m
        except Exception as e:  # noqa: BLE001 - requests using it fail with this reason
            bad[a] = f"{uri}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            log.error("editor %s unusable: %s", a, bad[a])
    return good, bad


def build_requests(cfg: Settings, sweep: SweepSection, ctx: EditContext):
    """(requests dataset of REQUEST_SCHEMA rows, the keys of the codes they need as object refs
    or None when every code may be needed, whether any reference edit is asked for). A user
    table (or a sweep over listed images) is user-sized: prepared here, then a Ray Dataset. A
    sweep over all faces is expanded in Ray tasks from the latents snapshot."""
    import ray

    if cfg.requests:
        rows = read_requests(cfg.requests)
    else:
        ids = sweep.image_ids
        if ids == "all":
            for u in sweep.direction_uris:
                ctx.direction_error(u)  # checked once here, not in every task
            faces = read_latents(required(cfg.latents, "latents"), ["image_id", "face_index", "status"])
            ds = faces.map_batches(sweep_batch, batch_format="pyarrow", batch_size=1024,
                                   fn_kwargs={"sweep": sweep, "ctx": ctx})
            return ds, None, "reference" in sweep.kinds
        rows = expand_sweep(sweep, [(i, 0) for i in ([ids] if isinstance(ids, str) else ids)])
    table = prepare_requests(rows, ctx)
    keys = [ray.put(request_keys(table))]
    has_ref = bool(pc.any(pc.equal(table["kind"], "reference")).as_py())
    return ray.data.from_arrow(table), keys, has_ref


def edit_partitions(c: EditSection, n_todo: int) -> int:
    parts = c.join_partitions
    if parts is None or parts == "auto":
        return join_partitions(n_todo)
    return parts


def paste_settings(cfg: Settings) -> tuple[paste_stage.PasteSettings, str] | None:
    """(the paste stage's settings, the root of the faces table), or None without paste_back; a
    missing faces table stops the job before it starts."""
    if not cfg.paste_back.enabled:
        return None
    root = cfg.paste_back.faces or required(cfg.latents, "latents")
    if not paste_stage.faces_table_exists(root):
        raise JobError(f"paste_back needs the photos' faces table (quads, photo URIs) and {root} has no committed "
                       f"one: set paste_back.faces=ROOT (the jobs.align output the latents came from)")
    # group=photo: the faces of a photo whose requests are the same but for face_index
    same_request = tuple(f for f in REQUEST_FIELDS if f not in ("image_id", "face_index"))
    ps = paste_stage.PasteSettings(cfg.paste_back, output=required(cfg.output, "output"), folder="edits",
                                   member_columns=("edit_id",), crop_uri_column="output_uri", schema=EDITS.schema,
                                   group_columns=same_request)
    return ps, root


def join_codes(todo, cfg: Settings, keys: list | None, has_ref: bool, n_todo: int):
    """The requests to edit joined with their source codes (and reference codes): hash joins
    in Ray Data, left outer (a request without a code is failed by the edit stage). The codes
    are read once; with reference edits they are materialised (in the object store) for the
    two joins."""
    parts = edit_partitions(cfg.edit, n_todo)
    latents = read_latents(required(cfg.latents, "latents"),
                           ["image_id", "face_index", "status", "w_plus", "checkpoint_sha256"])
    codes = latents.map_batches(codes_for_join, batch_format="pyarrow", fn_kwargs={"keys_refs": keys})
    if has_ref:
        codes = codes.materialize()

    def role(name: str):
        return codes.map_batches(as_role, batch_format="pyarrow", fn_kwargs={"role": name})

    ds = todo.join(role("source"), "left_outer", num_partitions=parts, on=("image_id", "face_index"))
    if has_ref:
        ds = ds.join(role("reference"), "left_outer", num_partitions=parts,
                     on=("reference_image_id", "reference_face_index"))
    return ds


def _edit_counts(batch: pa.Table) -> pa.Table:
    """A block of edits rows -> its ok rows counted per kind, and its label edits whose logit
    moved the asked way (`moved`) out of those with logits (`label`)."""
    ok = batch.filter(pc.equal(batch.column("status"), STATUS_OK))
    kinds = ok.group_by("kind").aggregate([("kind", "count")]).to_pylist()
    lab = ok.filter(pc.and_(pc.equal(ok["kind"], "label"), pc.is_valid(ok["logit_before"])))
    moved = pc.equal(pc.greater(lab["logit_after"], lab["logit_before"]), pc.equal(lab["target"], 1))
    return pa.table({"kind": [r["kind"] for r in kinds] + ["_label", "_moved"],
                     "n": [r["kind_count"] for r in kinds] + [lab.num_rows, int(pc.sum(moved).as_py() or 0)]},
                    schema=pa.schema([("kind", pa.string()), ("n", pa.int64())]))


def edit_summary(output: str, files: list) -> dict:
    """Per-kind counts and the share of label edits whose logit moved the asked way, over this
    run's committed rows (counted by Ray tasks over the run's own files, column-wise; the driver
    adds one small record per block)."""
    if not files:
        return {}
    schema = edits_schema()
    fields = [schema.field(c) for c in ("status", "kind", "target", "logit_before", "logit_after")]
    counts: dict[str, int] = {}
    for r in reduce_run_files(output, TABLE, files, fields, _edit_counts).iter_rows():
        counts[r["kind"]] = counts.get(r["kind"], 0) + int(r["n"])
    label, moved = counts.pop("_label", 0), counts.pop("_moved", 0)
    out: dict = {"by_kind": {k: n for k, n in counts.items() if n}}
    if label:
        out["label_moved_rate"] = round(moved / label, 4)
    return out


def direction_sweep(cfg: Settings) -> tuple[SweepSection, list[str]]:
    """(the sweep to run, the roots a direction_uri may point under): `direction=NAME` makes the
    sweep one of the committed direction of that name (pipeline.directions.named_direction_sweep),
    and allows its root."""
    roots = [required(cfg.output, "output"), *cfg.direction_prefixes]
    if not cfg.direction:
        return cfg.sweep, roots
    root = cfg.directions or required(cfg.latents, "latents")
    try:
        return named_direction_sweep(cfg.direction, root, cfg.sweep, cfg.directions_run), [*roots, root]
    except LookupError as e:
        raise JobError(str(e)) from None


def run(cfg: Settings, before_commit=None, actor: type[EditBatch] = EditBatch) -> dict:
    """The job body (also callable from Python, after `check`; `before_commit(run)` and `actor`,
    the edit stage's class, are for tests)."""
    import ray

    from pipeline.models import describe_model
    from stmodel.classifier import load_classifier

    output = required(cfg.output, "output")
    pasting = paste_settings(cfg)
    c = cfg.edit
    r = JobRun(output, JOB, cfg, rows_per_file=c.rows_per_part, log_every_s=c.log_every_s)
    mc, info = describe_model(cfg.model)
    n_latent, style_dim = mc.n_latent, mc.style_dim
    clf_row, editor_rows = resolve_models(cfg)
    sweep, direction_roots = direction_sweep(cfg)
    attributes = None
    if clf_row is not None:
        clf = load_classifier(clf_row["uri"], sha256=clf_row["sha256"])
        if (clf.n_latent, clf.style_dim) != (n_latent, style_dim):
            raise JobError(f"the classifier takes [{clf.n_latent}, {clf.style_dim}] codes, the model makes "
                           f"[{n_latent}, {style_dim}]")
        attributes = list(clf.attributes)
        del clf
    editors, editor_errors = check_editors(editor_rows, style_dim)
    ctx = EditContext(info["sha256"], clf_row["sha256"] if clf_row else None, attributes,
                      {a: m["sha256"] for a, m in editors.items()}, editor_errors, n_latent, style_dim,
                      direction_roots, cfg.direction_max_bytes)
    requests, keys, has_ref = build_requests(cfg, sweep, ctx)
    # requests already done never enter the plan (their codes are not even joined)
    marked, skipped = r.skip_done(requests, EDITS, retry_failed=cfg.retry_failed)
    n_in = marked.count() + skipped
    n_todo = marked.map_batches(with_status, batch_format="pyarrow", fn_kwargs={"todo": True}).count()
    log.info("edit %s -> %s: %d requests, %d to edit (the rest skipped or invalid), run %s", cfg.latents,
             output, n_in, n_todo, r.run_id)
    rows_fn = partial(request_rows, run_id=r.run_id, model=info["name"], checkpoint_sha256=info["sha256"])
    actor_args = {"model": cfg.model, "run_id": r.run_id, "output": output,
                  "classifier": {k: clf_row[k] for k in ("uri", "sha256")} if clf_row else None,
                  "editors": {a: {k: m[k] for k in ("uri", "sha256")} for a, m in editors.items()},
                  "metrics": cfg.metric_weights if cfg.metrics else None, "keep_crops": pasting is not None}

    def stages(rows, batch_size: int | None = None):
        """The edit's plan over request rows (the runner's `rerun`): rows not to be edited become
        their `edits` rows as they are; the others meet their codes, then the edit actor (and the
        paste stage). `batch_size` is set in an isolation pass, over the few rows that did not
        come back: only their codes enter the join, and the joined rows are cut into blocks of at
        most `batch_size` before the actor, because a join's output blocks are its hash partitions
        and a crash loses the actor's whole task (all of a partition's rows would crash together
        in every pass, and never be isolated)."""
        passed = rows.map_batches(with_status, batch_format="pyarrow", fn_kwargs={"todo": False}).map_batches(
            rows_fn, batch_format="pyarrow")
        todo = rows.map_batches(with_status, batch_format="pyarrow", fn_kwargs={"todo": True})
        if batch_size is None:
            n, need = n_todo, keys
        else:
            todo = todo.materialize()
            n = todo.count()
            need = delta.broadcast_refs(todo.map_batches(request_keys, batch_format="pyarrow")) if n else None
        if not n:
            return passed
        joined = join_codes(todo, cfg, need, has_ref, n)
        if batch_size is not None:
            joined = joined.repartition(target_num_rows_per_block=batch_size)
        stage_kw, device = actor_stage(c, n_todo, isolating=batch_size is not None, stage="edit")
        edited = joined.map_batches(actor, batch_size=batch_size or c.batch_size, batch_format="pyarrow",
                                    fn_constructor_kwargs={"section": c, "device": device, **actor_args}, **stage_kw)
        if pasting is not None:
            paste, faces_root = pasting
            edited = paste_stage.paste(paste_stage.attach_faces(edited, faces_root, edit_partitions(c, n)), paste)
        return edited.union(passed)

    res = WriteResult()
    if n_in - skipped:
        res = r.write(None, EDITS, expected=n_in - skipped, inputs=marked,
                      lost_rows=partial(rows_fn, status=STATUS_LOST, error="row lost by the pipeline (worker crash)"),
                      rerun=stages, batch_size=c.batch_size)
    res.add_skipped(skipped)
    counts = {"in": n_in, **res.counts}
    seconds = r.seconds()
    models = {"checkpoint_sha256": info["sha256"],
              "classifier": {k: clf_row[k] for k in ("uri", "sha256", "run_id")} if clf_row else None,
              "editors": {a: {k: m[k] for k in ("uri", "sha256", "run_id")} for a, m in editors.items()}}
    extra: dict = {"model": info["name"], **models, "statuses": res.statuses,
                   "edits_per_s": round((counts["ok"] + counts["failed"]) / max(seconds, 1e-9), 3)}
    extra.update(run_summary(output, TABLE, res.files, ("id_similarity", "lpips")))
    extra.update(edit_summary(output, res.files))
    if before_commit is not None:
        before_commit(r)
    r.commit({EDITS: res}, {**counts, "seconds": seconds, **extra},
             extra={"inputs": {"latents": cfg.latents, "requests": cfg.requests},
                    "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


DESCRIPTION = __doc__


if __name__ == "__main__":
    main(JOB, DESCRIPTION, SETTINGS, run, check=check)
