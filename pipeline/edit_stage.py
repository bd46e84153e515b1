"""Ray Data stage of the edit job, and the request handling it relies on.

    requests (table rows or a config sweep)
      -> normalize_request   types, defaults, the fields that matter for the kind
      -> edit_id             sha256 of the canonical fields: idempotent reruns, safe object keys
      -> validate            unknown image / attribute / reference / editor / direction: a failed
                             row with a readable error, never an exception
    ds = ray.data.from_arrow(work rows with w_source / w_reference codes)
    ds = ds.map_batches(EditBatch, compute=ActorPoolStrategy(...), batch_size=B, num_gpus=G)

`EditBatch` loads the inversion model (its generator renders), the classifier, the editors and
the metric backbones once per actor; per batch it computes the edited codes w_e (label:
classifier gradient; reference: the attribute's editor; direction: w + strength * n), renders
the edited images and the source reconstructions, scores them and writes PNGs. Its output
rows follow `pipeline.schemas.edits_schema`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from pipeline import storage
from pipeline.images import encode_png
from pipeline.models import ModelActor, build_metrics, metric_label
from pipeline.schemas import EDIT_KINDS, edits_schema, make_table, nested_list_to_numpy
from pipeline.scoring import to_uint8
from pipeline.storage import image_key

log = logging.getLogger("stbatch.edit")

REQUEST_FIELDS = ("image_id", "face_index", "kind", "attribute", "strength", "target", "reference_image_id",
                  "reference_face_index", "direction_uri", "order")
STATUS_OK, STATUS_BAD, STATUS_MISMATCH, STATUS_ERROR = "ok", "bad_request", "model_mismatch", "edit_error"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Edited images live one level below the table's folder (`edits/run=<id>/` holds the Parquet
# parts): listing `edits/` to sweep crashed runs then never enumerates millions of PNGs.
IMAGES = "edits/images"
SOURCES = "edit_sources"


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


def edit_id(req: dict) -> str:
    """sha256 hex of the canonical request (sorted JSON of REQUEST_FIELDS)."""
    canon = {k: req.get(k) for k in REQUEST_FIELDS}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class EditContext:
    """What `validate` checks requests against (all known on the driver before any edit)."""

    def __init__(self, latents: dict, model_sha: str | None, attributes: list[str] | None,
                 editors: set, editor_errors: dict, direction_error: Callable[[str], str | None],
                 direction_prefixes: list[str] | None = None):
        self.latents = latents            # (image_id, face_index) -> checkpoint sha of the ok code
        self.model_sha = model_sha
        self.attributes = attributes      # the classifier's, or None without a classifier
        self.editors = editors            # attributes with a loadable editor
        self.editor_errors = editor_errors
        self.direction_error = direction_error
        self.direction_prefixes = list(direction_prefixes or [])


def validate(req: dict, ctx: EditContext) -> tuple[str, str | None]:
    """(status, error): `ok`/None when the request can be carried out."""
    key = (req["image_id"], req["face_index"])
    if key not in ctx.latents:
        return STATUS_BAD, (f"unknown image: no ok latent code for image_id {req['image_id']} "
                            f"face_index {req['face_index']}")
    sha = ctx.latents[key]
    if sha and ctx.model_sha and sha != ctx.model_sha:
        return STATUS_MISMATCH, (f"the code was made by checkpoint {sha[:12]}..., the edit model is "
                                 f"{ctx.model_sha[:12]}...; edit with the same file")
    attr, kind = req["attribute"], req["kind"]
    if attr is not None:
        known = ctx.attributes if ctx.attributes is not None else (sorted(ctx.editors) if kind == "reference" else None)
        if kind == "label" and ctx.attributes is None:
            return STATUS_BAD, "label edits need a classifier (set classifier=URI)"
        if known is not None and attr not in known:
            shown = ", ".join(known[:8]) + (" ..." if len(known) > 8 else "")
            return STATUS_BAD, f"unknown attribute {attr!r} (known: {shown})"
    if kind == "reference":
        rkey = (req["reference_image_id"], req["reference_face_index"])
        if rkey not in ctx.latents:
            return STATUS_BAD, (f"reference image not found: no ok latent code for image_id "
                                f"{req['reference_image_id']} face_index {req['reference_face_index']}")
        if ctx.latents[rkey] and ctx.model_sha and ctx.latents[rkey] != ctx.model_sha:
            return STATUS_MISMATCH, "the reference code was made by another checkpoint than the edit model"
        if attr in ctx.editor_errors:
            return STATUS_BAD, f"editor for {attr!r} cannot be used: {ctx.editor_errors[attr]}"
        if attr not in ctx.editors:
            return STATUS_BAD, f"no editor for attribute {attr!r} (set editors.{attr}=URI)"
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


def work_table(rows: list[dict], codes: dict, n_latent: int, style_dim: int) -> pa.Table:
    """Request rows + their codes as Arrow (nested fixed-size lists, null w_reference when the
    kind has none): the input blocks of the stage."""
    n = len(rows)
    ws = np.zeros((n, n_latent, style_dim), np.float32)
    wr = np.zeros((n, n_latent, style_dim), np.float32)
    has_ref = np.zeros(n, bool)
    for i, r in enumerate(rows):
        ws[i] = codes[(r["image_id"], r["face_index"])]
        if r["kind"] == "reference":
            wr[i] = codes[(r["reference_image_id"], r["reference_face_index"])]
            has_ref[i] = True
    from pipeline.schemas import nested_list_array

    cols = {"edit_id": pa.array([r["edit_id"] for r in rows], pa.string())}
    types = {"face_index": pa.int32(), "reference_face_index": pa.int32(), "strength": pa.float64(),
             "target": pa.int8(), "order": pa.int8()}
    for k in REQUEST_FIELDS:
        cols[k] = pa.array([r[k] for r in rows], types.get(k, pa.string()))
    cols["w_source"] = nested_list_array(ws, shape=(n_latent, style_dim))
    cols["w_reference"] = nested_list_array(wr, mask=~has_ref if (~has_ref).any() else None,
                                            shape=(n_latent, style_dim))
    return pa.table(cols)


# ---------------------------------------------------------------------------- the actor

class EditBatch(ModelActor):
    """Actor: model, classifier, editors and metric backbones loaded once; a batch of work rows
    -> `edits` rows (edited PNG under `<output>/edits/images/<edit_id>.png`, source reconstruction
    under `<output>/edit_sources/<image_id>_<face>.png`)."""

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
        for attr, uri in (editors or {}).items():
            ed, _, _ = load_editor(uri)
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
        meta = batch.drop_columns(["w_source", "w_reference"]).to_pylist()
        n = len(meta)
        status, error = [STATUS_OK] * n, [None] * n
        ws = torch.from_numpy(nested_list_to_numpy(batch["w_source"])).to(self.device)
        wr = torch.from_numpy(np.nan_to_num(nested_list_to_numpy(batch["w_reference"]))).to(self.device)
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


__all__ = ["REQUEST_FIELDS", "normalize_request", "edit_id", "EditContext", "validate", "check_direction",
           "work_table", "EditBatch"]
