"""Ray Data stages of the inversion job.

    ds = ray.data.from_items(work)                                     # one row per face crop
    ds = ds.map_batches(load_crops, fn_kwargs=...)                     # CPU tasks: read, decode, resize
    ds = ds.map_batches(InvertBatch, compute=ActorPoolStrategy(...),   # model loaded once per actor
                        batch_size=B, num_gpus=G)

`load_crops` never raises on data: an unreadable crop becomes a row with a status and error.
`InvertBatch` returns `latents` rows (pipeline.schemas.latents_schema) as an Arrow table, so
`w_plus` keeps its nested fixed-size-list type all the way to Parquet.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipeline import storage
from pipeline.decode import STATUS_OK, decode_image, image_id as hash_image_id
from pipeline.models import ModelActor
from pipeline.schemas import latents_schema, make_table
from pipeline.scoring import ReconstructionScorer, empty_metrics

log = logging.getLogger("stbatch.invert")


def hash_batch(batch: dict) -> dict:
    """(path, bytes) rows -> (path, image_id): the first pass over a plain folder of crops."""
    return {"path": batch["path"], "image_id": np.array([hash_image_id(bytes(b)) for b in batch["bytes"]], dtype=object)}


def to_model_input(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xSxS in [-1, 1] (the official transforms: PIL bilinear resize,
    normalise with mean 0.5 / std 0.5)."""
    im = Image.fromarray(rgb, "RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1)
    return x * (2.0 / 255.0) - 1.0


def load_crops(batch: dict, input_size: int | None, target_size: int | None = None,
               max_pixels: int = 64_000_000) -> dict:
    """Read and preprocess aligned crops. Adds `status`, `error`, `image` (encoder input, when
    `input_size` is set) and `target` (the crop at the reconstruction's size, for metrics, when
    `target_size` is set)."""
    n = len(batch["aligned_uri"])
    status = np.array(["ok"] * n, dtype=object)
    error = np.array([None] * n, dtype=object)
    image = np.zeros((n, 3, input_size, input_size), dtype=np.float32) if input_size else None
    target = np.zeros((n, 3, target_size, target_size), dtype=np.float32) if target_size else None
    for i, uri in enumerate(batch["aligned_uri"]):
        try:
            data = storage.read_bytes(str(uri))
        except Exception as e:  # noqa: BLE001 - any storage failure is this row's error
            status[i], error[i] = "read_error", f"cannot read {uri}: {type(e).__name__}: {e}"
            continue
        d = decode_image(data, max_pixels=max_pixels, min_side=1)
        if d.status != STATUS_OK:
            status[i], error[i] = "decode_error", d.error
            continue
        if image is not None:
            image[i] = to_model_input(d.image, input_size)
        if target is not None:
            target[i] = to_model_input(d.image, target_size)
    out = dict(batch)
    out.update(status=status, error=error)
    if image is not None:
        out["image"] = image
    if target is not None:
        out["target"] = target
    return out


class InvertBatch(ModelActor):
    """Actor: loads the inversion model (and metric backbones) once, maps a batch of
    preprocessed crops to `latents` rows."""

    def __init__(self, model: dict, run_id: str, output: str, device: str = "auto", amp: str = "auto",
                 metrics: dict | None = None, torch_threads: int = 0, crash_once: dict | None = None):
        super().__init__(model, device, amp, torch_threads)
        cfg = self.model.cfg
        self.schema = latents_schema(cfg.n_latent, cfg.style_dim)
        self.run_id, self.output = run_id, output
        self.metrics = metrics
        self.scorer = ReconstructionScorer(metrics, self.device, output) if metrics else None
        self.crash_once = crash_once

    def _maybe_crash(self, ids) -> None:
        """Fault injection for the retry test: kill this actor process once."""
        c = self.crash_once
        if c and c.get("image_id") in set(ids) and not Path(c["marker"]).exists():
            Path(c["marker"]).write_text(str(os.getpid()))
            os._exit(1)

    @torch.no_grad()
    def __call__(self, batch: dict) -> pa.Table:
        ids = [str(i) for i in batch["image_id"]]
        self._maybe_crash(ids)
        n = len(ids)
        status = np.array(batch["status"], dtype=object)
        error = np.array(batch["error"], dtype=object)
        ok = status == "ok"
        cfg = self.model.cfg
        w = np.zeros((n, cfg.n_latent, cfg.style_dim), dtype=np.float32)
        cols = {k: batch[k] for k in ("image_id", "face_index", "source_uri", "aligned_uri")}
        cols["face_index"] = np.asarray(batch["face_index"], dtype=np.int32)
        metric = empty_metrics(n)
        idx = np.flatnonzero(ok)
        if len(idx):
            x = torch.from_numpy(np.ascontiguousarray(batch["image"][idx])).to(self.device)
            try:
                with self.autocast():
                    wp = self.model.invert(x)
                    y = self.model.reconstruct(wp) if self.metrics else None
                w[idx] = wp.float().cpu().numpy()
                if y is not None:
                    self.scorer.score(y, batch["target"], idx, ids, np.asarray(batch["face_index"]), metric)
            except Exception as e:  # noqa: BLE001 - a failing batch becomes failed rows, not a crash
                log.exception("inversion failed for a batch of %d", len(idx))
                status[idx], error[idx] = "invert_error", f"{type(e).__name__}: {e}"
                ok = status == "ok"
        cols.update(status=status, error=error, model=[self.info["name"]] * n,
                    checkpoint_sha256=[self.info["sha256"]] * n, **metric)
        if self.scorer:
            cols["metric_backbones"] = [self.scorer.label if o else None for o in ok]
        return make_table(cols, self.schema, self.run_id, w_plus=w, ok=ok)

