"""The pSp training objective used by the Style Transformer encoder:

    L = l2 * MSE(y_hat, y) + lpips * LPIPS_alex(y_hat, y) + id * (1 - cos(E(y_hat), E(y)))
        + w_norm * mean_b ||w_b - latent_avg||_2

with the official face defaults l2 = 1.0, lpips = 0.8, id = 0.1, w_norm = 0 (off). The LPIPS
and face-embedding networks are passed in (frozen); a term whose weight is 0 needs none.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LossWeights:
    l2: float = 1.0
    lpips: float = 0.8
    id: float = 0.1
    w_norm: float = 0.0


class PSPLoss(nn.Module):
    def __init__(self, weights: LossWeights = LossWeights(),
                 lpips_net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 id_embed: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """`lpips_net(a, b)` -> per-image distance (inputs [-1, 1]); `id_embed(x)` -> unit
        embeddings; both frozen, differentiable w.r.t. their inputs."""
        super().__init__()
        if weights.lpips > 0 and lpips_net is None:
            raise ValueError("lpips weight > 0 needs an LPIPS network (set it to 0 to train without)")
        if weights.id > 0 and id_embed is None:
            raise ValueError("id weight > 0 needs a face embedder (set it to 0 to train without)")
        self.weights = weights
        self.lpips_net = lpips_net
        self.id_embed = id_embed

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None,
                latent_avg: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        wt = self.weights
        parts = {"l2": F.mse_loss(y_hat, y)}
        total = wt.l2 * parts["l2"]
        if wt.lpips > 0:
            if self.lpips_net is None:  # __init__ refuses this; narrows the Optional
                raise ValueError("lpips weight > 0 needs an LPIPS network")
            parts["lpips"] = self.lpips_net(y_hat, y).mean()
            total = total + wt.lpips * parts["lpips"]
        if wt.id > 0:
            if self.id_embed is None:  # __init__ refuses this; narrows the Optional
                raise ValueError("id weight > 0 needs a face embedder")
            cos = (self.id_embed(y_hat) * self.id_embed(y).detach()).sum(1)
            parts["id"] = (1 - cos).mean()
            total = total + wt.id * parts["id"]
        if wt.w_norm > 0:
            if w is None or latent_avg is None:
                raise ValueError("w_norm needs the codes and latent_avg")
            parts["wnorm"] = (w - latent_avg[: w.shape[1]]).flatten(1).norm(dim=1).mean()
            total = total + wt.w_norm * parts["wnorm"]
        parts["loss"] = total
        return total, {k: float(v.detach()) for k, v in parts.items()}
