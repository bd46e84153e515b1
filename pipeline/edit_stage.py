"""Ray Data stage of the edit job: requests (`pipeline.edit_requests`) meet their codes, and the
actor that edits them.

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

import logging
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import delta, storage
from pipeline.edit_requests import REQUEST_FIELDS, check_direction
from pipeline.edit_sections import EditSection
from pipeline.fit_data import codes_to_numpy
from pipeline.images import encode_png
from pipeline.models import ModelActor, build_metrics, metric_label
from pipeline.paste_stage import CROP_PNG
from pipeline.schemas import edits_schema, make_table, unsliced
from pipeline.scoring import to_uint8
from pipeline.sections import MetricWeights, ModelSection
from pipeline.status import STATUS_BAD_REQUEST, STATUS_EDIT_ERROR, STATUS_MODEL_MISMATCH, STATUS_OK
from pipeline.storage import image_key

if TYPE_CHECKING:
    from stmodel.classifier import LatentClassifier

log = logging.getLogger("stbatch.edit")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Edited images live beside the `edits` Delta table, never inside it (a vacuum of the table
# removes every file its log does not name).
IMAGES = "edit_images"
SOURCES = "edit_sources"
CODE_COLUMNS = {"source": ("image_id", "face_index", "w_source", "source_sha256"),
                "reference": ("reference_image_id", "reference_face_index", "w_reference", "reference_sha256")}


# ---------------------------------------------------------------------------- joins

def codes_for_join(batch: pa.Table, keys_refs: list | None = None) -> pa.Table:
    """Ray task: latents rows (image_id, face_index, status, w_plus, checkpoint_sha256) -> the ok
    codes, only those of `keys_refs` when given (the keys the requests need, broadcast: the rest
    of the table never reaches the shuffle)."""
    t = unsliced(batch).filter(pc.equal(batch["status"], STATUS_OK))
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
    batch = unsliced(batch)
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
            status[i], error[i] = STATUS_BAD_REQUEST, (f"unknown image: no ok latent code for image_id {r['image_id']} "
                                               f"face_index {r['face_index']}")
        elif sha and model_sha and sha != model_sha:
            status[i], error[i] = STATUS_MODEL_MISMATCH, (f"the code was made by checkpoint {sha[:12]}..., the edit "
                                                    f"model is {model_sha[:12]}...; edit with the same file")
        elif r["kind"] == "reference" and not has_ref[i]:
            status[i], error[i] = STATUS_BAD_REQUEST, (f"reference image not found: no ok latent code for image_id "
                                               f"{r['reference_image_id']} face_index {r['reference_face_index']}")
        elif r["kind"] == "reference" and r.get("reference_sha256") and model_sha \
                and r["reference_sha256"] != model_sha:
            status[i], error[i] = STATUS_MODEL_MISMATCH, ("the reference code was made by another checkpoint than the "
                                                    "edit model")


# ---------------------------------------------------------------------------- the actor

class EditBatch(ModelActor):
    """Actor: model, classifier, editors and metric backbones loaded once; a batch of requests
    joined with their codes -> `edits` rows (edited PNG under `<output>/edit_images/<edit_id>.png`,
    source reconstruction under `<output>/edit_sources/<image_id>_<face>.png`). `section`: the
    job's `edit` settings (autocast; its CPUs are the actor's torch threads); `device`: the one
    its resources resolved to (pipeline.compute.actor_stage). `classifier` and each of `editors`
    (by attribute) are {uri, sha256}; every file is verified against its committed sha256.
    `metrics`: the metric backbones, or None for no metrics. `keep_crops`: each row also carries
    its edited PNG's bytes (pipeline.paste_stage.CROP_PNG) for the paste-back stage after it, so
    that stage does not read the file back."""

    def __init__(self, section: EditSection, model: ModelSection, run_id: str, output: str, device: str,
                 classifier: dict | None = None, editors: dict[str, dict] | None = None,
                 metrics: MetricWeights | None = None, keep_crops: bool = False):
        super().__init__(model, device, section.amp, section.threads)
        self.n_latent, self.style_dim = self.model.cfg.n_latent, self.model.cfg.style_dim
        self.on_model_thread(self._load_edit_models, classifier, editors or {}, metrics)
        self.run_id, self.output = run_id, output
        self.schema = edits_schema()
        self.directions: dict[str, torch.Tensor] = {}
        self.sources_written: set = set()
        self.keep_crops = keep_crops

    def _load_edit_models(self, classifier: dict | None, editors: dict[str, dict], metrics: MetricWeights | None
                          ) -> None:
        from stmodel.classifier import load_classifier
        from stmodel.editor import load_editor

        self.clf = None
        if classifier:
            self.clf = load_classifier(classifier["uri"], sha256=classifier["sha256"]).to(self.device)
            self.clf.requires_grad_(False)
        self.editors = {}
        for attr, m in editors.items():
            ed, _, _ = load_editor(m["uri"], sha256=m["sha256"])
            self.editors[attr] = ed.to(self.device).requires_grad_(False)
        self.lpips = self.ident = None
        self.label = None
        if metrics is not None:
            self.lpips, self.ident = build_metrics(metrics, self.device)
            self.label = metric_label(self.lpips, self.ident)

    def _direction(self, uri: str) -> torch.Tensor:
        if uri not in self.directions:
            n, err = check_direction(uri, self.n_latent, self.style_dim)
            if err:
                raise ValueError(err)
            if n is None:  # check_direction returns a direction or why there is none
                raise ValueError(f"check_direction gave neither a direction nor an error for {uri}")
            self.directions[uri] = n.to(self.device)
        return self.directions[uri]

    def _classifier(self) -> LatentClassifier:
        if self.clf is None:  # validate fails label edits without a classifier
            raise ValueError("label edits need a classifier (set classifier=ROOT)")
        return self.clf

    def _edit_codes(self, rows: list[dict], ws: torch.Tensor, wr: torch.Tensor, status: list, error: list
                    ) -> torch.Tensor:
        """w_e for every row (rows that fail keep NaN and get status edit_error)."""
        from stmodel.label_edit import direction_edit, label_edit

        we = torch.full_like(ws, float("nan"))
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(rows):
            if status[i] != STATUS_OK:
                continue
            key: tuple[Any, ...]  # (kind tag, what the rows of a group share)
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
                    out = label_edit(self._classifier(), ws[ix], r["attribute"], int(r["target"]), float(r["strength"]),
                                     order=2, seed=seed)
                elif key[0] == "label":
                    # alpha per row: w - alpha * direction (label_edit's arithmetic broadcasts)
                    out = label_edit(self._classifier(), ws[ix], key[1], key[2], alpha, order=1)
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
                    status[i], error[i] = STATUS_EDIT_ERROR, f"{type(e).__name__}: {e}"
        return we

    def map_batch(self, batch: pa.Table) -> pa.Table:
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
                    status[i], error[i] = STATUS_MODEL_MISMATCH, str(e)
        check_codes(meta, has_source, has_ref, self.info["sha256"], status, error)
        ws = torch.from_numpy(w_s).to(self.device)
        wr = torch.from_numpy(w_r).to(self.device)
        cols: dict[str, list[Any] | np.ndarray] = {k: [r[k] for r in meta] for k in ("edit_id",) + REQUEST_FIELDS}
        out: dict[str, list[Any]] = {k: [None] * n for k in ("output_uri", "source_reconstruction_uri",
                                                             "metric_backbones")}
        pngs: list = [None] * n
        nums = {k: np.full(n, np.nan, np.float32) for k in ("id_similarity", "lpips", "logit_before", "logit_after")}
        we = self._edit_codes(meta, ws, wr, status, error)
        ok = [i for i in range(n) if status[i] == STATUS_OK]
        if ok:
            try:
                self._render(meta, ok, ws, we, out, nums, status, error, pngs)
            except Exception as e:  # noqa: BLE001 - a failing batch becomes failed rows, not a crash
                log.exception("rendering failed for a batch of %d edits", len(ok))
                for i in ok:
                    status[i], error[i] = STATUS_EDIT_ERROR, f"{type(e).__name__}: {e}"
                    out["output_uri"][i] = out["source_reconstruction_uri"][i] = None
        cols.update(status=status, error=error, model=[self.info["name"]] * n,
                    checkpoint_sha256=[self.info["sha256"]] * n, **out, **nums)
        table = make_table(cols, self.schema, self.run_id)
        if self.keep_crops:
            table = table.append_column(CROP_PNG, pa.array(pngs, pa.binary()))
        return table

    @torch.no_grad()
    def _render(self, meta, ok, ws, we, out, nums, status, error, pngs) -> None:
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
                png = encode_png(edit_png[j])
                storage.write_bytes(uri, png)
                out["output_uri"][i] = uri
                pngs[i] = png if self.keep_crops else None
                out["source_reconstruction_uri"][i] = src_uri[src_keys[j]]
            except Exception as e:  # noqa: BLE001 - a failed write fails that row only
                status[i], error[i] = STATUS_EDIT_ERROR, f"cannot write the edited image: {type(e).__name__}: {e}"


__all__ = ["IMAGES", "SOURCES", "codes_for_join", "as_role", "with_status",
           "request_rows", "check_codes", "EditBatch"]
