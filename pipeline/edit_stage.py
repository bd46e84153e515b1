"""Ray Data stage of the edit job, and the request handling it relies on.

    requests (a user table or a config sweep)
      -> normalize_request   types, defaults, the fields that matter for the kind
      -> edit_id             sha256 of the canonical fields and of the models the edit uses:
                             idempotent reruns, a new id when a model is retrained, safe keys
      -> validate            unknown attribute / editor / direction: a failed row with a
                             readable error, never an exception
    prepare_requests          all three, for a table of request rows (driver for a user table,
                              Ray tasks for a sweep over every face): REQUEST_SCHEMA rows
    codes = latents.map_batches(codes_for_join)          # ok codes (only the needed keys)
    ds = requests.join(as_role(codes, "source"), "left_outer", on=(image_id, face_index))
    ds = ds.join(as_role(codes, "reference"), "left_outer", on=(reference_image_id, ...))
    ds = ds.map_batches(EditBatch, compute=ActorPoolStrategy(...), batch_size=B, num_gpus=G)

The codes meet the requests in Ray Data (hash joins); they never reach the driver. `EditBatch`
checks the joined codes (unknown image or reference, codes of another checkpoint), loads the
inversion model (its generator renders), the classifier, the editors and the metric backbones
once per actor; per batch it computes the edited codes w_e (label: classifier gradient;
reference: the attribute's editor; direction: w + strength * n), renders the edited images and
the source reconstructions, scores them and writes PNGs. Its output rows follow
`pipeline.schemas.edits_schema`; rows that are not to be edited pass through with their status.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import delta, storage
from pipeline.fit_data import codes_to_numpy
from pipeline.images import encode_png
from pipeline.models import ModelActor, build_metrics, metric_label
from pipeline.schemas import EDIT_KINDS, edits_schema, make_table
from pipeline.scoring import to_uint8
from pipeline.storage import image_key

log = logging.getLogger("stbatch.edit")

REQUEST_FIELDS = ("image_id", "face_index", "kind", "attribute", "strength", "target", "reference_image_id",
                  "reference_face_index", "direction_uri", "order")
STATUS_OK, STATUS_BAD, STATUS_MISMATCH, STATUS_ERROR = "ok", "bad_request", "model_mismatch", "edit_error"
STATUS_SKIPPED = "skipped"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Edited images live beside the `edits` Delta table, never inside it (a vacuum of the table
# removes every file its log does not name).
IMAGES = "edit_images"
SOURCES = "edit_sources"
REQUEST_TYPES = {"face_index": pa.int32(), "reference_face_index": pa.int32(), "strength": pa.float64(),
                 "target": pa.int8(), "order": pa.int8()}
REQUEST_SCHEMA = pa.schema([pa.field("edit_id", pa.string()),
                            *[pa.field(k, REQUEST_TYPES.get(k, pa.string())) for k in REQUEST_FIELDS],
                            pa.field("status", pa.string()), pa.field("error", pa.string())])
CODE_COLUMNS = {"source": ("image_id", "face_index", "w_source", "source_sha256"),
                "reference": ("reference_image_id", "reference_face_index", "w_reference", "reference_sha256")}


# ---------------------------------------------------------------------------- requests

def _blank(v):
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, str) and not v.strip():
        return None
    return v


def _int(v, default, name, allowed=None, minimum=None):
    if v is None:
        return default, None
    try:
        f = float(v)
        if not f.is_integer():
            raise ValueError
        i = int(f)
    except (TypeError, ValueError, OverflowError):
        return str(v), f"{name} must be an integer, got {v!r}"
    if allowed is not None and i not in allowed:
        return i, f"{name} must be one of {list(allowed)}, got {i}"
    if minimum is not None and i < minimum:
        return i, f"{name} must be >= {minimum}, got {i}"
    return i, None


def _float(v, default, name):
    if v is None:
        return default, None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v), f"{name} must be a number, got {v!r}"
    if not math.isfinite(f):
        return str(v), f"{name} must be finite, got {v!r}"
    return f, None


def _str(v):
    return None if v is None else str(v).strip()


def normalize_request(raw: dict) -> tuple[dict, str | None]:
    """A request row -> (canonical fields, first format error or None). Defaults: face_index 0,
    strength 1.0, target 1 and order 1 (label), reference_face_index 0 (reference). Fields that
    do not apply to the kind are set to None, so they do not change the edit_id."""
    r = {k: _blank(raw.get(k)) for k in REQUEST_FIELDS}
    errs: list[str] = []
    kind = _str(r["kind"])
    kind = kind.lower() if kind else None
    req: dict = {"kind": kind}
    if kind is None:
        errs.append("kind is missing (label, reference or direction)")
    elif kind not in EDIT_KINDS:
        errs.append(f"bad kind {kind!r}: use label, reference or direction")
    iid = _str(r["image_id"])
    req["image_id"] = iid.lower() if iid else None
    if not req["image_id"]:
        errs.append("image_id is missing")
    req["face_index"], e = _int(r["face_index"], 0, "face_index", minimum=0)
    errs += [e] if e else []
    req["attribute"] = _str(r["attribute"])
    req["strength"], e = _float(r["strength"], 1.0, "strength")
    errs += [e] if e else []
    req["target"] = req["order"] = req["reference_image_id"] = req["reference_face_index"] = None
    req["direction_uri"] = None
    if kind == "label":
        req["target"], e = _int(r["target"], 1, "target", allowed=(0, 1))
        errs += [e] if e else []
        req["order"], e = _int(r["order"], 1, "order", allowed=(1, 2))
        errs += [e] if e else []
        if not req["attribute"]:
            errs.append("attribute is required for a label edit")
    elif kind == "reference":
        ref = _str(r["reference_image_id"])
        req["reference_image_id"] = ref.lower() if ref else None
        req["reference_face_index"], e = _int(r["reference_face_index"], 0, "reference_face_index", minimum=0)
        errs += [e] if e else []
        if not req["attribute"]:
            errs.append("attribute is required for a reference edit")
        if not req["reference_image_id"]:
            errs.append("reference_image_id is required for a reference edit")
    elif kind == "direction":
        req["direction_uri"] = _str(r["direction_uri"])
        if not req["direction_uri"]:
            errs.append("direction_uri is required for a direction edit")
    return req, (errs[0] if errs else None)


def edit_id(req: dict, models: dict | None = None) -> str:
    """sha256 hex of the canonical request (REQUEST_FIELDS) and of the models that make the
    edit (`edit_models`), as sorted JSON: a retrained model gives new ids."""
    canon = {k: req.get(k) for k in REQUEST_FIELDS}
    canon["models"] = {k: v for k, v in sorted((models or {}).items()) if v}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class EditContext:
    """What `validate` checks requests against and the model hashes of their edit ids (all
    known on the driver before any edit; small, shipped to tasks)."""

    def __init__(self, checkpoint_sha256: str, classifier_sha256: str | None, attributes: list[str] | None,
                 editors: dict[str, str], editor_errors: dict[str, str], n_latent: int, style_dim: int,
                 direction_prefixes: list[str] | None = None):
        self.checkpoint_sha256 = checkpoint_sha256
        self.classifier_sha256 = classifier_sha256
        self.attributes = attributes      # the classifier's, or None without a classifier
        self.editors = dict(editors)      # attribute -> sha256 of its loadable editor
        self.editor_errors = dict(editor_errors)
        self.n_latent, self.style_dim = int(n_latent), int(style_dim)
        self.direction_prefixes = list(direction_prefixes or [])
        self.directions: dict[str, str | None] = {}

    def direction_error(self, uri: str) -> str | None:
        if uri not in self.directions:
            self.directions[uri] = check_direction(uri, self.n_latent, self.style_dim)[1]
        return self.directions[uri]


def edit_models(req: dict, ctx: EditContext) -> dict:
    """The models an edit depends on: the inversion checkpoint (it renders), and the classifier
    (label edits) or the attribute's editor (reference edits)."""
    kind = req.get("kind")
    return {"checkpoint": ctx.checkpoint_sha256,
            "classifier": ctx.classifier_sha256 if kind == "label" else None,
            "editor": ctx.editors.get(req.get("attribute")) if kind == "reference" else None}


def validate(req: dict, ctx: EditContext) -> tuple[str, str | None]:
    """(status, error): `ok`/None when the request can be carried out as far as the models and
    files say; its codes are checked where they meet it (`check_codes`)."""
    attr, kind = req["attribute"], req["kind"]
    if attr is not None:
        known = ctx.attributes if ctx.attributes is not None else (sorted(ctx.editors) if kind == "reference" else None)
        if kind == "label" and ctx.attributes is None:
            return STATUS_BAD, "label edits need a classifier (set classifier=ROOT)"
        if known is not None and attr not in known:
            shown = ", ".join(known[:8]) + (" ..." if len(known) > 8 else "")
            return STATUS_BAD, f"unknown attribute {attr!r} (known: {shown})"
    if kind == "reference":
        if attr in ctx.editor_errors:
            return STATUS_BAD, f"editor for {attr!r} cannot be used: {ctx.editor_errors[attr]}"
        if attr not in ctx.editors:
            return STATUS_BAD, f"no editor for attribute {attr!r} (no committed editor; set editors=ROOT)"
    if kind == "direction":
        uri = req["direction_uri"]
        if ctx.direction_prefixes and not any(uri.startswith(p) for p in ctx.direction_prefixes):
            return STATUS_BAD, f"direction_uri {uri!r} is outside the allowed prefixes {ctx.direction_prefixes}"
        err = ctx.direction_error(uri)
        if err:
            return STATUS_BAD, err
    return STATUS_OK, None


def check_direction(uri: str, n_latent: int, style_dim: int) -> tuple[torch.Tensor | None, str | None]:
    from stmodel.label_edit import load_direction

    try:
        n = load_direction(uri)
    except Exception as e:  # noqa: BLE001 - any reading failure is this request's error
        return None, f"cannot read direction file {uri}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if not (tuple(n.shape) == (style_dim,) or tuple(n.shape) == (n_latent, style_dim)):
        return None, f"direction in {uri} has shape {list(n.shape)}; codes need [{style_dim}] or [{n_latent}, {style_dim}]"
    return n, None


def prepare_requests(rows, ctx: EditContext) -> pa.Table:
    """Request rows (dicts) -> REQUEST_SCHEMA rows: canonical fields, edit_id, and status `ok`
    (to edit), `bad_request` (with the reason) or `skipped` (the same edit_id earlier in
    `rows`). Values that did not parse are kept in the id and stored as null."""
    out: dict[str, list] = {f.name: [] for f in REQUEST_SCHEMA}
    seen: set = set()
    for row in rows:
        req, err = normalize_request(row)
        eid = edit_id(req, edit_models(req, ctx))
        status = STATUS_BAD
        if eid in seen:
            status, err = STATUS_SKIPPED, None
        elif err is None:
            status, err = validate(req, ctx)
        seen.add(eid)
        for k in REQUEST_FIELDS:
            v = req.get(k)
            if k in ("face_index", "reference_face_index", "target", "order") and not isinstance(v, int):
                v = None
            if k == "strength" and not isinstance(v, float):
                v = None
            out[k].append(v)
        out["edit_id"].append(eid)
        out["status"].append(status)
        out["error"].append(err)
    return pa.table(out, schema=REQUEST_SCHEMA)


def expand_sweep(sw: dict, faces: list[tuple[str, int]]) -> list[dict]:
    """The request rows of a sweep for the given faces (its cross product)."""
    attrs = list(dict.fromkeys(sw.get("attributes") or [])) or [None]
    uniq = (lambda xs: list(dict.fromkeys(xs)))
    out = []
    for iid, fi in faces:
        for kind in uniq(sw.get("kinds") or ["label"]):
            for attr in attrs:
                for s in uniq(sw.get("strengths") or [1.0]):
                    base = {"image_id": iid, "face_index": fi, "kind": kind, "attribute": attr, "strength": s}
                    if kind == "label":
                        out += [{**base, "target": t, "order": sw.get("order", 1)}
                                for t in uniq(sw.get("targets") or [1])]
                    elif kind == "reference":
                        out += [{**base, "reference_image_id": ref} for ref in uniq(sw.get("reference_image_ids") or [])
                                if str(ref) != iid]
                    elif kind == "direction":
                        out += [{**base, "direction_uri": u} for u in uniq(sw.get("direction_uris") or [])]
                    else:
                        out.append(base)  # becomes a failed row: bad kind
    return out


def sweep_batch(batch: pa.Table, sweep: dict, ctx: EditContext) -> pa.Table:
    """Ray task: latents rows (image_id, face_index, status) -> the sweep's requests for their ok
    faces, prepared (a sweep over every face never passes through the driver)."""
    ok = batch.filter(pc.equal(batch["status"], STATUS_OK))
    faces = list(zip(ok["image_id"].to_pylist(), [int(f) for f in ok["face_index"].to_pylist()]))
    return prepare_requests(expand_sweep(sweep, faces), ctx)


def request_keys(t: pa.Table) -> pa.Table:
    """The distinct code keys (image_id, face_index) that the requests to edit need: their
    sources and their references."""
    t = t.filter(pc.equal(t["status"], STATUS_OK))
    ref = t.filter(pc.equal(t["kind"], "reference"))
    keys = pa.concat_tables([
        pa.table({"image_id": t["image_id"], "face_index": t["face_index"]}),
        pa.table({"image_id": ref["reference_image_id"], "face_index": ref["reference_face_index"]})])
    keys = keys.filter(pc.and_(pc.is_valid(keys["image_id"]), pc.is_valid(keys["face_index"])))
    return keys.group_by(["image_id", "face_index"]).aggregate([])


def codes_for_join(batch: pa.Table, keys_refs: list | None = None) -> pa.Table:
    """Ray task: latents rows (image_id, face_index, status, w_plus, checkpoint_sha256) -> the ok
    codes, only those of `keys_refs` when given (the keys the requests need, broadcast: the rest
    of the table never reaches the shuffle)."""
    t = batch.filter(pc.equal(batch["status"], STATUS_OK))
    if keys_refs is not None:
        want = delta.gather(keys_refs)
        if want is None:
            t = t.slice(0, 0)
        else:
            hit = pc.is_in(delta.key_strings(t, ["image_id", "face_index"]),
                           value_set=delta.key_strings(want, ["image_id", "face_index"]))
            t = t.filter(hit)
    return pa.table({"image_id": pc.cast(t["image_id"], pa.string()),
                     "face_index": pc.cast(t["face_index"], pa.int32()),
                     "w_plus": t["w_plus"], "checkpoint_sha256": t["checkpoint_sha256"]})


def as_role(batch: pa.Table, role: str) -> pa.Table:
    """Codes named for the `role` join (source or reference columns of a request)."""
    return batch.rename_columns(list(CODE_COLUMNS[role]))


def with_status(batch: pa.Table, todo: bool) -> pa.Table:
    """The rows to edit (status ok), or the others (skipped, bad requests)."""
    hit = pc.equal(batch["status"], STATUS_OK)
    return batch.filter(hit if todo else pc.invert(hit))


def request_rows(batch: pa.Table, run_id: str, model: str, checkpoint_sha256: str, status: str | None = None,
                 error: str | None = None) -> pa.Table:
    """Request rows -> `edits` rows that carry no edit (their own status, or `status`)."""
    n = batch.num_rows
    cols = {k: batch[k] for k in ("edit_id",) + REQUEST_FIELDS}
    cols.update(status=[status] * n if status else batch["status"], error=[error] * n if status else batch["error"],
                model=[model] * n, checkpoint_sha256=[checkpoint_sha256] * n)
    cols = {k: (v.to_pylist() if isinstance(v, (pa.Array, pa.ChunkedArray)) else v) for k, v in cols.items()}
    return make_table(cols, edits_schema(), run_id)


def _codes(batch: pa.Table, column: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(codes [N, *shape] with zeros where missing, present [N]) of a joined code column."""
    n = batch.num_rows
    if column not in batch.column_names:
        return np.zeros((n, *shape), np.float32), np.zeros(n, bool)
    w = codes_to_numpy(batch[column])
    present = np.asarray(batch[column].is_valid().to_numpy(zero_copy_only=False), bool)
    if not present.any():
        return np.zeros((n, *shape), np.float32), present
    if tuple(w.shape[1:]) != tuple(shape):
        raise ValueError(f"codes of shape {list(w.shape[1:])}; the model makes {list(shape)}")
    return np.nan_to_num(w), present


def check_codes(meta: list[dict], has_source: np.ndarray, has_ref: np.ndarray, model_sha: str | None,
                status: list, error: list) -> None:
    """The checks that need the codes: the source (and reference) has an ok code, made by the
    checkpoint that renders the edit."""
    for i, r in enumerate(meta):
        if status[i] != STATUS_OK:
            continue
        sha = r.get("source_sha256")
        if not has_source[i]:
            status[i], error[i] = STATUS_BAD, (f"unknown image: no ok latent code for image_id {r['image_id']} "
                                               f"face_index {r['face_index']}")
        elif sha and model_sha and sha != model_sha:
            status[i], error[i] = STATUS_MISMATCH, (f"the code was made by checkpoint {sha[:12]}..., the edit "
                                                    f"model is {model_sha[:12]}...; edit with the same file")
        elif r["kind"] == "reference" and not has_ref[i]:
            status[i], error[i] = STATUS_BAD, (f"reference image not found: no ok latent code for image_id "
                                               f"{r['reference_image_id']} face_index {r['reference_face_index']}")
        elif r["kind"] == "reference" and r.get("reference_sha256") and model_sha \
                and r["reference_sha256"] != model_sha:
            status[i], error[i] = STATUS_MISMATCH, ("the reference code was made by another checkpoint than the "
                                                    "edit model")


# ---------------------------------------------------------------------------- the actor

class EditBatch(ModelActor):
    """Actor: model, classifier, editors and metric backbones loaded once; a batch of requests
    joined with their codes -> `edits` rows (edited PNG under `<output>/edit_images/<edit_id>.png`,
    source reconstruction under `<output>/edit_sources/<image_id>_<face>.png`). `editors` maps an
    attribute to {uri, sha256}; every file is verified against its committed sha256."""

    def __init__(self, model: dict, run_id: str, output: str, classifier: str | None = None,
                 classifier_sha256: str | None = None, editors: dict | None = None, metrics: dict | None = None,
                 device: str = "auto", amp: str = "auto", torch_threads: int = 0):
        from stmodel.classifier import load_classifier
        from stmodel.editor import load_editor

        super().__init__(model, device, amp, torch_threads)
        self.n_latent, self.style_dim = self.model.cfg.n_latent, self.model.cfg.style_dim
        self.clf = None
        if classifier:
            self.clf = load_classifier(classifier, sha256=classifier_sha256).to(self.device).requires_grad_(False)
        self.editors = {}
        for attr, m in (editors or {}).items():
            ed, _, _ = load_editor(m["uri"], sha256=m.get("sha256"))
            self.editors[attr] = ed.to(self.device).requires_grad_(False)
        self.lpips = self.ident = None
        self.label = None
        if metrics:
            self.lpips, self.ident = build_metrics(metrics, self.device)
            self.label = metric_label(self.lpips, self.ident)
        self.run_id, self.output = run_id, output
        self.schema = edits_schema()
        self.directions: dict[str, torch.Tensor] = {}
        self.sources_written: set = set()

    def _direction(self, uri: str) -> torch.Tensor:
        if uri not in self.directions:
            n, err = check_direction(uri, self.n_latent, self.style_dim)
            if err:
                raise ValueError(err)
            self.directions[uri] = n.to(self.device)
        return self.directions[uri]

    def _edit_codes(self, rows: list[dict], ws: torch.Tensor, wr: torch.Tensor, status: list, error: list
                    ) -> torch.Tensor:
        """w_e for every row (rows that fail keep NaN and get status edit_error)."""
        from stmodel.label_edit import direction_edit, label_edit

        we = torch.full_like(ws, float("nan"))
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            if status[i] != STATUS_OK:
                continue
            if r["kind"] == "label" and int(r["order"]) == 2:
                key = ("label2", i)  # seeded per request: the same w_e whatever the batching
            elif r["kind"] == "label":
                key = ("label", r["attribute"], int(r["target"]))
            elif r["kind"] == "reference":
                key = ("reference", r["attribute"])
            else:
                key = ("direction", r["direction_uri"])
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            ix = torch.tensor(idx, device=ws.device)
            alpha = torch.tensor([float(rows[i]["strength"]) for i in idx], device=ws.device)[:, None, None]
            try:
                if key[0] == "label2":
                    r = rows[idx[0]]
                    seed = int(r["edit_id"][:15], 16) % (2 ** 31)
                    out = label_edit(self.clf, ws[ix], r["attribute"], int(r["target"]), float(r["strength"]),
                                     order=2, seed=seed)
                elif key[0] == "label":
                    # alpha per row: w - alpha * direction (label_edit's arithmetic broadcasts)
                    out = label_edit(self.clf, ws[ix], key[1], key[2], alpha, order=1)
                elif key[0] == "reference":
                    with torch.no_grad():
                        w_ref = self.editors[key[1]](ws[ix], wr[ix])
                    # strength interpolates: 0 = the source, 1 = the editor's output
                    out = ws[ix] + alpha * (w_ref - ws[ix])
                else:
                    out = direction_edit(ws[ix], self._direction(key[1]), alpha[:, 0, 0])
                if not torch.isfinite(out).all():
                    raise FloatingPointError("the edited code is not finite")
                we[ix] = out.detach().float()
            except Exception as e:  # noqa: BLE001 - a failing group becomes failed rows
                log.exception("edit failed for %s", key)
                for i in idx:
                    status[i], error[i] = STATUS_ERROR, f"{type(e).__name__}: {e}"
        return we

    def __call__(self, batch: pa.Table) -> pa.Table:
        meta = batch.drop_columns([c for c in ("w_source", "w_reference") if c in batch.column_names]).to_pylist()
        n = len(meta)
        status, error = [r["status"] for r in meta], [r["error"] for r in meta]
        shape = (self.n_latent, self.style_dim)
        try:
            w_s, has_source = _codes(batch, "w_source", shape)
            w_r, has_ref = _codes(batch, "w_reference", shape)
        except ValueError as e:  # codes of another model: no row of the batch can be edited
            w_s, w_r = np.zeros((n, *shape), np.float32), np.zeros((n, *shape), np.float32)
            has_source = has_ref = np.ones(n, bool)
            for i in range(n):
                if status[i] == STATUS_OK:
                    status[i], error[i] = STATUS_MISMATCH, str(e)
        check_codes(meta, has_source, has_ref, self.info["sha256"], status, error)
        ws = torch.from_numpy(w_s).to(self.device)
        wr = torch.from_numpy(w_r).to(self.device)
        cols = {k: [r[k] for r in meta] for k in ("edit_id",) + REQUEST_FIELDS}
        out = {k: [None] * n for k in ("output_uri", "source_reconstruction_uri", "metric_backbones")}
        nums = {k: np.full(n, np.nan, np.float32) for k in ("id_similarity", "lpips", "logit_before", "logit_after")}
        we = self._edit_codes(meta, ws, wr, status, error)
        ok = [i for i in range(n) if status[i] == STATUS_OK]
        if ok:
            try:
                self._render(meta, ok, ws, we, out, nums, status, error)
            except Exception as e:  # noqa: BLE001 - a failing batch becomes failed rows, not a crash
                log.exception("rendering failed for a batch of %d edits", len(ok))
                for i in ok:
                    status[i], error[i] = STATUS_ERROR, f"{type(e).__name__}: {e}"
                    out["output_uri"][i] = out["source_reconstruction_uri"][i] = None
        cols.update(status=status, error=error, model=[self.info["name"]] * n,
                    checkpoint_sha256=[self.info["sha256"]] * n, **out, **nums)
        return make_table(cols, self.schema, self.run_id)

    @torch.no_grad()
    def _render(self, meta, ok, ws, we, out, nums, status, error) -> None:
        ix = torch.tensor(ok, device=ws.device)
        w_src, w_edit = ws[ix], we[ix]
        if self.clf is not None:
            lb, la = self.clf(w_src)[0], self.clf(w_edit)[0]
            for j, i in enumerate(ok):
                a = meta[i]["attribute"]
                if a is not None and a in self.clf.attributes:
                    k = self.clf.attribute_index(a)
                    nums["logit_before"][i], nums["logit_after"][i] = float(lb[j, k]), float(la[j, k])
        # one source reconstruction per (image_id, face_index) in the batch
        src_keys = [(meta[i]["image_id"], int(meta[i]["face_index"])) for i in ok]
        uniq = list(dict.fromkeys(src_keys))
        first = {k: src_keys.index(k) for k in uniq}
        with self.autocast():
            src_img = self.model.reconstruct(w_src[[first[k] for k in uniq]]).float()
            edit_img = self.model.reconstruct(w_edit).float()
        row_src = src_img[[uniq.index(k) for k in src_keys]]
        if self.label is not None:
            nan = np.full(len(ok), np.nan, np.float32)
            lp = self.lpips(edit_img, row_src).cpu().numpy() if self.lpips is not None else nan
            idsim = self.ident(edit_img, row_src).cpu().numpy() if self.ident is not None else nan
            for j, i in enumerate(ok):
                nums["lpips"][i], nums["id_similarity"][i] = lp[j], idsim[j]
                out["metric_backbones"][i] = self.label
        src_png = to_uint8(src_img)
        src_uri = {}
        for u, (iid, fi) in enumerate(uniq):
            src_uri[(iid, fi)] = uri = storage.join(self.output, image_key(SOURCES, iid, fi))
            if (iid, fi) not in self.sources_written:
                storage.write_bytes(uri, encode_png(src_png[u]))
                self.sources_written.add((iid, fi))
        edit_png = to_uint8(edit_img)
        for j, i in enumerate(ok):
            eid = meta[i]["edit_id"]
            try:
                if not _HEX64.match(eid):
                    raise ValueError(f"edit_id {eid!r} is not a sha256 hex")
                uri = storage.join(self.output, storage.safe_key(f"{IMAGES}/{eid}.png"))
                storage.write_bytes(uri, encode_png(edit_png[j]))
                out["output_uri"][i] = uri
                out["source_reconstruction_uri"][i] = src_uri[src_keys[j]]
            except Exception as e:  # noqa: BLE001 - a failed write fails that row only
                status[i], error[i] = STATUS_ERROR, f"cannot write the edited image: {type(e).__name__}: {e}"


__all__ = ["REQUEST_FIELDS", "REQUEST_SCHEMA", "normalize_request", "edit_id", "edit_models", "EditContext",
           "validate", "check_direction", "prepare_requests", "expand_sweep", "sweep_batch", "request_keys",
           "codes_for_join", "as_role", "with_status", "request_rows", "check_codes", "EditBatch"]
