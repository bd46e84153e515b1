"""Image-quality metrics on batches: MSE, PSNR, LPIPS (AlexNet, v0.1) and ID similarity.

Every function takes image batches `[B, 3, H, W]` in [-1, 1] (the generator's range) and
returns one value per image. Inputs are clamped to [-1, 1] first: that is what an image saved
to disk would hold, and the papers' tables are computed on saved images.

Weights are never downloaded. LPIPS' linear heads ship inside the `lpips` package; the AlexNet
backbone and the face embedder are read from configured paths/URIs. Without one, the metric
refuses to build unless `allow_random_init=True` (tests only), and then its `label` says so,
so a random-init number can never pass for a real one in a report.
"""
from __future__ import annotations

import inspect
import math
import os
import warnings
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_bytes, load_strict, read_bytes

# pSp's ID loss crops a 256 FFHQ-aligned image to rows 35:223, cols 32:220 (the face, without
# hair and background) before the face embedder. Kept as fractions so any size works.
FACE_CROP = (35 / 256, 223 / 256, 32 / 256, 220 / 256)  # top, bottom, left, right
FACENET_SIZE = 160
LPIPS_SIZE = 256


def _unit(x: torch.Tensor) -> torch.Tensor:
    return (x.float().clamp(-1, 1) + 1) / 2


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error on images in [-1, 1], as pSp reports it (4x the MSE in
    [0, 1]). Inputs are clamped to [-1, 1]. Returns `[B]`."""
    return (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB with peak 1, computed on images mapped from [-1, 1] to [0, 1].
    Identical images give +inf. Returns `[B]`."""
    m = (_unit(a) - _unit(b)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / m)


def summarize(values: torch.Tensor | np.ndarray | Iterable[float]) -> dict:
    """mean, median, 95th percentile and count of the non-NaN values."""
    if isinstance(values, torch.Tensor):
        values = values.detach().double().cpu().numpy()
    v = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": math.nan, "p50": math.nan, "p95": math.nan, "n": 0}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)),
            "p95": float(np.percentile(v, 95)), "n": int(v.size)}


def _read_state(uri: str, sha256: str | None) -> dict:
    data, _ = read_bytes(uri, sha256)
    obj = load_bytes(data, uri)
    return obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj


def _pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    # Area pooling, as the official inference pools 1024 outputs to 256; never upsample here.
    if x.shape[-1] > size or x.shape[-2] > size:
        x = F.adaptive_avg_pool2d(x, (min(size, x.shape[-2]), min(size, x.shape[-1])))
    return x


# ---------------------------------------------------------------- LPIPS

def alexnet_to_lpips(state: dict, lp_net: torch.nn.Module) -> dict:
    """Map a torchvision AlexNet state_dict (`features.N.*`) onto lpips' sliced wrapper
    (`sliceS.N.*`). The slice of each feature index is read off the wrapper itself, so a
    different lpips slicing still maps correctly. `classifier.*` (the ImageNet head) is unused
    by LPIPS and dropped; keys already in the `sliceS.N.*` form pass through."""
    where = {}
    for name, child in lp_net.named_children():
        if name.startswith("slice"):
            for idx, _ in child.named_children():
                where[idx] = name
    out = {}
    for k, v in state.items():
        if k.startswith("classifier."):
            continue
        if k.startswith("features."):
            idx, rest = k[len("features."):].split(".", 1)
            if idx not in where:  # e.g. the last max-pool: no weights, but be loud if it had some
                raise CheckpointError(f"AlexNet key {k}: feature index {idx} is not used by LPIPS")
            out[f"{where[idx]}.{idx}.{rest}"] = v
        else:
            out[k] = v
    return out


class LPIPSMetric:
    """LPIPS with the AlexNet trunk and the v0.1 linear heads; inputs [-1, 1], pooled to 256
    when larger. Call with two batches, get `[B]` distances."""

    def __init__(self, backbone: str | None = None, *, allow_random_init: bool = False,
                 device: str | torch.device = "cpu", sha256: str | None = None):
        import lpips

        if backbone is None and not allow_random_init:
            raise ValueError("LPIPSMetric needs the AlexNet backbone weights (a torchvision alexnet "
                             "state_dict path/URI); pass allow_random_init=True only in tests")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation
            # pnet_rand=True: lpips builds alexnet(weights=None), so torchvision downloads nothing;
            # the v0.1 linear heads are read below from the file the lpips package ships.
            net = lpips.LPIPS(net="alex", version="0.1", pretrained=False, pnet_rand=True,
                              pnet_tune=False, verbose=False)
        self._load_heads(net)
        if backbone is not None:
            load_strict(net.net, alexnet_to_lpips(_read_state(backbone, sha256), net.net),
                        f"{backbone} (LPIPS AlexNet backbone)")
            self.label = "lpips-alex-v0.1"
        else:
            self.label = "lpips-alex-RANDOM-INIT (not a real LPIPS)"
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net.eval().to(device)
        self.device = torch.device(device)

    @staticmethod
    def _load_heads(net: torch.nn.Module) -> None:
        """The v0.1 AlexNet linear heads from the lpips package, through the safe loader, and
        every head accounted for (lpips' own loader is non-strict)."""
        import lpips
        path = os.path.join(os.path.dirname(inspect.getfile(lpips.LPIPS)), "weights", "v0.1", "alex.pth")
        heads = load_bytes(read_bytes(path)[0], path)
        own = net.state_dict()
        expected = {k for k in own if k.startswith("lin") and not k.startswith("lins.")}
        if set(heads) != expected or any(own[k].shape != v.shape for k, v in heads.items()):
            raise CheckpointError(f"{path}: lpips linear heads {sorted(heads)} do not fit {sorted(expected)}")
        net.load_state_dict(heads, strict=False)

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = _pool_to(a.to(self.device).float().clamp(-1, 1), LPIPS_SIZE)
        b = _pool_to(b.to(self.device).float().clamp(-1, 1), LPIPS_SIZE)
        return self.net(a, b, normalize=False).flatten()


# ---------------------------------------------------------------- ID similarity

class IDSimilarity:
    """Cosine similarity of facenet-pytorch InceptionResnetV1 (VGGFace2) embeddings of the
    face region of FFHQ-aligned images. Call with two batches, get `[B]` similarities."""

    def __init__(self, weights: str | None = None, *, allow_random_init: bool = False,
                 device: str | torch.device = "cpu", sha256: str | None = None,
                 crop: tuple[float, float, float, float] = FACE_CROP):
        from facenet_pytorch import InceptionResnetV1

        if weights is None and not allow_random_init:
            raise ValueError("IDSimilarity needs the facenet VGGFace2 state_dict path/URI "
                             "(20180402-114759-vggface2.pt); pass allow_random_init=True only in tests")
        net = InceptionResnetV1(pretrained=None, classify=False)
        if weights is not None:
            # The released file also holds the 8631-way VGGFace2 `logits` head, unused for embeddings.
            sd = {k: v for k, v in _read_state(weights, sha256).items() if not k.startswith("logits.")}
            load_strict(net, sd, f"{weights} (facenet InceptionResnetV1)")
            self.label = "facenet-vggface2"
        else:
            self.label = "facenet-RANDOM-INIT (not a real ID metric)"
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net.eval().to(device)
        self.device = torch.device(device)
        self.crop = crop

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device).float().clamp(-1, 1)
        h, w = x.shape[-2:]
        top, btm, left, right = self.crop
        x = x[..., round(top * h):round(btm * h), round(left * w):round(right * w)]
        x = F.interpolate(x, size=(FACENET_SIZE, FACENET_SIZE), mode="bilinear",
                          align_corners=False, antialias=True)
        # facenet's fixed_image_standardization, (x*255 - 127.5) / 128, written for [-1, 1].
        return x * (127.5 / 128.0)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x))  # already L2-normalised

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(self.embed(a), self.embed(b), dim=1)


__all__ = ["mse", "psnr", "summarize", "alexnet_to_lpips", "LPIPSMetric", "IDSimilarity",
           "FACE_CROP", "FACENET_SIZE", "LPIPS_SIZE"]
