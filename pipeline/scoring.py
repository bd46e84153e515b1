"""Scoring reconstructions (or edits) against their targets, shared by the invert, evaluate
and edit jobs: PSNR / MSE / LPIPS / ID similarity per face, and the image written to storage."""
from __future__ import annotations

import numpy as np
import torch

from pipeline import storage
from pipeline.images import encode_png
from pipeline.models import build_metrics, metric_label
from pipeline.schemas import METRIC_COLUMNS
from pipeline.sections import MetricWeights
from pipeline.storage import image_key


def empty_metrics(n: int) -> dict:
    """Per-row metric columns (NaN = not computed, stored as null) and the image URI column."""
    out = {k: np.full(n, np.nan, dtype=np.float32) for k in METRIC_COLUMNS}
    out["reconstruction_uri"] = np.array([None] * n, dtype=object)
    return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class ReconstructionScorer:
    def __init__(self, weights: MetricWeights, device: torch.device, output: str, folder: str = "reconstructions"):
        self.lpips, self.ident = build_metrics(weights, device)
        self.label = metric_label(self.lpips, self.ident)
        self.device, self.output, self.folder = device, output, folder

    def score(self, y: torch.Tensor, target: np.ndarray, idx: np.ndarray, ids: list[str],
              faces: np.ndarray, metric: dict) -> None:
        """Fill `metric[...]` at rows `idx` for reconstructions `y` (one per idx) against
        `target[idx]`, and write each reconstruction as PNG."""
        from stmodel.metrics import mse, psnr

        y = y.float()
        t = torch.from_numpy(np.ascontiguousarray(target[idx])).to(y.device)
        if t.shape[-1] != y.shape[-1]:
            t = torch.nn.functional.adaptive_avg_pool2d(t, y.shape[-1])
        metric["psnr"][idx] = psnr(y, t).cpu().numpy()
        metric["mse"][idx] = mse(y, t).cpu().numpy()
        if self.lpips is not None:
            metric["lpips"][idx] = self.lpips(y, t).cpu().numpy()
        if self.ident is not None:
            metric["id_similarity"][idx] = self.ident(y, t).cpu().numpy()
        imgs = to_uint8(y)
        for j, i in enumerate(idx):
            uri = storage.join(self.output, image_key(self.folder, ids[i], int(faces[i])))
            storage.write_bytes(uri, encode_png(imgs[j]))
            metric["reconstruction_uri"][i] = uri
