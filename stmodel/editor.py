"""Reference-based attribute editor (official `EditTransformerEncoder`) and its checkpoint.

One post-norm transformer decoder layer: the source W+ tokens are the queries, the reference
W+ tokens the keys and values, the output is the edited code w_e. One editor is trained per
attribute against a frozen latent classifier (`editor_loss`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, load_bytes, load_strict, read_bytes, strip_prefix
from .classifier import PREFIX as CLS_PREFIX
from .classifier import LatentClassifier, classifier_from_state
from .transformer import TransformerDecoderLayer

ENC_PREFIX = "encoder.module."
DEC_PREFIX = "decoder.module."


def query_normalised_attention(mha: nn.MultiheadAttention, query: torch.Tensor, memory: torch.Tensor,
                               training: bool = False) -> torch.Tensor:
    """Cross-attention with the paper's normalisation, using `mha`'s own packed weights.

    Our reading of "normalise the query and re-normalise the key": the softmax runs over the
    query (source token) axis, so each reference token hands its value to the few source tokens
    that match it best; each source token's weights are then divided by their sum over the keys
    so its update is a weighted mean of reference values. The released code does not do this
    (it uses plain `nn.MultiheadAttention`); it adds no parameters, so the key layout is the same.
    """
    b, q_len, d = query.shape
    t_len, h = memory.shape[1], mha.num_heads
    dh = d // h
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).view(b, q_len, h, dh).transpose(1, 2)
    k = F.linear(memory, w_k, b_k).view(b, t_len, h, dh).transpose(1, 2)
    v = F.linear(memory, w_v, b_v).view(b, t_len, h, dh).transpose(1, 2)
    attn = (q @ k.transpose(-1, -2) / math.sqrt(dh)).softmax(dim=-2)
    attn = attn / (attn.sum(dim=-1, keepdim=True) + 1e-8)
    attn = F.dropout(attn, mha.dropout, training)
    out = (attn @ v).transpose(1, 2).reshape(b, q_len, d)
    return mha.out_proj(out)


class EditTransformer(nn.Module):
    def __init__(self, style_dim: int = 512, n_heads: int = 4, ff_dim: int = 1024,
                 dropout: float = 0.1, query_norm: bool = False):
        super().__init__()
        self.transformerlayer = TransformerDecoderLayer(style_dim, n_heads, ff_dim, dropout)
        self.style_dim, self.n_heads, self.ff_dim, self.dropout = style_dim, n_heads, ff_dim, dropout
        self.query_norm = query_norm

    def forward(self, w_s: torch.Tensor, w_r: torch.Tensor) -> torch.Tensor:
        """w_s, w_r `[B, n_latent, D]` (a batch of 1 broadcasts) -> w_e `[B, n_latent, D]`."""
        if w_s.shape[0] != w_r.shape[0]:
            bsz = max(w_s.shape[0], w_r.shape[0])
            w_s, w_r = w_s.expand(bsz, -1, -1), w_r.expand(bsz, -1, -1)
        layer = self.transformerlayer
        if not self.query_norm:
            return layer(w_s, w_r)
        # Same post-norm block as TransformerDecoderLayer, with the cross-attention swapped.
        p, tr = layer.dropout if self.training else 0.0, self.training
        x = layer.norm1(w_s + F.dropout(layer.self_attn(w_s, w_s, w_s, need_weights=False)[0], p, tr))
        x = layer.norm2(x + F.dropout(query_normalised_attention(layer.multihead_attn, x, w_r, tr), p, tr))
        ff = layer.linear2(F.dropout(F.relu(layer.linear1(x)), p, tr))
        return layer.norm3(x + F.dropout(ff, p, tr))

    def config(self) -> dict:
        return {"style_dim": self.style_dim, "n_heads": self.n_heads, "ff_dim": self.ff_dim,
                "dropout": self.dropout, "query_norm": self.query_norm}


def editor_loss(w_s: torch.Tensor, w_r: torch.Tensor, w_e: torch.Tensor, classifier: LatentClassifier,
                k: int | str, weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`l2 * MSE(w_s, w_e) + ref * MSE(emb_k(w_e), emb_k(w_r)) + src * MSE(emb_notk(w_e), emb_notk(w_s))`.

    The classifier should be frozen by the caller (requires_grad False, eval); gradients reach
    w_e through it. Returns the total and the detached parts."""
    k = classifier.attribute_index(k)
    l2_w, ref_w, src_w = weights
    _, emb_e = classifier(w_e)
    with torch.no_grad():
        _, emb_s = classifier(w_s)
        _, emb_r = classifier(w_r)
    others = torch.ones(emb_e.shape[1], dtype=torch.bool, device=emb_e.device)
    others[k] = False
    l2 = F.mse_loss(w_e, w_s)
    ref = F.mse_loss(emb_e[:, k], emb_r[:, k])
    src = F.mse_loss(emb_e[:, others], emb_s[:, others])
    total = l2_w * l2 + ref_w * ref + src_w * src
    return total, {"l2": l2.detach(), "ref": ref.detach(), "src": src.detach(), "total": total.detach()}


def editor_state(editor: EditTransformer, classifier: LatentClassifier | None,
                 decoder_state: dict | nn.Module | None = None, opts: dict | None = None) -> dict:
    """The official edit checkpoint layout: `{'state_dict': {encoder.module.transformerlayer.*,
    decoder.module.* (only when given), classifier.module.*}, 'opts': {...}}`."""
    sd = {ENC_PREFIX + k: v.detach().cpu() for k, v in editor.state_dict().items()}
    if decoder_state is not None:
        dec = decoder_state.state_dict() if isinstance(decoder_state, nn.Module) else decoder_state
        sd.update({DEC_PREFIX + k: v.detach().cpu() for k, v in dec.items()})
    o: dict = {"editor": editor.config()}
    if classifier is not None:
        sd.update({CLS_PREFIX + k: v.detach().cpu() for k, v in classifier.state_dict().items()})
        o["classifier"] = classifier.config()
    o.update(opts or {})
    return {"state_dict": sd, "opts": o}


def load_editor(src: str | dict, *, sha256: str | None = None, query_norm: bool | None = None
                ) -> tuple[EditTransformer, LatentClassifier | None, dict]:
    """Load an edit checkpoint (official or ours) from a path/URI or a loaded dict. Returns
    (editor in eval mode, classifier or None when the file has none, opts). `decoder.module.*`
    keys are left to the caller (e.g. the inversion generator is usually the same)."""
    source = src if isinstance(src, str) else "<dict>"
    obj = load_bytes(read_bytes(src, sha256)[0], src) if isinstance(src, str) else src
    if not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{source}: no 'state_dict' in the edit checkpoint")
    sd, opts = obj["state_dict"], dict(obj.get("opts") or {})
    enc = strip_prefix(sd, ENC_PREFIX)
    if "transformerlayer.norm1.weight" not in enc or "transformerlayer.linear1.weight" not in enc:
        raise CheckpointError(f"{source}: no editor keys ({ENC_PREFIX}transformerlayer.*); "
                              "is this an inversion checkpoint?")
    ours_opts = opts.get("editor")
    ours: dict = ours_opts if isinstance(ours_opts, dict) else {}
    d = int(enc["transformerlayer.norm1.weight"].shape[0])
    ff = int(enc["transformerlayer.linear1.weight"].shape[0])
    qn = ours.get("query_norm", False) if query_norm is None else query_norm
    # Head count is not visible in the shapes; the official editor uses 4.
    editor = EditTransformer(d, int(ours.get("n_heads", 4)), ff, float(ours.get("dropout", 0.1)), bool(qn))
    load_strict(editor, enc, f"{source} (editor)")
    cls_sd = strip_prefix(sd, CLS_PREFIX)
    classifier = classifier_from_state(cls_sd, opts, source) if cls_sd else None
    return editor.eval(), classifier, opts


__all__ = ["EditTransformer", "editor_loss", "editor_state", "load_editor", "query_normalised_attention"]
