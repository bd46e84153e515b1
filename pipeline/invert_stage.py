"""Ray Data stages of the inversion job.

    ds = <work rows: faces table snapshot, or a folder of crops read once>  # one row per face crop
    ds = ds.map_batches(load_crops, fn_kwargs=...)                     # CPU tasks: decode, resize
    ds = ds.map_batches(InvertBatch, compute=ActorPoolStrategy(...),   # model loaded once per actor
                        batch_size=B, num_gpus=G)

`load_crops` (pipeline.images) never raises on data: an unreadable crop becomes a row with a
status and error.
`InvertBatch` returns `latents` rows (pipeline.schemas.latents_schema) as an Arrow table, so
`w_plus` keeps its nested fixed-size-list type all the way to Parquet.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from pipeline.models import ModelActor
from pipeline.schemas import latents_schema, make_table
from pipeline.scoring import ReconstructionScorer, empty_metrics
from pipeline.sections import InvertSection, MetricWeights, ModelSection
from pipeline.status import STATUS_OK

log = logging.getLogger("stbatch.invert")


def failed_rows(batch: pa.Table, n_latent: int, style_dim: int, run_id: str) -> pa.Table:
    """Work rows never inverted (refused before reading, or skipped) -> `latents` rows with
    their own status and error."""
    n = batch.num_rows
    cols = {k: batch.column(k).to_pylist()
            for k in ("image_id", "face_index", "source_uri", "aligned_uri", "status", "error")}
    return make_table(cols, latents_schema(n_latent, style_dim), run_id,
                      w_plus=np.zeros((n, n_latent, style_dim), np.float32), ok=np.zeros(n, bool))


def lost_rows(batch: pa.Table, n_latent: int, style_dim: int, run_id: str) -> pa.Table:
    """Work rows that never came back from the pipeline (a worker died with them) -> failed
    `latents` rows; `lost` is transient, so the next run tries them again."""
    n = batch.num_rows
    batch = batch.select(["image_id", "face_index", "source_uri", "aligned_uri"])
    batch = batch.append_column("status", pa.array(["lost"] * n, pa.string()))
    batch = batch.append_column("error", pa.array(["row lost by the pipeline (worker crash)"] * n, pa.string()))
    return failed_rows(batch, n_latent, style_dim, run_id)


class InvertBatch(ModelActor):
    """Actor: loads the inversion model (and metric backbones) once, maps a batch of
    preprocessed crops to `latents` rows."""

    def __init__(self, model: ModelSection, section: InvertSection, run_id: str, output: str, device: str = "cpu",
                 metrics: MetricWeights | None = None):
        """`metrics`: the backbones that score each reconstruction (None: the encoder alone).
        Torch runs `section.torch_threads` threads, or `num_cpus` (at least one)."""
        super().__init__(model, device, section.amp, section.threads, generator=metrics is not None)
        cfg = self.model.cfg
        self.schema = latents_schema(cfg.n_latent, cfg.style_dim)
        self.run_id, self.output = run_id, output
        self.metrics = metrics
        self.scorer = self.on_model_thread(ReconstructionScorer, metrics, self.device, output) if metrics else None

    @torch.no_grad()
    def map_batch(self, batch: dict) -> pa.Table:
        ids = [str(i) for i in batch["image_id"]]
        n = len(ids)
        status = np.array(batch["status"], dtype=object)
        error = np.array(batch["error"], dtype=object)
        ok = status == STATUS_OK
        cfg = self.model.cfg
        w = np.zeros((n, cfg.n_latent, cfg.style_dim), dtype=np.float32)
        cols = {k: batch[k] for k in ("image_id", "face_index", "source_uri", "aligned_uri")}
        cols["face_index"] = np.asarray(batch["face_index"], dtype=np.int32)
        metric = empty_metrics(n)
        idx = np.flatnonzero(ok)
        scorer = self.scorer  # set exactly when metrics are asked for
        if len(idx):
            x = torch.from_numpy(np.ascontiguousarray(batch["image"][idx])).to(self.device)
            try:
                with self.autocast():
                    wp = self.model.invert(x)
                    y = self.model.reconstruct(wp) if scorer is not None else None
                w[idx] = wp.float().cpu().numpy()
                if scorer is not None and y is not None:
                    scorer.score(y, batch["target"], idx, ids, np.asarray(batch["face_index"]), metric)
            except Exception as e:  # noqa: BLE001 - a failing batch becomes failed rows, not a crash
                log.exception("inversion failed for a batch of %d", len(idx))
                status[idx], error[idx] = "invert_error", f"{type(e).__name__}: {e}"
                ok = status == STATUS_OK
        cols.update(status=status, error=error, model=[self.info["name"]] * n,
                    checkpoint_sha256=[self.info["sha256"]] * n, **metric)
        if self.scorer:
            cols["metric_backbones"] = [self.scorer.label if o else None for o in ok]
        return make_table(cols, self.schema, self.run_id, w_plus=w, ok=ok)

