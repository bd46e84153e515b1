"""The post-norm (DETR-style) transformer decoder layer shared by the encoder and the editor."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TransformerDecoderLayer(nn.Module):
    """Self-attention over the queries, cross-attention to `memory`, feed-forward; each followed
    by add & LayerNorm. Batch-first tensors; parameter names match the official checkpoints
    (`self_attn`, `multihead_attn`, `linear1/2`, `norm1/2/3`)."""

    def __init__(self, d_model: int = 512, n_heads: int = 4, ff_dim: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, ff_dim)
        self.linear2 = nn.Linear(ff_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = dropout

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """query `[B, Q, D]`, memory `[B, T, D]` -> `[B, Q, D]`."""
        p = self.dropout if self.training else 0.0
        x = self.norm1(query + F.dropout(self.self_attn(query, query, query, need_weights=False)[0], p, self.training))
        x = self.norm2(x + F.dropout(self.multihead_attn(x, memory, memory, need_weights=False)[0], p, self.training))
        ff = self.linear2(F.dropout(F.relu(self.linear1(x)), p, self.training))
        return self.norm3(x + F.dropout(ff, p, self.training))
