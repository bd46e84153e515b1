"""StyleGAN2 generator in rosinality's module and key layout, pure PyTorch.

No compiled extension: upfirdn2d is zero-insertion plus a depthwise convolution, the fused
leaky ReLU is a bias add and a scaled `leaky_relu`. The modulated convolution folds
style, demodulation, the activation gain and bias into one grouped convolution (the
reference's formulation), so the only full-resolution passes left per layer are the conv,
the blur after an upsampling conv, one noise add and one in-place leaky ReLU.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

SQRT2 = math.sqrt(2.0)


def make_kernel(k: list[int]) -> torch.Tensor:
    t = torch.tensor(k, dtype=torch.float32)
    if t.ndim == 1:
        t = t[None, :] * t[:, None]
    return t / t.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0), bias: torch.Tensor | None = None) -> torch.Tensor:
    """Upsample by zero insertion, pad, FIR-filter (true convolution), downsample; an optional
    per-channel bias is added by the same depthwise conv."""
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    p0, p1 = pad
    if up > 1 and down == 1 and kh == kw and p0 - p1 == up - 1 and 0 <= kh - 1 - p0:
        # Zero insertion + FIR == a depthwise transposed conv with stride `up` (no zeros stored).
        weight = kernel.to(x.dtype).view(1, 1, kh, kw).expand(c, 1, kh, kw).contiguous()
        return F.conv_transpose2d(x, weight, bias=None if bias is None else bias.to(x.dtype),
                                  stride=up, padding=kh - 1 - p0, groups=c)
    if up > 1:
        z = x.new_zeros(b, c, h, up, w, up)
        z[:, :, :, 0, :, 0] = x
        x = z.view(b, c, h * up, w * up)
    conv_pad = 0
    if p0 == p1 >= 0:
        conv_pad = p0  # the conv pads itself: no padded copy, NHWC strides kept
    else:
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        x = F.pad(x, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
        if p0 < 0 or p1 < 0:
            x = x[:, :, max(-p0, 0): x.shape[2] - max(-p1, 0), max(-p0, 0): x.shape[3] - max(-p1, 0)]
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.flip(kernel, [0, 1]).to(x.dtype).view(1, 1, kh, kw).expand(c, 1, kh, kw).contiguous()
    return F.conv2d(x, weight, bias=None if bias is None else bias.to(x.dtype), stride=down,
                    padding=conv_pad, groups=c)


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2,
                     scale: float = SQRT2) -> torch.Tensor:
    shape = [1, bias.shape[0]] + [1] * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape), negative_slope) * scale


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class Upsample(nn.Module):
    def __init__(self, kernel: list[int], factor: int = 2):
        super().__init__()
        self.factor = factor
        self.kernel: torch.Tensor
        self.register_buffer("kernel", make_kernel(kernel) * factor ** 2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class Blur(nn.Module):
    def __init__(self, kernel: list[int], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        k = make_kernel(kernel)
        if upsample_factor > 1:
            k = k * upsample_factor ** 2
        self.kernel: torch.Tensor
        self.register_buffer("kernel", k)
        self.pad = pad

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad, bias=bias)


class EqualLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.activation = activation
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            out = F.linear(x, self.weight * self.scale)
            return fused_leaky_relu(out, bias) if bias is not None else F.leaky_relu(out, 0.2) * SQRT2
        return F.linear(x, self.weight * self.scale, bias)


class ModulatedConv2d(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(list(blur_kernel), pad=((p + 1) // 2 + factor - 1, p // 2 + 1),
                             upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)

    def forward(self, x: torch.Tensor, style: torch.Tensor, bias: torch.Tensor | None = None,
                gain: float = 1.0) -> torch.Tensor:
        """`gain * modulated_conv(x) + bias`, with bias and gain riding on the conv or blur."""
        b, cin = x.shape[:2]
        s = self.modulation(style)  # [B, in]
        w = (self.scale * gain) * self.weight[0]  # [out, in, k, k]
        demod = None
        if self.demodulate:  # sum over (in, k, k) of (w * s)^2 == (s^2) @ sum_k(w^2)^T
            demod = torch.rsqrt(s.pow(2) @ (self.scale * self.weight[0]).pow(2).sum([2, 3]).t() + 1e-8)
        if b > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return self._scaled_input(x, s, w, demod, bias)
        return self._grouped(x, s, w, demod, bias)

    def _grouped(self, x, s, w, demod, bias):
        """Style and demodulation folded into per-sample weights: one grouped conv (the
        reference formulation; a plain conv at batch 1)."""
        b, cin, h, wd = x.shape
        weight = w.unsqueeze(0) * s.view(b, 1, cin, 1, 1)
        if demod is not None:
            weight = weight * demod.view(b, self.out_channel, 1, 1, 1)
        weight = weight.to(x.dtype)
        k = self.kernel_size
        if b > 1:  # at batch 1 keep x as is: a reshape would lose its NHWC strides
            x = x.reshape(1, b * cin, h, wd)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(b * cin, self.out_channel, k, k)
            out = F.conv_transpose2d(x, weight, stride=2, groups=b)
            if b > 1:
                out = out.view(b, self.out_channel, out.shape[2], out.shape[3])
            return self.blur(out, bias)
        bias = None if bias is None else bias.to(x.dtype).repeat(b)
        out = F.conv2d(x, weight.reshape(b * self.out_channel, cin, k, k), bias=bias,
                       padding=self.padding, groups=b)
        return out.view(b, self.out_channel, out.shape[2], out.shape[3]) if b > 1 else out

    def _scaled_input(self, x, s, w, demod, bias):
        """Batched channels-last form: scale the input by the style, one shared-weight conv,
        then demodulate per output channel (same linear map, no per-sample weights)."""
        b = x.shape[0]
        x = x * s.view(b, -1, 1, 1).to(x.dtype)
        w = w.to(x.dtype)
        if self.upsample:
            out = self.blur(F.conv_transpose2d(x, w.transpose(0, 1), stride=2))
        else:
            out = F.conv2d(x, w, padding=self.padding)
        if demod is None and bias is None:
            return out
        scale = demod.view(b, -1, 1, 1).to(out.dtype) if demod is not None else None
        if bias is None:
            return out.mul_(scale) if not torch.is_grad_enabled() else out * scale
        bias = bias.view(1, -1, 1, 1).to(out.dtype)
        return torch.addcmul(bias, out, scale) if scale is not None else out + bias


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image: torch.Tensor, noise: torch.Tensor | None = None, gain: float = 1.0) -> torch.Tensor:
        if noise is None:
            b, _, h, w = image.shape
            noise = image.new_empty(b, 1, h, w).normal_()
        term = (self.weight * gain).to(image.dtype) * noise.to(image.dtype)
        if torch.is_grad_enabled():
            return image + term
        return image.add_(term)  # inference: no new full-size tensor


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim,
                                    upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x, style, noise=None):
        # leaky(z) * sqrt2 == leaky(sqrt2 * z): the gain and the activation bias are folded into
        # the conv, leaving one noise add and one in-place activation per layer.
        out = self.conv(x, style, bias=self.activate.bias * SQRT2, gain=SQRT2)
        out = self.noise(out, noise, gain=SQRT2)
        return F.leaky_relu(out, 0.2) if torch.is_grad_enabled() else F.leaky_relu_(out, 0.2)


class ToRGB(nn.Module):
    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(list(blur_kernel))
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style, bias=self.bias.view(3))
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class Generator(nn.Module):
    """Synthesis from W+ (`[B, n_latent, style_dim]`), or from z through the mapping net."""

    def __init__(self, cfg: ModelConfig, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.cfg = cfg
        self.size, self.style_dim = cfg.size, cfg.style_dim
        self.style = nn.Sequential(PixelNorm(), *[
            EqualLinear(cfg.style_dim, cfg.style_dim, lr_mul=cfg.lr_mlp, activation="fused_lrelu")
            for _ in range(cfg.n_mlp)])
        ch = cfg.channels
        self.input = ConstantInput(ch(4))
        self.conv1 = StyledConv(ch(4), ch(4), 3, cfg.style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(ch(4), cfg.style_dim, upsample=False)
        self.log_size, self.num_layers, self.n_latent = cfg.log_size, cfg.num_layers, cfg.n_latent
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        self.noises = nn.Module()
        for i in range(self.num_layers):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, res, res))
        in_ch = ch(4)
        for i in range(3, self.log_size + 1):
            out_ch = ch(2 ** i)
            self.convs.append(StyledConv(in_ch, out_ch, 3, cfg.style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_ch, out_ch, 3, cfg.style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_ch, cfg.style_dim, blur_kernel=blur_kernel))
            in_ch = out_ch

    @torch.no_grad()
    def mean_latent(self, n: int = 100_000, seed: int = 0, chunk: int = 10_000) -> torch.Tensor:
        """Mean of the mapping net over `n` seeded z samples: `[style_dim]`."""
        g = torch.Generator().manual_seed(seed)
        dev = self.input.input.device
        total = torch.zeros(self.style_dim, dtype=torch.float64, device=dev)
        for start in range(0, n, chunk):
            z = torch.randn(min(chunk, n - start), self.style_dim, generator=g).to(dev)
            total += self.style(z).double().sum(0)
        return (total / n).float()

    def fixed_noise(self) -> list[torch.Tensor]:
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def forward(self, w_plus: torch.Tensor, randomize_noise: bool = False,
                noise: Sequence[torch.Tensor | None] | None = None, truncation: float = 1.0,
                truncation_latent: torch.Tensor | None = None, channels_last: bool = True) -> torch.Tensor:
        """W+ `[B, >= n_latent, D]` (or W `[B, D]`, broadcast to every layer) -> image `[B, 3, size, size]`.

        Codes beyond `n_latent` are ignored, as in the reference (cars-512 reads 16 of 18).
        `channels_last` (default) runs the convolutions in NHWC, which oneDNN and cuDNN run
        faster for the depthwise blurs and the narrow high-resolution layers.
        """
        if w_plus.ndim == 2:
            w_plus = w_plus.unsqueeze(1).expand(-1, self.n_latent, -1)
        if truncation < 1.0:
            if truncation_latent is None:
                raise ValueError("truncation < 1 needs truncation_latent")
            w_plus = truncation_latent + truncation * (w_plus - truncation_latent)
        if noise is None:
            noise = [None] * self.num_layers if randomize_noise else self.fixed_noise()
        latent = w_plus
        out = self.input(latent.shape[0]).to(latent.dtype)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        out = self.conv1(out, latent[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv1, conv2, n1, n2, to_rgb in zip(self.convs[::2], self.convs[1::2], noise[1::2],
                                                noise[2::2], self.to_rgbs):
            out = conv1(out, latent[:, i], noise=n1)
            out = conv2(out, latent[:, i + 1], noise=n2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip
