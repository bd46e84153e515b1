"""Latent attribute classifier on W+ codes, in the official `LCNet_40` key layout.

Flattened W+ -> Linear -> LeakyReLU(0.2) -> Linear -> LeakyReLU(0.2) -> per attribute k an
embedding `indep_fcs.k` (512 -> 32) and a logit `output_fcs.k` (32 -> 1). The embeddings are
what the reference-based editor's loss compares, the logits what label editing differentiates.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, load_bytes, load_strict, read_bytes, strip_prefix

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)
PREFIX = "classifier.module."


class LatentClassifier(nn.Module):
    def __init__(self, n_latent: int = 18, style_dim: int = 512, n_attributes: int = 40,
                 hidden: Sequence[int] = (2048, 512), emb_dim: int = 32,
                 attributes: Sequence[str] | None = None):
        super().__init__()
        if attributes is None:
            attributes = CELEBA_ATTRIBUTES if n_attributes == 40 else [f"attr_{i}" for i in range(n_attributes)]
        if len(attributes) != n_attributes:
            raise ValueError(f"{len(attributes)} attribute names for {n_attributes} attributes")
        self.n_latent, self.style_dim, self.emb_dim = n_latent, style_dim, emb_dim
        self.hidden = tuple(int(h) for h in hidden)
        self.attributes = list(attributes)
        dims = [n_latent * style_dim, *self.hidden]
        self.fcs = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.indep_fcs = nn.ModuleList(nn.Linear(dims[-1], emb_dim) for _ in attributes)
        self.output_fcs = nn.ModuleList(nn.Linear(emb_dim, 1) for _ in attributes)

    @property
    def n_attributes(self) -> int:
        return len(self.attributes)

    def attribute_index(self, k: int | str) -> int:
        if isinstance(k, str):
            try:
                return self.attributes.index(k)
            except ValueError:
                raise ValueError(f"unknown attribute {k!r}; known: {', '.join(self.attributes)}") from None
        if not 0 <= int(k) < self.n_attributes:
            raise ValueError(f"attribute index {k} out of range [0, {self.n_attributes})")
        return int(k)

    def forward(self, w_plus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w_plus `[B, n_latent, D]` -> (logits `[B, K]`, embeddings `[B, K, emb_dim]`)."""
        x = w_plus.reshape(w_plus.shape[0], -1)
        for fc in self.fcs:
            x = F.leaky_relu(fc(x), 0.2)
        emb = torch.stack([fc(x) for fc in self.indep_fcs], dim=1)
        logits = torch.cat([fc(emb[:, i]) for i, fc in enumerate(self.output_fcs)], dim=1)
        return logits, emb

    def config(self) -> dict:
        return {"n_latent": self.n_latent, "style_dim": self.style_dim, "hidden": list(self.hidden),
                "emb_dim": self.emb_dim, "attributes": list(self.attributes)}


def classifier_state(model: LatentClassifier, attributes: Sequence[str] | None = None) -> dict:
    """`{'state_dict': {classifier.module.*}, 'opts': {'classifier': dims + attribute names}}`:
    the keys of the official edit checkpoint, plus our dims so a reload needs no guessing."""
    cfg = model.config()
    if attributes is not None:
        if len(attributes) != model.n_attributes:
            raise ValueError(f"{len(attributes)} attribute names for {model.n_attributes} attributes")
        cfg["attributes"] = list(attributes)
    sd = {PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"state_dict": sd, "opts": {"classifier": cfg}}


def _count(sd: dict, stem: str) -> int:
    n = 0
    while f"{stem}.{n}.weight" in sd:
        n += 1
    return n


def classifier_from_state(sd: dict, opts: dict | None = None, source: str = "<classifier>",
                          n_latent: int | None = None, style_dim: int | None = None) -> LatentClassifier:
    """Build and strictly load a classifier from bare `fcs.*` keys; dims from the shapes, the
    W+ split from (in order) the arguments, our opts, the official `output_size`, or D = 512."""
    opts = dict(opts or {})
    ours_opts = opts.get("classifier")
    ours: dict = ours_opts if isinstance(ours_opts, dict) else {}
    n_fc, k = _count(sd, "fcs"), _count(sd, "indep_fcs")
    if n_fc == 0 or k == 0:
        raise CheckpointError(f"{source}: no classifier keys (expected fcs.0.weight, indep_fcs.0.weight)")
    in_dim = int(sd["fcs.0.weight"].shape[1])
    hidden = [int(sd[f"fcs.{i}.weight"].shape[0]) for i in range(n_fc)]
    emb_dim = int(sd["indep_fcs.0.weight"].shape[0])
    n_latent = n_latent or ours.get("n_latent")
    style_dim = style_dim or ours.get("style_dim")
    if not n_latent and not style_dim and opts.get("output_size"):
        n_latent = 2 * int(math.log2(int(opts["output_size"]))) - 2
    if not n_latent:
        style_dim = style_dim or 512  # the official W space
        n_latent = in_dim // style_dim
    elif not style_dim:
        style_dim = in_dim // n_latent
    if n_latent * style_dim != in_dim:
        raise CheckpointError(f"{source}: fcs.0 takes {in_dim} inputs, not n_latent {n_latent} x style_dim {style_dim}")
    names = ours.get("attributes")
    if not names or len(names) != k:
        names = None
    model = LatentClassifier(n_latent, style_dim, k, hidden, emb_dim, names)
    load_strict(model, sd, f"{source} (classifier)")
    return model.eval()


def load_classifier(src: str | dict, *, sha256: str | None = None, n_latent: int | None = None,
                    style_dim: int | None = None) -> LatentClassifier:
    """Load from a path/URI or an already-loaded dict. Accepts our files, an official edit
    checkpoint (`classifier.module.*` keys, the rest ignored), the official classifier file
    (`{'state_dict': {fcs.0.weight, ...}}`) and a bare state_dict."""
    source = src if isinstance(src, str) else "<dict>"
    obj = load_bytes(read_bytes(src, sha256)[0], src) if isinstance(src, str) else src
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    opts = obj.get("opts") if isinstance(obj.get("opts"), dict) else {}
    if any(k.startswith(PREFIX) for k in sd):
        sd = strip_prefix(sd, PREFIX)
    return classifier_from_state(sd, opts, source, n_latent, style_dim)


__all__ = ["CELEBA_ATTRIBUTES", "LatentClassifier", "classifier_state", "classifier_from_state",
           "load_classifier"]
