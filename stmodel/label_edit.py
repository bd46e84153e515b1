"""Label-based editing with the latent classifier, and global (InterFaceGAN-style) directions.

`label_edit` follows the released `training/coach_label_edit.py`: the direction is the gradient
of the binary cross-entropy of attribute k's logit against the wanted label, normalised per
W+ layer, and the code steps against it (`w - alpha * direction`), which lowers the BCE, i.e.
moves the logit towards the target.
"""
from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import torch

from .checkpoint import CheckpointError, read_bytes
from .classifier import LatentClassifier

FD_STEP = 1e-4  # the released code's finite-difference step


def _normalise(g: torch.Tensor) -> torch.Tensor:
    """Per layer `g / (||g|| + 1e-8)`. Each sample is first divided by its largest |entry|, a
    positive per-sample scale the per-layer normalisation removes anyway: a confidently
    classified sample's BCE gradient is ~1e-9, and the 1e-8 guard would otherwise shrink its
    direction instead of only protecting all-zero layers."""
    g = g / g.detach().flatten(1).abs().amax(1).clamp_min(1e-30).view(-1, *([1] * (g.ndim - 1)))
    return g / (g.norm(dim=-1, keepdim=True) + 1e-8)


def _bce_grad(classifier: LatentClassifier, w: torch.Tensor, k: int, target: int) -> torch.Tensor:
    """d/dw of BCE-with-logits(logit_k(w), target), summed over the batch so each sample's
    gradient is its own. dBCE/dlogit = sigmoid(x) - t is formed as -sigmoid(-x) for t = 1:
    autograd's `sigmoid(x) - 1` rounds to 0 in float32 for logits above ~17, which would leave
    already-confident samples with a zero direction instead of a tiny, normalisable one."""
    with torch.enable_grad():
        w = w.detach().float().requires_grad_(True)
        logit = classifier(w)[0][:, k]
        dl = -torch.sigmoid(-logit) if target == 1 else torch.sigmoid(logit)
        (g,) = torch.autograd.grad(logit, w, grad_outputs=dl.detach())
    return g


def _check(classifier: LatentClassifier, w: torch.Tensor, k: int | str, target: int) -> int:
    if target not in (0, 1):
        raise ValueError(f"target must be 0 (remove) or 1 (add), got {target}")
    if w.ndim != 3:
        raise ValueError(f"w must be [B, n_latent, D], got shape {list(w.shape)}")
    return classifier.attribute_index(k)


def label_direction(classifier: LatentClassifier, w: torch.Tensor, k: int | str, target: int) -> torch.Tensor:
    """First-order, image-adaptive direction `[B, n_latent, D]`: d BCE(logit_k, target) / dw,
    divided per layer by its norm over the last axis (`/ (norm + 1e-8)`)."""
    k = _check(classifier, w, k, target)
    return _normalise(_bce_grad(classifier, w, k, target))


def label_edit(classifier: LatentClassifier, w: torch.Tensor, k: int | str, target: int, alpha: float | torch.Tensor,
               order: int = 1, seed: int = 0, *, unit_noise: bool = True) -> torch.Tensor:
    """Edit W+ codes towards `target` (1 add, 0 remove) for attribute k; returns `w_e`.

    order 1: `w_e = w - alpha * label_direction(...)`.

    order 2, the released code's finite-difference variant, step for step:
      v ~ N(0, I) (seeded, `[B, n_latent, D]`); h = 1e-4;
      a = d/dv L(w + h v) = h * g(w + h v)   (the gradient w.r.t. the perturbation, chain rule);
      b = d/dz L(w + z) at z = 0 = g(w);
      d = normalise_per_layer(a - b);   direction = v - d;   w_e = w - alpha * direction.
    Since a - b = -(1 - h) g(w) + h^2 H v, the Hessian-vector term is O(1e-8) and d is, to
    float precision, -normalise(g(w)): the variant is the first-order step plus a random step
    `-alpha * v`. One deviation: with `unit_noise=True` (default) v is scaled to unit norm per
    layer, like the gradient term; the released code uses raw N(0, 1) entries (norm ~ sqrt(D)
    per layer, ~22.6 at D = 512), which swamps the edit. `unit_noise=False` reproduces it.
    """
    k = _check(classifier, w, k, target)
    if order == 1:
        return w - alpha * _normalise(_bce_grad(classifier, w, k, target))
    if order != 2:
        raise ValueError(f"order must be 1 or 2, got {order}")
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(w.shape, generator=gen).to(device=w.device, dtype=w.dtype)
    if unit_noise:
        v = _normalise(v)
    a = FD_STEP * _bce_grad(classifier, w + FD_STEP * v, k, target)
    b = _bce_grad(classifier, w, k, target)
    direction = v - _normalise(a - b)
    return w - alpha * direction


def direction_edit(w: torch.Tensor, n: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Global edit `w + alpha * n`; n is `[D]` (every layer) or `[n_latent, D]` (per layer), alpha a
    number or a `[B]` tensor of per-sample strengths."""
    n = n.to(device=w.device, dtype=w.dtype)
    if n.ndim == 1:
        n = n.expand(w.shape[1], -1)
    if n.shape != w.shape[1:]:
        raise ValueError(f"direction of shape {list(n.shape)} does not fit codes of shape {list(w.shape[1:])}")
    alpha = torch.as_tensor(alpha, device=w.device, dtype=w.dtype)
    if alpha.ndim == 1:
        alpha = alpha[:, None, None]
    return w + alpha * n


def load_direction(uri: str, sha256: str | None = None) -> torch.Tensor:
    """Read a direction from `.npy` (no pickles) or `.pt`/`.pth` (weights_only; a tensor, or a
    dict holding exactly one tensor). Leading singleton axes are dropped (InterFaceGAN's
    boundaries are `[1, 512]`). Returns float32 `[D]` or `[n_latent, D]`."""
    low = uri.lower()
    if not low.endswith((".npy", ".pt", ".pth")):
        raise CheckpointError(f"{uri}: unknown direction format (use .npy, .pt or .pth)")
    data, _ = read_bytes(uri, sha256)
    if low.endswith(".npy"):
        try:
            t = torch.from_numpy(np.array(np.load(io.BytesIO(data), allow_pickle=False)))
        except ValueError as e:
            raise CheckpointError(f"{uri}: refused: {e} (only plain numeric .npy arrays are read)") from None
    else:
        # checkpoint.load_bytes only returns dicts; a direction is usually a bare tensor.
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{uri}: refused by the safe loader (weights_only=True): "
                                  f"{str(e).splitlines()[0]}") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{uri}: not a readable PyTorch file: {str(e).splitlines()[0]}") from None
        if isinstance(obj, dict):
            tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
            if len(tensors) != 1:
                raise CheckpointError(f"{uri}: a dict direction file must hold exactly one tensor, "
                                      f"found {len(tensors)}")
            obj = tensors[0]
        if not isinstance(obj, torch.Tensor):
            raise CheckpointError(f"{uri}: expected a tensor, found {type(obj).__name__}")
        t = obj
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise CheckpointError(f"{uri}: direction has dtype {t.dtype}")
    t = t.float()
    while t.ndim > 1 and t.shape[0] == 1:
        t = t[0]
    if t.ndim not in (1, 2):
        raise CheckpointError(f"{uri}: direction has shape {list(t.shape)}, expected [D] or [n_latent, D]")
    return t


__all__ = ["label_direction", "label_edit", "direction_edit", "load_direction"]
