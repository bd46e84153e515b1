"""Ray Data stage of the evaluate job: W+ codes from a `latents` table -> reconstructions ->
per-face metrics against the aligned crops.

    ds = <ok latents rows to evaluate>                     # pipeline.incremental.read_source: done
                                                           # faces removed before their codes are read
    ds = ds.map_batches(load_targets, fn_kwargs=...)       # tasks: read + resize crops, W+ to numpy
    ds = ds.map_batches(EvaluateBatch, compute=...)        # actors: generator + metric backbones
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.images import load_crops
from pipeline.models import ModelActor
from pipeline.schemas import make_table, metrics_schema, nested_list_to_numpy, unsliced
from pipeline.scoring import ReconstructionScorer, empty_metrics
from pipeline.sections import CropActorSection, MetricWeights, ModelSection
from pipeline.status import STATUS_LOST, STATUS_OK

log = logging.getLogger("stbatch.evaluate")

PASS_COLUMNS = ("image_id", "face_index", "aligned_uri", "run_id", "checkpoint_sha256", "status", "error")
LATENT_COLUMNS = ["image_id", "face_index", "aligned_uri", "run_id", "checkpoint_sha256", "status", "w_plus"]


def ok_latents(batch: pa.Table) -> pa.Table:
    """Committed latents rows -> work rows: status ok only, with an empty `error`."""
    batch = unsliced(batch)
    t = batch.filter(pc.equal(batch.column("status"), STATUS_OK)).select(LATENT_COLUMNS)
    return t.append_column("error", pa.nulls(t.num_rows, pa.string()))


def load_targets(batch: pa.Table, target_size: int, max_pixels: int) -> dict:
    """Work rows (Arrow) -> numpy batch with the crop at the reconstruction's size and W+ (rows
    that are not ok, i.e. skipped, are not read)."""
    cols = {k: np.array(batch[k].to_pylist(), dtype=object) for k in PASS_COLUMNS}
    cols["face_index"] = np.asarray(batch["face_index"].to_numpy(zero_copy_only=False), dtype=np.int32)
    out = load_crops(cols, input_size=None, target_size=target_size, max_pixels=max_pixels)
    out["w_plus"] = nested_list_to_numpy(batch["w_plus"])
    return out


def lost_rows(batch: pa.Table, run_id: str) -> pa.Table:
    """Work rows that never came back from the pipeline (a worker died with them) -> failed
    `metrics` rows; `lost` is transient, so the next run evaluates them again."""
    n = batch.num_rows
    cols = {k: batch.column(k).to_pylist() for k in ("image_id", "face_index", "aligned_uri", "checkpoint_sha256")}
    cols.update(latents_run_id=batch.column("run_id").to_pylist(), status=[STATUS_LOST] * n,
                error=["row lost by the pipeline (worker crash)"] * n)
    return make_table(cols, metrics_schema(), run_id)


class EvaluateBatch(ModelActor):
    """Actor: loads the generator (from the inversion checkpoint) and the metric backbones once."""

    def __init__(self, model: ModelSection, section: CropActorSection, run_id: str, output: str,
                 metrics: MetricWeights, device: str = "cpu"):
        super().__init__(model, device, section.amp, section.threads)
        self.scorer = self.on_model_thread(ReconstructionScorer, metrics, self.device, output)
        self.schema = metrics_schema()
        self.run_id = run_id

    @torch.no_grad()
    def map_batch(self, batch: dict) -> pa.Table:
        ids = [str(i) for i in batch["image_id"]]
        n = len(ids)
        status = np.array(batch["status"], dtype=object)
        error = np.array(batch["error"], dtype=object)
        sha = np.array(batch["checkpoint_sha256"], dtype=object)
        wrong = (status == STATUS_OK) & (sha != self.info["sha256"])
        status[wrong] = "model_mismatch"
        error[wrong] = [f"latents were made with checkpoint {s[:12]}..., evaluating with "
                        f"{self.info['sha256'][:12]}...: set model.checkpoint to the same file" for s in sha[wrong]]
        metric = empty_metrics(n)
        idx = np.flatnonzero(status == STATUS_OK)
        if len(idx):
            w = torch.from_numpy(np.ascontiguousarray(batch["w_plus"][idx])).to(self.device)
            try:
                with self.autocast():
                    y = self.model.reconstruct(w)
                self.scorer.score(y, batch["target"], idx, ids, np.asarray(batch["face_index"]), metric)
            except Exception as e:  # noqa: BLE001 - a failing batch becomes failed rows
                log.exception("evaluation failed for a batch of %d", len(idx))
                status[idx], error[idx] = "evaluate_error", f"{type(e).__name__}: {e}"
        ok = status == STATUS_OK
        cols = {"image_id": ids, "face_index": np.asarray(batch["face_index"], dtype=np.int32),
                "status": status, "error": error, "aligned_uri": batch["aligned_uri"],
                "latents_run_id": batch["run_id"], "model": [self.info["name"]] * n,
                "checkpoint_sha256": [self.info["sha256"]] * n,
                "metric_backbones": [self.scorer.label if o else None for o in ok], **metric}
        return make_table(cols, self.schema, self.run_id)
