"""The inversion model: encoder (images -> W+) and generator (W+ -> images), kept apart so a
batch job can run the encoder alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .encoder import StyleTransformerEncoder
from .stylegan2 import Generator


class StyleTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # NHWC weights and activations: oneDNN and cuDNN run the backbone's convs faster so
        # (about 1.5x at batch 4 on a CPU); loading a state_dict keeps this layout.
        self.encoder = StyleTransformerEncoder(cfg).to(memory_format=torch.channels_last)
        self.decoder = Generator(cfg)
        # Not a state_dict entry: the official file stores it beside `state_dict`.
        self.register_buffer("latent_avg", torch.zeros(cfg.n_queries, cfg.style_dim), persistent=False)

    @property
    def n_latent(self) -> int:
        return self.cfg.n_latent

    def queries(self, batch: int) -> torch.Tensor:
        """The learnable `z` tokens mapped to W one token at a time by the checkpoint's own mapping net."""
        z = self.encoder.z
        q, d = z.shape[1], z.shape[2]
        return self.decoder.style(z.expand(batch, q, d).reshape(batch * q, d)).view(batch, q, d)

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """images `[B, 3, input_size, input_size]` in [-1, 1] -> W+ `[B, n_latent, style_dim]`.

        Runs the encoder only. The encoder emits `n_queries` codes (18 even for cars-512);
        the generator reads the first `n_latent`, so only those are returned.
        """
        if images.shape[-1] != self.cfg.input_size or images.shape[-2] != self.cfg.input_size:
            images = F.interpolate(images, size=(self.cfg.input_size,) * 2, mode="bilinear",
                                   align_corners=False, antialias=True)
        images = images.contiguous(memory_format=torch.channels_last)
        codes = self.encoder(images, self.queries(images.shape[0]))
        n = self.n_latent
        return codes[:, :n] + self.latent_avg[:n].to(codes.dtype)

    def reconstruct(self, w_plus: torch.Tensor, resize: bool = True, randomize_noise: bool = False) -> torch.Tensor:
        """W+ -> images in [-1, 1]; `resize` pools to `cfg.pool_size` as the official inference does."""
        img = self.decoder(w_plus, randomize_noise=randomize_noise)
        if resize and img.shape[-1] != self.cfg.pool_size:
            img = F.adaptive_avg_pool2d(img, self.cfg.pool_size)
        return img

    def forward(self, images: torch.Tensor, resize: bool = True, randomize_noise: bool = False):
        w = self.invert(images)
        return self.reconstruct(w, resize=resize, randomize_noise=randomize_noise), w
