"""Edit requests: read, parsed, keyed and checked before any edit runs.

    read_requests      a user's Parquet/CSV table -> request rows; a column that is not a request
                       field stops the job (with the nearest valid name)
    normalize_request  types, defaults, the fields that matter for the kind
    edit_id            sha256 of the canonical fields and of the models the edit uses:
                       idempotent reruns, a new id when a model is retrained, safe keys
    validate           unknown attribute / editor, a direction file outside the allowed roots,
                       too large or unreadable: a `bad_request` row with a readable error, never
                       an exception
    prepare_requests   all three, for a table of request rows (driver for a user table, Ray tasks
                       for a sweep over every face): REQUEST_SCHEMA rows

Values. An empty cell (CSV), a null (Parquet) or an absent column means the documented default
of an optional field: face_index 0, strength 1.0, target 1, order 1, reference_face_index 0. A
value that is there must parse: NaN (float NaN, or "NaN" / "NA" / "null" or any other text in
a numeric field), infinities, a fraction for an integer field and booleans are `bad_request`,
also in a field the request's kind does not use. A required field that is empty (image_id,
kind; attribute for label and reference edits; reference_image_id; direction_uri) is
`bad_request`.

Direction files. `direction_uri` must name an object under the job's output root or under one
of the allowed prefixes (`direction_prefixes`), compared after normalisation: scheme and bucket
(host) compared whole, `..` resolved, local paths made absolute with symlinks resolved, and
whole path components (`/ok` does not hold `/okay/x.npy`, `s3://bucket` does not hold
`s3://bucket-evil/x.npy`). A chained fsspec URL (`a::b`) is refused. The file's size (from its
listing, before it is read) must be at most jobs.edit's `direction_max_bytes`.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import posixpath
from collections.abc import Iterable
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import storage
from pipeline.edit_sections import SweepSection
from pipeline.errors import JobError
from pipeline.redact import redact_uri
from pipeline.schemas import EDIT_KINDS
from pipeline.status import STATUS_BAD_REQUEST, STATUS_OK, STATUS_SKIPPED

REQUEST_FIELDS = ("image_id", "face_index", "kind", "attribute", "strength", "target", "reference_image_id",
                  "reference_face_index", "direction_uri", "order")
STRING_FIELDS = ("image_id", "kind", "attribute", "reference_image_id", "direction_uri")
REQUEST_TYPES = {"face_index": pa.int32(), "reference_face_index": pa.int32(), "strength": pa.float64(),
                 "target": pa.int8(), "order": pa.int8()}
REQUEST_SCHEMA = pa.schema([pa.field("edit_id", pa.string()),
                            *[pa.field(k, REQUEST_TYPES.get(k, pa.string())) for k in REQUEST_FIELDS],
                            pa.field("status", pa.string()), pa.field("error", pa.string())])
_LOCAL = ("", "file", "local")
_DECODED_PATHS = ("http", "https")   # servers percent-decode paths: `%2e%2e` is `..` there


# ---------------------------------------------------------------------------- reading

def check_columns(columns: list[str]) -> None:
    """Stop the job (JobError) on a column that is not a request field, naming the nearest one."""
    for c in columns:
        if c in REQUEST_FIELDS:
            continue
        near = difflib.get_close_matches(str(c).strip().lower(), REQUEST_FIELDS, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise JobError(f"requests column {c!r} is not a request field{hint} "
                         f"(request fields: {', '.join(REQUEST_FIELDS)})")


def read_requests(uri: str) -> list[dict]:
    """The rows of a requests table (Parquet, or CSV where only an empty cell is a null, so that
    "NA" and "NaN" reach the parser and are refused there), after `check_columns`."""
    from pipeline.fit_data import read_table_uri

    t = read_table_uri(uri, string_columns=STRING_FIELDS, null_values=[""])
    check_columns(t.column_names)
    return t.to_pylist()


# ---------------------------------------------------------------------------- parsing

def _absent(v) -> bool:
    """An empty cell: None, or a string of blanks (float NaN is a value, and is refused)."""
    return v is None or (isinstance(v, str) and not v.strip())


def _number(v, name: str, what: str = "a number") -> tuple[float | None, str | None]:
    if isinstance(v, bool):
        return None, f"{name} must be {what}, got {v!r}"
    try:
        f = float(v.strip() if isinstance(v, str) else v)
    except (TypeError, ValueError):
        return None, f"{name} must be {what}, got {v!r}"
    if math.isnan(f):
        return None, f"{name} is NaN (not a number); leave it empty for the default"
    if not math.isfinite(f):
        return None, f"{name} must be finite, got {v!r}"
    return f, None


def _int(v, default, name, allowed=None, minimum=None):
    """(value, error): the default for an empty cell, else an integer (value kept as text when it
    does not parse, so the edit_id tells it apart from the default)."""
    if _absent(v):
        return default, None
    f, err = _number(v, name, "an integer")
    if err is None and not f.is_integer():
        err = f"{name} must be an integer, got {v!r}"
    if err:
        return str(v), err
    i = int(f)
    if allowed is not None and i not in allowed:
        return i, f"{name} must be one of {list(allowed)}, got {i}"
    if minimum is not None and i < minimum:
        return i, f"{name} must be >= {minimum}, got {i}"
    return i, None


def _float(v, default, name):
    if _absent(v):
        return default, None
    f, err = _number(v, name)
    return (str(v), err) if err else (f, None)


def _str(v):
    return None if _absent(v) else str(v).strip()


def normalize_request(raw: dict) -> tuple[dict, str | None]:
    """A request row -> (canonical fields, first format error or None). Defaults (empty cells
    only): face_index 0, strength 1.0, target 1 and order 1 (label), reference_face_index 0
    (reference). Fields that do not apply to the kind are set to None, so they do not change the
    edit_id; a value there must still parse."""
    r = {k: raw.get(k) for k in REQUEST_FIELDS}
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
    by_kind = {"target": _int(r["target"], 1, "target", allowed=(0, 1)),
               "order": _int(r["order"], 1, "order", allowed=(1, 2)),
               "reference_face_index": _int(r["reference_face_index"], 0, "reference_face_index", minimum=0)}
    req["target"] = req["order"] = req["reference_image_id"] = req["reference_face_index"] = None
    req["direction_uri"] = None
    if kind == "label":
        req["target"], req["order"] = by_kind["target"][0], by_kind["order"][0]
        if not req["attribute"]:
            errs.append("attribute is required for a label edit")
    elif kind == "reference":
        ref = _str(r["reference_image_id"])
        req["reference_image_id"] = ref.lower() if ref else None
        req["reference_face_index"] = by_kind["reference_face_index"][0]
        if not req["attribute"]:
            errs.append("attribute is required for a reference edit")
        if not req["reference_image_id"]:
            errs.append("reference_image_id is required for a reference edit")
    elif kind == "direction":
        req["direction_uri"] = _str(r["direction_uri"])
        if not req["direction_uri"]:
            errs.append("direction_uri is required for a direction edit")
    for name, (v, e) in by_kind.items():
        if e:
            errs.append(e)
            req[name] = v  # kept (also where the kind ignores the field): the edit_id tells it apart
    return req, (errs[0] if errs else None)


def edit_id(req: dict, models: dict | None = None) -> str:
    """sha256 hex of the canonical request (REQUEST_FIELDS) and of the models that make the
    edit (`edit_models`), as sorted JSON: a retrained model gives new ids."""
    canon = {k: req.get(k) for k in REQUEST_FIELDS}
    canon["models"] = {k: v for k, v in sorted((models or {}).items()) if v}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------- direction files

def _location(uri: str) -> tuple[str, str, tuple[str, ...]] | None:
    """(scheme, host, path components) of a URI with `..` resolved; None for a chained URL."""
    if "::" in uri:
        return None
    parts = urlsplit(uri) if "://" in uri else None
    scheme = parts.scheme.lower() if parts else ""
    if parts is None or scheme in _LOCAL:  # no scheme is a local path
        path = parts.path if parts else uri
        path = os.path.realpath(os.path.expanduser(path))
        return "file", "", tuple(p for p in path.split(os.sep) if p)
    host = parts.netloc.rsplit("@", 1)[-1].lower()
    path = unquote(parts.path) if scheme in _DECODED_PATHS else parts.path
    path = posixpath.normpath("/" + path)
    return scheme, host, tuple(p for p in path.split("/") if p)


def is_under(uri: str, roots: list[str]) -> bool:
    """Whether `uri` names an object under one of `roots` (whole scheme, host and path
    components, after normalisation)."""
    loc = _location(uri)
    if loc is None:
        return False
    for root in roots:
        r = _location(str(root))
        if r is not None and r[:2] == loc[:2] and loc[2][:len(r[2])] == r[2] and len(loc[2]) > len(r[2]):
            return True
    return False


def direction_refusal(uri: str, roots: list[str], max_bytes: int) -> str | None:
    """Why `uri` may not be read as a direction (outside `roots`, too large, missing), or None.
    The size comes from the listing: nothing is read."""
    shown = redact_uri(uri)
    if not is_under(uri, roots):
        return (f"direction_uri {shown} is outside the output root and the allowed prefixes "
                f"({', '.join(redact_uri(str(r)) for r in roots)}); add its folder to direction_prefixes")
    try:
        fs, path = storage.url_to_fs(uri)
        size = fs.size(path)
    except FileNotFoundError:
        return f"cannot read direction file {shown}: not found"
    except Exception as e:  # noqa: BLE001 - any listing failure is this request's error
        return f"cannot read direction file {shown}: {type(e).__name__}"
    if size is None:
        return f"direction file {shown}: its size is unknown, so it is not read"
    if size > max_bytes:
        return f"direction file {shown} is {size} bytes, over direction_max_bytes={max_bytes}"
    return None


def check_direction(uri: str, n_latent: int, style_dim: int) -> tuple[torch.Tensor | None, str | None]:
    """(direction, None) or (None, why it cannot be used): unreadable, or a shape the codes do not
    take. Call `direction_refusal` first: this reads the file."""
    from stmodel.label_edit import load_direction

    shown = redact_uri(uri)
    try:
        n = load_direction(uri)
    except Exception as e:  # noqa: BLE001 - any reading failure is this request's error
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None, f"cannot read direction file {shown}: {msg.replace(uri, shown)}"
    if not (tuple(n.shape) == (style_dim,) or tuple(n.shape) == (n_latent, style_dim)):
        return None, (f"direction in {shown} has shape {list(n.shape)}; codes need [{style_dim}] or "
                      f"[{n_latent}, {style_dim}]")
    return n, None


# ---------------------------------------------------------------------------- checking

class EditContext:
    """What `validate` checks requests against and the model hashes of their edit ids (all
    known on the driver before any edit; small, shipped to tasks). `direction_roots`: the job's
    output root and the allowed prefixes."""

    def __init__(self, checkpoint_sha256: str, classifier_sha256: str | None, attributes: list[str] | None,
                 editors: dict[str, str], editor_errors: dict[str, str], n_latent: int, style_dim: int,
                 direction_roots: list[str], direction_max_bytes: int):
        self.checkpoint_sha256 = checkpoint_sha256
        self.classifier_sha256 = classifier_sha256
        self.attributes = attributes      # the classifier's, or None without a classifier
        self.editors = dict(editors)      # attribute -> sha256 of its loadable editor
        self.editor_errors = dict(editor_errors)
        self.n_latent, self.style_dim = n_latent, style_dim
        self.direction_roots = [r for r in direction_roots if r]
        self.direction_max_bytes = direction_max_bytes
        self.directions: dict[str, str | None] = {}

    def direction_error(self, uri: str) -> str | None:
        if uri not in self.directions:
            err = direction_refusal(uri, self.direction_roots, self.direction_max_bytes)
            self.directions[uri] = err or check_direction(uri, self.n_latent, self.style_dim)[1]
        return self.directions[uri]


def edit_models(req: dict, ctx: EditContext) -> dict:
    """The models an edit depends on: the inversion checkpoint (it renders), and the classifier
    (label edits) or the attribute's editor (reference edits)."""
    kind, attr = req.get("kind"), req.get("attribute")
    return {"checkpoint": ctx.checkpoint_sha256,
            "classifier": ctx.classifier_sha256 if kind == "label" else None,
            "editor": ctx.editors.get(attr) if kind == "reference" and attr is not None else None}


def validate(req: dict, ctx: EditContext) -> tuple[str, str | None]:
    """(status, error): `ok`/None when the request can be carried out as far as the models and
    files say; its codes are checked where they meet it (`edit_stage.check_codes`)."""
    attr, kind = req["attribute"], req["kind"]
    if attr is not None:
        known = ctx.attributes if ctx.attributes is not None else (sorted(ctx.editors) if kind == "reference" else None)
        if kind == "label" and ctx.attributes is None:
            return STATUS_BAD_REQUEST, "label edits need a classifier (set classifier=ROOT)"
        if known is not None and attr not in known:
            shown = ", ".join(known[:8]) + (" ..." if len(known) > 8 else "")
            return STATUS_BAD_REQUEST, f"unknown attribute {attr!r} (known: {shown})"
    if kind == "reference":
        if attr in ctx.editor_errors:
            return STATUS_BAD_REQUEST, f"editor for {attr!r} cannot be used: {ctx.editor_errors[attr]}"
        if attr not in ctx.editors:
            return STATUS_BAD_REQUEST, f"no editor for attribute {attr!r} (no committed editor; set editors=ROOT)"
    if kind == "direction":
        err = ctx.direction_error(req["direction_uri"])
        if err:
            return STATUS_BAD_REQUEST, err
    return STATUS_OK, None


def prepare_requests(rows, ctx: EditContext) -> pa.Table:
    """Request rows (dicts) -> REQUEST_SCHEMA rows: canonical fields, edit_id, and status `ok`
    (to edit), `bad_request` (with the reason) or `skipped` (the same edit_id earlier in
    `rows`). Values that did not parse are kept in the id and stored as null."""
    out: dict[str, list] = {f.name: [] for f in REQUEST_SCHEMA}
    seen: set = set()
    for row in rows:
        req, err = normalize_request(row)
        eid = edit_id(req, edit_models(req, ctx))
        status = STATUS_BAD_REQUEST
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


# ---------------------------------------------------------------------------- sweeps and keys

_T = TypeVar("_T")


def _unique(xs: Iterable[_T]) -> list[_T]:
    """The values in their first order, each once."""
    return list(dict.fromkeys(xs))


def expand_sweep(sw: SweepSection, faces: list[tuple[str, int]]) -> list[dict]:
    """The request rows of a sweep for the given faces (its cross product; a value listed twice
    counts once)."""
    attrs: list[str | None] = [*_unique(sw.attributes)] or [None]
    uniq = _unique
    out: list[dict] = []
    for iid, fi in faces:
        for kind in uniq(sw.kinds):
            for attr in attrs:
                for s in uniq(sw.strengths):
                    base = {"image_id": iid, "face_index": fi, "kind": kind, "attribute": attr, "strength": s}
                    if kind == "label":
                        out += [{**base, "target": t, "order": sw.order} for t in uniq(sw.targets)]
                    elif kind == "reference":
                        out += [{**base, "reference_image_id": ref} for ref in uniq(sw.reference_image_ids)
                                if ref != iid]
                    else:
                        out += [{**base, "direction_uri": u} for u in uniq(sw.direction_uris)]
    return out


def sweep_batch(batch: pa.Table, sweep: SweepSection, ctx: EditContext) -> pa.Table:
    """Ray task: latents rows (image_id, face_index, status) -> the sweep's requests for their ok
    faces, prepared (a sweep over every face never passes through the driver)."""
    ok = batch.filter(pc.equal(batch["status"], STATUS_OK))
    faces = list(zip(ok["image_id"].to_pylist(), ok["face_index"].to_pylist()))
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


__all__ = ["REQUEST_FIELDS", "REQUEST_SCHEMA",
           "check_columns", "read_requests", "normalize_request", "edit_id", "is_under", "direction_refusal",
           "check_direction", "EditContext", "edit_models", "validate", "prepare_requests", "expand_sweep",
           "sweep_batch", "request_keys"]
