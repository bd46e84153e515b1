"""Ray Data stage of the score job: the committed latent classifier applied to ok W+ codes.

    ds = <committed latents snapshot> .map_batches(work_batch)   # ok codes + the classifier's sha256
    ds = run.mark_done(ds, SCORES, key=SCORE_DONE_KEY)           # scored by this classifier -> skipped
    ds = ds.map_batches(ScoreBatch, compute=ActorPoolStrategy(...))

One probability column per attribute. An attribute's column is its name when that is a plain
SQL identifier (`Smiling`, `Eyeglasses`), else the name with every other character replaced by
`_` and, when it starts with a digit, prefixed with `a_` (`5_o_Clock_Shadow` -> `a_5_o_Clock_Shadow`),
so a query never needs quotes.
"""
from __future__ import annotations

import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.fit_data import codes_to_numpy
from pipeline.models import ModelActor
from pipeline.schemas import make_table, scores_schema, unsliced
from pipeline.sections import ScoreSection
from pipeline.status import STATUS_BAD_CODE, STATUS_LOST, STATUS_OK

log = logging.getLogger("stbatch.score")

WORK_COLUMNS = ["image_id", "face_index", "status", "w_plus", "run_id"]
# A face is done when it has a committed row from the same classifier; a row from another
# classifier is replaced by the new scores (one row per face: the latest classifier's).
SCORE_KEY = ("image_id", "face_index")
SCORE_DONE_KEY = ("image_id", "face_index", "classifier_sha256")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED = frozenset(f.name for f in scores_schema([]))


def safe_columns(attributes: list[str]) -> dict[str, str]:
    """{attribute: column name}; raises ValueError when two attributes (or an attribute and a
    fixed column) would share a column."""
    out: dict[str, str] = {}
    for a in attributes:
        c = a if _IDENT.match(a) else re.sub(r"[^A-Za-z0-9_]", "_", a)
        if not _IDENT.match(c):
            c = f"a_{c}"
        if c.lower() in {x.lower() for x in RESERVED} or c.lower() in {x.lower() for x in out.values()}:
            raise ValueError(f"attribute {a!r} would be the column {c!r}, which another column already is")
        out[a] = c
    return out


def work_batch(batch: pa.Table, classifier_sha256: str) -> pa.Table:
    """Committed latents rows -> work rows: the ok codes, with the classifier that will score them."""
    t = unsliced(batch).filter(pc.equal(batch.column("status"), STATUS_OK))
    n = t.num_rows
    return pa.table({"image_id": pc.cast(t["image_id"], pa.string()),
                     "face_index": pc.cast(t["face_index"], pa.int32()),
                     "status": t["status"], "error": pa.nulls(n, pa.string()), "w_plus": t["w_plus"],
                     "latents_run_id": t["run_id"],
                     "classifier_sha256": pa.array([classifier_sha256] * n, pa.string())})


def score_rows(batch: pa.Table, probs: np.ndarray | None, columns: list[str], classifier_run_id: str | None,
               run_id: str, status: list | None = None, error: list | None = None) -> pa.Table:
    """Work rows -> `scores` rows (`probs` [N, K] in the order of `columns`; NaN -> null)."""
    n = batch.num_rows
    cols = {k: batch[k].to_pylist() for k in ("image_id", "face_index", "classifier_sha256", "latents_run_id")}
    cols.update(status=status if status is not None else batch["status"].to_pylist(),
                error=error if error is not None else batch["error"].to_pylist(),
                classifier_run_id=[classifier_run_id] * n)
    p = probs if probs is not None else np.full((n, len(columns)), np.nan, np.float32)
    cols.update({c: p[:, j] for j, c in enumerate(columns)})
    return make_table(cols, scores_schema(columns), run_id)


def lost_rows(batch: pa.Table, columns: list[str], classifier_run_id: str | None, run_id: str) -> pa.Table:
    """Work rows that never came back (a worker died with them): `lost`, tried again next run."""
    n = batch.num_rows
    return score_rows(batch, None, columns, classifier_run_id, run_id, status=[STATUS_LOST] * n,
                      error=["row lost by the pipeline (worker crash)"] * n)


class ScoreBatch(ModelActor):
    """Actor: the classifier loaded once (verified against its sha256); a batch of work rows ->
    `scores` rows. Rows that are not ok (skipped) pass through with their status. `device`: the
    one pipeline.compute.actor_stage resolved from `section.device`."""

    def __init__(self, section: ScoreSection, classifier: str, classifier_sha256: str, classifier_run_id: str | None,
                 columns: list[str], run_id: str, device: str):
        # one torch thread per CPU the actor is granted (at least one: num_cpus may be fractional)
        super().__init__(None, device, section.amp, section.threads)
        self.clf = self.on_model_thread(self._load_classifier, classifier, classifier_sha256)
        self.columns, self.classifier_run_id, self.run_id = list(columns), classifier_run_id, run_id

    def _load_classifier(self, uri: str, sha256: str):
        from stmodel.classifier import load_classifier

        return load_classifier(uri, sha256=sha256).to(self.device).requires_grad_(False)

    @torch.no_grad()
    def map_batch(self, batch: pa.Table) -> pa.Table:
        batch = unsliced(batch)
        status, error = batch["status"].to_pylist(), batch["error"].to_pylist()
        todo = np.array([s == "ok" for s in status], bool)
        probs = np.full((batch.num_rows, len(self.columns)), np.nan, np.float32)
        if todo.any():
            w = codes_to_numpy(batch["w_plus"].filter(pa.array(todo)))
            finite = np.isfinite(w).reshape(len(w), -1).all(1)
            idx = np.flatnonzero(todo)
            for i in idx[~finite]:
                status[i], error[i] = STATUS_BAD_CODE, "the W+ code holds NaN or inf values"
            if finite.any():
                x = torch.from_numpy(np.ascontiguousarray(w[finite])).to(self.device)
                with self.autocast():
                    logits = self.clf(x)[0]
                probs[idx[finite]] = torch.sigmoid(logits.float()).cpu().numpy()
        return score_rows(batch, probs, self.columns, self.classifier_run_id, self.run_id, status, error)
