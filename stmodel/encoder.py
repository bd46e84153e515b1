"""Style Transformer encoder: IR-SE50 backbone, a feature pyramid, and three transformer
decoder layers that turn W-space queries into W+ codes (Hu et al., CVPR 2022)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .transformer import TransformerDecoderLayer


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class Subsample(nn.Module):
    """`MaxPool2d(1, stride)` of the reference, as the strided view it is (no keys either way);
    the pooling kernel costs ~7 % of the encoder under bf16 autocast on a CPU."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.stride == 1 else x[:, :, ::self.stride, ::self.stride]


class BottleneckIRSE(nn.Module):
    """Improved-residual unit with squeeze-excitation; shortcut is a strided subsample
    (no parameters) when the shape is kept, else conv1x1 + BN."""

    def __init__(self, in_channel: int, depth: int, stride: int, se_reduction: int):
        super().__init__()
        self.shortcut_layer: nn.Module
        if in_channel == depth:
            self.shortcut_layer = Subsample(stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, se_reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class StyleTransformerEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.stage_widths
        self.input_layer = nn.Sequential(nn.Conv2d(cfg.input_nc, w[0], 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(w[0]), nn.PReLU(w[0]))
        units, in_ch = [], w[0]
        for depth, n in zip(w, cfg.stage_units):
            units.append(BottleneckIRSE(in_ch, depth, 2, cfg.se_reduction))
            units += [BottleneckIRSE(depth, depth, 1, cfg.se_reduction) for _ in range(n - 1)]
            in_ch = depth
        self.body = nn.Sequential(*units)
        ends = [sum(cfg.stage_units[: i + 1]) - 1 for i in range(4)]
        self.taps = (ends[1], ends[2], ends[3])  # (6, 20, 23) for IR-SE50
        d = cfg.style_dim
        self.latlayer1 = nn.Conv2d(w[2], d, 1)
        self.latlayer2 = nn.Conv2d(w[1], d, 1)
        self.transformerlayer_coarse = TransformerDecoderLayer(d, cfg.n_heads, cfg.ff_dim)
        self.transformerlayer_medium = TransformerDecoderLayer(d, cfg.n_heads, cfg.ff_dim)
        self.transformerlayer_fine = TransformerDecoderLayer(d, cfg.n_heads, cfg.ff_dim)
        self.z = nn.Parameter(torch.randn(1, cfg.n_queries, d))

    @staticmethod
    def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """images `[B, 3, H, W]` in [-1, 1], W-space queries `[B, Q, D]` -> codes `[B, Q, D]`
        (before `latent_avg` is added)."""
        x = self.input_layer(x)
        c1 = c2 = c3 = None
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i == self.taps[0]:
                c1 = x
            elif i == self.taps[1]:
                c2 = x
            if i == self.taps[2]:
                c3 = x
        if c1 is None or c2 is None or c3 is None:
            raise RuntimeError(f"encoder body of {len(self.body)} units never reached the taps {self.taps}")
        p2 = self._upsample_add(c3, self.latlayer1(c2))
        p1 = self._upsample_add(p2, self.latlayer2(c1))
        tokens = [t.flatten(2).transpose(1, 2) for t in (c3, p2, p1)]  # [B, HW, D]
        q = self.transformerlayer_coarse(query, tokens[0])
        q = self.transformerlayer_medium(q, tokens[1])
        return self.transformerlayer_fine(q, tokens[2])
