"""The inversion model: encoder (images -> W+) and generator (W+ -> images), kept apart so a
batch job can run the encoder alone.

`StyleTransformer(cfg, generator=False)` builds the encoder and, of the generator, only its
mapping net (`decoder.style`, through which the encoder's queries go): what `invert` needs,
without the synthesis network's weights (at 1024: ~28 M parameters, most of the model's build
time and memory). Its mapping weights are those of the full model built from the same seed.
`reconstruct` then raises."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .encoder import StyleTransformerEncoder
from .stylegan2 import EqualLinear, Generator, PixelNorm


class MappingNet(nn.Module):
    """The generator's mapping net alone, under the same key (`style`): built exactly as
    `Generator.__init__` builds it first, so a seeded model draws the same weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.style_dim = cfg.style_dim
        self.style = nn.Sequential(PixelNorm(), *[
            EqualLinear(cfg.style_dim, cfg.style_dim, lr_mul=cfg.lr_mlp, activation="fused_lrelu")
            for _ in range(cfg.n_mlp)])


class StyleTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, generator: bool = True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # NHWC weights and activations: oneDNN and cuDNN run the backbone's convs faster so
        # (about 1.5x at batch 4 on a CPU); loading a state_dict keeps this layout.
        self.encoder = StyleTransformerEncoder(cfg).to(memory_format=torch.channels_last)
        self.has_generator = bool(generator)
        self.decoder = Generator(cfg) if generator else MappingNet(cfg)
        # Not a state_dict entry: the official file stores it beside `state_dict`.
        self.latent_avg: torch.Tensor
        self.register_buffer("latent_avg", torch.zeros(cfg.n_queries, cfg.style_dim), persistent=False)
        # Rows of `latent_avg` the loaded checkpoint held (written back on save).
        self.latent_avg_rows: int = cfg.n_queries

    @property
    def n_latent(self) -> int:
        return self.cfg.n_latent

    def queries(self, batch: int) -> torch.Tensor:
        """The learnable `z` tokens mapped to W one token at a time by the checkpoint's own mapping net."""
        z = self.encoder.z
        q, d = z.shape[1], z.shape[2]
        return self.decoder.style(z.expand(batch, q, d).reshape(batch * q, d)).view(batch, q, d)

    # Inference on a CPU runs a batch one image at a time: each image's activations then stay in
    # cache (at 1024, batch 8 ran the encoder at 80% of the matmul peak, 1 at a time at 88%).
    # GPUs, and training (batch statistics), take the whole batch.
    cpu_micro_batch: int = 1

    weights_dtype: torch.dtype | None = None

    def cast_encoder_weights(self, dtype: torch.dtype | None) -> None:
        """Hold the encoder's conv / linear weights in the autocast dtype (bf16 / fp16) for
        inference. Autocast casts fp32 weights again on every call (it caches only tensors that
        require grad): ~5 % of bf16 encoder time on a CPU. Norms and biases stay fp32, and
        `invert` then always runs under autocast with this dtype. `None` casts back to fp32
        (the values keep their rounding)."""
        target = dtype or torch.float32
        for m in self.encoder.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.data = m.weight.data.to(target)
            elif isinstance(m, nn.MultiheadAttention):
                m.in_proj_weight.data = m.in_proj_weight.data.to(target)
        self.weights_dtype = dtype

    def _chunks(self, x: torch.Tensor):
        n = self.cpu_micro_batch
        if x.device.type != "cpu" or self.training or torch.is_grad_enabled() or not n or x.shape[0] <= n:
            return None
        return x.split(n)

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """images `[B, 3, input_size, input_size]` in [-1, 1] -> W+ `[B, n_latent, style_dim]`.

        Runs the encoder only. The encoder emits `n_queries` codes (18 even for cars-512);
        the generator reads the first `n_latent`, so only those are returned.
        """
        chunks = self._chunks(images)
        if chunks is not None:
            return torch.cat([self.invert(c) for c in chunks])
        if images.shape[-1] != self.cfg.input_size or images.shape[-2] != self.cfg.input_size:
            images = F.interpolate(images, size=(self.cfg.input_size,) * 2, mode="bilinear",
                                   align_corners=False, antialias=True)
        images = images.contiguous(memory_format=torch.channels_last)
        dev = images.device.type
        cast = self.weights_dtype is not None and not torch.is_autocast_enabled(dev)
        with torch.autocast(dev, dtype=self.weights_dtype) if cast else nullcontext():
            return self._encode(images)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        # Under autocast the queries (18 tokens through the mapping net) and the final offset stay
        # in fp32: cheap, and bf16 rounding of |W+| ~ 4 codes alone would cost ~0.02.
        with torch.autocast(images.device.type, enabled=False):
            q = self.queries(images.shape[0])
        codes = self.encoder(images, q)
        n = self.n_latent
        return codes[:, :n].float() + self.latent_avg[:n]

    def reconstruct(self, w_plus: torch.Tensor, resize: bool = True, randomize_noise: bool = False) -> torch.Tensor:
        """W+ -> images in [-1, 1]; `resize` pools to `cfg.pool_size` as the official inference does."""
        if not self.has_generator:
            raise RuntimeError("this model was built without its generator (generator=False): it can invert, "
                               "not reconstruct")
        chunks = self._chunks(w_plus)
        if chunks is not None:
            return torch.cat([self.reconstruct(c, resize, randomize_noise) for c in chunks])
        img = self.decoder(w_plus, randomize_noise=randomize_noise)
        if resize and img.shape[-1] != self.cfg.pool_size:
            img = F.adaptive_avg_pool2d(img, self.cfg.pool_size)
        return img

    def forward(self, images: torch.Tensor, resize: bool = True, randomize_noise: bool = False):
        w = self.invert(images)
        return self.reconstruct(w, resize=resize, randomize_noise=randomize_noise), w
